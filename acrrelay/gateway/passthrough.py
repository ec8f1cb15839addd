"""Pass-through: a request goes upstream as it came, and its answer comes back the same way.

Pings, token requests, manifests by tag, pushes, catalog and chart calls, and every answer to a
proof the registry refused (a 401 with its WWW-Authenticate, a 403, a 404) travel here, status
and headers unchanged but for the hop-by-hop ones, bodies streamed with flow control both ways:
the request body is an ``IBodyProducer`` fed from the client, paused when upstream is slow; the
response body is delivered to a protocol that writes to the client and is registered as the
client transport's producer, so a slow client pauses the upstream connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from acrrelay.gateway.server import Exchange
from acrrelay.gateway.upstream import NotRouted, Upstream

__all__ = [
    "HOP_BY_HOP",
    "ResponseRelay",
    "StreamingBody",
    "answer_error",
    "forward_headers",
    "pass_through",
    "relay_response",
    "response_headers",
]

_log = Logger(namespace="acrrelay.gateway.passthrough")

#: Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those h11
#: and the client agent write themselves.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"expect",
    }
)


def _dropped(headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return frozenset(named)


def forward_headers(headers: list[tuple[bytes, bytes]]) -> Headers:
    """The request headers to send upstream: all but hop-by-hop ones; Host is kept."""
    dropped = _dropped(headers)
    out = Headers()
    for name, value in headers:
        if name.lower() not in dropped:
            out.addRawHeader(name, value)
    return out


def response_headers(response: IResponse, *, head: bool) -> list[tuple[bytes, bytes]]:
    """The upstream answer's headers for the client, with its Content-Length if known."""
    raw = [(n, v) for n, vs in response.headers.getAllRawHeaders() for v in vs]
    dropped = _dropped(raw)
    if head:
        dropped = dropped - {b"content-length"}  # a HEAD answer's length is the entity's
    out = [(n, v) for n, v in raw if n.lower() not in dropped]
    if not head and response.length is not UNKNOWN_LENGTH:
        out.append((b"content-length", str(response.length).encode()))
    return out


@implementer(IBodyProducer)
class StreamingBody:
    """The client's request body, fed to the upstream request as it arrives."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        length = exchange.header(b"content-length")
        self.length: int | object = (
            int(length) if length is not None and length.isdigit() else UNKNOWN_LENGTH
        )
        self._done: defer.Deferred[None] = defer.Deferred()
        self._stopped = False

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        def data(chunk: bytes) -> None:
            if not self._stopped:
                consumer.write(chunk)

        def end() -> None:
            if not self._stopped and not self._done.called:
                self._done.callback(None)

        self._exchange.read_body(data, end)
        return self._done

    def pauseProducing(self) -> None:
        self._exchange.pause_body()

    def resumeProducing(self) -> None:
        self._exchange.resume_body()

    def stopProducing(self) -> None:
        self._stopped = True
        self._exchange.resume_body()  # drain what the client still sends; it goes nowhere


class ResponseRelay(Protocol):
    """Writes an upstream response body to the client; pauses upstream while the client is
    slow. A body that ends uncleanly cuts the client with a reset."""

    transport: Any

    def __init__(self, exchange: Exchange, *, counted: Callable[[int], None] | None = None) -> None:
        self._exchange = exchange
        self._counted = counted

    def connectionMade(self) -> None:
        if self._exchange.finished:
            self.transport.stopProducing()
            return
        self._exchange.register_producer(self.transport)
        self._exchange.when_lost(lambda _: self.transport.stopProducing())

    def dataReceived(self, data: bytes) -> None:
        if self._counted is not None:
            self._counted(len(data))
        self._exchange.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self._exchange.finished:
            return
        self._exchange.unregister_producer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self._exchange.finish()
        else:
            self._exchange.abort("upstream_cut")


def relay_response(
    exchange: Exchange, response: IResponse, *, counted: Callable[[int], None] | None = None
) -> None:
    """Answer the client with ``response`` as it is (status, headers, streamed body)."""
    head = exchange.method == "HEAD"
    exchange.start_response(response.code, response_headers(response, head=head))
    if head or response.code in (204, 304) or response.length == 0:
        exchange.finish()
        _discard(response)
        return
    response.deliverBody(ResponseRelay(exchange, counted=counted))


def _discard(response: IResponse) -> None:
    class _Drop(Protocol):
        def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
            pass

    response.deliverBody(_Drop())


def answer_error(exchange: Exchange, failure: Failure) -> None:
    """An upstream request failed: 502/504 if nothing was answered yet, else a reset."""
    if exchange.finished:
        return
    if exchange.status:
        exchange.abort("upstream_failed")
        return
    if failure.check(NotRouted):
        status, why = 502, "not_routed"
    elif failure.check(defer.CancelledError, TimeoutError):
        status, why = 504, "upstream_timeout"
    else:
        status, why = 502, "upstream_failed"
    _log.info(
        "upstream failed for {method} {host}: {why} ({error})",
        method=exchange.method,
        host=exchange.host,
        why=why,
        error=failure.getErrorMessage(),
    )
    exchange.detail = why
    exchange.start_response(status, [(b"content-length", b"0")])
    exchange.finish()


def pass_through(exchange: Exchange, upstream: Upstream) -> defer.Deferred[Any]:
    """Send the exchange's request upstream as it came and stream the answer back."""
    body = StreamingBody(exchange) if exchange.has_body else None
    url = b"https://" + exchange.host.encode("ascii") + exchange.raw_target
    d = upstream.request(
        exchange.method.encode("ascii"),
        url,
        forward_headers(exchange.headers),
        body,
        head_timeout=body is None,
    )
    exchange.when_lost(lambda _: d.cancel())
    d.addCallbacks(
        lambda response: relay_response(exchange, response), lambda f: answer_error(exchange, f)
    )
    d.addErrback(lambda f: _log.failure("pass-through failed", failure=f))
    return d
