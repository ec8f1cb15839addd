r"""The live relay: the current routes, the backends, the counters and the connection table.

One :class:`Relay` sits behind every listener of a service. Connections read
its ``policy``, ``connector`` and ``config`` when they route, so swapping those (a
reload) changes what new connections do and never touches established ones.

Connections and the relay meet through one contract (:class:`IRelay`): a connection
``enter``\ s the table, is ``admit``\ ted (client ACL and per-client limit) for a
:class:`Ticket`, is ``release``\ d, and hands in one :class:`AccessRecord` when it
ends; the relay's counters are updated from those records alone. Metrics, the admin
shell and the drain read :meth:`Relay.views` (frozen :class:`ConnectionView`\ s),
never a connection's attributes.

It also holds the connection limits: at ``max_connections`` it stops reading from
the listening sockets (new connections wait in the kernel's backlog instead of being
accepted and dropped in a spin), and it counts connections per client address for
``max_connections_per_client``.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import Interface, implementer

from acrrelay import reasons
from acrrelay.accesslog import AccessLog, AccessRecord
from acrrelay.addresses import host_port
from acrrelay.auth import BasicAuth, Runner
from acrrelay.backends import BackendConnector
from acrrelay.config import ListenerConfig, RelayConfig
from acrrelay.connection import State, describe
from acrrelay.metrics import RelayMetrics
from acrrelay.routing import ListenerPolicy, Policy, Refusal, client_ip
from acrrelay.twistedinternals import cap_accept_batches

if TYPE_CHECKING:
    from acrrelay.session import Session

__all__ = [
    "AccessObserver",
    "AccessRecord",
    "ConnectionView",
    "IRelay",
    "Relay",
    "RelayStats",
    "Ticket",
]

#: Receives one event per finished connection: an ILogObserver, or any such callable.
AccessObserver = ILogObserver | Callable[[LogEvent], None]


class RefusalLog:
    """Lets the first few refusals of each reason per minute into the main log, then
    logs how many more there were: a flood of scanners must not drown the log (the
    access log still has one line for each)."""

    PER_MINUTE: Final = 10
    _log = Logger(namespace="acrrelay.refusals")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._window_start: float | None = None
        self._seen: Counter[str] = Counter()

    def allow(self, reason: str) -> bool:
        now = self._clock.seconds()
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= 60:
            self._summarise()
            self._window_start = now
        self._seen[reason] += 1
        return self._seen[reason] <= self.PER_MINUTE

    def _summarise(self) -> None:
        for reason, count in sorted(self._seen.items()):
            if count > self.PER_MINUTE:
                self._log.info(
                    "{more} more {reason} refusals in the last minute (not logged one by one)",
                    more=count - self.PER_MINUTE,
                    reason=reason,
                )
        self._seen.clear()


@attrs.frozen
class Ticket:
    """An admitted connection's place in the per-client count, given back on release."""

    client_host: str | None


@attrs.frozen
class ConnectionView:
    """What the relay shows of one live connection, at the moment it was asked."""

    id: int
    listener: str
    #: The client as policy sees it (a PROXY header's source), and the TCP peer.
    client: str
    peer: str
    #: tls, http or connect; None until the front door is known.
    door: str | None
    target: tuple[str, int] | None
    #: The route's pattern; None until routed.
    route: str | None
    backend_address: str | None
    state: State
    started: float
    bytes_up: int
    bytes_down: int
    #: Whether back-pressure holds the client, and the backend, back right now.
    client_paused: bool
    backend_paused: bool
    #: Seconds each side has been held back so far.
    paused_up: float
    paused_down: float
    #: Which directions move by splice(2) now: (up, down).
    zero_copy: tuple[bool, bool]

    @property
    def target_text(self) -> str:
        return host_port(*self.target) if self.target else "-"


class IRelay(Interface):
    """The contract between connections and the relay they belong to."""

    def enter(connection: Session) -> int:
        """Put ``connection`` in the table (it counts toward max_connections); its id."""

    def admit(listener: str, client_host: str | None) -> Refusal | Ticket:
        """The client ACL and the per-client limit, once the client is known."""

    def release(connection: Session) -> None:
        """Take ``connection`` out of the table and give back its ticket."""

    def record(record: AccessRecord) -> None:
        """Count a finished connection and write its access line."""


