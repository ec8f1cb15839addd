"""The library entry point: a Twisted service that runs the relay.

Embed it in any Twisted program::

    from twisted.internet import reactor
    from acrrelay import load_config, make_relay_service

    service = make_relay_service(load_config("etc/acrrelay.toml"), reactor)
    service.startService()        # raises ListenError if a port cannot be bound
    reactor.run()

The service binds its listeners in ``privilegedStartService`` (so ``twistd`` can
bind 443 before dropping privileges) or, failing that, in ``startService``. A
listener that cannot bind raises :class:`ListenError` there, naming the
endpoint and the reason; nothing is left half-bound.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Iterable
from typing import Any, Final

import psutil
from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from acrrelay.config import ListenerConfig, RelayConfig
from acrrelay.peek import RelayFactory, describe
from acrrelay.relay import AccessObserver, Relay

__all__ = ["ListenError", "RelayService", "make_relay_service", "raise_fd_limit"]

#: Descriptors kept back from the connection limit: listeners, logs, resolver threads
#: (an eighth of the limit, between 16 and 64).
FD_RESERVE_MIN: Final = 16
FD_RESERVE_MAX: Final = 64


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connections_for(fd_limit: int) -> int:
    """How many relayed connections fit in ``fd_limit`` descriptors (two each)."""
    reserve = max(FD_RESERVE_MIN, min(FD_RESERVE_MAX, fd_limit // 8))
    return max(1, (fd_limit - reserve) // 2)


def local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this machine's interfaces."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            try:
                found.append(ipaddress.ip_address(address.address.split("%")[0]))
            except ValueError:
                continue  # MAC addresses and the like
    return found


class ListenError(Exception):
    """A listener could not be bound. The message names the endpoint and the reason."""


class RelayService(MultiService):
    """Runs a :class:`~acrrelay.relay.Relay` on every configured listener."""

    _log = Logger(namespace="acrrelay.service")

    def __init__(
        self,
        config: RelayConfig,
        reactor: Any,
        *,
        access_observer: AccessObserver | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.relay = Relay(config, reactor, access_observer=access_observer)
        self.ports: list[IListeningPort] = []
        self._bound = False
        self._pending: list[defer.Deferred[IListeningPort]] = []

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind()
        self._apply_limits()
        self.relay.open()
        super().startService()
        for port, listener in zip(self.ports, self.config.listeners, strict=False):
            # Tests and scripts read "listening on HOST:PORT" to learn a port-0 listener's port.
            self._log.info(
                "listening on {address} ({listener}) with {routes} routes",
                address=describe(port.getHost()),
                listener=listener.name,
                routes=len(self.config.routes),
            )

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        yield super().stopService()
        ports, self.ports = self.ports, []
        self._bound = False
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        self.relay.close()

    def _apply_limits(self) -> None:
        self.relay.watch_ports(self.ports)
        self.relay.connector.guard.set_own(_own_endpoints(self.addresses(), local_addresses))
        if not self.config.max_connections:
            fd_limit = raise_fd_limit()
            self.relay.max_connections = connections_for(fd_limit)
            self._log.info(
                "at most {limit} connections at once ({fds} file descriptors)",
                limit=self.relay.max_connections,
                fds=fd_limit,
            )

    def addresses(self) -> list[Any]:
        """The bound addresses, in listener order (port 0 shows the port chosen)."""
        return [port.getHost() for port in self.ports]

    def _bind(self) -> None:
        if self._bound:
            return
        self._bound = True
        for listener in self.config.listeners:
            try:
                self.ports.append(self._listen_now(listener))
            except ListenError:
                for port in self.ports:
                    port.stopListening()
                self.ports = []
                self._bound = False
                raise

    def _listen_now(self, listener: ListenerConfig) -> IListeningPort:
        endpoint = serverFromString(self.reactor, listener.endpoint)
        outcome: list[IListeningPort | Failure] = []
        d = endpoint.listen(RelayFactory(self.relay, listener))
        d.addBoth(outcome.append)
        if not outcome:
            # Standard endpoints bind synchronously; anything else must not leave us guessing.
            d.cancel()
            raise ListenError(f"cannot listen on {listener.endpoint}: it did not bind at once")
        result = outcome[0]
        if isinstance(result, Failure):
            raise ListenError(f"cannot listen on {listener.endpoint}: {_why(result)}")
        return result


def _own_endpoints(
    bound: Iterable[Any], interfaces: Any
) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) pairs that reach this relay: a wildcard listener is on every interface."""
    own: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
    local: list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None
    for address in bound:
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if host is None or port is None:
            continue
        ip = ipaddress.ip_address(host.split("%")[0])
        if ip.is_unspecified:
            local = local if local is not None else interfaces()
            own.update((each, port) for each in local)
        else:
            own.add((ip, port))
    return own


def _why(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, error.CannotListenError) and isinstance(value.socketError, OSError):
        return (value.socketError.strerror or str(value.socketError)).lower()
    return failure.getErrorMessage().strip() or type(value).__name__


def make_relay_service(
    config: RelayConfig,
    reactor: Any,
    *,
    access_observer: AccessObserver | None = None,
) -> RelayService:
    """Build the relay service for ``config`` on ``reactor``.

    ``access_observer`` receives one ``twisted.logger`` event per connection (see
    :mod:`acrrelay.accesslog` for the fields); by default the events are written as
    JSON lines to ``config.access_log``.
    """
    return RelayService(config, reactor, access_observer=access_observer)
