"""The front doors: learn where a connection goes, ask the policy, splice to the backend.

Each accepted connection is one :class:`RelayProtocol`, an explicit state machine::

    peeking -> [authorizing] -> connecting -> splicing -> closed
       |             |               \\-> closing (backend failed: alert or 502/504)
       \\-------------\\-> closing (refused: alert, or an HTTP error response) -> closed

**peeking** reads, under one size cap and one timeout:

1. a PROXY protocol v1/v2 header, if the peer is in the listener's
   ``proxy_protocol_from``; its source address becomes the client. From anyone else
   a PROXY header is refused;
2. the client ACL and the per-client limit, for that client;
3. the first bytes, which choose the front door: ``0x16`` is TLS (routed by the
   ClientHello's SNI), a capital letter is HTTP: ``CONNECT host:port`` (routed by its
   target) or a plain request (routed by its absolute URI or its ``Host``).

Every door asks :meth:`~acrrelay.routing.Policy.decide` the same question. Refusals
are answered in the door's own language (a TLS ``unrecognized_name`` alert, or an
HTTP 400/403/407/408/431), logged with their reason and counted. On a listener with
users, every request needs ``Proxy-Authorization`` (**authorizing**, off the reactor).
A plain-HTTP request there is the connection's only one: its head goes on without the
``Proxy-Authorization`` meant for the relay, with ``Connection: close``, and any later
request is refused. That is the one place bytes are not passed as they came.

**connecting** pauses the client while the route's backend connects, under the
connect timeout; a route may have a PROXY header sent to the backend first.
**splicing** hands over to a :class:`~acrrelay.splice.Pump`. On plain HTTP the later
requests of a keep-alive connection are followed, and one that names another host
is cut off: the first request's route is the only one the connection has.

Every connection ends with exactly one access event. A per-connection error never
escapes ``dataReceived``: it is logged, counted, and that connection alone is closed.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Final

from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from acrrelay.backends import AddressDenied
from acrrelay.clienthello import NEED_MORE, ClientHello, ClientHelloError, ClientHelloReader, NotTLS
from acrrelay.httphead import (
    HttpHeadError,
    HttpHeadReader,
    HttpRequest,
    RequestFollower,
    error_response,
    without_proxy_auth,
)
from acrrelay.proxyproto import (
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    is_proxy_signature,
)
from acrrelay.reasons import http_status
from acrrelay.routing import Door, Refusal, Route, normalize_name
from acrrelay.splice import BackendProtocol, Pump, PumpResult, reset_not_eof

if TYPE_CHECKING:
    from acrrelay.config import ListenerConfig
    from acrrelay.relay import Relay

__all__ = ["RelayFactory", "RelayProtocol", "State", "describe", "tls_alert"]

ALERT_UNRECOGNIZED_NAME: Final = 112
ALERT_INTERNAL_ERROR: Final = 80
CONNECT_ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"
_HTTP_FIRST: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TLS_FIRST: Final = 0x16

_PROXY_AUTHENTICATE: Final = b'Proxy-Authenticate: Basic realm="acrrelay"\r\n'


def tls_alert(description: int) -> bytes:
    """A fatal TLS alert record, as a server sends before its ServerHello."""
    return b"\x15\x03\x03\x00\x02\x02" + bytes([description])


class State(enum.Enum):
    PEEKING = "peeking"
    AUTHORIZING = "authorizing"
    CONNECTING = "connecting"
    SPLICING = "splicing"
    CLOSING = "closing"
    CLOSED = "closed"


def describe(address: IAddress | None) -> str:
    """``host:port`` (``[v6]:port``) for IP addresses, the path for UNIX ones."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return _host_port(unmapped(host), port)
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address) if address is not None else "-"


