"""End to end: client (netns) -> gateway -> region relay -> registry, token service, OSS.

The issue's "Must show" list, in the real-registry world (``tests/gateway_world.py``):
skopeo trusts the gateway CA through /etc/containers/certs.d/<host>/ca.crt (a private
mount namespace), the byte-exact client (``GatewayWorld.fetch``) shows what a client
got, byte for byte, and upstream bytes are counted at the region relay. Each test starts
a fresh gateway with an empty cache (the ``gateway`` fixture, or ``start_gateway``).

A refusal is "the registry's" when its status and WWW-Authenticate are what the
registry itself answers to the same request (asked directly, beside the gateway).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import MiB
from tests.gateway_world import GatewayProcess, GatewayWorld
from tests.https_fetch import Fetch
from tests.registry_world import (
    AUTH,
    IMAGE,
    IMAGE_REPOSITORY,
    OTHER_REPOSITORY,
    REGISTRY,
    SERVICE,
    USER,
    LocalImage,
    build_oci_image,
    sha256_file,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = [pytest.mark.e2e, pytest.mark.gateway]

#: What one skopeo pull may take per MiB (generous: 2 cores, TLS four times on the way).
SECONDS_PER_MIB = 2.0
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_users = iter(range(1_000_000))


def _pull(repository: str) -> str:
    return f"repository:{repository}:pull"


def _blob(repository: str, digest: str) -> str:
    return f"/v2/{repository}/blobs/{digest}"


def _token(gw: GatewayWorld, repository: str = IMAGE_REPOSITORY) -> str:
    return gw.world.token(USER, gw.world.password, [_pull(repository)])


def _user(gw: GatewayWorld, rights: dict[str, list[str]], **options: Any) -> str:
    name = f"gwuser{next(_users)}-{time.monotonic_ns()}"
    gw.world.users.add(name, name, rights, **options)
    return name


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


def _warm(gw: GatewayWorld, repository: str, digest: str, token: str | None = None) -> Fetch:
    """Fetch a layer through the gateway with a token that may read it, and wait until the
    store holds it: the cache is warm."""
    got = gw.fetch("GET", _blob(repository, digest), token=token or _token(gw, repository))
    assert got.status == 200 and got.complete, (got, gw.diagnostics())
    assert got.digest == digest, got
    assert gw.gateway is not None
    store = gw.gateway.blob_path(digest)
    _wait(lambda: store.exists(), f"{digest} in the store ({store})")
    return got


def _registry_says(gw: GatewayWorld, method: str, path: str, token: str | None) -> Any:
    return gw.world.registry_request(method, path, token=token)


def _refused_as_the_registry(
    gw: GatewayWorld, method: str, path: str, token: str | None, layer: str
) -> Fetch:
    """``method path`` with ``token`` through the gateway gets exactly the registry's
    refusal (status, WWW-Authenticate, error code) and none of the layer's bytes."""
    status, headers, body = _registry_says(gw, method, path, token)
    assert status in (401, 403, 404), f"the registry itself allows {method} {path}: {status}"
    assert gw.gateway is not None
    denied = gw.gateway.metric("acrrelay_gateway_proofs_total", outcome="denied")
    got = gw.fetch(method, path, token=token)
    assert got.status == status, (got, status, headers, gw.diagnostics())
    assert got.headers.get("www-authenticate") == headers.get("www-authenticate"), got.headers
    assert got.size < 4096 and got.digest != layer, got
    assert "content-range" not in got.headers and "docker-content-digest" not in got.headers
    if method == "GET":
        code = json.loads(body)["errors"][0]["code"]
        assert json.loads(got.head)["errors"][0]["code"] == code, (got.head, body)
        # The refusal came from a proof upstream (a HEAD is passed through as it is).
        after = gw.gateway.metric("acrrelay_gateway_proofs_total", outcome="denied")
        assert after == denied + 1, (denied, after)
    return got


def _skopeo_pull(
    gw: GatewayWorld, reference: str, destination: Path, home: Path, timeout: float
) -> subprocess.Popen[str]:
    return gw.skopeo_popen(
        ["copy", f"docker://{reference}", f"dir:{destination}"], home=home, timeout=timeout
    )


def _pulled_layer_digest(destination: Path, image: LocalImage) -> str:
    manifest = json.loads((destination / "manifest.json").read_text())
    assert [layer["digest"] for layer in manifest["layers"]] == [image.layer_digest]
    return sha256_file(destination / image.layer_digest.removeprefix("sha256:"))


