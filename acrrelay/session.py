"""What one connection knows, and the actions its state machine runs.

A :class:`Session` is the core of :mod:`acrrelay.connection`'s machine: every method
below that takes ``inputs`` is an action named in its transition table, run when the
machine moves, never called otherwise. It talks to the relay through its contract
(enter, admit, release, record) and never touches the relay's counters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, cast

from twisted.internet import defer, error
from twisted.internet.interfaces import IAddress, IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from acrrelay import connection, reasons
from acrrelay.accesslog import AccessRecord
from acrrelay.backends import AddressDenied
from acrrelay.clienthello import ClientHello
from acrrelay.connection import COARSE, IClientTransport, Inputs, State, new_machine
from acrrelay.doors import NEED_MORE, Ask, FrontDoor, NoDoor, Refused, choose_door, proxy_signature
from acrrelay.httphead import HttpRequest
from acrrelay.proxyproto import ProxyHeader, encode_v1, encode_v2
from acrrelay.routing import Door, Refusal, Route, normalize_name
from acrrelay.splice import BackendProtocol, Pump, PumpResult
from acrrelay.transports import tcp_transport

if TYPE_CHECKING:
    from acrrelay.config import ListenerConfig
    from acrrelay.relay import Relay, Ticket

__all__ = ["Session"]


_BACKEND_FACTORY: Final = Factory.forProtocol(BackendProtocol)
_BACKEND_FACTORY.noisy = False


class Session:
    """One client connection's facts and actions, from accept to its access record."""

    _log = Logger()

    def __init__(
        self,
        relay: Relay,
        listener: ListenerConfig,
        transport: IClientTransport,
        *,
        check_signature: bool,
    ) -> None:
        self.relay = relay
        self.listener = listener
        self.transport = transport
        self.config = relay.config
        self.phase = self.previous = "identifying"
        self.started = relay.reactor.seconds()
        #: The TCP peer; with a PROXY header, the load balancer.
        self.peer = connection.describe(transport.getPeer())
        #: The client as policy sees it: the PROXY header's source, or the peer.
        self.client = self.peer
        host = getattr(transport.getPeer(), "host", None)
        self.client_host: str | None = connection.unmapped(host) if host is not None else None
        self.proxy_header: ProxyHeader | None = None
        self.door: FrontDoor = NoDoor()
        self.hello: ClientHello | None = None
        self.request: HttpRequest | None = None
        self.user: str | None = None
        self.target: tuple[str, int] | None = None
        self.route_taken: Route | None = None
        self.pump: Pump | None = None
        self.backend_address: str | None = None
        #: Where the protocol sends the client's bytes straight, once nothing else must see them.
        self.sink: Any = None
        self.routed_at: float | None = None
        self.connected_at: float | None = None
        self.buffer = bytearray()
        self.check_signature = check_signature  # an untrusted peer may not send PROXY
        self.ticket: Ticket | None = None
        self.refusal: str | None = None
        self.close_reason: str | None = None
        self.detail: str | None = None
        self._timer: IDelayedCall | None = None
        self._pending: defer.Deferred[Any] | None = None
        self.inputs = new_machine(self)
        self.id = relay.enter(self)
        self._arm(self.config.peek_timeout)

    # -- what views and the drain read

    @property
    def state(self) -> State:
        return COARSE[self.phase]

    def kill(self, reason: str = "killed") -> None:
        """Cut this connection now, whatever its state."""
        self.inputs.kill(reason)

    # -- identifying and peeking

    def admit(self, inputs: Inputs, header: ProxyHeader | None) -> None:
        if header is not None:
            self.proxy_header = header
            if header.command == "proxy" and header.source is not None:
                host, port = header.source
                self.client_host = host
                self.client = connection.host_port(host, port)
        admitted = self.relay.admit(self.listener.name, self.client_host)
        if isinstance(admitted, Refusal):
            inputs.refuse(Refused(admitted.reason, admitted.detail))
        else:
            self.ticket = admitted

    def peek(self, inputs: Inputs, data: bytes) -> None:
        self.buffer += data
        if self.check_signature:
            verdict = proxy_signature(bytes(self.buffer[:16]), self.peer)
            if isinstance(verdict, Refused):
                inputs.refuse(verdict)
                return
            if verdict is NEED_MORE:
                return
            self.check_signature = not verdict
        if isinstance(self.door, NoDoor):
            chosen = choose_door(
                bytes(self.buffer),
                listener=self.listener.name,
                protocols=self.listener.protocols,
                limit=self.config.peek_limit,
                tls_port=self.listener.tls_port,
                consume_auth=self.listener.name in self.relay.auth,
            )
            if isinstance(chosen, Refused):
                inputs.refuse(chosen)
                return
            self.door = chosen
            data = bytes(self.buffer)
        outcome = self.door.feed(data)
        if isinstance(outcome, Refused):
            inputs.refuse(outcome)
        elif isinstance(outcome, Ask):
            self._asked(inputs, outcome)

    def _asked(self, inputs: Inputs, ask: Ask) -> None:
        self.door = ask.door
        self.hello = ask.hello
        self.request = ask.request
        if ask.hello is not None:
            self.relay.metrics.hello_bytes.observe(ask.hello.size)
        auth = self.relay.auth.get(self.listener.name)
        if ask.request is not None and auth is not None:
            inputs.authorize(auth.check(ask.request.proxy_authorization))
        else:
            self._decide(inputs, ask.name, ask.port)

    def _decide(self, inputs: Inputs, name: str | None, port: int) -> None:
        self.routed_at = self.relay.reactor.seconds()
        door = Door(self.listener.name, self.door.protocol or "http")
        self.relay.metrics.observe_peek(door.protocol, self.routed_at - self.started)
        decision = self.relay.policy.decide(door, name, port, self.client_host or "")
        if isinstance(decision, Refusal):
            inputs.refuse(Refused(decision.reason, decision.detail))
            return
        assert name is not None
        self.target = (normalize_name(name), port)
        inputs.route(decision)

    def peek_timed_out(self, inputs: Inputs) -> None:
        self._timer = None
        detail = (
            f"no complete request after {self.config.peek_timeout:g}s ({len(self.buffer)} bytes)"
        )
        self.refused(inputs, self.door.timed_out(detail))

    # -- authorizing

    def authorizing(self, inputs: Inputs, check: defer.Deferred[str | None]) -> None:
        self.transport.pauseProducing()
        self._pending = check
        request = self.request
        assert request is not None

        def checked(user: str | None) -> None:
            self._pending = None
            if user is None:
                detail = "Proxy-Authorization is missing or wrong"
                inputs.refuse(Refused(reasons.AUTH_REQUIRED, detail))
                return
            self.user = user
            self._decide(inputs, request.host, request.port)

        def failed(failure: Failure) -> None:
            self._pending = None
            if failure.check(defer.CancelledError):
                return  # given up on: the connection has moved on
            self._log.failure("{client}: password check failed", failure, client=self.client)
            inputs.refuse(Refused(reasons.INTERNAL_ERROR, "password check failed"))

        check.addCallbacks(checked, failed)

    def auth_timed_out(self, inputs: Inputs) -> None:
        self._timer = None
        detail = f"no answer from the password check within {self.config.peek_timeout:g}s"
        self.refused(inputs, Refused(reasons.AUTH_TIMEOUT, detail))

    def hold(self, inputs: Inputs, data: bytes) -> None:
        """Bytes while paused (rare): kept for the backend, once a following door saw them."""
        refusal = self.door.follow(data) if self.door.follows else None
        if refusal is not None:
            inputs.refuse(refusal)
        else:
            self.buffer += data

    # -- connecting

    def connect(self, inputs: Inputs, route: Route) -> None:
        assert self.target is not None
        self.route_taken = route
        self._arm(self.config.connect_timeout)
        self.transport.pauseProducing()
        host, port = self.target
        try:
            d = self.relay.connector.connect(route, host, port, _BACKEND_FACTORY)
        except Exception as e:  # a bad endpoint must cost this connection only
            inputs.connect_failed(reasons.CONNECT_FAILED, f"cannot build backend endpoint: {e}")
            return
        self._pending = d

        def connected(protocol: Any) -> None:
            self._pending = None
            inputs.connected(protocol)

        def failed(failure: Failure) -> None:
            self._pending = None
            if not failure.check(defer.CancelledError):
                inputs.connect_failed(*_connect_failure(failure, self.config.connect_timeout))

        d.addCallbacks(connected, failed)

    def connect_timed_out(self, inputs: Inputs) -> None:
        self._timer = None
        detail = f"no connection within {self.config.connect_timeout:g}s"
        self.backend_failed(inputs, reasons.CONNECT_TIMEOUT, detail)

    def backend_failed(self, inputs: Inputs, reason: str, detail: str) -> None:
        self._log.warn(
            "{client} -> {target}: {reason} to {backend}: {detail}",
            client=self.client,
            target=self.target_text(),
            reason=reason,
            backend=self.route_taken.backend if self.route_taken else None,
            detail=detail,
        )
        self._close(reason, detail, self.door.answer(reason, detail))

    def splice(self, inputs: Inputs, backend: BackendProtocol) -> None:
        self._cancel_timer()
        transport = backend.transport
        assert transport is not None
        self.connected_at = self.relay.reactor.seconds()
        self.backend_address = connection.describe(transport.getPeer())
        route = self.route_taken
        if route is not None and self.routed_at is not None:
            self.relay.metrics.observe_connect(route.name, self.connected_at - self.routed_at)
        config = self.config
        pump = self.pump = Pump(
            self.relay.reactor,
            tcp_transport(self.transport),
            idle_timeout=config.idle_timeout,
            buffer_size=config.buffer_size,
            on_done=inputs.spliced,
            zero_copy=config.zero_copy,
            # A following door must see every byte the client sends.
            zero_copy_up=not self.door.follows,
        )
        backend.pump = pump
        if route is not None and route.proxy_protocol is not None:
            transport.write(self._outbound_proxy_header(route.proxy_protocol))
        greeting = self.door.greeting()
        if greeting:
            self.transport.write(greeting)
        replay = self.door.replay(bytes(self.buffer))
        self.buffer = bytearray()
        if not self.door.follows:
            self.sink = pump.client_data
        pump.start(tcp_transport(transport), replay)

    def splice_after_eof(self, inputs: Inputs, backend: BackendProtocol) -> None:
        self.splice(inputs, backend)
        assert self.pump is not None
        self.pump.client_eof()

    def _outbound_proxy_header(self, version: str) -> bytes:
        """The PROXY header naming the real client, as the route asks for it."""
        header = self.proxy_header
        source: tuple[str, int] | None
        destination: tuple[str, int] | None
        if header is not None and header.command == "proxy" and header.source is not None:
            source, destination = header.source, header.destination
        else:
            source = _ip_port(self.transport.getPeer())
            destination = _ip_port(self.transport.getHost())
        encode = encode_v2 if version == "v2" else encode_v1
        return encode(source, destination)

    def drop_backend(self, inputs: Inputs, backend: BackendProtocol) -> None:
        if backend.transport is not None:
            cast(ITCPTransport, backend.transport).abortConnection()

    # -- splicing

    def forward(self, inputs: Inputs, data: bytes) -> None:
        refusal = self.door.follow(data) if self.door.follows else None
        if refusal is not None:
            inputs.refuse(refusal)
        elif self.pump is not None:
            self.pump.client_data(data)

    def pump_eof(self, inputs: Inputs) -> None:
        if self.pump is not None:
            self.pump.client_eof()

    def pump_lost(self, inputs: Inputs, reason: Failure) -> None:
        if self.pump is not None:
            self.pump.client_lost(reason)

    def pump_abort(self, inputs: Inputs, reason: str) -> None:
        if self.pump is not None:
            self.pump.abort(reason)

    def cut_off(self, inputs: Inputs, refusal: Refused) -> None:
        self.refusal = refusal.reason
        self.detail = refusal.detail
        if self.pump is not None:
            self.pump.abort("refused")

    def spliced(self, inputs: Inputs, result: PumpResult) -> None:
        self.sink = None
        if self.refusal is None:
            self.close_reason = result.reason
        self._finish(result.closed_first, result)

    # -- closing

    def refused(self, inputs: Inputs, refusal: Refused) -> None:
        if refusal.door is not None:
            self.door = refusal.door
        self.refusal = refusal.reason
        self._close("refused", refusal.detail, self.door.answer(refusal.reason, refusal.detail))

    def client_gone(self, inputs: Inputs) -> None:
        self._close("client_gone", "closed before a complete request", b"")

    def killed(self, inputs: Inputs, reason: str) -> None:
        self._cancel_timer()
        self._drop_pending()
        self.close_reason = reason
        self.transport.abortConnection()

    def abort(self, inputs: Inputs) -> None:
        self._timer = None
        self.transport.abortConnection()

    def abort_killed(self, inputs: Inputs, reason: str) -> None:
        self.close_reason = reason
        self._cancel_timer()
        self.transport.abortConnection()

    def _close(self, reason: str, detail: str, answer: bytes) -> None:
        self._cancel_timer()
        self._drop_pending()
        self.close_reason = reason
        self.detail = detail or self.detail
        self.buffer = bytearray()
        if answer:
            self.transport.write(answer)
        self.transport.loseConnection()
        # A client that never reads its answer must not hold the connection forever.
        self._timer = self.relay.reactor.callLater(self.config.peek_timeout, self.inputs.timeout)

    def lost(self, inputs: Inputs, reason: Failure) -> None:
        self.close_reason = "client_gone"
        self.detail = f"client left while {COARSE[self.previous].value}"
        self._finish("client")

    def finish(self, inputs: Inputs, reason: Failure) -> None:
        self._finish("client" if self.close_reason == "client_gone" else "relay")

    def ignore(self, inputs: Inputs, *args: object) -> None:
        pass

    # -- the end

    def _finish(self, closed_first: str, result: PumpResult | None = None) -> None:
        self._cancel_timer()
        self._drop_pending()
        self.relay.release(self)
        self.relay.record(self._record(closed_first, result))

    def _record(self, closed_first: str, result: PumpResult | None) -> AccessRecord:
        now = self.relay.reactor.seconds()
        hello, route, request = self.hello, self.route_taken, self.request
        reason = self.close_reason or "done"
        return AccessRecord(
            id=self.id,
            worker=self.relay.worker_label,
            listener=self.listener.name,
            client=self.client,
            peer=self.peer if self.peer != self.client else None,
            front_door=self.door.protocol,
            target=self.target_text(),
            sni=hello.server_name if hello else None,
            method=request.method if request else None,
            user=self.user,
            alpn=hello.alpn if hello and hello.alpn else None,
            ech=True if hello and hello.ech else None,
            hello_bytes=hello.size if hello else None,
            hello_records=hello.records if hello else None,
            route=route.name if route else None,
            service=route.service if route else None,
            backend=route.backend if route else None,
            backend_address=self.backend_address,
            bytes_up=result.bytes_up if result else 0,
            bytes_down=result.bytes_down if result else 0,
            peek_ms=_ms(self.routed_at, self.started),
            connect_ms=_ms(self.connected_at, self.routed_at),
            total_ms=_ms(now, self.started),
            paused_up_ms=_paused_ms(result.paused_up) if result else None,
            paused_down_ms=_paused_ms(result.paused_down) if result else None,
            zero_copy=result.zero_copy if result else None,
            close_reason=f"refused:{self.refusal}" if self.refusal else reason,
            closed_first=closed_first,
            detail=self.detail,
        )

    def target_text(self) -> str | None:
        if self.target is not None:
            return connection.host_port(*self.target)
        if self.hello is not None:
            return self.hello.server_name
        if self.request is not None and self.request.host is not None:
            return connection.host_port(self.request.host, self.request.port)
        return None

    # -- timers and pending work

    def _arm(self, seconds: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(seconds)
        else:
            self._timer = self.relay.reactor.callLater(seconds, self.inputs.timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()


def _connect_failure(failure: Failure, timeout: float) -> tuple[str, str]:
    if failure.check(defer.TimeoutError, error.TimeoutError):
        return reasons.CONNECT_TIMEOUT, f"no connection within {timeout:g}s"
    if failure.check(AddressDenied):
        return reasons.ADDRESS_DENIED, _one_line(failure)
    if failure.check(error.DNSLookupError):
        return reasons.RESOLVE_FAILED, _one_line(failure)
    return reasons.CONNECT_FAILED, _one_line(failure)


def _ip_port(address: IAddress) -> tuple[str, int] | None:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return (host, port) if host is not None and port is not None else None


def _ms(end: float | None, start: float | None) -> float | None:
    if end is None or start is None:
        return None
    return round((end - start) * 1000, 3)


def _paused_ms(seconds: float) -> float | None:
    return round(seconds * 1000, 3) if seconds else None


def _one_line(failure: Failure) -> str:
    text = failure.getErrorMessage().strip() or (failure.type.__name__ if failure.type else "")
    return text.splitlines()[0] if text else "unknown error"
