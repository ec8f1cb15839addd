"""From a route to a connected backend.

A route's backend is either a Twisted client endpoint string, built once and
reused, or ``resolve``: connect to the requested name itself, on the target
port, through the relay's own resolver. That resolver answers from the static
``[resolver.hosts]`` table first, so the relay never follows the same
hosts-file redirection its clients use, and falls back to the reactor's
resolver. Connection attempts over several addresses, and their failover, are
Twisted's :class:`~twisted.internet.endpoints.HostnameEndpoint`.

Every attempt is bounded by the connect timeout, whatever the endpoint type.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from zope.interface import implementer

from acrrelay.routing import RESOLVE, Route, normalize_name

__all__ = ["BackendConnector", "StaticHostsResolver"]

#: Decides whether a resolved address may be used; see issue 3's deny-list.
AddressFilter = Callable[[str, IPv4Address | IPv6Address], bool]


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass  # static answers are delivered before anyone could cancel


@implementer(IHostnameResolver)
class StaticHostsResolver:
    """Answers from a static table, else asks ``fallback``; drops addresses ``allow`` refuses."""

    def __init__(
        self,
        hosts: Mapping[str, Sequence[str]],
        fallback: IHostnameResolver,
        allow: AddressFilter | None = None,
    ) -> None:
        self._hosts = {
            name: tuple(ipaddress.ip_address(a) for a in addrs) for name, addrs in hosts.items()
        }
        self._fallback = fallback
        self._allow = allow

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[Any]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        receiver = resolutionReceiver
        if self._allow is not None:
            receiver = _FilteringReceiver(hostName, resolutionReceiver, self._allow)
        try:
            static = self._hosts.get(normalize_name(hostName))
        except ValueError:
            static = None
        if static is None:
            return self._fallback.resolveHostName(
                receiver, hostName, portNumber, addressTypes, transportSemantics
            )
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        for ip in static:
            kind = IPv4Address if ip.version == 4 else IPv6Address
            if addressTypes is None or kind in addressTypes:
                receiver.addressResolved(kind("TCP", str(ip), portNumber))
        receiver.resolutionComplete()
        return resolution


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    def __init__(self, name: str, inner: IResolutionReceiver, allow: AddressFilter) -> None:
        self._name = name
        self._inner = inner
        self._allow = allow

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._inner.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: Any) -> None:
        if self._allow(self._name, address):
            self._inner.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._inner.resolutionComplete()


@implementer(IReactorPluggableNameResolver)
class _ResolverReactor:
    """The reactor, seen by HostnameEndpoint with our resolver in place of its own."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class BackendConnector:
    """Connects routes to their backends, with a connect timeout on every attempt."""

    def __init__(
        self,
        reactor: Any,
        *,
        hosts: Mapping[str, Sequence[str]],
        connect_timeout: float,
        allow_address: AddressFilter | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._endpoints: dict[str, IStreamClientEndpoint] = {}
        resolver = StaticHostsResolver(hosts, reactor.nameResolver, allow_address)
        self._resolving_reactor = _ResolverReactor(reactor, resolver)

    def endpoint_for(self, route: Route, name: str, port: int) -> IStreamClientEndpoint:
        """The endpoint a connection to ``name:port`` over ``route`` uses."""
        if route.backend == RESOLVE:
            return HostnameEndpoint(self._resolving_reactor, name, port, timeout=self._timeout)
        endpoint = self._endpoints.get(route.backend)
        if endpoint is None:
            endpoint = clientFromString(self._reactor, route.backend)
            self._endpoints[route.backend] = endpoint
        return endpoint

    def connect(
        self, route: Route, name: str, port: int, factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        """Connect, or fail with the endpoint's error or ``TimeoutError`` after the timeout."""
        d = self.endpoint_for(route, name, port).connect(factory)
        d.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_timed_out)
        return d


def _timed_out(result: object, timeout: float) -> NoReturn:
    # Endpoints fail a cancelled attempt in their own ways (ConnectingCancelledError
    # for TCP); once our timeout fired, the cause is the timeout, whatever they say.
    raise defer.TimeoutError(timeout, "backend connection")
