"""The gateway's HTTP/1.1 server, over the TLS it terminated: h11, one request at a time.

twisted.web's server reads a whole request body before it lets anyone answer, so it cannot
stream a multi-GiB push; h11 hands over the body as it arrives. The protocol stays thin: bytes
in, h11 events out to one :class:`Exchange` per request, which the handler (pass-through or the
blob path) answers through. Flow control both ways: a handler that cannot take more request
body pauses reading from the client; a handler's response source is registered as the client
transport's producer, so a slow client pauses it. After the response, the connection takes the
next request (keep-alive) if both sides ended their messages cleanly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final
from typing import Protocol as TypingProtocol

import h11
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["Exchange", "GatewayHTTP", "GatewayHTTPFactory", "Handler"]

_log = Logger(namespace="acrrelay.gateway.server")

#: The largest request head h11 accepts.
MAX_HEAD: Final = 64 * 1024
#: How much of an already answered request's body is read and dropped to keep the connection.
DRAIN_LIMIT: Final = 1024 * 1024
#: Request-body bytes an exchange holds before the handler asked for them.
BODY_HIGH_WATER: Final = 256 * 1024


class Handler(TypingProtocol):
    """Answers one request. Called once per exchange, in the reactor."""

    def __call__(self, exchange: Exchange) -> None: ...


class Exchange:
    """One request and its answer. Handlers read the request from it and answer through it."""

    def __init__(self, connection: GatewayHTTP, request: h11.Request, host: str) -> None:
        self._connection = connection
        self.method = request.method.decode("ascii")
        self.target = request.target.decode("ascii", "replace")
        self.raw_target = request.target
        self.headers: list[tuple[bytes, bytes]] = [(n, v) for n, v in request.headers]
        #: The TLS server name the client reached: the upstream host.
        self.host = host
        self.client = connection.client
        self.status = 0
        self.bytes_out = 0
        self.bytes_in = 0
        #: hit, miss, coalesced, bypass, or None for pass-through.
        self.cache: str | None = None
        self.detail: str | None = None
        self.started = connection.reactor.seconds()
        self.body_done = False
        self.finished = False
        self._body: list[bytes] = []
        self._buffered = 0
        self._on_data: Callable[[bytes], None] | None = None
        self._on_end: Callable[[], None] | None = None
        self._paused_by_handler = False
        self._lost: list[Callable[[Failure], None]] = []

    # -- the request

    def header(self, name: bytes) -> bytes | None:
        """The first value of a request header (names are lower-case in h11)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def joined(self, name: bytes) -> bytes | None:
        """Every value of a request header joined with ", " (Accept often comes in several
        lines), or None if it is absent."""
        values = [value for key, value in self.headers if key == name]
        return b", ".join(values) if values else None

    @property
    def has_body(self) -> bool:
        return self.header(b"transfer-encoding") is not None or (
            self.header(b"content-length") not in (None, b"0")
        )

    def read_body(self, on_data: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        """Deliver the request body, what arrived so far first, then as it comes."""
        if self._connection.waiting_for_100():
            self._connection.send(h11.InformationalResponse(status_code=100, headers=[]))
        self._on_data, self._on_end = on_data, on_end
        body, self._body, self._buffered = self._body, [], 0
        for chunk in body:
            on_data(chunk)
        if self.body_done:
            on_end()
        self._connection.update_reading()

    def pause_body(self) -> None:
        """The handler's sink is full: stop reading from the client."""
        self._paused_by_handler = True
        self._connection.update_reading()

    def resume_body(self) -> None:
        self._paused_by_handler = False
        self._connection.update_reading()

    def wants_body(self) -> bool:
        if self.body_done or self._paused_by_handler:
            return False
        return self._on_data is not None or self._buffered < BODY_HIGH_WATER

    def _data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._on_data is None:
            self._body.append(data)
            self._buffered += len(data)
        else:
            self._on_data(data)

    def _end(self) -> None:
        self.body_done = True
        if self._on_end is not None:
            self._on_end()

    # -- the answer

    def start_response(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self._connection.send(h11.Response(status_code=status, headers=headers))

    def write(self, data: bytes) -> None:
        if data and not self.finished:
            self.bytes_out += len(data)
            self._connection.send(h11.Data(data=data))

    def finish(self) -> None:
        """End the answer cleanly; the connection takes the next request if it can."""
        if self.finished:
            return
        try:
            self._connection.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # Fewer bytes than the Content-Length said: cut, never a clean short answer.
            self.abort("short_body")
            return
        self.finished = True
        self._connection.exchange_done(self, "done")

    def abort(self, why: str) -> None:
        """Cut the client's connection with a RESET: never a clean end of a short answer."""
        if self.finished:
            return
        self.finished = True
        self.detail = why
        self._connection.transport.abortConnection()
        self._connection.exchange_done(self, why)

    def register_producer(self, producer: Any) -> None:
        """``producer`` (streaming) is paused while the client reads slower than it sends."""
        self._connection.transport.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        self._connection.transport.unregisterProducer()

    def when_lost(self, callback: Callable[[Failure], None]) -> None:
        """Call ``callback`` if the client goes away before the answer is finished."""
        self._lost.append(callback)

    def _connection_lost(self, reason: Failure) -> None:
        if self.finished:
            return
        self.finished = True
        self.detail = self.detail or "client_closed"
        for callback in self._lost:
            callback(reason)


class GatewayHTTP(Protocol):
    """h11 on one client connection; ``handler`` answers each request."""

    transport: Any

    def __init__(
        self,
        handler: Handler,
        reactor: Any,
        *,
        idle_timeout: float,
        first_timeout: float | None = None,
        done: Callable[[Exchange, str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        #: Until the first request head: a peer that never finishes its TLS handshake or
        #: never asks anything holds a descriptor only this long.
        self.first_timeout = idle_timeout if first_timeout is None else first_timeout
        self._done = done
        self.client = ""
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.exchange: Exchange | None = None
        self._idle: IDelayedCall | None = None
        self._reading = True
        self._closed = False
        #: Bytes of an answered request's body still to drop, or None.
        self._draining: int | None = None

    # -- transport events

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client = str(getattr(peer, "host", ""))
        self._arm_idle(self.first_timeout)

    def dataReceived(self, data: bytes) -> None:
        # No timer reset here: a request head must be complete within the timeout armed at
        # connect (first_timeout) or after the last answer (idle_timeout), however it trickles.
        try:
            self._h11.receive_data(data)
        except RuntimeError:  # data after a close we decided on
            return
        self._pump()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self._closed = True
        self._cancel_idle()
        if self.exchange is not None:
            exchange, self.exchange = self.exchange, None
            exchange._connection_lost(reason)
            if self._done is not None:
                self._done(exchange, exchange.detail or "client_closed")

    # -- h11 events

    def _pump(self) -> None:
        while not self._closed:
            if self.exchange is not None and not self.exchange.wants_body():
                break
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                self._bad_request(e)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self._begin(event)
            elif isinstance(event, h11.Data) and self.exchange is not None:
                self.exchange._data(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage) and self.exchange is not None:
                self.exchange._end()
            elif isinstance(event, h11.Data) and self._draining is not None:
                self._draining -= len(event.data)
                if self._draining < 0:
                    self.transport.loseConnection()
                    return
            elif isinstance(event, h11.EndOfMessage) and self._draining is not None:
                self._draining = None
                self._next_cycle()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.transport.loseConnection()
                return
        self.update_reading()

    def _begin(self, request: h11.Request) -> None:
        self._cancel_idle()
        host = self._server_name()
        exchange = Exchange(self, request, host)
        self.exchange = exchange
        why = _misdirected(exchange)
        if why is not None:
            _log.info("misdirected request from {client}: {why}", client=self.client, why=why)
            exchange.start_response(421, [(b"content-length", b"0")])
            exchange.detail = "misdirected"
            exchange.finish()
            return
        try:
            self.handler(exchange)
        except Exception:
            _log.failure(
                "handler failed for {method} {target}",
                method=exchange.method,
                target=exchange.target,
            )
            if exchange.status == 0 and not exchange.finished:
                exchange.start_response(500, [(b"content-length", b"0")])
                exchange.finish()
            else:
                exchange.abort("handler_error")

    def _server_name(self) -> str:
        handle = getattr(self.transport, "getHandle", lambda: None)()
        name = getattr(handle, "get_servername", lambda: None)()
        return name.decode("ascii", "replace").lower().rstrip(".") if name else ""

    def _bad_request(self, error: h11.RemoteProtocolError) -> None:
        if self._h11.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self.exchange is None:
            status = error.error_status_hint
            try:
                self.send(h11.Response(status_code=status, headers=[(b"content-length", b"0")]))
                self.send(h11.EndOfMessage())
            except h11.LocalProtocolError:
                pass
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    # -- what exchanges call

    def send(self, event: Any) -> None:
        data = self._h11.send(event)
        if data:
            self.transport.write(data)

    def waiting_for_100(self) -> bool:
        return bool(self._h11.they_are_waiting_for_100_continue)

    def update_reading(self) -> None:
        """Read from the client only while the current exchange wants more body, or between
        requests: one request at a time, and a full sink pauses the client."""
        want = not self._closed and (self.exchange is None or self.exchange.wants_body())
        if want and not self._reading:
            self._reading = True
            self.transport.resumeProducing()
            self.reactor.callLater(0, self._pump)  # events h11 already holds
        elif not want and self._reading:
            self._reading = False
            self.transport.pauseProducing()

    def exchange_done(self, exchange: Exchange, how: str) -> None:
        if self.exchange is not exchange:
            return
        self.exchange = None
        if self._done is not None:
            self._done(exchange, how)
        if how != "done":
            return
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.SEND_BODY:
            # Answered before the request ended (a refusal, a 421): read the rest of its body
            # and drop it, up to a limit, to keep the connection.
            self._draining = DRAIN_LIMIT
            self.update_reading()
            self.reactor.callLater(0, self._pump)
            return
        self._next_cycle()

    def _next_cycle(self) -> None:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
            self._arm_idle()
            self.update_reading()
            self.reactor.callLater(0, self._pump)
        else:
            # Either side asked to close, or the request cannot be read to its end.
            self.transport.loseConnection()

    # -- idle timeout

    def _arm_idle(self, timeout: float | None = None) -> None:
        self._cancel_idle()
        timeout = self.idle_timeout if timeout is None else timeout
        if timeout > 0:
            self._idle = self.reactor.callLater(timeout, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _idle_expired(self) -> None:
        self._idle = None
        if self.exchange is None:
            self.transport.loseConnection()


def _misdirected(exchange: Exchange) -> str | None:
    """Why a request's Host does not name the TLS server name it came in on, or None."""
    if not exchange.raw_target.startswith(b"/"):
        # Absolute-form or "*": the upstream is the TLS name, never a URL a client writes.
        return "the target is not a path"
    host = exchange.header(b"host")
    if host is None:
        return "no Host header"
    # The port names the gateway's own listener, whatever it is; the name must match.
    text = host.decode("ascii", "replace").lower()
    name, colon, port = text.rpartition(":")
    if not colon or not port.isdigit():
        name = text
    if name.rstrip(".") != exchange.host:
        return f"Host {name!r} is not the TLS name {exchange.host!r}"
    return None


class GatewayHTTPFactory(Factory):
    """Builds :class:`GatewayHTTP` for each (TLS-terminated) connection."""

    noisy = False

    def __init__(
        self,
        handler: Handler,
        reactor: Any,
        *,
        idle_timeout: float,
        first_timeout: float | None = None,
        done: Callable[[Exchange, str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.first_timeout = first_timeout
        self.done = done

    def buildProtocol(self, addr: Any) -> GatewayHTTP:
        protocol = GatewayHTTP(
            self.handler,
            self.reactor,
            idle_timeout=self.idle_timeout,
            first_timeout=self.first_timeout,
            done=self.done,
        )
        protocol.factory = self
        return protocol
