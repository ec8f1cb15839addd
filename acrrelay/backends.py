"""From a route to a connected backend.

A route's backend is either a Twisted client endpoint string, built once and
reused, or ``resolve``: connect to the requested name itself, on the target
port, through the relay's own resolver. That resolver answers from the static
``[resolver.hosts]`` table first, so the relay never follows the same
hosts-file redirection its clients use, and falls back to the reactor's
resolver. Connection attempts over several addresses, and their failover, are
Twisted's :class:`~twisted.internet.endpoints.HostnameEndpoint`.

The caller bounds the whole attempt, whatever the endpoint type: the relay's protocol
does, with the one timer it keeps per connection, by cancelling the attempt at the
connect timeout. (``resolve`` also bounds each address's attempt by it.)

Addresses that ``resolve`` finds are checked against a deny-list before any connection
is tried (:class:`AddressGuard`): loopback, link-local, unspecified, multicast, the cloud
metadata services, and the relay's own listening addresses, which would be a self-loop.
A route may allow more with ``allow_addresses``. Explicit endpoint backends are the
operator's own choice and are not checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from acrrelay.addresses import IPAddress, ipv4_unmapped
from acrrelay.routing import RESOLVE, IPNetwork, Route, client_ip, normalize_name

__all__ = [
    "DENIED_NETWORKS",
    "AddressDenied",
    "AddressGuard",
    "BackendConnector",
    "StaticHostsResolver",
]

#: Where ``resolve`` never connects unless a route allows it.
DENIED_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",  # loopback
        "::1/128",
        "0.0.0.0/8",  # unspecified / "this network"
        "::/128",
        "169.254.0.0/16",  # link-local, with 169.254.169.254, the usual metadata service
        "fe80::/10",
        "224.0.0.0/4",  # multicast
        "ff00::/8",
        "255.255.255.255/32",
        "100.100.100.200/32",  # the Alibaba Cloud metadata service
    )
)


class AddressDenied(Exception):
    """Every address a name resolved to is on the deny-list."""

    def __init__(self, name: str, denied: Sequence[str]) -> None:
        super().__init__(f"{name} resolves only to denied addresses: {', '.join(denied)}")


class AddressGuard:
    """Decides whether ``resolve`` may connect to an address, and says why not."""

    def __init__(self, denied: Iterable[IPNetwork] = DENIED_NETWORKS) -> None:
        self._denied = tuple(denied)
        self._own: frozenset[tuple[IPAddress, int]] = frozenset()

    def set_own(self, own: Iterable[tuple[IPAddress, int]]) -> None:
        """The relay's own listening (address, port) pairs: connecting there would loop."""
        self._own = frozenset((self._landing(address), port) for address, port in own)

    @staticmethod
    def _landing(address: IPAddress) -> IPAddress:
        """Where a connection to ``address`` lands, for the self-loop check.

        IPv4-mapped IPv6 is the IPv4 address. Every 127.0.0.0/8 address and the
        unspecified ones reach this host's loopback (Linux connects to ``0.0.0.0`` and
        ``::`` as to 127.0.0.1 and ::1), where a wildcard listener answers too: all count
        as the loopback address, which a wildcard listener's own pairs include.
        """
        address = ipv4_unmapped(address)
        if address.is_loopback or address.is_unspecified:
            return ipaddress.ip_address("127.0.0.1" if address.version == 4 else "::1")
        return address

    def refuse(self, route: Route, host: str, port: int) -> str | None:
        """None if the route may connect to host:port, else the reason it may not.

        The relay's own addresses come first: ``allow_addresses`` opens the deny-list,
        never a loop back into the relay.
        """
        address = client_ip(host)
        if address is None:
            return "not an IP address"
        if (self._landing(address), port) in self._own:
            return "the relay itself"
        if any(address in network for network in route.allow_addresses):
            return None
        for network in self._denied:
            if address in network:
                return f"in {network}"
        return None


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
        addressTypes: Sequence[type[IAddress]] | None = None,
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

    def addressResolved(self, address: IAddress) -> None:
        # Only IP addresses can be judged, and a TCP connection needs nothing else.
        if isinstance(address, IPv4Address | IPv6Address) and self._allow(self._name, address):
            self._inner.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._inner.resolutionComplete()


@implementer(IReactorPluggableNameResolver)
class _ResolverReactor:
    """The reactor, seen by HostnameEndpoint with our resolver in place of its own."""

    def __init__(self, reactor: IReactorPluggableNameResolver, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        # Everything else HostnameEndpoint uses (IReactorTCP, IReactorTime) is the reactor's.
        return getattr(self._reactor, name)


class BackendConnector:
    """Connects routes to their backends, with a connect timeout on every attempt.

    ``reactor`` provides ``IReactorPluggableNameResolver`` (its resolver is the fallback
    of ``[resolver.hosts]``) and, for the endpoints built on it, ``IReactorTCP`` and
    ``IReactorTime``, as every Twisted reactor does.
    """

    def __init__(
        self,
        reactor: IReactorPluggableNameResolver,
        *,
        hosts: Mapping[str, Sequence[str]],
        connect_timeout: float,
        guard: AddressGuard | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._hosts = hosts
        self.guard = guard or AddressGuard()
        self._endpoints: dict[str, IStreamClientEndpoint] = {}

    def _resolving(self, route: Route, name: str, port: int) -> tuple[HostnameEndpoint, list[str]]:
        denied: list[str] = []

        def allow(host_name: str, address: IPv4Address | IPv6Address) -> bool:
            why = self.guard.refuse(route, address.host, address.port)
            if why is not None:
                denied.append(f"{address.host} ({why})")
            return why is None

        resolver = StaticHostsResolver(self._hosts, self._reactor.nameResolver, allow)
        endpoint = HostnameEndpoint(
            _ResolverReactor(self._reactor, resolver), name, port, timeout=self._timeout
        )
        return endpoint, denied

    def _explicit(self, backend: str) -> IStreamClientEndpoint:
        endpoint = self._endpoints.get(backend)
        if endpoint is None:
            endpoint = clientFromString(self._reactor, backend)
            self._endpoints[backend] = endpoint
        return endpoint

    def connect(
        self, route: Route, name: str, port: int, factory: IProtocolFactory
    ) -> Deferred[IProtocol]:
        """Connect, or fail with the endpoint's error or :class:`AddressDenied`. Cancel the
        result to give up (the caller's connect timeout)."""
        if route.backend != RESOLVE:
            d = self._explicit(route.backend).connect(factory)
        else:
            endpoint, denied = self._resolving(route, name, port)
            d = endpoint.connect(factory)

            def explain(failure: Failure) -> Failure:
                if denied and failure.check(DNSLookupError):
                    raise AddressDenied(name, denied)
                return failure

            d.addErrback(explain)
        return d