def _round(
    gw: GatewayWorld, image: LocalImage, homes: list[Path], directory: Path
) -> dict[str, float]:
    """len(homes) concurrent skopeo pulls of ``IMAGE:gateway``, each checked; figures."""
    timeout = 120 + SECONDS_PER_MIB * len(homes) * image.layer_size / MiB
    before = gw.upstream_bytes("oss")
    before_all = sum(gw.upstream_bytes(service) for service in ("oss", "registry", "auth"))
    started = time.monotonic()
    pulls = [
        _skopeo_pull(gw, f"{IMAGE}:gateway", directory / f"pulled{i}", home, timeout)
        for i, home in enumerate(homes)
    ]
    outcomes = [p.communicate(timeout=timeout + 30) for p in pulls]
    seconds = time.monotonic() - started
    for i, (proc, (out, err)) in enumerate(zip(pulls, outcomes, strict=True)):
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert proc.returncode == 0, gw.failure(f"pull {i} of {len(homes)}", result)
        assert _pulled_layer_digest(directory / f"pulled{i}", image) == image.layer_digest
        shutil.rmtree(directory / f"pulled{i}")
    after_all = sum(gw.upstream_bytes(service) for service in ("oss", "registry", "auth"))
    return {
        "seconds": seconds,
        "upstream": gw.upstream_bytes("oss") - before,
        "upstream_all_services": after_all - before_all,
    }


def _logged_in_homes(gw: GatewayWorld, directory: Path, count: int) -> list[Path]:
    first = directory / "home0"
    gw.login(first, USER, gw.world.password)
    homes = [first]
    for i in range(1, count):
        home = directory / f"home{i}"
        home.mkdir(parents=True)
        shutil.copyfile(first / "auth.json", home / "auth.json")
        homes.append(home)
    return homes


# ---------------------------------------------------------------- pulls


