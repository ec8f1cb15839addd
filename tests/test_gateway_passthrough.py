"""Pass-through over the terminated TLS, end to end on loopback: challenge unchanged, uploads
byte-exact, and a slow client pauses the upstream instead of filling the gateway's memory."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.static import File

from acrrelay.backends import BackendConnector
from acrrelay.gateway.passthrough import forward_headers, pass_through
from acrrelay.gateway.upstream import Upstream, UpstreamEndpoints, trust_root
from acrrelay.routing import RouteTable
from tests import gateway_support as gs

MiB = 1 << 20
CHALLENGE = b'Bearer realm="https://auth.gw.test/token",service="registry.gw.test"'


class _Registry(Resource):
    """A fake registry: /v2/ challenges; uploads answer with the sha256 of what arrived."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []

    def _note(self, request: Any) -> None:
        headers = {k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((request.method, request.uri, headers))

    def render_GET(self, request: Any) -> bytes:
        self._note(request)
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", CHALLENGE)
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        return b'{"errors":[{"code":"UNAUTHORIZED"}]}'

    def _upload(self, request: Any) -> bytes:
        self._note(request)
        request.content.seek(0)
        digest = hashlib.sha256()
        size = 0
        while chunk := request.content.read(MiB):
            digest.update(chunk)
            size += len(chunk)
        request.setResponseCode(202)
        return f"{size} {digest.hexdigest()}".encode()

    render_PUT = render_PATCH = render_POST = _upload


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Any]:
    """client -> gateway (TLS, h11, pass-through) -> upstream registry over TLS."""
    ca = gs.make_ca(tmp_path / "ca")
    registry = _Registry()
    root = Resource()
    root.putChild(b"v2", registry)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(64 * MiB))
    root.putChild(b"big", File(str(big)))
    up_port = gs.listen_tls_site(ca, gs.REGISTRY, root)
    backend = f"tcp:host=127.0.0.1:port={up_port.getHost().port}"
    reactor = _reactor()
    connector = BackendConnector(reactor, hosts={}, connect_timeout=5)
    table = RouteTable(gs.routes(backend))
    endpoints = UpstreamEndpoints(
        reactor, lambda: table, lambda: connector, trust=trust_root(str(ca.ca_file))
    )
    upstream = Upstream(reactor, endpoints, timeout=20)
    exchanges: list[Any] = []

    def handler(exchange: Any) -> None:
        exchanges.append(exchange)
        pass_through(exchange, upstream)

    port, _ = gs.serve_gateway(ca, handler)
    yield ca, port.getHost().port, registry, big, exchanges
    port.stopListening()
    up_port.stopListening()
    upstream.pool.closeCachedConnections()


def test_hop_by_hop_headers_are_dropped_and_host_kept() -> None:
    """Connection, Keep-Alive, TE, Transfer-Encoding and Connection-named ones go; Host stays."""
    headers = forward_headers(
        [
            (b"host", b"registry.gw.test"),
            (b"connection", b"keep-alive, x-private"),
            (b"keep-alive", b"300"),
            (b"x-private", b"1"),
            (b"transfer-encoding", b"chunked"),
            (b"authorization", b"Bearer t"),
        ]
    )
    assert dict(headers.getAllRawHeaders()) == {
        b"Host": [b"registry.gw.test"],
        b"Authorization": [b"Bearer t"],
    }


@pytest_twisted.inlineCallbacks
def test_a_v2_ping_gets_the_upstream_401_and_challenge_unchanged(chain: Any) -> Any:
    """GET /v2/ through the gateway answers 401 with the registry's WWW-Authenticate as is,
    twice on one keep-alive connection."""
    ca, port, registry, _, _ = chain

    def ping() -> list[tuple[int, str | None, bytes]]:
        conn = gs.HTTPSTo(gs.REGISTRY, port, ca)
        out = []
        for _ in range(2):
            conn.request("GET", "/v2/", headers={"Authorization": "Bearer abc"})
            r = conn.getresponse()
            out.append((r.status, r.getheader("www-authenticate"), r.read()))
        conn.close()
        return out

    answers = yield deferToThread(ping)
    for status, challenge, body in answers:
        assert status == 401
        assert challenge == CHALLENGE.decode()
        assert b"UNAUTHORIZED" in body
    assert [s[0] for s in registry.seen] == [b"GET", b"GET"]
    assert registry.seen[0][2][b"host"] == [f"{gs.REGISTRY}:{port}".encode()]
    assert registry.seen[0][2][b"authorization"] == [b"Bearer abc"]


@pytest.mark.parametrize("method", ["PATCH", "PUT", "POST"])
@pytest_twisted.inlineCallbacks
def test_an_upload_of_tens_of_mib_arrives_byte_exact(chain: Any, method: str) -> Any:
    """A 24 MiB chunked upload reaches upstream with the same size and sha256."""
    ca, port, _, _, _ = chain
    blob = os.urandom(24 * MiB)

    def upload() -> bytes:
        conn = gs.HTTPSTo(gs.REGISTRY, port, ca)
        chunks = (blob[i : i + MiB] for i in range(0, len(blob), MiB))
        conn.request(method, "/v2/r/blobs/uploads/u1", body=chunks, encode_chunked=True)
        answer = conn.getresponse().read()
        conn.close()
        return answer

    answer = yield deferToThread(upload)
    assert answer == f"{len(blob)} {hashlib.sha256(blob).hexdigest()}".encode()


def _tcp(exchange: Any) -> Any:
    return exchange._connection.transport.transport  # TLS protocol -> TCP transport


@pytest_twisted.inlineCallbacks
def test_a_slow_client_pauses_the_upstream_and_gateway_buffers_stay_bounded(chain: Any) -> Any:
    """While the client reads nothing of a 64 MiB answer, the gateway pauses the upstream and
    holds at most a few hundred KiB; then every byte arrives intact."""
    ca, port, _, big, exchanges = chain
    go = threading.Event()
    result: dict[str, Any] = {}

    def slow_read() -> None:
        conn = gs.HTTPSTo(gs.REGISTRY, port, ca, timeout=120)
        conn.request("GET", "/big")
        response = conn.getresponse()
        result["status"] = response.status
        go.wait(60)
        digest = hashlib.sha256()
        while chunk := response.read(MiB):
            digest.update(chunk)
        result["sha256"] = digest.hexdigest()
        conn.close()

    reading = deferToThread(slow_read)
    for _ in range(600):
        if exchanges and _tcp(exchanges[0]).producerPaused:
            break
        yield deferLater(_reactor(), 0.05, lambda: None)
    tcp = _tcp(exchanges[0])
    assert tcp.producerPaused, "the client side never pushed back"
    peak = 0
    for _ in range(20):  # it stays paused and bounded while the client reads nothing
        buffered = len(tcp.dataBuffer) + tcp._tempDataLen
        peak = max(peak, buffered)
        yield deferLater(_reactor(), 0.05, lambda: None)
    assert exchanges[0].bytes_out < 48 * MiB  # the rest waits upstream
    assert peak < 512 * 1024, peak
    go.set()
    yield reading
    assert result["status"] == 200
    assert result["sha256"] == hashlib.sha256(big.read_bytes()).hexdigest()
