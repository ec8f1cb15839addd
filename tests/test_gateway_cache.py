"""The blob path end to end on loopback TLS: a fake registry that proves and redirects, a fake
object store that counts bytes, and real TLS clients through the gateway."""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.static import File

from acrrelay.backends import BackendConnector
from acrrelay.gateway.app import GatewayHandler
from acrrelay.gateway.cache import BlobPath
from acrrelay.gateway.proof import ProofCache
from acrrelay.gateway.store import BlobStore
from acrrelay.gateway.upstream import Upstream, UpstreamEndpoints, trust_root
from acrrelay.routing import Route, RouteTable, parse_pattern
from tests import gateway_support as gs

MiB = 1 << 20
GOOD = b"Bearer good-for-lib"
OTHER = b"Bearer good-for-other"
CHALLENGE = b'Bearer realm="https://auth.gw.test/token",service="registry.gw.test"'


class _Registry(Resource):
    """/v2/<repo>/blobs/<digest>: 401 unless the token may pull the repo, else 307 to OSS."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rights = {GOOD: "lib/app", OTHER: "other/app"}
        self.requests: list[tuple[bytes, bytes, bytes | None]] = []
        self.oss_host = gs.OSS

    def render_GET(self, request: Any) -> bytes:
        auth = request.getHeader(b"authorization")
        self.requests.append((request.method, request.path, request.getHeader(b"range")))
        parts = request.path.decode().split("/")  # '', v2, repo..., blobs, digest
        repo, digest = "/".join(parts[2:-2]), parts[-1]
        if (
            auth is None
            or self.rights.get(auth.encode() if isinstance(auth, str) else auth) != repo
        ):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", CHALLENGE)
            return b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        request.setResponseCode(307)
        request.setHeader(b"location", f"https://{self.oss_host}/data/{digest}?sig=1".encode())
        return b""


class _OSS(Resource):
    """Serves blobs by digest (Range included), counting bytes and remembering headers."""

    isLeaf = True

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory
        self.headers: list[dict[bytes, list[bytes]]] = []
        self.bytes = 0
        self.cut_first_at: int | None = None
        self.cut_every_at: int | None = None
        self.stall_first_at: int | None = None
        self.gate: defer.Deferred[None] | None = None

    def render_GET(self, request: Any) -> Any:
        self.headers.append(dict(request.requestHeaders.getAllRawHeaders()))
        name = request.path.decode().rsplit("/", 1)[-1]
        path = self.directory / name
        size = path.stat().st_size
        rng = request.getHeader(b"range")
        start = int(rng.split(b"=")[1].split(b"-")[0]) if rng else 0
        if self.stall_first_at is not None:
            cut, self.stall_first_at = self.stall_first_at, None
            request.setHeader(b"content-length", str(size).encode())
            request.write(path.read_bytes()[:cut])
            self.bytes += cut
            return 1  # NOT_DONE_YET, and never done: a stalled upstream
        if self.cut_first_at is not None or self.cut_every_at is not None:
            cut = self.cut_first_at or self.cut_every_at or 0
            self.cut_first_at = None
            request.setHeader(b"content-length", str(size).encode())
            request.write(path.read_bytes()[start : start + cut])
            self.bytes += cut
            from twisted.internet import reactor

            reactor.callLater(0.2, request.transport.abortConnection)
            return 1  # NOT_DONE_YET
        self.bytes += size - start
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate.addCallback(lambda _: self._serve(request, path))
            return 1
        return File(str(path)).render(request)

    def _serve(self, request: Any, path: Path) -> None:
        File(str(path)).render(request)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Any]:
    ca = gs.make_ca(tmp_path / "ca")
    registry = _Registry()
    oss_root = Resource()
    oss = _OSS(tmp_path / "oss")
    (tmp_path / "oss").mkdir()
    oss_root.putChild(b"data", oss)
    reg_root = Resource()
    reg_root.putChild(b"v2", registry)
    reg_port = gs.listen_tls_site(ca, gs.REGISTRY, reg_root)
    oss_port = gs.listen_tls_site(ca, gs.OSS, oss_root)
    routes = [
        Route(parse_pattern(gs.REGISTRY), f"tcp:host=127.0.0.1:port={reg_port.getHost().port}"),
        Route(parse_pattern("*.oss.gw.test"), f"tcp:host=127.0.0.1:port={oss_port.getHost().port}"),
    ]
    reactor = _reactor()
    connector = BackendConnector(reactor, hosts={}, connect_timeout=5)
    table = RouteTable(routes)
    endpoints = UpstreamEndpoints(
        reactor, lambda: table, lambda: connector, trust=trust_root(str(ca.ca_file))
    )
    upstream = Upstream(reactor, endpoints, timeout=20)
    store = BlobStore(tmp_path / "store", 1 << 30)
    blobs = BlobPath(reactor, store, upstream, ProofCache(60, reactor))
    port, _ = gs.serve_gateway(ca, GatewayHandler(upstream, blobs))

    def add_blob(data: bytes, served: bytes | None = None) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (tmp_path / "oss" / digest).write_bytes(served if served is not None else data)
        return digest

    yield ca, port.getHost().port, registry, oss, store, blobs, add_blob
    for p in (port, reg_port, oss_port):
        p.stopListening()
    upstream.pool.closeCachedConnections()


def _get(ca: Any, port: int, target: str, auth: bytes | None) -> tuple[int, dict[str, str], bytes]:
    conn = gs.HTTPSTo(gs.REGISTRY, port, ca)
    headers = {"Authorization": auth.decode()} if auth else {}
    conn.request("GET", target, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest_twisted.inlineCallbacks
def test_a_miss_follows_the_redirect_without_authorization_then_hits(world: Any) -> Any:
    """First GET downloads through the 307 (OSS never sees Authorization); the second is a
    hit from the store with no OSS bytes."""
    ca, port, _, oss, store, blobs, add_blob = world
    data = os.urandom(3 * MiB + 17)
    digest = add_blob(data)
    status, headers, body = yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert status == 200 and body == data
    assert headers["docker-content-digest"] == digest
    assert all(b"Authorization" not in h and b"Cookie" not in h for h in oss.headers)
    assert oss.bytes == len(data)
    assert digest in store
    status, _, body = yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert status == 200 and body == data
    assert oss.bytes == len(data) and blobs.stats["hits"] == 1


@pytest_twisted.inlineCallbacks
def test_concurrent_requests_share_one_download(world: Any) -> Any:
    """Five clients asking for one digest at once cause one OSS download, all get the bytes."""
    ca, port, _, oss, _, blobs, add_blob = world
    data = os.urandom(8 * MiB)
    digest = add_blob(data)
    gate: defer.Deferred[None] = defer.Deferred()
    oss.gate = gate
    target = f"/v2/lib/app/blobs/{digest}"
    pulls = [deferToThread(_get, ca, port, target, GOOD) for _ in range(5)]
    while blobs.stats["misses"] + blobs.stats["coalesced"] < 5:
        yield deferToThread(lambda: __import__("time").sleep(0.05))
    gate.callback(None)
    results = yield defer.gatherResults(pulls)
    assert [r[2] == data for r in results] == [True] * 5
    assert oss.bytes == len(data) and len(oss.headers) == 1
    assert blobs.stats["misses"] == 1 and blobs.stats["coalesced"] == 4


@pytest_twisted.inlineCallbacks
def test_a_refused_credential_gets_the_upstream_answer_and_zero_cached_bytes(world: Any) -> Any:
    """With the blob in the store, no token, another repo's token, or its digest under the
    other path all get the registry's 401 with the challenge, never the bytes."""
    ca, port, _, _, store, _, add_blob = world
    data = os.urandom(MiB)
    digest = add_blob(data)
    yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert digest in store
    for target, auth in [
        (f"/v2/lib/app/blobs/{digest}", None),
        (f"/v2/lib/app/blobs/{digest}", OTHER),
        (f"/v2/lib/app/blobs/{digest}", b"Bearer expired"),
    ]:
        status, headers, body = yield deferToThread(_get, ca, port, target, auth)
        assert status == 401, target
        assert headers["www-authenticate"] == CHALLENGE.decode()
        assert data[:64] not in body and len(body) < 100


