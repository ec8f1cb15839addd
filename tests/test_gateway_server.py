"""The h11 server protocol alone, on StringTransport and a fake clock."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport

from acrrelay.gateway.server import Exchange, GatewayHTTP


class _Handle:
    def __init__(self, name: bytes | None) -> None:
        self.name = name

    def get_servername(self) -> bytes | None:
        return self.name


class _TLSLike(StringTransport):
    """A StringTransport that answers getHandle() like a TLS transport with SNI."""

    def __init__(self, name: bytes | None = b"registry.gw.test") -> None:
        super().__init__(peerAddress=None)
        self.handle = _Handle(name)
        self.aborted = False

    def getHandle(self) -> Any:
        return self.handle

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def _connect(handler: Any, **kw: Any) -> tuple[GatewayHTTP, _TLSLike, MemoryReactorClock]:
    clock = MemoryReactorClock()
    protocol = GatewayHTTP(handler, clock, idle_timeout=kw.pop("idle", 60), **kw)
    transport = _TLSLike()
    protocol.makeConnection(transport)
    return protocol, transport, clock


def _ok(exchange: Exchange) -> None:
    exchange.start_response(200, [(b"content-length", b"2")])
    exchange.write(b"ok")
    exchange.finish()


GET = b"GET /v2/ HTTP/1.1\r\nHost: registry.gw.test\r\n\r\n"


def test_keep_alive_answers_two_requests_in_turn() -> None:
    """Two pipelined requests get two answers, one at a time, on one connection."""
    seen: list[str] = []

    def handler(exchange: Exchange) -> None:
        seen.append(exchange.target)
        _ok(exchange)

    protocol, transport, clock = _connect(handler)
    protocol.dataReceived(GET + GET.replace(b"/v2/", b"/v2/x"))
    clock.advance(0)
    clock.advance(0)
    assert seen == ["/v2/", "/v2/x"]
    assert transport.value().count(b"HTTP/1.1 200") == 2
    assert not transport.disconnecting


def test_a_second_request_waits_until_the_first_is_answered() -> None:
    """While an answer is pending the client is not read and the next request waits."""
    pending: list[Exchange] = []
    protocol, transport, clock = _connect(pending.append)
    protocol.dataReceived(GET + GET)
    clock.advance(0)
    assert len(pending) == 1
    assert transport.producerState == "paused"
    _ok(pending[0])
    clock.advance(0)
    assert len(pending) == 2


def test_a_host_other_than_the_tls_name_is_misdirected() -> None:
    """Host naming another routed name than the SNI gets 421 and no handler call."""
    called: list[Exchange] = []
    protocol, transport, _ = _connect(called.append)
    protocol.dataReceived(b"GET /v2/ HTTP/1.1\r\nHost: auth.gw.test\r\n\r\n")
    assert called == []
    assert transport.value().startswith(b"HTTP/1.1 421 ")


def test_a_request_head_must_arrive_within_the_first_timeout() -> None:
    """A peer that trickles a head slower than first_timeout is closed; bytes do not reset it."""
    protocol, transport, clock = _connect(_ok, first_timeout=10)
    for _ in range(5):
        protocol.dataReceived(b"G")
        clock.advance(3)
    assert transport.disconnecting


def test_a_full_body_sink_pauses_reading_from_the_client() -> None:
    """The handler pausing the body stops reading; resuming reads on to the end."""
    got: list[bytes] = []
    ends: list[bool] = []
    exchanges: list[Exchange] = []

    def handler(exchange: Exchange) -> None:
        exchanges.append(exchange)
        exchange.read_body(got.append, lambda: ends.append(True))
        exchange.pause_body()

    protocol, transport, clock = _connect(handler)
    protocol.dataReceived(
        b"PUT /v2/r/blobs/uploads/1 HTTP/1.1\r\nHost: registry.gw.test\r\n"
        b"Content-Length: 6\r\n\r\nabc"
    )
    assert transport.producerState == "paused"
    protocol.dataReceived(b"def")  # already in flight when we paused: held by h11
    assert got == []
    exchanges[0].resume_body()
    clock.advance(0)
    assert b"".join(got) == b"abcdef" and ends == [True]


def test_finishing_short_of_the_content_length_is_a_reset() -> None:
    """An answer that ends before its Content-Length is cut, never ended cleanly."""

    def handler(exchange: Exchange) -> None:
        exchange.start_response(200, [(b"content-length", b"10")])
        exchange.write(b"short")
        exchange.finish()

    protocol, transport, _ = _connect(handler)
    protocol.dataReceived(GET)
    assert transport.aborted


def test_an_absolute_url_target_is_refused() -> None:
    """A proxy-style absolute URL never names the upstream: 421, no handler call."""
    called: list[Exchange] = []
    protocol, transport, _ = _connect(called.append)
    protocol.dataReceived(
        b"GET https://elsewhere.example.test/v2/ HTTP/1.1\r\nHost: registry.gw.test\r\n\r\n"
    )
    assert called == []
    assert transport.value().startswith(b"HTTP/1.1 421 ")
