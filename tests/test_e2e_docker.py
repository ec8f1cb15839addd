"""End to end with the real docker engine: ``docker pull`` through the relay, then the
gateway, with dockerd in the world's client namespace (``tests/docker_engine.py``).

dockerd trusts a CA only through ``/etc/docker/certs.d/<host>/ca.crt`` (in its private
mount namespace); docker checks every blob's digest as it downloads and every layer's
uncompressed digest (``diff_id``) as it unpacks, so a pulled image whose ``RootFS`` and
``RepoDigests`` match the pushed ones arrived byte for byte.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.docker_engine import DockerEngine, certs_d, cgroup_mounts
from tests.gateway_world import CLIENT_NAMES, GatewayProcess, GatewayWorld
from tests.registry_world import (
    AUTH,
    IMAGE,
    NAMES,
    OSS,
    REGISTRY,
    USER,
    LocalImage,
    RegistryWorld,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e


def _login_and_pull(engine: DockerEngine, world: RegistryWorld, reference: str) -> float:
    result = engine.docker(
        ["login", "--username", USER, "--password-stdin", REGISTRY], stdin=world.password
    )
    assert result.returncode == 0, f"docker login: {result.stderr}\n{engine.tail()}"
    started = time.monotonic()
    result = engine.docker(["pull", reference], timeout=600)
    seconds = time.monotonic() - started
    assert result.returncode == 0, (
        f"docker pull: {result.stdout}{result.stderr}\n{engine.tail()}\n{world.diagnostics()}"
    )
    return seconds


def _same_image(engine: DockerEngine, reference: str, image: LocalImage) -> None:
    inspected = engine.inspect(reference)
    assert inspected["RootFS"]["Layers"] == [image.diff_id], inspected["RootFS"]
    assert f"{IMAGE}@{image.manifest_digest}" in inspected["RepoDigests"], inspected


def test_the_cgroup_mounts_are_read_from_the_host() -> None:
    """The mounts dockerd gets are the host's cgroup mounts, the holding tmpfs first: v1
    hierarchies with their controller options, or cgroup2."""
    mountinfo = (
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
        "42 23 0:39 / /proc rw - proc proc rw\n"
    )
    assert cgroup_mounts(mountinfo) == [
        ("tmpfs", "mode=755", "/sys/fs/cgroup"),
        ("cgroup", "cpu", "/sys/fs/cgroup/cpu"),
        ("cgroup", "name=systemd", "/sys/fs/cgroup/systemd"),
        ("cgroup2", "", "/sys/fs/cgroup/unified"),
    ]
    pure_v2 = "30 23 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n"
    assert cgroup_mounts(pure_v2) == [("cgroup2", "nsdelegate", "/sys/fs/cgroup")]


def test_docker_pulls_through_the_relay_with_identical_digests(
    registry_world: RegistryWorld,
    gateway_image: LocalImage,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """dockerd in the client namespace, trusting the test CA for the registry through
    /etc/docker/certs.d, logs in and pulls the big image through the world's relay: the
    image's manifest digest and layer diff_id are the pushed ones."""
    world, size = registry_world, gateway_image.layer_size
    etc_docker = certs_d(tmp_path / "etc-docker", {REGISTRY: world.ca.ca_file})
    engine = DockerEngine(
        tmp_path / "docker",
        world.netns,
        hosts=dict.fromkeys(NAMES, world.relay.address),
        etc_docker=etc_docker,
    )
    first_id = max((e["id"] for e in world.relay.access_entries()), default=0) + 1
    ca_crt = etc_docker / "certs.d" / REGISTRY / "ca.crt"
    try:
        # Without the certs.d entry dockerd does not trust the world (it reads certs.d for
        # every new connection to a registry), so the entry is what makes the pull work.
        aside = ca_crt.rename(tmp_path / "ca.crt.aside")
        result = engine.docker(
            ["login", "--username", USER, "--password-stdin", REGISTRY], stdin=world.password
        )
        assert result.returncode != 0 and "x509" in result.stderr, result
        aside.rename(ca_crt)
        seconds = _login_and_pull(engine, world, f"{IMAGE}:gateway")
        _same_image(engine, f"{IMAGE}:gateway", gateway_image)
    finally:
        engine.stop()
    # dockerd ran in the client namespace: the relay saw it come from there, for the
    # registry, the token service and OSS (the layer, after the redirect).
    pulled = world.relay.wait_access(
        lambda e: e["id"] >= first_id and e.get("sni") == OSS and e["bytes_down"] >= size,
        timeout=15,
    )
    entries = [e for e in world.relay.access_entries() if e["id"] >= first_id]
    assert {e["client"].rpartition(":")[0] for e in entries} == {world.netns.client_address}
    assert {e["sni"] for e in entries} >= {REGISTRY, AUTH, OSS}, entries
    assert pulled
    assert engine.proc.poll() is not None, "dockerd outlived stop()"
    record_property("docker_pull_s", round(seconds, 2))
    print(f"\ndocker {engine.version} pull through the relay: {seconds:.1f}s")


@pytest.mark.gateway
def test_docker_pulls_through_the_gateway_with_identical_digests(
    gateway_world: GatewayWorld,
    gateway: GatewayProcess,
    gateway_image: LocalImage,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """dockerd, trusting the gateway CA through /etc/docker/certs.d/<host>/ca.crt, pulls
    the big image through the gateway (registry and token names only resolve, to the
    gateway): identical digests, and the layer crossed the line once."""
    gw = gateway_world
    engine = DockerEngine(
        tmp_path / "docker",
        gw.world.netns,
        hosts=dict.fromkeys(CLIENT_NAMES, gw.address),
        etc_docker=gw.etc_docker,
    )
    try:
        before = gw.upstream_bytes("oss")
        seconds = _login_and_pull(engine, gw.world, f"{IMAGE}:gateway")
        _same_image(engine, f"{IMAGE}:gateway", gateway_image)
        moved = gw.upstream_bytes("oss") - before
        size = gateway_image.layer_size
        assert size <= moved <= size * 1.02 + 1024 * 1024, moved
    finally:
        engine.stop()
    record_property("docker_gateway_pull_s", round(seconds, 2))
    print(f"\ndocker pull through the gateway: {seconds:.1f}s")