@pytest_twisted.inlineCallbacks
def test_mismatching_bytes_leave_nothing_and_the_client_sees_a_reset(world: Any) -> Any:
    """An OSS serving other bytes for the digest: nothing stored, the client's read fails."""
    ca, port, _, _, store, _, add_blob = world
    data = os.urandom(2 * MiB)
    digest = add_blob(data, served=os.urandom(2 * MiB))
    with pytest.raises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
        yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert digest not in store
    assert list((store.root / "tmp").iterdir()) == []


@pytest_twisted.inlineCallbacks
def test_an_upstream_reset_mid_download_resumes_from_the_offset(world: Any) -> Any:
    """OSS cuts the first body at 1 MiB; the gateway asks again with Range from there, on a
    fresh redirect, and the client gets every byte once."""
    ca, port, registry, oss, store, _, add_blob = world
    data = os.urandom(4 * MiB)
    digest = add_blob(data)
    oss.cut_first_at = MiB
    status, _, body = yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert status == 200 and body == data
    assert [h.get(b"Range") for h in oss.headers] == [None, [b"bytes=%d-" % MiB]]
    assert oss.bytes == len(data)
    assert sum(1 for r in registry.requests if r[2] != b"bytes=0-0") == 2  # fresh redirects
    assert digest in store


