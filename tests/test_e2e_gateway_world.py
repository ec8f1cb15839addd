"""End to end: the gateway world's own pieces, checked through the region relay alone.

The gateway tests (``test_e2e_gateway.py``) measure with these pieces, so each is pinned
here without a gateway: the region relay's live byte count, the byte-exact client, the
client namespace's hosts and private certs.d, and skopeo through the region relay.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.gateway_world import CLIENT_NAMES, GatewayWorld
from tests.https_fetch import tls_context
from tests.registry_world import (
    IMAGE,
    IMAGE_REPOSITORY,
    OSS,
    USER,
    LocalImage,
    sha256_file,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = [pytest.mark.e2e, pytest.mark.gateway]


def _pull_token(gw: GatewayWorld) -> str:
    return gw.world.token(USER, gw.world.password, [f"repository:{IMAGE_REPOSITORY}:pull"])


def test_fetch_follows_nothing_and_hashes_the_blob_from_oss_through_the_relay(
    gateway_world: GatewayWorld, small_images: dict[str, LocalImage]
) -> None:
    """Through the region relay, the byte-exact client gets the registry's 307 for a
    layer (it follows nothing), then from OSS, without Authorization, exactly the layer:
    size and sha256; the relay counts those bytes on its OSS routes."""
    gw = gateway_world
    image = small_images[IMAGE_REPOSITORY]
    path = f"/v2/{IMAGE_REPOSITORY}/blobs/{image.layer_digest}"
    redirect = gw.fetch("GET", path, token=_pull_token(gw), via="relay")
    assert redirect.status == 307 and redirect.complete, redirect
    location = urllib.parse.urlsplit(redirect.headers["location"])
    assert location.hostname == OSS, location

    before = gw.upstream_bytes("oss")
    blob = gw.fetch("GET", f"{location.path}?{location.query}", via="relay", name=OSS)
    assert blob.status == 200 and blob.complete, blob
    assert (blob.size, blob.digest) == (image.layer_size, image.layer_digest), blob
    moved = gw.upstream_bytes("oss") - before
    assert image.layer_size <= moved <= image.layer_size * 1.02 + 64 * 1024, moved


def test_upstream_bytes_count_a_connection_that_is_still_open(
    gateway_world: GatewayWorld, small_images: dict[str, LocalImage]
) -> None:
    """The region relay's byte count includes a connection that has not closed (no access
    line yet: the gateway pools its upstream connections, so that line would come late)."""
    gw = gateway_world
    image = small_images[IMAGE_REPOSITORY]
    path = f"/v2/{IMAGE_REPOSITORY}/blobs/{image.layer_digest}"
    location = urllib.parse.urlsplit(
        gw.fetch("GET", path, token=_pull_token(gw), via="relay").headers["location"]
    )
    before = gw.upstream_bytes("oss")
    context = tls_context(gw.world.ca.ca_file)
    raw = socket.create_connection((gw.region.address, 443), timeout=60)
    client = "{}:{}".format(*raw.getsockname())
    connection = http.client.HTTPSConnection(OSS, 443, timeout=60, context=context)
    tls = connection.sock = context.wrap_socket(raw, server_hostname=OSS)
    try:
        connection.request("GET", f"{location.path}?{location.query}")
        response = connection.getresponse()
        half = response.read(image.layer_size // 2)
        assert response.status == 200 and len(half) == image.layer_size // 2, response.status
        moved = gw.upstream_bytes("oss") - before
        assert moved >= len(half), moved
        assert not [e for e in gw.region.access_entries() if e["client"] == client]
    finally:
        # http.client's close leaves the socket open while the response's file refers to
        # it: end the connection for sure.
        with contextlib.suppress(OSError):
            tls.shutdown(socket.SHUT_RDWR)
        connection.close()
    done = gw.region.wait_access(lambda e: e["client"] == client, timeout=15)
    assert done[0]["sni"] == OSS and done[0]["bytes_down"] >= len(half), done


def test_gateway_clients_resolve_only_registry_and_token_and_see_a_private_certs_d(
    gateway_world: GatewayWorld,
) -> None:
    """A command ``via="gateway"`` resolves the registry and token names to the gateway's
    address and OSS's to nothing, and sees the gateway CA at /etc/containers/certs.d/<host>
    and /etc/docker/certs.d/<host>; the machine's own directories stay without certs.d."""
    gw = gateway_world
    script = "; ".join(
        [f"getent hosts {name} || echo MISSING {name}" for name in (*CLIENT_NAMES, OSS)]
        + [
            f"cat /etc/{etc}/certs.d/{name}/ca.crt"
            for etc in ("containers", "docker")
            for name in CLIENT_NAMES
        ]
    )
    result = subprocess.run(
        gw.command(["sh", "-c", script], via="gateway"),
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result
    lines = [line.split() for line in result.stdout.splitlines()]
    for name in CLIENT_NAMES:
        assert [gw.address, name] in lines, result.stdout
    assert ["MISSING", OSS] in lines, result.stdout
    ca = gw.ca_file.read_text()
    assert result.stdout.count(ca.strip().splitlines()[1]) == 4, result.stdout
    assert not Path("/etc/containers/certs.d").exists()
    assert not Path("/etc/docker/certs.d").exists()


def test_skopeo_pulls_through_the_region_relay_and_the_relay_counts_the_layer_once(
    gateway_world: GatewayWorld, small_images: dict[str, LocalImage], tmp_path: Path
) -> None:
    """skopeo ``via="relay"`` logs in and pulls the small image through the region relay
    alone: identical sha256, and the relay's OSS count grew by about one layer."""
    gw = gateway_world
    image = small_images[IMAGE_REPOSITORY]
    home = tmp_path / "home"
    gw.login(home, USER, gw.world.password, via="relay")
    before = gw.upstream_bytes("oss")
    started = time.monotonic()
    result = gw.skopeo(
        ["copy", f"docker://{IMAGE}:small", f"dir:{tmp_path / 'pulled'}"], home=home, via="relay"
    )
    assert result.returncode == 0, gw.failure("skopeo copy via the region relay", result)
    seconds = time.monotonic() - started
    manifest = json.loads((tmp_path / "pulled" / "manifest.json").read_text())
    assert manifest["layers"][0]["digest"] == image.layer_digest
    layer = tmp_path / "pulled" / image.layer_digest.removeprefix("sha256:")
    assert sha256_file(layer) == image.layer_digest
    moved = gw.upstream_bytes("oss") - before
    assert image.layer_size <= moved <= image.layer_size * 1.05 + 64 * 1024, (moved, seconds)
