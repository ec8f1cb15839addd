"""The TLS-peeking front door: read the ClientHello, route by SNI, splice to the backend.

Each accepted connection is one :class:`RelayProtocol`, an explicit state machine::

    peeking -> connecting -> splicing -> closed
        \\            \\-> closing (backend failed) -> closed
         \\-> closing (refused: alert, close) -> closed

- **peeking**: bytes are fed to a :class:`~acrrelay.clienthello.ClientHelloReader`
  under a size cap and a timeout. Not-TLS, malformed, no SNI, too large, timed
  out and not allowed are each refused, with a TLS ``unrecognized_name`` alert
  where the input was TLS, logged with the reason and counted.
- **connecting**: the client is paused while the route's backend connects,
  under the connect timeout.
- **splicing**: a :class:`~acrrelay.splice.Pump` moves bytes both ways, peeked
  bytes first.

Every connection ends with exactly one access event. A per-connection error
never escapes ``dataReceived``: it is logged, counted, and that connection
alone is closed.
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

from acrrelay.clienthello import NEED_MORE, ClientHello, ClientHelloError, ClientHelloReader, NotTLS
from acrrelay.routing import Refusal, Route
from acrrelay.splice import BackendProtocol, Pump, PumpResult

if TYPE_CHECKING:
    from acrrelay.config import ListenerConfig
    from acrrelay.relay import Relay

__all__ = ["RelayFactory", "RelayProtocol", "State", "tls_alert"]

FRONT_DOOR_TLS: Final = "tls"
ALERT_UNRECOGNIZED_NAME: Final = 112
ALERT_INTERNAL_ERROR: Final = 80


def tls_alert(description: int) -> bytes:
    """A fatal TLS alert record, as a server sends before its ServerHello."""
    return b"\x15\x03\x03\x00\x02\x02" + bytes([description])


class State(enum.Enum):
    PEEKING = "peeking"
    CONNECTING = "connecting"
    SPLICING = "splicing"
    CLOSING = "closing"
    CLOSED = "closed"


def describe(address: IAddress | None) -> str:
    """``host:port`` (``[v6]:port``) for IP addresses, the path for UNIX ones."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address) if address is not None else "-"


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
        self.client = "-"
        self.hello: ClientHello | None = None
        self.route: Route | None = None
        self.pump: Pump | None = None
        self.backend_address: str | None = None
        self.started = 0.0
        self._routed_at: float | None = None
        self._connected_at: float | None = None
        self._buffer = bytearray()
        self._reader = ClientHelloReader(relay.settings.peek_limit)
        self._timer: IDelayedCall | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._eof_while_connecting = False
        self._refusal: str | None = None
        self._close_reason: str | None = None
        self._detail: str | None = None

    # -- Twisted's protocol interface

    def connectionMade(self) -> None:
        clock = self.relay.reactor
        self.started = clock.seconds()
        self.id = self.relay.next_id()
        self.relay.connections[self.id] = self
        self.relay.stats.accepted += 1
        self.client = describe(self.transport.getPeer())  # type: ignore[union-attr]
        self._timer = clock.callLater(self.relay.settings.peek_timeout, self._peek_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.SPLICING:
            self.pump.client_data(data)  # type: ignore[union-attr]
            return
        if self.state is not State.PEEKING:
            return  # refused or failed: we are closing and want nothing more
        try:
            self._peek(data)
        except Exception:
            # A bug must cost this connection only, and be seen.
            self._log.failure("{client}: internal error while peeking", client=self.client)
            self._cancel_timer()
            self.relay.stats.refused["internal_error"] += 1
            self._refusal = "internal_error"
            self._close("refused", "internal error", alert=ALERT_INTERNAL_ERROR)

    def _peek(self, data: bytes) -> None:
        self._buffer += data
        try:
            outcome = self._reader.feed(data)
        except ClientHelloError as e:
            self._refuse(e.reason, str(e), tls=True)
            return
        if outcome is NEED_MORE:
            return
        if isinstance(outcome, NotTLS):
            self._refuse("not_tls", outcome.detail, tls=False)
            return
        assert isinstance(outcome, ClientHello)
        self.hello = outcome
        self._route(outcome)

    def readConnectionLost(self) -> None:
        if self.state is State.SPLICING:
            self.pump.client_eof()  # type: ignore[union-attr]
        elif self.state is State.CONNECTING:
            self._eof_while_connecting = True
        elif self.state is State.PEEKING:
            self._cancel_timer()
            self._close("client_gone", "closed before a complete ClientHello")

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if self.state is State.SPLICING:
            self.pump.client_lost(reason)  # type: ignore[union-attr]
            return
        self._cancel_timer()
        if self.state in (State.PEEKING, State.CONNECTING):
            self._close_reason = "client_gone"
            self._detail = f"client left while {self.state.value}"
        if self._connecting is not None:
            self.state = State.CLOSED
            self._connecting.cancel()
        self._finish(closed_first="client" if self._close_reason == "client_gone" else "relay")

    # -- peeking

    def _peek_timed_out(self) -> None:
        self._timer = None
        if self.state is State.PEEKING:
            tls = bool(self._buffer) and self._buffer[0] == 0x16
            self._refuse(
                "peek_timeout",
                f"no complete ClientHello after {self.relay.settings.peek_timeout:g}s "
                f"({len(self._buffer)} bytes)",
                tls=tls,
            )

    def _route(self, hello: ClientHello) -> None:
        self._cancel_timer()
        self._routed_at = self.relay.reactor.seconds()
        reached: int = getattr(self.transport.getHost(), "port", 0)  # type: ignore[union-attr]
        port = self.listener.target_port or reached
        client_host = getattr(self.transport.getPeer(), "host", self.client)  # type: ignore[union-attr]
        decision = self.relay.policy.decide(FRONT_DOOR_TLS, hello.server_name, port, client_host)
        if isinstance(decision, Refusal):
            self._refuse(decision.reason, decision.detail, tls=True)
            return
        self.route = decision
        self.state = State.CONNECTING
        self.transport.pauseProducing()  # type: ignore[union-attr]
        assert hello.server_name is not None
        try:
            d = self.relay.connector.connect(decision, hello.server_name, port, _BACKEND_FACTORY)
        except Exception as e:  # a bad endpoint must cost this connection only
            self._backend_failed("connect_failed", f"cannot build backend endpoint: {e}")
            return
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    # -- connecting

    def _connected(self, protocol: BackendProtocol) -> None:
        self._connecting = None
        transport = protocol.transport
        if self.state is not State.CONNECTING:
            transport.abortConnection()  # type: ignore[union-attr]
            return
        self._connected_at = self.relay.reactor.seconds()
        self.backend_address = describe(transport.getPeer())  # type: ignore[union-attr]
        self.state = State.SPLICING
        settings = self.relay.settings
        self.pump = Pump(
            self.relay.reactor,
            self.transport,  # type: ignore[arg-type]
            idle_timeout=settings.idle_timeout,
            buffer_size=settings.buffer_size,
            on_done=self._spliced,
        )
        protocol.pump = self.pump
        replay, self._buffer = bytes(self._buffer), bytearray()
        self.pump.start(transport, replay)  # type: ignore[arg-type]
        if self._eof_while_connecting:
            self.pump.client_eof()

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.state is not State.CONNECTING:
            return  # the client left and we cancelled
        if failure.check(defer.TimeoutError, error.TimeoutError):
            reason = "connect_timeout"
            detail = f"no connection within {self.relay.settings.connect_timeout:g}s"
        elif failure.check(error.DNSLookupError):
            reason, detail = "resolve_failed", _one_line(failure)
        else:
            reason, detail = "connect_failed", _one_line(failure)
        self._backend_failed(reason, detail)

    def _backend_failed(self, reason: str, detail: str) -> None:
        self.relay.stats.backend_failures[reason] += 1
        self._log.warn(
            "{client} -> {sni}: {reason} to {backend}: {detail}",
            client=self.client,
            sni=self.hello.server_name if self.hello else None,
            reason=reason,
            backend=self.route.backend if self.route else None,
            detail=detail,
        )
        self._close(reason, detail, alert=ALERT_INTERNAL_ERROR)

    # -- splicing

    def _spliced(self, result: PumpResult) -> None:
        self._close_reason = result.reason
        self.relay.stats.bytes_up += result.bytes_up
        self.relay.stats.bytes_down += result.bytes_down
        self._finish(
            closed_first=result.closed_first,
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
            paused_up=result.paused_up,
            paused_down=result.paused_down,
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

    def _refuse(self, reason: str, detail: str, *, tls: bool) -> None:
        self._cancel_timer()
        self._refusal = reason
        self.relay.stats.refused[reason] += 1
        self._log.info(
            "refused {client} on {listener}: {reason} ({detail})",
            client=self.client,
            listener=self.listener.name,
            reason=reason,
            detail=detail,
            sni=self.hello.server_name if self.hello else None,
        )
        self._close("refused", detail, alert=ALERT_UNRECOGNIZED_NAME if tls else None)

    def _close(self, reason: str, detail: str, *, alert: int | None = None) -> None:
        self.state = State.CLOSING
        self._close_reason = reason
        self._detail = detail
        self._buffer = bytearray()
        if alert is not None:
            self.transport.write(tls_alert(alert))  # type: ignore[union-attr]
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(
        self,
        *,
        closed_first: str,
        bytes_up: int = 0,
        bytes_down: int = 0,
        paused_up: float = 0.0,
        paused_down: float = 0.0,
    ) -> None:
        self.state = State.CLOSED
        self.relay.connections.pop(self.id, None)
        reason = self._close_reason or "done"
        self.relay.stats.closed[reason] += 1
        now = self.relay.reactor.seconds()
        hello = self.hello
        route = self.route
        self.relay.access.info(
            "{client} {sni} -> {backend_address} {close_reason}",
            id=self.id,
            listener=self.listener.name,
            client=self.client,
            front_door=FRONT_DOOR_TLS,
            sni=hello.server_name if hello else None,
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
            close_reason=f"refused:{self._refusal}" if self._refusal else reason,
            closed_first=closed_first,
            detail=self._detail,
        )


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

    def buildProtocol(self, addr: IAddress | None) -> RelayProtocol:
        protocol = RelayProtocol(self.relay, self.listener)
        protocol.factory = self
        return protocol