def _request(
    ca: Any, port: int, target: str, auth: bytes | None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    conn = gs.HTTPSTo(gs.REGISTRY, port, ca)
    sent = {"Authorization": auth.decode()} if auth else {}
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    conn.request("GET", target, headers=sent)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest_twisted.inlineCallbacks
def test_a_hit_answers_range_and_if_none_match_from_the_store(world: Any) -> Any:
    """Range gives a 206 with Content-Range, If-None-Match with the digest a 304, no OSS."""
    ca, port, _, oss, _, _, add_blob = world
    data = os.urandom(MiB)
    digest = add_blob(data)
    target = f"/v2/lib/app/blobs/{digest}"
    yield deferToThread(_get, ca, port, target, GOOD)
    status, headers, body = yield deferToThread(
        _request, ca, port, target, GOOD, Range="bytes=100-199"
    )
    assert (status, body) == (206, data[100:200])
    assert headers["content-range"] == f"bytes 100-199/{len(data)}"
    status, _, body = yield deferToThread(
        _request, ca, port, target, GOOD, If_None_Match=f'"{digest}"'
    )
    assert (status, body) == (304, b"")
    assert len(oss.headers) == 1


@pytest_twisted.inlineCallbacks
def test_a_corrupt_stored_blob_is_cut_dropped_and_fetched_again(world: Any) -> Any:
    """A byte flipped on disk: that client's read fails (reset, not a clean end), the blob is
    dropped, and the next request downloads the right bytes again."""
    ca, port, _, oss, store, _, add_blob = world
    data = os.urandom(2 * MiB)
    digest = add_blob(data)
    target = f"/v2/lib/app/blobs/{digest}"
    yield deferToThread(_get, ca, port, target, GOOD)
    path = store.path_of(digest)
    flipped = bytearray(path.read_bytes())
    flipped[MiB] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises((http.client.IncompleteRead, ConnectionError, ssl.SSLError)):
        yield deferToThread(_get, ca, port, target, GOOD)
    assert digest not in store
    status, _, body = yield deferToThread(_get, ca, port, target, GOOD)
    assert status == 200 and body == data
    assert oss.bytes == 2 * len(data)


@pytest_twisted.inlineCallbacks
def test_no_room_in_the_store_bypasses_uncached(world: Any) -> Any:
    """A blob larger than the cap is served straight from upstream, and nothing is kept."""
    ca, port, _, oss, store, blobs, add_blob = world
    store.set_cap(MiB)
    data = os.urandom(2 * MiB)
    digest = add_blob(data)
    status, _, body = yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert status == 200 and body == data
    assert digest not in store and blobs.stats["bypass"] == 1
    assert all(b"Authorization" not in h for h in oss.headers)


@pytest_twisted.inlineCallbacks
def test_a_download_that_fails_for_good_cuts_every_waiter(world: Any) -> Any:
    """OSS cuts every attempt: all three waiters see a reset, nothing is stored, and the next
    request downloads afresh."""
    ca, port, _, oss, store, blobs, add_blob = world
    data = os.urandom(4 * MiB)
    digest = add_blob(data)
    oss.cut_every_at = MiB
    target = f"/v2/lib/app/blobs/{digest}"
    outcomes = yield defer.DeferredList(
        [deferToThread(_get, ca, port, target, GOOD) for _ in range(3)], consumeErrors=True
    )
    for ok, result in outcomes:
        assert not ok, "a failed download must never end cleanly"
        assert result.check(http.client.IncompleteRead, ConnectionError, ssl.SSLError), result
    assert digest not in store and blobs.stats["download_failures"] >= 1
    oss.cut_every_at = None
    status, _, body = yield deferToThread(_get, ca, port, target, GOOD)
    assert status == 200 and body == data


@pytest_twisted.inlineCallbacks
def test_a_slow_waiter_slows_only_itself(world: Any) -> Any:
    """One waiter reads nothing while another reads all: the fast one and the download finish
    (the blob is stored) before the slow one has read its body, which then arrives intact."""
    import threading

    ca, port, _, oss, store, blobs, add_blob = world
    data = os.urandom(32 * MiB)
    digest = add_blob(data)
    target = f"/v2/lib/app/blobs/{digest}"
    gate: defer.Deferred[None] = defer.Deferred()
    oss.gate = gate
    go = threading.Event()

    def slow() -> bytes:
        conn = gs.HTTPSTo(gs.REGISTRY, port, ca, timeout=120)
        conn.request("GET", target, headers={"Authorization": GOOD.decode()})
        response = conn.getresponse()
        go.wait(60)
        return response.read()

    slow_read = deferToThread(slow)
    while blobs.stats["misses"] < 1:
        yield deferToThread(lambda: __import__("time").sleep(0.05))
    fast_read = deferToThread(_get, ca, port, target, GOOD)
    while blobs.stats["coalesced"] < 1:
        yield deferToThread(lambda: __import__("time").sleep(0.05))
    gate.callback(None)
    status, _, body = yield fast_read
    assert status == 200 and body == data
    assert digest in store and not slow_read.called
    go.set()
    body = yield slow_read
    assert body == data and oss.bytes == len(data)


class _Manifests(Resource):
    """/v2/<repo>/manifests/<digest>: HEAD proves, GET serves the manifest itself (no redirect)."""

    isLeaf = True
    MEDIA = b"application/vnd.oci.image.manifest.v1+json"

    def __init__(self, registry: _Registry, manifests: dict[str, bytes]) -> None:
        super().__init__()
        self.registry = registry
        self.manifests = manifests
        self.methods: list[bytes] = []

    def render_HEAD(self, request: Any) -> bytes:
        return self.render_GET(request)

    def render_GET(self, request: Any) -> bytes:
        self.methods.append(request.method)
        parts = request.path.decode().split("/")
        repo, digest = "/".join(parts[2:-2]), parts[-1]
        if self.registry.rights.get(request.getHeader(b"authorization")) != repo:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", CHALLENGE)
            return b""
        accepted = b",".join(request.requestHeaders.getRawHeaders(b"accept", []))
        if self.MEDIA not in accepted:  # as distribution does for an OCI manifest
            request.setResponseCode(404)
            return b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'

        request.setHeader(b"content-type", self.MEDIA)
        request.setHeader(b"docker-content-digest", digest.encode())
        return self.manifests[digest]


def _get_manifest(
    ca: Any, port: int, target: str, auth: bytes
) -> tuple[int, dict[str, str], bytes]:
    """GET with Accept in two header lines, as docker sends it."""
    conn = gs.HTTPSTo(gs.REGISTRY, port, ca)
    conn.putrequest("GET", target)
    conn.putheader("Authorization", auth.decode())
    conn.putheader("Accept", "application/vnd.docker.distribution.manifest.v2+json")
    conn.putheader("Accept", _Manifests.MEDIA.decode())
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


@pytest_twisted.inlineCallbacks
def test_a_manifest_by_digest_is_proven_by_head_and_cached(world: Any) -> Any:
    """GET manifest by digest: miss then hit, the media type kept; another repo's token gets
    the registry's 401 from the HEAD proof and not the manifest."""
    ca, port, registry, _, store, _, _ = world
    manifest = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}'
    digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    resource = _Manifests(registry, {digest: manifest})
    original = registry.render_GET  # blobs as before; manifests from the resource above

    def route(request: Any) -> Any:
        if b"/manifests/" in request.path:
            return resource.render(request)
        return original(request)

    registry.render_GET = route  # type: ignore[method-assign]
    registry.render_HEAD = route  # type: ignore[attr-defined]
    target = f"/v2/lib/app/manifests/{digest}"
    for _ in range(2):
        status, headers, body = yield deferToThread(_get_manifest, ca, port, target, GOOD)
        assert (status, body) == (200, manifest)
        assert headers["content-type"] == _Manifests.MEDIA.decode()
    assert digest in store
    assert resource.methods == [b"HEAD", b"GET"]  # one proof, one download, then a hit
    status, headers, body = yield deferToThread(_get_manifest, ca, port, target, OTHER)
    assert status == 401 and manifest not in body
    assert headers["www-authenticate"] == CHALLENGE.decode()


