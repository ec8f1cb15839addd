"""What the host allows and what is this relay: descriptors, and its own addresses.

The connection limit comes from the file-descriptor limit (two descriptors a
connection); ``resolve`` backends must never reach the relay's own listeners, so the
service tells the connector which (address, port) pairs those are.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable, Iterable
from typing import Any, Final

import psutil

__all__ = ["connections_for", "local_addresses", "own_endpoints", "raise_fd_limit"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

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


def local_addresses() -> list[IPAddress]:
    """Every address of this machine's interfaces."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            try:
                found.append(ipaddress.ip_address(address.address.split("%")[0]))
            except ValueError:
                continue  # MAC addresses and the like
    return found


def own_endpoints(
    bound: Iterable[Any], interfaces: Callable[[], list[IPAddress]]
) -> set[tuple[IPAddress, int]]:
    """(address, port) pairs that reach this relay: a wildcard listener is on every interface."""
    own: set[tuple[IPAddress, int]] = set()
    local: list[IPAddress] | None = None
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
