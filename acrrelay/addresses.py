"""Addresses as the relay shows and compares them: one way to unmap, one way to print.

- :func:`ipv4_unmapped`: an IPv4 client on a dual-stack (IPv6) socket arrives as
  ``::ffff:192.0.2.1``; policy, limits, logs and PROXY headers all treat it as the IPv4
  address it is, so a client has one identity whatever socket type each hop used.
- :func:`host_port`: ``host:port``, with an IPv6 host in brackets (``[2001:db8::1]:443``,
  zone id included: ``[fe80::1%eth0]:443``), so the port can always be told apart.
- :func:`describe_address`: a Twisted address as text, through both.

This module is pure: no reactor, no sockets, no Twisted.
"""

from __future__ import annotations

import ipaddress

__all__ = ["IPAddress", "describe_address", "host_port", "ipv4_unmapped", "unmapped_host"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ipv4_unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def unmapped_host(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address written as IPv4; anything else (a name,
    another address, one with a zone id) exactly as given."""
    if ":" not in host:
        return host  # IPv4 or a name: only IPv6 text can be a mapped address (and parsing costs)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    unmapped = ipv4_unmapped(address)
    return str(unmapped) if unmapped is not address else host


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets; a host already in brackets is
    left as it is."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def describe_address(address: object) -> str:
    """A Twisted address as text: ``host:port`` (IPv4-mapped unmapped, IPv6 bracketed)
    for IP addresses, the path for UNIX ones, ``-`` for none."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return host_port(unmapped_host(host), port)
    name = getattr(address, "name", None)
    if name is not None:
        return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
    return str(address) if address is not None else "-"
