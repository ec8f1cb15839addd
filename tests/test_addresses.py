"""Layer 1: the one way to unmap IPv4 and the one way to print ``host:port``."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from acrrelay.addresses import describe_address, host_port, ipv4_unmapped, unmapped_host


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:192.0.2.1", "192.0.2.1"),
        ("::ffff:c000:201", "192.0.2.1"),  # the same address, written in hex
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("2001:DB8::1", "2001:DB8::1"),  # not rewritten: only a mapped address changes
        ("fe80::1%eth0", "fe80::1%eth0"),
        ("::1", "::1"),
        ("registry.cn-beijing.aliyuncs.com", "registry.cn-beijing.aliyuncs.com"),
        ("", ""),
    ],
)
def test_unmapped_host_writes_only_mapped_addresses_as_ipv4(given: str, expected: str) -> None:
    """An IPv4-mapped IPv6 address becomes IPv4 in any spelling; names, other addresses
    and zone ids come back exactly as given."""
    assert unmapped_host(given) == expected


def test_ipv4_unmapped_keeps_other_addresses() -> None:
    """Mapped IPv6 gives the IPv4 address; plain IPv4 and IPv6 are returned as they are."""
    assert ipv4_unmapped(ipaddress.ip_address("::ffff:10.0.0.1")) == ipaddress.ip_address(
        "10.0.0.1"
    )
    for text in ("10.0.0.1", "2001:db8::1", "::1"):
        address = ipaddress.ip_address(text)
        assert ipv4_unmapped(address) is address


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("192.0.2.1", 443, "192.0.2.1:443"),
        ("registry.cn-beijing.aliyuncs.com", 443, "registry.cn-beijing.aliyuncs.com:443"),
        ("2001:db8::1", 443, "[2001:db8::1]:443"),
        ("::1", 80, "[::1]:80"),
        ("fe80::1%eth0", 8443, "[fe80::1%eth0]:8443"),
        ("[2001:db8::1]", 443, "[2001:db8::1]:443"),  # already bracketed: not twice
    ],
)
def test_host_port_brackets_ipv6(host: str, port: int, expected: str) -> None:
    """IPv6 hosts (zone ids too) are bracketed so the port stays unambiguous."""
    assert host_port(host, port) == expected


def test_describe_address_unmaps_and_brackets_twisted_addresses() -> None:
    """A Twisted address prints as host:port, unmapped and bracketed; UNIX as its path."""
    assert describe_address(IPv4Address("TCP", "192.0.2.1", 1234)) == "192.0.2.1:1234"
    assert describe_address(IPv6Address("TCP", "::ffff:192.0.2.1", 1234)) == "192.0.2.1:1234"
    assert describe_address(IPv6Address("TCP", "2001:db8::1", 443)) == "[2001:db8::1]:443"
    assert describe_address(UNIXAddress(b"/run/acrrelay.sock")) == "/run/acrrelay.sock"
    assert describe_address(None) == "-"