def test_a_big_image_pulls_through_the_gateway_with_identical_sha256s(
    gateway_world: GatewayWorld,
    gateway: GatewayProcess,
    gateway_image: LocalImage,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """skopeo, trusting the gateway CA through certs.d, pulls the big image through the
    gateway: the layer's sha256 is the pushed one, and it crossed the line once."""
    gw, image = gateway_world, gateway_image
    homes = _logged_in_homes(gw, tmp_path, 1)
    figures = _round(gw, image, homes, tmp_path)
    assert image.layer_size <= figures["upstream"] <= image.layer_size * 1.02 + MiB, figures
    record_property("pull_s", round(figures["seconds"], 2))
    print(f"\ngateway pull: {image.layer_size / MiB:.0f} MiB in {figures['seconds']:.1f}s")


def test_eight_concurrent_cold_pulls_move_the_layer_once_and_a_second_round_almost_nothing(
    gateway_world: GatewayWorld,
    gateway: GatewayProcess,
    gateway_image: LocalImage,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """Eight skopeo pulls at once on a cold gateway all get the layer's sha256, and the
    region relay carried the layer about once (not eight times); a second round of eight
    moves at most 1 % of the image over the line, all three services counted."""
    gw, image = gateway_world, gateway_image
    homes = _logged_in_homes(gw, tmp_path, 8)
    cold = _round(gw, image, homes, tmp_path)
    served = {
        kind: gateway.metric("acrrelay_gateway_requests_total", cache=kind)
        for kind in ("hit", "miss", "coalesced")
    }
    assert image.layer_size <= cold["upstream"] <= image.layer_size * 1.02 + MiB, cold
    warm = _round(gw, image, homes, tmp_path)
    # Registry and token service included: proofs, tag manifests, token requests.
    assert warm["upstream_all_services"] <= image.layer_size / 100, warm
    for name, value in (("cold", cold), ("warm", warm)):
        record_property(f"{name}_s", round(value["seconds"], 2))
        record_property(f"{name}_upstream_bytes", value["upstream"])
    print(f"\ngateway 8 pulls: cold {cold}, warm {warm}, layer {image.layer_size}")
    # Two blobs (config and layer), eight times: each downloaded once; the rest shared
    # that download or came from the store.
    assert served["miss"] == 2 and sum(served.values()) == 16, served


# ---------------------------------------------------------------- authorization


def test_a_user_without_pull_right_gets_the_registrys_refusal_from_a_warm_cache(
    gateway_world: GatewayWorld, gateway: GatewayProcess, small_images: dict[str, LocalImage]
) -> None:
    """With the layer in the store, a user whose token grants nothing on the repository
    gets the registry's 401 (GET and HEAD) and zero bytes of it."""
    gw = gateway_world
    layer = small_images[IMAGE_REPOSITORY].layer_digest
    _warm(gw, IMAGE_REPOSITORY, layer)
    outsider = _user(gw, {OTHER_REPOSITORY: ["pull"]})
    token = gw.world.token(outsider, outsider, [_pull(IMAGE_REPOSITORY)])
    for method in ("GET", "HEAD"):
        _refused_as_the_registry(gw, method, _blob(IMAGE_REPOSITORY, layer), token, layer)


def test_an_anonymous_client_gets_the_registrys_challenge_from_a_warm_cache(
    gateway_world: GatewayWorld, gateway: GatewayProcess, small_images: dict[str, LocalImage]
) -> None:
    """With the layer in the store, a request with no Authorization gets the registry's
    401 and its Bearer challenge, unchanged, and zero bytes of the layer."""
    gw = gateway_world
    layer = small_images[IMAGE_REPOSITORY].layer_digest
    _warm(gw, IMAGE_REPOSITORY, layer)
    got = _refused_as_the_registry(gw, "GET", _blob(IMAGE_REPOSITORY, layer), None, layer)
    assert got.headers["www-authenticate"].startswith(f'Bearer realm="https://{AUTH}/auth"')
    _refused_as_the_registry(gw, "HEAD", _blob(IMAGE_REPOSITORY, layer), None, layer)


def test_an_expired_token_gets_the_registrys_refusal_from_a_warm_cache(
    gateway_world: GatewayWorld, gateway: GatewayProcess, small_images: dict[str, LocalImage]
) -> None:
    """With the layer in the store, a token for the right scope that expired (past the
    registry's 60 s leeway) gets the registry's 401 and zero bytes."""
    gw = gateway_world
    layer = small_images[IMAGE_REPOSITORY].layer_digest
    _warm(gw, IMAGE_REPOSITORY, layer)
    expired = gw.world.mint_token(USER, [_pull(IMAGE_REPOSITORY)], lifetime=-120)
    for method in ("GET", "HEAD"):
        _refused_as_the_registry(gw, method, _blob(IMAGE_REPOSITORY, layer), expired, layer)


def test_a_token_for_another_repository_gets_no_cached_layer_under_either_path(
    gateway_world: GatewayWorld, gateway: GatewayProcess, small_images: dict[str, LocalImage]
) -> None:
    """A token for repository B, proven for B's own layer, asking for repository A's
    cached layer: under A's path the registry's 401, under B's path the registry's 404;
    zero bytes of A's layer either way (cf. zot#4363)."""
    gw = gateway_world
    a, b = small_images[IMAGE_REPOSITORY], small_images[OTHER_REPOSITORY]
    reader = _user(gw, {OTHER_REPOSITORY: ["pull"]})
    token_b = gw.world.token(reader, reader, [_pull(OTHER_REPOSITORY)])
    _warm(gw, OTHER_REPOSITORY, b.layer_digest, token_b)
    _warm(gw, IMAGE_REPOSITORY, a.layer_digest)
    for repository in (IMAGE_REPOSITORY, OTHER_REPOSITORY):
        for method in ("GET", "HEAD"):
            path = _blob(repository, a.layer_digest)
            _refused_as_the_registry(gw, method, path, token_b, a.layer_digest)


def _manifest(gw: GatewayWorld, repository: str, image: LocalImage, token: str | None) -> Fetch:
    return gw.fetch(
        "GET",
        f"/v2/{repository}/manifests/{image.manifest_digest}",
        token=token,
        headers={"Accept": OCI_MANIFEST},
    )


def test_a_manifest_by_digest_is_served_and_refused_as_the_registry_does(
    gateway_world: GatewayWorld, gateway: GatewayProcess, small_images: dict[str, LocalImage]
) -> None:
    """An OCI manifest by digest (cached, like a blob) comes through the gateway byte for
    byte with its media type, cold and warm; a token for repository B asking for it
    under either path gets the registry's status and none of its bytes."""
    gw = gateway_world
    a, b = small_images[IMAGE_REPOSITORY], small_images[OTHER_REPOSITORY]
    for round_ in ("cold", "warm"):
        got = _manifest(gw, IMAGE_REPOSITORY, a, _token(gw))
        assert got.status == 200 and got.complete, (round_, got, gw.diagnostics())
        assert got.digest == a.manifest_digest, (round_, got)
        assert got.headers["content-type"] == OCI_MANIFEST, (round_, got.headers)
    reader = _user(gw, {OTHER_REPOSITORY: ["pull"]})
    token_b = gw.world.token(reader, reader, [_pull(OTHER_REPOSITORY)])
    assert _manifest(gw, OTHER_REPOSITORY, b, token_b).digest == b.manifest_digest
    for repository in (IMAGE_REPOSITORY, OTHER_REPOSITORY):
        got = _manifest(gw, repository, a, token_b)
        path = f"/v2/{repository}/manifests/{a.manifest_digest}"
        status, headers, body = _registry_says(gw, "GET", path, token_b)
        assert got.status == status and status in (401, 404), (got, status)
        assert got.digest != a.manifest_digest and got.size < 4096, got
        # The registry's error document too: docker reads it ("error parsing HTTP 404
        # response body" when it is empty).
        assert got.headers.get("www-authenticate") == headers.get("www-authenticate"), got
        code = json.loads(body)["errors"][0]["code"]
        assert got.head and json.loads(got.head)["errors"][0]["code"] == code, (got, body)


def test_skopeo_pulls_an_image_by_manifest_digest_through_the_gateway(
    gateway_world: GatewayWorld,
    gateway: GatewayProcess,
    small_images: dict[str, LocalImage],
    tmp_path: Path,
) -> None:
    """``skopeo copy docker://IMAGE@sha256:...`` (a pull by digest, as Kubernetes does
    with pinned images) through the gateway gets the image with identical digests."""
    gw = gateway_world
    image = small_images[IMAGE_REPOSITORY]
    home = tmp_path / "home"
    gw.login(home, USER, gw.world.password)
    destination = tmp_path / "pulled"
    result = gw.skopeo(
        ["copy", f"docker://{IMAGE}@{image.manifest_digest}", f"dir:{destination}"], home=home
    )
    assert result.returncode == 0, gw.failure("skopeo pull by digest", result)
    assert _pulled_layer_digest(destination, image) == image.layer_digest


def test_a_revoked_user_gets_nothing_after_the_proof_time(
    gateway_world: GatewayWorld, small_images: dict[str, LocalImage], tmp_path: Path
) -> None:
    """A user pulls through a gateway whose proofs last 2 s, then is revoked: after the
    proof time its skopeo pull fails at the token service (passed through) with no layer
    written; and its last token, once the registry refuses it, gets the registry's 401 and
    zero bytes from the warm cache. distribution refuses a token only at exp + 60 s (its
    leeway), and a revocation never touches tokens issued before it; so the user's tokens
    are issued 40 s expired (the registry takes each for 20 s more) to keep this short."""
    gw = gateway_world
    image = small_images[IMAGE_REPOSITORY]
    layer, path = image.layer_digest, _blob(IMAGE_REPOSITORY, image.layer_digest)
    gw.start_gateway(proof_ttl="2s")
    user = _user(gw, {IMAGE_REPOSITORY: ["pull"]}, token_seconds=-40)
    token = gw.world.token(user, user, [_pull(IMAGE_REPOSITORY)])
    _warm(gw, IMAGE_REPOSITORY, layer, token)
    home = tmp_path / "home"
    gw.login(home, user, user)
    result = _skopeo_pull_now(gw, tmp_path / "before", home)
    assert result.returncode == 0, gw.failure("skopeo pull before the revocation", result)

    gw.world.users.revoke(user)
    revoked_at = time.monotonic()
    basic = base64.b64encode(f"{user}:{user}".encode()).decode()
    query = urllib.parse.urlencode({"service": SERVICE, "scope": _pull(IMAGE_REPOSITORY)})
    asked = gw.fetch(
        "GET", f"/auth?{query}", name=AUTH, headers={"Authorization": f"Basic {basic}"}
    )
    assert asked.status == 401, asked
    _wait(lambda: time.monotonic() > revoked_at + 2.5, "the proof time")
    result = _skopeo_pull_now(gw, tmp_path / "after", home)
    assert result.returncode != 0, gw.failure("skopeo pull after the revocation", result)
    assert not (tmp_path / "after" / layer.removeprefix("sha256:")).exists()

    _wait(lambda: _registry_says(gw, "GET", path, token)[0] == 401, "the registry refuses")
    _refused_as_the_registry(gw, "GET", path, token, layer)


def _skopeo_pull_now(
    gw: GatewayWorld, destination: Path, home: Path
) -> subprocess.CompletedProcess[str]:
    return gw.skopeo(["copy", f"docker://{IMAGE}:small", f"dir:{destination}"], home=home)


# ---------------------------------------------------------------- integrity and pushes


def test_a_flipped_byte_on_disk_is_found_and_the_layer_fetched_again(
    gateway_world: GatewayWorld, gateway: GatewayProcess, small_images: dict[str, LocalImage]
) -> None:
    """One byte flipped in the stored layer: no client ever gets a complete body with the
    wrong sha256 (the first may be cut), the layer is fetched upstream again, and correct
    bytes are served and stored."""
    gw = gateway_world
    image = small_images[IMAGE_REPOSITORY]
    layer, path = image.layer_digest, _blob(IMAGE_REPOSITORY, image.layer_digest)
    _warm(gw, IMAGE_REPOSITORY, layer)
    stored = gateway.blob_path(layer)
    with stored.open("r+b") as f:
        f.seek(image.layer_size // 2)
        byte = f.read(1)
        f.seek(image.layer_size // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    before = gw.upstream_bytes("oss")
    token = _token(gw)
    attempts = [gw.fetch("GET", path, token=token) for _ in range(2)]
    wrong = [a for a in attempts if a.complete and a.status == 200 and a.digest != layer]
    assert not wrong, f"a clean 200 with the flipped byte: {wrong}\n{gw.diagnostics()}"
    assert gateway.metric("acrrelay_gateway_store_events_total", event="corrupt") == 1
    # The first is served from the store, so it is the one cut, and (checked last) by a
    # TCP reset (GATEWAY.md: "RESET (never a clean end)"); a FIN reads as SSLEOFError.
    assert not attempts[0].complete and attempts[0].size < image.layer_size, attempts[0]
    assert attempts[-1].status == 200 and attempts[-1].digest == layer, attempts
    assert gw.upstream_bytes("oss") - before >= image.layer_size, "not fetched again"
    _wait(lambda: stored.exists() and sha256_file(stored) == layer, "the store repaired")
    # The gateway resets the connection (SO_LINGER 0 under the TLS); whether Python's TLS
    # client reports that as ConnectionResetError or, when the RST lands before it reads,
    # as SSLEOFError is a matter of timing. Either way the body ended short, with no TLS
    # close: never a clean end (checked above).
    assert attempts[0].error is not None and (
        "ConnectionResetError" in attempts[0].error or "SSLEOFError" in attempts[0].error
    ), attempts[0].error


def test_a_push_through_the_gateway_arrives_intact(
    gateway_world: GatewayWorld, gateway: GatewayProcess, tmp_path: Path
) -> None:
    """skopeo pushes a new image (a 24 MiB layer) through the gateway; pulled back through
    the region relay alone, its layer has the pushed sha256, and the layer went up the
    line through the region relay."""
    gw = gateway_world
    image = build_oci_image(tmp_path / "image", 24 * MiB, tag="pushed", seed=77)
    repository = "acrrelay-e2e/pushed"
    home = tmp_path / "home"
    gw.login(home, USER, gw.world.password)
    before = gw.upstream_bytes("registry", "up")
    result = gw.skopeo(
        ["copy", image.reference, f"docker://{REGISTRY}/{repository}:pushed"], home=home
    )
    assert result.returncode == 0, gw.failure("skopeo push through the gateway", result)
    assert gw.upstream_bytes("registry", "up") - before >= image.layer_size

    relay_home = tmp_path / "relay-home"
    gw.login(relay_home, USER, gw.world.password, via="relay")
    pulled = tmp_path / "pulled"
    result = gw.skopeo(
        ["copy", f"docker://{REGISTRY}/{repository}:pushed", f"dir:{pulled}"],
        home=relay_home,
        via="relay",
    )
    assert result.returncode == 0, gw.failure("skopeo pull through the region relay", result)
    assert _pulled_layer_digest(pulled, image) == image.layer_digest
