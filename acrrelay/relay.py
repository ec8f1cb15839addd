"""The live relay: the current routes, the backends, the counters and the connection table.

One :class:`Relay` sits behind every listener of a service. Connections read
its ``policy`` and ``connector`` when they route, so swapping those (a reload)
changes what new connections do and never touches established ones.

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
from twisted.internet.defer import Deferred, succeed
from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer

from acrrelay.accesslog import AccessLog
from acrrelay.auth import BasicAuth, Runner
from acrrelay.backends import BackendConnector
from acrrelay.config import ListenerConfig, RelayConfig
from acrrelay.metrics import RelayMetrics
from acrrelay.routing import ListenerPolicy, Policy, Refusal, client_ip

if TYPE_CHECKING:
    from acrrelay.peek import RelayProtocol

__all__ = ["AccessObserver", "Relay", "RelayStats", "Settings"]

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
class Settings:
    """The per-connection limits, from the configuration."""

    peek_timeout: float
    peek_limit: int
    connect_timeout: float
    idle_timeout: float
    buffer_size: int
    zero_copy: bool = True

    @classmethod
    def from_config(cls, config: RelayConfig) -> Settings:
        return cls(
            peek_timeout=config.peek_timeout,
            peek_limit=config.peek_limit,
            connect_timeout=config.connect_timeout,
            idle_timeout=config.idle_timeout,
            buffer_size=config.buffer_size,
            zero_copy=config.zero_copy,
        )


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
    #: Connections routed, by (route pattern, front door).
    routed: Counter[tuple[str, str]] = attrs.Factory(Counter)
    #: Bytes of finished connections, by (route pattern, "up" or "down").
    route_bytes: Counter[tuple[str, str]] = attrs.Factory(Counter)
    #: Seconds of back-pressure of finished connections, by "up" or "down".
    paused_seconds: defaultdict[str, float] = attrs.Factory(lambda: defaultdict(float))
    #: Reloads, by result: "ok" or "failed".
    reloads: Counter[str] = attrs.Factory(Counter)


class Relay:
    """Routes, backends, counters and live connections, shared by all listeners."""

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
        self.connections: dict[int, RelayProtocol] = {}
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
        self._empty_waiters: list[Deferred[None]] = []
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
        self.settings = Settings.from_config(config)
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

    def next_id(self) -> int:
        return next(self._ids)

    def trusts_proxy_header(self, listener: ListenerConfig, host: str | None) -> bool:
        """Whether a peer on ``listener`` must begin with a PROXY protocol header."""
        if not listener.proxy_protocol_from or host is None:
            return False
        address = client_ip(host)
        return address is not None and any(
            address in network for network in listener.proxy_protocol_from
        )

    def admit_client(self, host: str | None) -> Refusal | None:
        """The per-client limit: None if ``host`` may open one more connection."""
        limit = self.config.max_connections_per_client
        if limit and host is not None and self.per_client[host] >= limit:
            return Refusal("client_limit", f"{host} already has {limit} connections")
        return None

    # -- the connection table, and accepting

    def watch_ports(self, ports: list[Any]) -> None:
        """The listening ports to pause and resume at the connection limit."""
        self._ports = ports
        for port in ports:
            self._cap_accept_batches(port)

    def _cap_accept_batches(self, port: Any) -> None:
        # A TCP port accepts up to `numberAccepts` connections in one pass (and adjusts
        # that number after each pass), whatever stopReading says meanwhile. Capping the
        # batch to the room left just before each pass keeps a burst waiting in the
        # kernel's backlog instead of accepting and dropping it.
        # A port is watched again at every reload: it is wrapped once, or the wrappers would
        # nest until an accept pass hit the recursion limit.
        if getattr(port, "_acrrelay_capped", False):
            return
        accept_pass = getattr(port, "doRead", None)
        if accept_pass is None or not hasattr(port, "numberAccepts"):
            return

        def capped_accept_pass() -> Any:
            room = self.max_connections - len(self.connections)
            port.numberAccepts = max(1, min(port.numberAccepts, room))
            return accept_pass()

        port.doRead = capped_accept_pass
        port._acrrelay_capped = True

    def at_limit(self) -> bool:
        return len(self.connections) >= self.max_connections

    def opened(self, connection: RelayProtocol) -> None:
        self.connections[connection.id] = connection
        self.stats.accepted += 1
        if self.accepting and self.at_limit():
            self.accepting = False
            self.stats.limit_pauses += 1
            for port in self._ports:
                if hasattr(port, "stopReading"):
                    port.stopReading()

    def closed(self, connection: RelayProtocol) -> None:
        self.connections.pop(connection.id, None)
        self._resume_if_room()
        if not self.connections:
            waiters, self._empty_waiters = self._empty_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def when_empty(self) -> Deferred[None]:
        """Fires once no connection is open (at once if none is)."""
        if not self.connections:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._empty_waiters.append(waiter)
        return waiter

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


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: LogEvent) -> None:
        pass


_DISCARD: Final = _Discard()
