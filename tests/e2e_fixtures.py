"""Fixtures for the end-to-end tests; load with ``pytest_plugins = ["tests.e2e_fixtures"]``.

Every process a fixture starts is stopped, by its PID, in the fixture's finaliser.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import (
    FRONTDOOR_NAMES,
    NAMES,
    AdminKeys,
    BackendServer,
    HAProxy,
    Relay,
    TestCA,
)
from tests.gateway_world import GatewayProcess, GatewayWorld
from tests.registry_world import (
    IMAGE_REPOSITORY,
    OTHER_REPOSITORY,
    LocalImage,
    RegistryWorld,
    build_oci_image,
    layer_bytes_from_env,
)


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"), NAMES)


@pytest.fixture(scope="session")
def backend(test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    server = BackendServer(test_ca, tmp_path_factory.mktemp("backend-home"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def frontdoor_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A CA with a certificate for each of ``FRONTDOOR_NAMES``."""
    return TestCA(tmp_path_factory.mktemp("frontdoor-ca"), FRONTDOOR_NAMES)


@pytest.fixture(scope="session")
def frontdoor_backend(
    frontdoor_ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackendServer]:
    """The TLS-or-plain backend, one port per front-door name; it reports what it accepted."""
    server = BackendServer(frontdoor_ca, tmp_path_factory.mktemp("frontdoor-backend-home"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[Callable[[str, list[int]], HAProxy]]:
    """A factory: ``start_haproxy(config, ports)`` -> a running :class:`HAProxy`."""
    started: list[HAProxy] = []

    def start(config: str, ports: list[int]) -> HAProxy:
        process = HAProxy(tmp_path / f"haproxy{len(started)}", config, ports)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """A factory: ``start_relay(routes, **options)`` -> a running :class:`Relay`.

    ``options`` are :class:`Relay`'s: ``[relay]`` settings, ``listeners``, ``hosts``, ``nofile``.
    """
    started: list[Relay] = []

    def start(routes: Mapping[str, Any], **options: Any) -> Relay:
        relay_process = Relay(tmp_path / f"relay{len(started)}", routes, **options)
        started.append(relay_process)
        return relay_process

    try:
        yield start
    finally:
        for relay_process in started:
            relay_process.stop()


@pytest.fixture
def relay(backend: BackendServer, start_relay: Callable[..., Relay]) -> Relay:
    """A relay with a route to each backend name, default settings."""
    return start_relay({name: backend.backend(name) for name in NAMES})


@pytest.fixture
def admin_keys(tmp_path: Path) -> AdminKeys:
    """A good (authorized) and a bad SSH key for the admin shell, and an ssh client to use them."""
    return AdminKeys(tmp_path / "ssh-keys")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """HOME for client commands (curl, openssl): empty, per test."""
    path = tmp_path / "home"
    path.mkdir()
    return path


# ---------------------------------------------------------------- the real-registry world


@pytest.fixture(scope="session")
def registry_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryWorld]:
    """docker-registry, token service and S3 on ACR's names, a client network namespace
    and a relay between them, for the whole session (see ``tests/registry_world.py``)."""
    world = RegistryWorld(tmp_path_factory.mktemp("registry-world"))
    try:
        yield world
    finally:
        world.close()


@pytest.fixture(scope="session")
def registry_image(tmp_path_factory: pytest.TempPathFactory) -> LocalImage:
    """An OCI image on disk whose gzip'd layer holds ``$ACRRELAY_E2E_LAYER_MB`` MiB
    (default 200) of random data."""
    return build_oci_image(tmp_path_factory.mktemp("oci-image"), layer_bytes_from_env())


@pytest.fixture(scope="session")
def small_images(
    registry_world: RegistryWorld, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, LocalImage]:
    """A small image (1 MiB layer) pushed as ``:small`` to each of ``IMAGE_REPOSITORY``
    and ``OTHER_REPOSITORY``, each with its own layer: repository -> image."""
    directory = tmp_path_factory.mktemp("small-images")
    images = {}
    for seed, repository in enumerate((IMAGE_REPOSITORY, OTHER_REPOSITORY), start=10):
        image = build_oci_image(directory / str(seed), 1024 * 1024, tag="small", seed=seed)
        registry_world.push(image, "small", home=directory / "home", repository=repository)
        images[repository] = image
    return images


# ---------------------------------------------------------------- the gateway's world


@pytest.fixture(scope="session")
def gateway_world(
    registry_world: RegistryWorld, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayWorld]:
    """The gateway chain on the registry world: its own region relay (metrics on), the
    gateway CA, client certs.d, and an address for the gateway (``tests/gateway_world.py``);
    no gateway runs until ``start_gateway()`` or the ``gateway`` fixture."""
    world = GatewayWorld(registry_world, tmp_path_factory.mktemp("gateway-world"))
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def gateway(gateway_world: GatewayWorld) -> Iterator[GatewayProcess]:
    """A fresh gateway with default settings and an empty cache, stopped after the test."""
    process = gateway_world.start_gateway()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def gateway_image(
    registry_world: RegistryWorld,
    registry_image: LocalImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> LocalImage:
    """The big image (``registry_image``) pushed through the world's relay as
    ``IMAGE:gateway``."""
    home = tmp_path_factory.mktemp("gateway-image-home")
    registry_world.push(registry_image, "gateway", home=home)
    return registry_image
