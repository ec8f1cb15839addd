"""The live relay: the current routes, the backends, the counters and the connection table.

One :class:`Relay` sits behind every listener of a service. Connections read
its ``policy`` and ``connector`` when they route, so swapping those (a reload)
changes what new connections do and never touches established ones.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer

from acrrelay.accesslog import AccessLog
from acrrelay.backends import BackendConnector
from acrrelay.config import RelayConfig
from acrrelay.routing import Policy

if TYPE_CHECKING:
    from acrrelay.peek import RelayProtocol

__all__ = ["AccessObserver", "Relay", "RelayStats", "Settings"]

#: Receives one event per finished connection: an ILogObserver, or any such callable.
AccessObserver = ILogObserver | Callable[[LogEvent], None]


@attrs.frozen
class Settings:
    """The per-connection limits, from the configuration."""

    peek_timeout: float
    peek_limit: int
    connect_timeout: float
    idle_timeout: float
    buffer_size: int

    @classmethod
    def from_config(cls, config: RelayConfig) -> Settings:
        return cls(
            peek_timeout=config.peek_timeout,
            peek_limit=config.peek_limit,
            connect_timeout=config.connect_timeout,
            idle_timeout=config.idle_timeout,
            buffer_size=config.buffer_size,
        )


@attrs.define
class RelayStats:
    """Counters since start. Refusals and closes are counted by reason."""

    accepted: int = 0
    refused: Counter[str] = attrs.Factory(Counter)
    closed: Counter[str] = attrs.Factory(Counter)
    backend_failures: Counter[str] = attrs.Factory(Counter)
    bytes_up: int = 0
    bytes_down: int = 0


class Relay:
    """Routes, backends, counters and live connections, shared by all listeners."""

    def __init__(
        self,
        config: RelayConfig,
        reactor: Any,
        *,
        access_observer: AccessObserver | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.settings = Settings.from_config(config)
        self.policy = Policy(config.route_table())
        self.connector = BackendConnector(
            reactor, hosts=config.hosts, connect_timeout=config.connect_timeout
        )
        self.stats = RelayStats()
        self.connections: dict[int, RelayProtocol] = {}
        self._ids = itertools.count(1)
        self.access_log: AccessLog | None = None
        if access_observer is None and config.access_log is not None:
            self.access_log = AccessLog(config.access_log)
            access_observer = self.access_log
        self.access = Logger(
            namespace="acrrelay.access",
            observer=_DISCARD if access_observer is None else access_observer,  # type: ignore[arg-type]
        )

    def next_id(self) -> int:
        return next(self._ids)

    def open(self) -> None:
        if self.access_log is not None:
            self.access_log.open()

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.close()


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: LogEvent) -> None:
        pass


_DISCARD: Final = _Discard()