@attrs.define
class RelayStats:
    """Counters since start. Refusals and closes are counted by reason."""

    accepted: int = 0
    #: Times accepting paused because max_connections was reached.
    limit_pauses: int = 0
    refused: Counter[str] = attrs.Factory(Counter)
    closed: Counter[str] = attrs.Factory(Counter)
    backend_failures: Counter[str] = attrs.Factory(Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    #: Finished connections that were routed, by (route pattern, front door); the live
    #: ones are in :meth:`Relay.views`.
    routed: Counter[tuple[str, str]] = attrs.Factory(Counter)
    #: Bytes of finished connections, by (route pattern, "up" or "down").
    route_bytes: Counter[tuple[str, str]] = attrs.Factory(Counter)
    #: Seconds of back-pressure of finished connections, by "up" or "down".
    paused_seconds: defaultdict[str, float] = attrs.Factory(lambda: defaultdict(float))
    #: Reloads, by result: "ok" or "failed".
    reloads: Counter[str] = attrs.Factory(Counter)

    def record(self, record: AccessRecord) -> None:
        """Count one finished connection from its access record."""
        refusal = record.refusal
        if refusal is not None:
            self.refused[refusal] += 1
            self.closed["refused"] += 1
        else:
            self.closed[record.close_reason] += 1
        if record.close_reason in reasons.BACKEND_FAILURES:
            self.backend_failures[record.close_reason] += 1
        up, down = record.bytes_up or 0, record.bytes_down or 0
        self.bytes_up += up
        self.bytes_down += down
        self.paused_seconds["up"] += (record.paused_up_ms or 0.0) / 1000
        self.paused_seconds["down"] += (record.paused_down_ms or 0.0) / 1000
        if record.route is not None:
            self.routed[(record.route, record.front_door or "")] += 1
            self.route_bytes[(record.route, "up")] += up
            self.route_bytes[(record.route, "down")] += down


@implementer(IRelay)
class Relay:
    """Routes, backends, counters and live connections, shared by all listeners."""

    _log = Logger(namespace="acrrelay.refusals")

    def __init__(
        self,
        config: RelayConfig,
        reactor: Any,
        *,
        access_observer: AccessObserver | None = None,
        auth_runner: Runner | None = None,
    ) -> None:
        self.reactor = reactor
        self._auth_runner = auth_runner
        self._own_access_log = access_observer is None
        self.stats = RelayStats()
        self.refusal_log = RefusalLog(reactor)
        self.metrics = RelayMetrics()
        #: The live connections by id; read :meth:`views` rather than these.
        self.connections: dict[int, Session] = {}
        self._empty_waiters: list[Deferred[None]] = []
        self.per_client: Counter[str] = Counter()
        #: Set from the file-descriptor limit by the service when the config says 0.
        self.max_connections = 1 << 30
        self._ports: list[Any] = []
        self.accepting = True
        #: Which process this is, with workers (1: the main one).
        self.worker = 1
        #: Set by a drain: accepting never resumes, whatever the limit says.
        self.draining = False
        self._ids = itertools.count(1)
        self.access_log: AccessLog | None = None
        self._access_observer = access_observer
        self.access = Logger(
            namespace="acrrelay.access", observer=cast(ILogObserver, self._emit_access)
        )
        self.apply(config)
        self.metrics.bind(self)

    def apply(self, config: RelayConfig) -> None:
        """Use ``config`` for every new connection; established ones keep what they have."""
        self.config = config
        self.policy = Policy(
            config.route_table(),
            {listener.name: _listener_policy(listener) for listener in config.listeners},
        )
        guard = getattr(getattr(self, "connector", None), "guard", None)
        self.connector = BackendConnector(
            self.reactor, hosts=config.hosts, connect_timeout=config.connect_timeout, guard=guard
        )
        self.auth = {
            listener.name: BasicAuth(listener.connect_users, self.reactor, self._auth_runner)
            for listener in config.listeners
            if listener.connect_users is not None
        }
        if config.max_connections:
            self.max_connections = config.max_connections
            self._resume_if_room()
        if self._own_access_log:
            target = config.access_log
            if self.access_log is None or self.access_log.target != target:
                opened = self.access_log is not None and self.access_log.is_open
                if self.access_log is not None:
                    self.access_log.close()
                self.access_log = AccessLog(target) if target is not None else None
                if opened and self.access_log is not None:
                    self.access_log.open()

    @property
    def access_wanted(self) -> bool:
        """Whether anyone takes access events: with ``access_log = "off"`` and no observer,
        connections need not build theirs."""
        return self._access_observer is not None or self.access_log is not None

    def _emit_access(self, event: LogEvent) -> None:
        if self._access_observer is not None:
            self._access_observer(event)
        elif self.access_log is not None:
            self.access_log(event)

    @property
    def worker_label(self) -> int | None:
        """This process's number in access lines, with workers (else None)."""
        return self.worker if self.config.workers > 1 else None

    def trusts_proxy_header(self, listener: ListenerConfig, host: str | None) -> bool:
        """Whether a peer on ``listener`` must begin with a PROXY protocol header."""
        if not listener.proxy_protocol_from or host is None:
            return False
        address = client_ip(host)
        return address is not None and any(
            address in network for network in listener.proxy_protocol_from
        )

    # -- the contract with connections (IRelay)

    def accepts(self, listener: ListenerConfig, client: IAddress | None) -> bool:
        """Whether a connection just accepted from ``client`` may have a protocol at all."""
        if self.draining:
            # Listeners close as a drain starts; one that has not yet takes no one new.
            self.stats.refused[reasons.DRAINING] += 1
            return False
        if self.at_limit():
            # Accept passes are capped to the room left; this is the last guard.
            self.stats.refused[reasons.OVER_LIMIT] += 1
            self._write_access(
                "{client} refused: over the connection limit",
                AccessRecord(
                    listener=listener.name,
                    client=describe(client),
                    close_reason=f"refused:{reasons.OVER_LIMIT}",
                    closed_first="relay",
                    detail=f"{len(self.connections)} connections open",
                    bytes_up=None,
                    bytes_down=None,
                ),
            )
            return False
        return True

    def enter(self, connection: Session) -> int:
        """Put ``connection`` in the table; its id. At the limit, stop accepting."""
        connection_id = next(self._ids)
        self.connections[connection_id] = connection
        self.stats.accepted += 1
        if self.accepting and self.at_limit():
            self.accepting = False
            self.stats.limit_pauses += 1
            for port in self._ports:
                if hasattr(port, "stopReading"):
                    port.stopReading()
        return connection_id

    def admit(self, listener: str, client_host: str | None) -> Refusal | Ticket:
        """The client ACL and the per-client limit: a refusal, or the ticket to release."""
        refusal = self.policy.admit(listener, client_host or "")
        if refusal is not None:
            return refusal
        limit = self.config.max_connections_per_client
        if client_host is None:
            return Ticket(None)
        if limit and self.per_client[client_host] >= limit:
            return Refusal(reasons.CLIENT_LIMIT, f"{client_host} already has {limit} connections")
        self.per_client[client_host] += 1
        return Ticket(client_host)

    def release(self, connection: Session) -> None:
        """Take ``connection`` out of the table, and give back its per-client ticket."""
        self.connections.pop(connection.id, None)
        ticket, connection.ticket = connection.ticket, None
        if ticket is not None and ticket.client_host is not None:
            remaining = self.per_client[ticket.client_host] - 1
            if remaining > 0:
                self.per_client[ticket.client_host] = remaining
            else:
                del self.per_client[ticket.client_host]
        self._resume_if_room()
        if not self.connections:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def record(self, record: AccessRecord) -> None:
        """Count a finished connection and write its access line."""
        self.stats.record(record)
        refusal = record.refusal
        if refusal is not None and self.refusal_log.allow(refusal):
            self._log.info(
                "refused {client} on {listener}: {reason} ({detail})",
                client=record.client,
                listener=record.listener,
                reason=refusal,
                detail=record.detail,
                target=record.target,
            )
        self._write_access("{client} {target} -> {backend_address} {close_reason}", record)

    def _write_access(self, format: str, record: AccessRecord) -> None:
        if self.access_wanted:
            self.access.info(format, **record.fields())

    # -- what metrics, the shell and the drain read

    def views(self) -> list[ConnectionView]:
        """The live connections, oldest first, as they are now."""
        return [_view(connection) for _, connection in sorted(self.connections.items())]

    def kill(self, connection_id: int, reason: str = "killed") -> ConnectionView | None:
        """Cut one connection now; what it was, or None if there is no such connection."""
        connection = self.connections.get(connection_id)
        if connection is None:
            return None
        view = _view(connection)
        connection.kill(reason)
        return view

    def when_empty(self) -> Deferred[None]:
        """Fires once the connection table is empty (at once if it is)."""
        if not self.connections:
            return succeed_none()
        waiter: Deferred[None] = Deferred()
        self._empty_waiters.append(waiter)
        return waiter

    # -- the connection table, and accepting

    def watch_ports(self, ports: list[Any]) -> None:
        """The listening ports to pause and resume at the connection limit."""
        self._ports = ports
        for port in ports:
            self._cap_accept_batches(port)

    def _cap_accept_batches(self, port: Any) -> None:
        cap_accept_batches(port, lambda: self.max_connections - len(self.connections))

    def at_limit(self) -> bool:
        return len(self.connections) >= self.max_connections

    def _resume_if_room(self) -> None:
        """Start accepting again if a pause at the limit is over (a close, a higher limit)."""
        if not self.accepting and not self.draining and not self.at_limit():
            self.accepting = True
            for port in self._ports:
                if hasattr(port, "startReading"):
                    port.startReading()

    def open(self) -> None:
        if self.access_log is not None:
            self.access_log.open()

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()


def _listener_policy(listener: ListenerConfig) -> ListenerPolicy:
    return ListenerPolicy(frozenset(listener.protocols), listener.allow, listener.deny)


def succeed_none() -> Deferred[None]:
    done: Deferred[None] = Deferred()
    done.callback(None)
    return done


def _view(connection: Session) -> ConnectionView:
    pump = connection.pump
    client_paused, backend_paused = pump.paused if pump is not None else (False, False)
    paused_up, paused_down = pump.paused_seconds() if pump is not None else (0.0, 0.0)
    route = connection.route_taken
    return ConnectionView(
        id=connection.id,
        listener=connection.listener.name,
        client=connection.client,
        peer=connection.peer,
        door=connection.door.protocol,
        target=connection.target,
        route=route.name if route is not None else None,
        backend_address=connection.backend_address,
        state=connection.state,
        started=connection.started,
        bytes_up=pump.bytes_up if pump is not None else 0,
        bytes_down=pump.bytes_down if pump is not None else 0,
        client_paused=client_paused,
        backend_paused=backend_paused,
        paused_up=paused_up,
        paused_down=paused_down,
        zero_copy=pump.zero_copy if pump is not None else (False, False),
    )
