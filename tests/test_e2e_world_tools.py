"""End to end in the real-registry world: `acrrelay hosts` and `acrrelay doctor`.

The world (docker-registry with token auth and S3 redirects, the token service, moto on
the OSS name, skopeo in a network namespace) is `tests/registry_world.py`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry_world import (
    AUTH,
    IMAGE_REPOSITORY,
    OSS,
    OSS_WILDCARD,
    PASSWORD,
    REGISTRY,
    USER,
    LocalImage,
    RegistryWorld,
    build_oci_image,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

ACRRELAY = str(Path(sys.executable).parent / "acrrelay")
TAG = "doctor"


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> LocalImage:
    return build_oci_image(tmp_path_factory.mktemp("small-image"), 2_000_000, tag=TAG, seed=7)


def hosts_from_tool(relay_address: str) -> dict[str, str]:
    """The names `acrrelay hosts` tells a VPC client to point at the relay."""
    result = subprocess.run(
        [ACRRELAY, "hosts", "--relay", relay_address, "--acr", "cn-beijing", "--network", "vpc"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    entries = [
        line.split() for line in result.stdout.splitlines() if line and not line.startswith("#")
    ]
    return {name: address for address, name in entries}


def test_hosts_output_is_all_a_client_needs(
    registry_world: RegistryWorld, small_image: LocalImage, tmp_path: Path
) -> None:
    """A namespace whose hosts file is built from `acrrelay hosts` alone logs in, pushes
    and pulls through the relay, and the bytes come back the same."""
    hosts = hosts_from_tool(registry_world.relay.address)
    assert {REGISTRY, AUTH, OSS} <= set(hosts)
    assert set(hosts.values()) == {registry_world.relay.address}
    registry_world.push(small_image, TAG, home=tmp_path / "push", hosts=hosts)
    pulled = tmp_path / "pulled"
    result = registry_world.skopeo(
        ["copy", f"docker://{registry_world.image}:{TAG}", f"dir:{pulled}"],
        home=tmp_path / "push",
        hosts=hosts,
    )
    assert result.returncode == 0, registry_world.failure("skopeo copy (pull)", result)
    layer = pulled / small_image.layer_digest.removeprefix("sha256:")
    assert layer.stat().st_size == small_image.layer_size


def doctor_in_namespace(
    world: RegistryWorld, home: Path, *extra: str, hosts: dict[str, str] | None = None
) -> tuple[int, dict[str, dict[str, str]], str]:
    """`acrrelay doctor` inside the client namespace, as a client machine would run it."""
    args = [
        ACRRELAY, "doctor", REGISTRY, "--username", USER, "--password-stdin",
        "--image", f"{IMAGE_REPOSITORY}:{TAG}", "--json", *extra,
    ]  # fmt: skip
    result = world.netns.run(
        args, env=world.client_env(home), timeout=120, stdin=f"{PASSWORD}\n", hosts=hosts
    )
    hops = {hop["name"]: hop for hop in json.loads(result.stdout)["hops"]}
    return result.returncode, hops, result.stderr


@pytest.fixture(scope="module")
def pushed(registry_world: RegistryWorld, small_image: LocalImage, tmp_path_factory) -> str:  # type: ignore[no-untyped-def]
    return registry_world.push(small_image, TAG, home=tmp_path_factory.mktemp("pusher"))


def test_doctor_passes_every_hop(
    registry_world: RegistryWorld, pushed: str, tmp_path: Path
) -> None:
    """From the client namespace, through the relay, every hop of a pull passes."""
    status, hops, stderr = doctor_in_namespace(registry_world, tmp_path)
    assert status == 0, (hops, stderr)
    assert list(hops) == ["tls", "v2", "realm", "token", "manifest", "blob", "oss-blob", "oss"]
    assert all(hop["status"] == "ok" for hop in hops.values()), hops
    assert f"realm=https://{AUTH}/auth" in hops["v2"]["result"]
    assert hops["blob"]["result"].startswith(f"307 to https://{OSS}/")
    assert hops["oss-blob"]["result"].startswith(("200, read", "206, read"))
    # moto lists buckets to an anonymous GET / where OSS denies it: passed, and named so.
    assert hops["oss"]["result"].startswith("200 ListAllMyBucketsResult: S3-compatible storage")
    services = {entry.get("sni") for entry in registry_world.relay.access_entries()}
    assert {REGISTRY, AUTH, OSS} <= services


def test_doctor_names_an_unrouted_token_service(
    registry_world: RegistryWorld, pushed: str, tmp_path: Path
) -> None:
    """A relay without the token service's route: the realm hop fails with the routing hint."""
    relay = registry_world.start_relay(
        {name: backend for name, backend in registry_world.backends.items() if name != AUTH}
    )
    status, hops, _ = doctor_in_namespace(registry_world, tmp_path, hosts=relay.hosts())
    assert status == 1
    assert hops["v2"]["status"] == "ok"
    assert hops["realm"]["status"] == "failed"
    assert hops["realm"]["hint"].startswith(f"the realm host {AUTH} is not routed by the relay")
    assert hops["token"]["status"] == "skipped"
    relay.stop()


def test_doctor_fails_on_the_redirect_without_oss(
    registry_world: RegistryWorld, pushed: str, tmp_path: Path
) -> None:
    """A relay without the OSS routes: the token and manifest pass, following the blob's
    redirect fails with the routing hint."""
    relay = registry_world.start_relay(
        {
            name: backend
            for name, backend in registry_world.backends.items()
            if name not in (OSS, OSS_WILDCARD)
        }
    )
    status, hops, _ = doctor_in_namespace(registry_world, tmp_path, hosts=relay.hosts())
    assert status == 1
    assert hops["token"]["status"] == hops["manifest"]["status"] == hops["blob"]["status"] == "ok"
    assert hops["oss-blob"]["status"] == "failed"
    assert hops["oss-blob"]["hint"].startswith(f"the OSS host {OSS} is not routed by the relay")
    relay.stop()