def unmapped(host: str) -> str:
    """An IPv4 client on a dual-stack socket (``::ffff:192.0.2.1``) as the IPv4 address it is."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _BackendFactory(Factory):
    protocol = BackendProtocol
    noisy = False


_BACKEND_FACTORY: Final = _BackendFactory()


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """One client connection, from the first byte to the access-log line."""

    _log = Logger()

    def __init__(self, relay: Relay, listener: ListenerConfig) -> None:
        self.relay = relay
        self.listener = listener
        self.state = State.PEEKING
        self.id = 0
        #: The TCP peer; with a PROXY header, the load balancer.
        self.peer = "-"
        #: The client as policy sees it: the PROXY header's source, or the peer.
        self.client = "-"
        self.client_host: str | None = None
        self.door: Door | None = None
        self.proxy_header: ProxyHeader | None = None
        self.hello: ClientHello | None = None
        self.request: HttpRequest | None = None
        self.user: str | None = None
        self.target: tuple[str, int] | None = None
        self.route: Route | None = None
        self.pump: Pump | None = None
        self.backend_address: str | None = None
        self.started = 0.0
        self._routed_at: float | None = None
        self._connected_at: float | None = None
        self._buffer = bytearray()
        self._skip = 0  # leading buffered bytes that are not forwarded (a CONNECT head)
        self._proxy_reader: ProxyHeaderReader | None = None
        self._check_signature = False  # untrusted peer: refuse a PROXY header
        self._tls_reader: ClientHelloReader | None = None
        self._http_reader: HttpHeadReader | None = None
        self._follower: RequestFollower | None = None
        #: A plain-HTTP request on a listener with users: forward its head without the
        #: Proxy-Authorization meant for the relay, and allow no other request after it.
        self._consume_proxy_auth = False
        self._admitted = False
        self._timer: IDelayedCall | None = None
        self._pending: defer.Deferred[Any] | None = None
        self._connect_timed_out = False
        self._eof_while_waiting = False
        self._refusal: str | None = None
        self._close_reason: str | None = None
        self._detail: str | None = None

    # -- Twisted's protocol interface

    def connectionMade(self) -> None:
        clock = self.relay.reactor
        self.started = clock.seconds()
        self.id = self.relay.next_id()
        self.relay.opened(self)
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = self.client = describe(peer)
        host = getattr(peer, "host", None)
        self.client_host = unmapped(host) if host is not None else None
        # One timer for the waits before splicing: the peek, then the backend's connect.
        self._timer = clock.callLater(self.relay.settings.peek_timeout, self._timed_out)
        if self.relay.trusts_proxy_header(self.listener, self.client_host):
            self._proxy_reader = ProxyHeaderReader()
        else:
            self._check_signature = True
            self._admit()

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.SPLICING:
            if self._follower is not None and not self._follow(data):
                return
            self.pump.client_data(data)  # type: ignore[union-attr]
            return
        if self.state is not State.PEEKING:
            if self.state in (State.AUTHORIZING, State.CONNECTING):
                # Paused, so rare; kept for the backend all the same, once the follower
                # has seen it (it may hold a later request for another host).
                if self._follower is not None and not self._follow(data):
                    return
                self._buffer += data
            return
        try:
            self._peek(data)
        except Exception:
            # A bug must cost this connection only, and be seen.
            self._log.failure("{client}: internal error while peeking", client=self.client)
            self._refuse("internal_error", "internal error")

    def readConnectionLost(self) -> None:
        if reset_not_eof(self.transport):
            return
        if self.state is State.SPLICING:
            self.pump.client_eof()  # type: ignore[union-attr]
        elif self.state in (State.AUTHORIZING, State.CONNECTING):
            self._eof_while_waiting = True
        elif self.state is State.PEEKING:
            self._cancel_timer()
            self._close("client_gone", "closed before a complete request")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if self.state is State.SPLICING:
            self.pump.client_lost(reason)  # type: ignore[union-attr]
            return
        self._cancel_timer()
        if self.state in (State.PEEKING, State.AUTHORIZING, State.CONNECTING):
            self._close_reason = "client_gone"
            self._detail = f"client left while {self.state.value}"
        if self._pending is not None:
            self.state = State.CLOSED
            self._pending.cancel()
        self._finish(closed_first="client" if self._close_reason == "client_gone" else "relay")

    # -- peeking

    def _admit(self) -> bool:
        """The client ACL and the per-client limit, once the client is known."""
        client = self.client_host or ""
        refusal = self.relay.policy.admit(self.listener.name, client)
        if refusal is None:
            refusal = self.relay.admit_client(self.client_host)
        if refusal is not None:
            self._refuse(refusal.reason, refusal.detail)
            return False
        self._admitted = True
        if self.client_host is not None:
            self.relay.per_client[self.client_host] += 1
        return True

    def _peek(self, data: bytes) -> None:
        if self._proxy_reader is not None:
            try:
                outcome = self._proxy_reader.feed(data)
            except ProxyProtocolError as e:
                reason = "proxy_malformed" if e.reason == "malformed" else "proxy_missing"
                self._refuse(reason, str(e))
                return
            if outcome is NEED_MORE:
                return
            header, data = outcome  # type: ignore[misc]
            self._proxy_reader = None
            self._take_proxy_header(header)
            if not self._admit() or not data:
                return
        self._buffer += data
        if self._check_signature:
            is_proxy = is_proxy_signature(bytes(self._buffer[:16]))
            if is_proxy:
                self._refuse("proxy_untrusted", f"a PROXY header from untrusted {self.peer}")
                return
            if is_proxy is False:
                self._check_signature = False
            elif self._buffer[0] not in _HTTP_FIRST:
                return  # too few bytes to tell a v2 signature from anything else
        if self._tls_reader is not None:
            self._feed_tls(data)
        elif self._http_reader is not None:
            self._feed_http(data)
        else:
            self._choose_door()

    def _take_proxy_header(self, header: ProxyHeader) -> None:
        self.proxy_header = header
        if header.command == "proxy" and header.source is not None:
            host, port = header.source
            self.client_host = host
            self.client = _host_port(host, port)

    def _choose_door(self) -> None:
        protocols = self.listener.protocols
        first = self._buffer[0]
        if first == _TLS_FIRST and "tls" in protocols:
            self.door = Door(self.listener.name, "tls")
            self._tls_reader = ClientHelloReader(self.relay.settings.peek_limit)
            self._feed_tls(bytes(self._buffer))
        elif first in _HTTP_FIRST and ("http" in protocols or "connect" in protocols):
            self._http_reader = HttpHeadReader(self.relay.settings.peek_limit)
            self._feed_http(bytes(self._buffer))
        elif first == _TLS_FIRST:
            self._refuse("protocol_not_allowed", f"TLS is not enabled on {self.listener.name}")
        else:
            detail = "sslv2" if first & 0x80 else "not a TLS handshake record"
            if "http" in protocols or "connect" in protocols:
                detail = "neither TLS nor HTTP"
            self._refuse("not_tls" if protocols == ("tls",) else "not_recognized", detail)

    def _feed_tls(self, data: bytes) -> None:
        assert self._tls_reader is not None
        try:
            outcome = self._tls_reader.feed(data)
        except ClientHelloError as e:
            self._refuse(e.reason, str(e))
            return
        if outcome is NEED_MORE:
            return
        if isinstance(outcome, NotTLS):  # cannot happen: the first byte was checked
            self._refuse("not_tls", outcome.detail)
            return
        assert isinstance(outcome, ClientHello)
        self.hello = outcome
        self._tls_reader = None
        self.relay.metrics.hello_bytes.observe(outcome.size)
        self._route(outcome.server_name, self.listener.tls_port)

    def _feed_http(self, data: bytes) -> None:
        reader = self._http_reader
        assert reader is not None
        try:
            outcome = reader.feed(data)
        except HttpHeadError as e:
            self.door = self.door or Door(self.listener.name, "http")
            self._refuse(e.reason, str(e))
            return
        if outcome is NEED_MORE:
            return
        assert isinstance(outcome, HttpRequest)
        self.request = outcome
        self._http_reader = None
        protocol = "connect" if outcome.is_connect else "http"
        self.door = Door(self.listener.name, protocol)
        if protocol not in self.listener.protocols:
            self._refuse("protocol_not_allowed", f"{protocol} is not enabled on this listener")
            return
        auth = self.relay.auth.get(self.listener.name)
        if outcome.is_connect:
            self._skip = outcome.head_size
        else:
            self._consume_proxy_auth = auth is not None
            self._follower = reader.follower()
            if not self._follow(b""):
                return
        if auth is not None:
            self._authorize(auth.check(outcome.proxy_authorization), outcome)
            return
        self._route(outcome.host, outcome.port)

    def _follow(self, data: bytes) -> bool:
        """Check later requests on a plain-HTTP connection; False if one was refused."""
        assert self._follower is not None and self.request is not None
        try:
            later = self._follower.feed(data)
        except HttpHeadError as e:
            self._cut_off(e.reason, f"later request: {e}")
            return False
        first = self.request
        if later and self._consume_proxy_auth:
            # Its head would carry the relay's credential on to the backend.
            self._cut_off(
                "one_request_with_auth",
                "a later request on a connection whose Proxy-Authorization the relay consumed",
            )
            return False
        for request in later:
            if request.port != first.port or not _same_name(request.host, first.host):
                self._cut_off(
                    "host_switch",
                    f"a later request on this connection asks for {request.host}:{request.port}",
                )
                return False
        return True

    def _cut_off(self, reason: str, detail: str) -> None:
        if self.state is not State.SPLICING:
            self._refuse(reason, detail)
            return
        self._refusal = reason
        self._detail = detail
        self._count_refusal(reason, detail)
        self.pump.abort("refused")  # type: ignore[union-attr]

    def _authorize(self, check: defer.Deferred[str | None], request: HttpRequest) -> None:
        self.state = State.AUTHORIZING
        self.transport.pauseProducing()  # type: ignore[union-attr]
        self._pending = check

        def checked(user: str | None) -> None:
            self._pending = None
            if self.state is not State.AUTHORIZING:
                return
            self.state = State.PEEKING
            if user is None:
                self._refuse("auth_required", "Proxy-Authorization is missing or wrong")
                return
            self.user = user
            self._route(request.host, request.port)

        def failed(failure: Failure) -> None:
            self._pending = None
            if self.state is State.AUTHORIZING:
                self._log.failure("{client}: password check failed", failure, client=self.client)
                self.state = State.PEEKING
                self._refuse("internal_error", "password check failed")

        check.addCallbacks(checked, failed)

    def _timed_out(self) -> None:
        self._timer = None
        if self.state is State.CONNECTING and self._pending is not None:
            # _connect_failed hears of it from the cancelled attempt, as connect_timeout.
            self._connect_timed_out = True
            self._pending.cancel()
            return
        if self.state is State.PEEKING:
            detail = (
                f"no complete request after {self.relay.settings.peek_timeout:g}s "
                f"({len(self._buffer)} bytes)"
            )
            if self._http_reader is not None and self.door is None:
                self.door = Door(self.listener.name, "http")
            self._refuse("peek_timeout", detail)

    # -- routing

    def _route(self, name: str | None, port: int) -> None:
        assert self.door is not None
        self._routed_at = self.relay.reactor.seconds()
        self.relay.metrics.observe_peek(self.door.protocol, self._routed_at - self.started)
        decision = self.relay.policy.decide(self.door, name, port, self.client_host or "")
        if isinstance(decision, Refusal):
            self._refuse(decision.reason, decision.detail)
            return
        assert name is not None
        host = normalize_name(name)
        self.route = decision
        self.relay.stats.routed[(decision.name, self.door.protocol)] += 1
        self.target = (host, port)
        self.state = State.CONNECTING
        self._arm_timer(self.relay.settings.connect_timeout)
        self.transport.pauseProducing()  # type: ignore[union-attr]
        try:
            d = self.relay.connector.connect(decision, host, port, _BACKEND_FACTORY)
        except Exception as e:  # a bad endpoint must cost this connection only
            self._backend_failed("connect_failed", f"cannot build backend endpoint: {e}")
            return
        self._pending = d
        d.addCallbacks(self._connected, self._connect_failed)

    # -- connecting

    def _connected(self, protocol: BackendProtocol) -> None:
        self._pending = None
        self._cancel_timer()
        transport = protocol.transport
        if self.state is not State.CONNECTING:
            transport.abortConnection()  # type: ignore[union-attr]
            return
        self._connected_at = self.relay.reactor.seconds()
        self.backend_address = describe(transport.getPeer())  # type: ignore[union-attr]
        if self.route is not None and self._routed_at is not None:
            self.relay.metrics.observe_connect(
                self.route.name, self._connected_at - self._routed_at
            )
        self.state = State.SPLICING
        settings = self.relay.settings
        self.pump = Pump(
            self.relay.reactor,
            self.transport,  # type: ignore[arg-type]
            idle_timeout=settings.idle_timeout,
            buffer_size=settings.buffer_size,
            on_done=self._spliced,
            zero_copy=settings.zero_copy,
            # The follower must see every byte the client sends on plain HTTP.
            zero_copy_up=self._follower is None,
        )
        protocol.pump = self.pump
        if self.route is not None and self.route.proxy_protocol is not None:
            transport.write(self._outbound_proxy_header(self.route.proxy_protocol))  # type: ignore[union-attr]
        if self.door is not None and self.door.protocol == "connect":
            self.transport.write(CONNECT_ESTABLISHED)  # type: ignore[union-attr]
        replay = bytes(self._buffer[self._skip :])
        if self._consume_proxy_auth and self.request is not None:
            head_size = self.request.head_size
            replay = without_proxy_auth(replay[:head_size]) + replay[head_size:]
        self._buffer = bytearray()
        self.pump.start(transport, replay)  # type: ignore[arg-type]
        if self._eof_while_waiting:
            self.pump.client_eof()

    def _outbound_proxy_header(self, version: str) -> bytes:
        """The PROXY header naming the real client, as the route asks for it."""
        header = self.proxy_header
        source: tuple[str, int] | None
        destination: tuple[str, int] | None
        if header is not None and header.command == "proxy" and header.source is not None:
            source, destination = header.source, header.destination
        else:
            source = _ip_port(self.transport.getPeer())  # type: ignore[union-attr]
            destination = _ip_port(self.transport.getHost())  # type: ignore[union-attr]
        encode = encode_v2 if version == "v2" else encode_v1
        return encode(source, destination)

    def _connect_failed(self, failure: Failure) -> None:
        self._pending = None
        if self.state is not State.CONNECTING:
            return  # the client left and we cancelled
        if self._connect_timed_out or failure.check(defer.TimeoutError, error.TimeoutError):
            reason = "connect_timeout"
            detail = f"no connection within {self.relay.settings.connect_timeout:g}s"
        elif failure.check(AddressDenied):
            reason, detail = "address_denied", _one_line(failure)
        elif failure.check(error.DNSLookupError):
            reason, detail = "resolve_failed", _one_line(failure)
        else:
            reason, detail = "connect_failed", _one_line(failure)
        self._backend_failed(reason, detail)

    def _backend_failed(self, reason: str, detail: str) -> None:
        self._cancel_timer()
        self.relay.stats.backend_failures[reason] += 1
        self._log.warn(
            "{client} -> {target}: {reason} to {backend}: {detail}",
            client=self.client,
            target=self._target_text(),
            reason=reason,
            backend=self.route.backend if self.route else None,
            detail=detail,
        )
        self._close(reason, detail, answer=self._answer(reason, detail, failed=True))

    # -- splicing

    def _spliced(self, result: PumpResult) -> None:
        if self._refusal is None:
            self._close_reason = result.reason
        stats = self.relay.stats
        stats.bytes_up += result.bytes_up
        stats.bytes_down += result.bytes_down
        stats.paused_seconds["up"] += result.paused_up
        stats.paused_seconds["down"] += result.paused_down
        if self.route is not None:
            stats.route_bytes[(self.route.name, "up")] += result.bytes_up
            stats.route_bytes[(self.route.name, "down")] += result.bytes_down
        self._finish(
            closed_first=result.closed_first,
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
            paused_up=result.paused_up,
            paused_down=result.paused_down,
            zero_copy=result.zero_copy,
        )

    def kill(self, reason: str = "killed") -> None:
        """Cut this connection now, whatever its state."""
        if self.state is State.SPLICING:
            self.pump.abort(reason)  # type: ignore[union-attr]
        elif self.state is not State.CLOSED:
            self._cancel_timer()
            self._close_reason = reason
            self.state = State.CLOSING
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- ending

    def _count_refusal(self, reason: str, detail: str) -> None:
        self.relay.stats.refused[reason] += 1
        if not self.relay.refusal_log.allow(reason):
            return  # a flood: the access log has each one, the main log a summary
        self._log.info(
            "refused {client} on {listener}: {reason} ({detail})",
            client=self.client,
            listener=self.listener.name,
            reason=reason,
            detail=detail,
            target=self._target_text(),
        )

    def _refuse(self, reason: str, detail: str) -> None:
        self._cancel_timer()
        self._refusal = reason
        self._count_refusal(reason, detail)
        self._close("refused", detail, answer=self._answer(reason, detail))

    def _answer(self, reason: str, detail: str, *, failed: bool = False) -> bytes:
        """What to tell the client, in its door's language, before closing."""
        protocol = self.door.protocol if self.door is not None else None
        if protocol is None and self._buffer[:1] == b"\x16":
            protocol = "tls"
        if protocol == "tls":
            internal = failed or reason == "internal_error"
            return tls_alert(ALERT_INTERNAL_ERROR if internal else ALERT_UNRECOGNIZED_NAME)
        if protocol in ("http", "connect"):
            status = http_status(reason)
            extra = _PROXY_AUTHENTICATE if status == 407 else b""
            return error_response(status, reason, detail, extra=extra)
        return b""

    def _close(self, reason: str, detail: str, *, answer: bytes = b"") -> None:
        self.state = State.CLOSING
        self._close_reason = reason
        self._detail = detail
        self._buffer = bytearray()
        if answer:
            self.transport.write(answer)  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _arm_timer(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.relay.reactor.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _target_text(self) -> str | None:
        if self.target is not None:
            return _host_port(*self.target)
        if self.hello is not None:
            return self.hello.server_name
        if self.request is not None and self.request.host is not None:
            return _host_port(self.request.host, self.request.port)
        return None

    def _finish(
        self,
        *,
        closed_first: str,
        bytes_up: int = 0,
        bytes_down: int = 0,
        paused_up: float = 0.0,
        paused_down: float = 0.0,
        zero_copy: str | None = None,
    ) -> None:
        self.state = State.CLOSED
        self.relay.closed(self)
        if self._admitted and self.client_host is not None:
            self._admitted = False
            remaining = self.relay.per_client[self.client_host] - 1
            if remaining > 0:
                self.relay.per_client[self.client_host] = remaining
            else:
                del self.relay.per_client[self.client_host]
        reason = self._close_reason or "done"
        self.relay.stats.closed[reason] += 1
        if not self.relay.access_wanted:
            return
        now = self.relay.reactor.seconds()
        hello = self.hello
        route = self.route
        request = self.request
        self.relay.access.info(
            "{client} {target} -> {backend_address} {close_reason}",
            id=self.id,
            worker=self.relay.worker if self.relay.config.workers > 1 else None,
            listener=self.listener.name,
            client=self.client,
            peer=self.peer if self.peer != self.client else None,
            front_door=self.door.protocol if self.door else None,
            target=self._target_text(),
            sni=hello.server_name if hello else None,
            method=request.method if request else None,
            user=self.user,
            alpn=list(hello.alpn) if hello and hello.alpn else None,
            ech=True if hello and hello.ech else None,
            hello_bytes=hello.size if hello else None,
            hello_records=hello.records if hello else None,
            route=route.name if route else None,
            service=route.service if route else None,
            backend=route.backend if route else None,
            backend_address=self.backend_address,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            peek_ms=_ms(self._routed_at, self.started),
            connect_ms=_ms(self._connected_at, self._routed_at),
            total_ms=_ms(now, self.started),
            paused_up_ms=round(paused_up * 1000, 3) if paused_up else None,
            paused_down_ms=round(paused_down * 1000, 3) if paused_down else None,
            zero_copy=zero_copy,
            close_reason=f"refused:{self._refusal}" if self._refusal else reason,
            closed_first=closed_first,
            detail=self._detail,
        )


def _ip_port(address: IAddress) -> tuple[str, int] | None:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return (host, port) if host is not None and port is not None else None


def _same_name(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    try:
        return normalize_name(a) == normalize_name(b)
    except ValueError:
        return False


def _ms(end: float | None, start: float | None) -> float | None:
    if end is None or start is None:
        return None
    return round((end - start) * 1000, 3)


def _one_line(failure: Failure) -> str:
    text = failure.getErrorMessage().strip() or failure.type.__name__  # type: ignore[union-attr]
    return text.splitlines()[0] if text else "unknown error"


class RelayFactory(ServerFactory):
    """Builds one :class:`RelayProtocol` per connection accepted on ``listener``."""

    noisy = False

    def __init__(self, relay: Relay, listener: ListenerConfig) -> None:
        self.relay = relay
        self.listener = listener

    def buildProtocol(self, addr: IAddress | None) -> RelayProtocol | None:
        if self.relay.draining:
            # Listeners close as a drain starts; one that has not yet takes no one new.
            self.relay.stats.refused["draining"] += 1
            return None
        if self.relay.at_limit():
            # Accept passes are capped to the room left; this is the last guard.
            self.relay.stats.refused["over_limit"] += 1
            self.relay.access.info(
                "{client} refused: over the connection limit",
                listener=self.listener.name,
                client=describe(addr),
                close_reason="refused:over_limit",
                closed_first="relay",
                detail=f"{len(self.relay.connections)} connections open",
            )
            return None
        protocol = RelayProtocol(self.relay, self.listener)
        protocol.factory = self
        return protocol
