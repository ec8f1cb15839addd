"""What the relay itself reaches: every concrete configured name, resolved from its side.

``acrrelay resolve`` answers the CEN / VPN question of the original recipe: which
addresses must be routable from the relay for its routes to work. Each name is
resolved the way a ``resolve`` route would be (``[resolver.hosts]`` first, then the
system resolver), and the addresses are summed up as the smallest set of CIDRs that
covers them exactly, plus the one smallest CIDR that covers them all.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import attrs

from acrrelay.addresses import IPAddress, ipv4_unmapped
from acrrelay.config import RelayConfig
from acrrelay.routing import IPNetwork

__all__ = ["Resolution", "covering", "exact_cidrs", "resolve_config"]

#: (host) -> addresses; raises OSError when the name does not resolve.
Lookup = Callable[[str], Sequence[str]]


@attrs.frozen
class Resolution:
    name: str
    #: "static" ([resolver.hosts]), "dns", "error", or "wildcard" (cannot be resolved).
    source: str
    addresses: tuple[str, ...] = ()
    error: str | None = None
    #: The route's backend, when it is an explicit endpoint (not "resolve").
    backend: str | None = None


def system_lookup(host: str) -> list[str]:
    """The addresses getaddrinfo gives for ``host`` (TCP), in its order, without repeats."""
    found: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM):
        address = str(sockaddr[0]).split("%")[0]
        if address not in found:
            found.append(address)
    return found


def resolve_config(
    config: RelayConfig, *, lookup: Lookup | None = system_lookup, workers: int = 16
) -> list[Resolution]:
    """Every route name resolved from the relay's side, in route order.

    ``lookup=None`` uses the static hosts only (names without one are reported as
    errors), which never sends a DNS query.
    """
    table = config.route_table()
    order: list[str] = []
    results: dict[str, Resolution] = {}
    pending: dict[str, str | None] = {}  # name to look up -> the explicit backend, if any
    for route in config.routes:
        name = route.name
        order.append(name)
        if route.pattern.kind != "exact":
            results[name] = Resolution(name, "wildcard")
        elif route.backend != "resolve":
            host = _endpoint_host(route.backend)
            if host is None:
                results[name] = Resolution(name, "static", backend=route.backend)
            elif _is_address(host):
                results[name] = Resolution(name, "static", (host,), backend=route.backend)
            else:
                pending[name] = route.backend
        elif name in config.hosts:
            results[name] = Resolution(name, "static", tuple(config.hosts[name]))
        else:
            pending[name] = None
    # Concrete names of [resolver.hosts] that a pattern covers (bucket hosts, say).
    for name, addresses in config.hosts.items():
        if name not in results and name not in pending and table.lookup(name) is not None:
            order.append(name)
            results[name] = Resolution(name, "static", tuple(addresses))

    def one(name: str) -> Resolution:
        backend = pending[name]
        target = _endpoint_host(backend) if backend is not None else name
        assert target is not None
        if lookup is None:
            return Resolution(name, "error", error="not in [resolver.hosts]", backend=backend)
        try:
            return Resolution(name, "dns", tuple(lookup(target)), backend=backend)
        except OSError as e:
            return Resolution(name, "error", error=e.strerror or str(e), backend=backend)

    if pending:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for resolution in pool.map(one, pending):
                results[resolution.name] = resolution
    return [results[name] for name in order]


_TCP_HOST = re.compile(r"tcp6?:(?:.*:)?host=((?:\\:|[^:])+)|tcp6?:((?:\\:|[^:=])+):\d+")


def _endpoint_host(backend: str) -> str | None:
    """The host of a tcp: client endpoint string, or None for other kinds."""
    match = _TCP_HOST.match(backend)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).replace("\\:", ":")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _addresses(resolutions: Iterable[Resolution]) -> list[IPAddress]:
    found: set[IPAddress] = set()
    for resolution in resolutions:
        for text in resolution.addresses:
            found.add(ipv4_unmapped(ipaddress.ip_address(text)))
    return sorted(found, key=lambda a: (a.version, a))


def exact_cidrs(resolutions: Iterable[Resolution]) -> list[IPNetwork]:
    """The fewest CIDRs that cover exactly the resolved addresses."""
    addresses = _addresses(resolutions)
    v4 = [ipaddress.IPv4Network(a) for a in addresses if isinstance(a, ipaddress.IPv4Address)]
    v6 = [ipaddress.IPv6Network(a) for a in addresses if isinstance(a, ipaddress.IPv6Address)]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


def covering(resolutions: Iterable[Resolution]) -> list[IPNetwork]:
    """Per address family, the one smallest CIDR that covers every resolved address."""
    addresses = _addresses(resolutions)
    out: list[IPNetwork] = []
    for version in (4, 6):
        family = [a for a in addresses if a.version == version]
        if not family:
            continue
        network = ipaddress.ip_network(family[0])
        while not all(a in network for a in family):
            network = network.supernet()
        out.append(network)
    return out