@pytest_twisted.inlineCallbacks
def test_a_redirect_to_an_unrouted_host_is_never_followed(world: Any) -> Any:
    """The registry redirecting to a host no route covers: the client gets a 502, nothing is
    fetched there, nothing is stored."""
    ca, port, registry, oss, store, _, add_blob = world
    registry.oss_host = gs.UNROUTED
    digest = add_blob(os.urandom(MiB))
    status, _, body = yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert (status, body) == (502, b"")
    assert oss.headers == [] and digest not in store


@pytest_twisted.inlineCallbacks
def test_a_stalled_upstream_body_is_cut_and_resumed(world: Any) -> Any:
    """OSS sends 1 MiB then nothing: after the upstream timeout the download is cut and
    resumed from its offset, and the client gets every byte."""
    ca, port, _, oss, store, blobs, add_blob = world
    blobs.upstream.timeout = 1.0
    data = os.urandom(3 * MiB)
    digest = add_blob(data)
    oss.stall_first_at = MiB
    status, _, body = yield deferToThread(_get, ca, port, f"/v2/lib/app/blobs/{digest}", GOOD)
    assert status == 200 and body == data
    assert [h.get(b"Range") for h in oss.headers] == [None, [b"bytes=%d-" % MiB]]
    assert digest in store
