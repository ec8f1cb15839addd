"""Layer 1: the PROXY protocol reader and encoders, on headers as HAProxy sends them
and on hostile bytes."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import struct
import tracemalloc
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acrrelay import clienthello
from acrrelay.proxyproto import (
    NEED_MORE,
    ProxyHeader,
    ProxyHeaderReader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    is_proxy_signature,
)

# Built from the spec (section 2.2), not imported from the module under test.
V2_SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
PROXY_CMD = 0x21  # version 2, PROXY
LOCAL_CMD = 0x20  # version 2, LOCAL
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CIPHER = 0x23

# What follows a header: the start of a TLS record, then bytes a careless parser
# might take for more header (a CRLF, the v2 signature).
PAYLOAD = b"\x16\x03\x01\x00\xf4\x01\x00\x00\xf0\x03\x03" + b"\r\n" + V2_SIG + b"PROXY tail"


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def v2(ver_cmd: int, fam: int, block: bytes, *, length: int | None = None) -> bytes:
    declared = len(block) if length is None else length
    return V2_SIG + bytes([ver_cmd, fam]) + struct.pack("!H", declared) + block


def ipv4(a: int, b: int, c: int, d: int) -> bytes:
    return bytes([a, b, c, d])


def v2_with_crc(fam: int, addresses: bytes, before: bytes, after: bytes) -> bytes:
    """A PROXY header with a CRC32C TLV filled in the way the spec says a sender must."""
    header = v2(PROXY_CMD, fam, addresses + before + tlv(PP2_TYPE_CRC32C, bytes(4)) + after)
    at = 16 + len(addresses) + len(before) + 3
    return header[:at] + struct.pack("!I", crc32c(header)) + header[at + 4 :]


IPV6_SRC = bytes.fromhex("20010db8000000000000000000000001")
IPV6_DST = bytes.fromhex("20010db80000000000000000000000ff")
UNIX_PATHS = b"/run/haproxy.sock".ljust(108, b"\x00") + b"/run/acrrelay.sock".ljust(108, b"\x00")
SSL_TLV = tlv(
    PP2_TYPE_SSL,
    b"\x01"  # PP2_CLIENT_SSL
    + b"\x00\x00\x00\x00"  # verify: ok
    + tlv(PP2_SUBTYPE_SSL_VERSION, b"TLSv1.3")
    + tlv(PP2_SUBTYPE_SSL_CIPHER, b"TLS_AES_256_GCM_SHA384"),
)
V1_WORST = (
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
    b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
)


def _hdr(
    version: int, command: str, src: tuple[str, int] | None, dst: tuple[str, int] | None, size: int
) -> ProxyHeader:
    return ProxyHeader(version=version, command=command, source=src, destination=dst, size=size)


_TCP4_V1 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
_TCP6_V1 = b"PROXY TCP6 2001:db8::1 2001:db8::ff 56324 443\r\n"
_TCP4_V2 = v2(
    PROXY_CMD, 0x11, ipv4(192, 168, 0, 1) + ipv4(192, 168, 0, 11) + struct.pack("!HH", 56324, 443)
)
_TCP6_V2_TLVS = v2_with_crc(
    0x21,
    IPV6_SRC + IPV6_DST + struct.pack("!HH", 56324, 443),
    tlv(PP2_TYPE_ALPN, b"h2") + tlv(PP2_TYPE_AUTHORITY, b"registry.cn-beijing.aliyuncs.com"),
    tlv(PP2_TYPE_UNIQUE_ID, bytes(range(32))) + SSL_TLV + tlv(PP2_TYPE_NOOP, b""),
)
_TCP4_V2_TLVS = v2_with_crc(
    0x11,
    ipv4(10, 0, 0, 7) + ipv4(10, 0, 0, 1) + struct.pack("!HH", 40000, 443),
    tlv(PP2_TYPE_AUTHORITY, b"dockerauth-vpc.cn-hangzhou.aliyuncs.com"),
    b"",
)
_LOCAL_V2 = v2(LOCAL_CMD, 0x00, b"")
_LOCAL_V2_WITH_BLOCK = v2(LOCAL_CMD, 0x11, ipv4(127, 0, 0, 1) * 2 + struct.pack("!HH", 1, 2))
_UNIX_V2 = v2(PROXY_CMD, 0x31, UNIX_PATHS)
_UNSPEC_V2 = v2(PROXY_CMD, 0x00, tlv(PP2_TYPE_NOOP, b"pad"))
_MAPPED_V2 = v2(
    PROXY_CMD,
    0x21,
    bytes(10) + b"\xff\xff" + ipv4(203, 0, 113, 9) + bytes(10) + b"\xff\xff" + ipv4(10, 1, 2, 3)
    + struct.pack("!HH", 5000, 443),
)  # fmt: skip

#: Real headers as HAProxy (send-proxy, send-proxy-v2, check-send-proxy) puts them on the wire.
REAL: dict[str, tuple[bytes, ProxyHeader]] = {
    "v1-tcp4": (_TCP4_V1, _hdr(1, "proxy", ("192.168.0.1", 56324), ("192.168.0.11", 443), 47)),
    "v1-tcp6": (_TCP6_V1, _hdr(1, "proxy", ("2001:db8::1", 56324), ("2001:db8::ff", 443), 47)),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", _hdr(1, "local", None, None, 15)),
    "v1-unknown-worst-case": (V1_WORST, _hdr(1, "local", None, None, 107)),
    "v2-tcp4": (_TCP4_V2, _hdr(2, "proxy", ("192.168.0.1", 56324), ("192.168.0.11", 443), 28)),
    "v2-tcp6-tlvs": (
        _TCP6_V2_TLVS,
        _hdr(2, "proxy", ("2001:db8::1", 56324), ("2001:db8::ff", 443), len(_TCP6_V2_TLVS)),
    ),
    "v2-tcp4-authority-crc": (
        _TCP4_V2_TLVS,
        _hdr(2, "proxy", ("10.0.0.7", 40000), ("10.0.0.1", 443), len(_TCP4_V2_TLVS)),
    ),
    "v2-local-health-check": (_LOCAL_V2, _hdr(2, "local", None, None, 16)),
    "v2-local-with-addresses": (_LOCAL_V2_WITH_BLOCK, _hdr(2, "local", None, None, 28)),
    "v2-unix-stream": (_UNIX_V2, _hdr(2, "proxy", None, None, 232)),
    "v2-unspec": (_UNSPEC_V2, _hdr(2, "proxy", None, None, 22)),
    "v2-tcp6-mapped": (_MAPPED_V2, _hdr(2, "proxy", ("203.0.113.9", 5000), ("10.1.2.3", 443), 52)),
}


def run(data: bytes, cuts: Sequence[int] = (), max_v2_length: int = 2048) -> object:
    """Feed ``data`` cut at ``cuts``; give (header, every byte after it), NEED_MORE, or the
    error reason."""
    reader = ProxyHeaderReader(max_v2_length)
    bounds = [0, *sorted({c for c in cuts if 0 <= c <= len(data)}), len(data)]
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    try:
        for i, piece in enumerate(pieces):
            outcome = reader.feed(piece)
            if outcome is not NEED_MORE:
                assert isinstance(outcome, tuple)
                header, rest = outcome
                return header, rest + b"".join(pieces[i + 1 :])
    except ProxyProtocolError as e:
        return ("error", e.reason)
    return NEED_MORE


def test_crc32c_helper_matches_the_rfc_check_value() -> None:
    """The test's own CRC32c gives the standard check value, so the CRC TLVs are real."""
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("name", REAL)
def test_real_headers_parse(name: str) -> None:
    """Each header as HAProxy sends it gives its addresses, command, size, and the payload."""
    data, expected = REAL[name]
    assert run(data + PAYLOAD) == (expected, PAYLOAD)
    assert expected.size == len(data)


@pytest.mark.parametrize("name", REAL)
def test_every_split_gives_the_same_header_and_payload(name: str) -> None:
    """A header plus payload cut in two at any offset, or fed byte by byte, reads the same."""
    data, expected = REAL[name]
    stream = data + PAYLOAD
    for offset in range(len(stream) + 1):
        assert run(stream, [offset]) == (expected, PAYLOAD), offset
    assert run(stream, list(range(len(stream)))) == (expected, PAYLOAD)


def test_one_byte_at_a_time_answers_need_more_until_the_last_header_byte() -> None:
    """Fed one byte per call, the reader says NEED_MORE exactly until the header is whole."""
    for data, expected in REAL.values():
        reader = ProxyHeaderReader()
        for i in range(len(data) - 1):
            assert reader.feed(data[i : i + 1]) is NEED_MORE
        assert reader.feed(data[-1:]) == (expected, b"")


@pytest.mark.parametrize("first", range(1, 16))
def test_v2_header_whose_first_read_is_shorter_than_16_bytes(first: int) -> None:
    """twisted#8287: a v2 header arriving as 1..15 bytes, then the rest, still parses."""
    for name in ("v2-tcp4", "v2-tcp6-tlvs", "v2-local-health-check"):
        data, expected = REAL[name]
        reader = ProxyHeaderReader()
        assert reader.feed(data[:first]) is NEED_MORE
        assert reader.feed(data[first:] + PAYLOAD) == (expected, PAYLOAD)


def test_header_alone_leaves_an_empty_remainder() -> None:
    """A read that ends exactly with the header gives b'' as what follows."""
    reader = ProxyHeaderReader()
    assert reader.feed(_TCP4_V1) == (REAL["v1-tcp4"][1], b"")


def test_empty_feed_is_need_more() -> None:
    """An empty read neither decides nor finishes the reader."""
    reader = ProxyHeaderReader()
    assert reader.feed(b"") is NEED_MORE
    assert reader.feed(_LOCAL_V2) == (REAL["v2-local-health-check"][1], b"")


@pytest.mark.parametrize(
    ("data", "fails"),
    [(_TCP4_V1, False), (b"GET / HTTP/1.1\r\n", True), (V2_SIG + b"\x11", True)],
)
def test_reader_refuses_to_be_fed_after_deciding(data: bytes, fails: bool) -> None:
    """After a header or an error, feeding again is a RuntimeError, not a silent reuse."""
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError) if fails else contextlib.nullcontext():
        reader.feed(data)
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


@pytest.mark.parametrize("limit", [215, 65536, 0])
def test_max_v2_length_must_fit_every_family_and_the_field(limit: int) -> None:
    """A v2 cap below the AF_UNIX block or above what 16 bits can say is a caller error."""
    with pytest.raises(ValueError):
        ProxyHeaderReader(limit)


# --- v1 line length ---------------------------------------------------------------


def test_v1_line_of_exactly_107_bytes_is_accepted() -> None:
    """The spec's worst case, 107 bytes with the CRLF, is within the limit."""
    line = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(line) == 107
    assert run(line + b"rest") == (_hdr(1, "local", None, None, 107), b"rest")


def test_v1_line_of_108_bytes_is_malformed() -> None:
    """One byte more than the spec allows is refused, even with a CRLF."""
    line = b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n"
    assert run(line) == ("error", "malformed")


def test_v1_without_cr_is_refused_at_the_106th_byte() -> None:
    """Without a CR in the first 106 bytes no valid line can follow; the reader says so there."""
    data = b"PROXY UNKNOWN " + b"x" * 200
    reader = ProxyHeaderReader()
    for i in range(105):
        assert reader.feed(data[i : i + 1]) is NEED_MORE
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(data[105:106])
    assert info.value.reason == "malformed"


def test_unknown_ignores_whatever_precedes_the_crlf() -> None:
    """After UNKNOWN and a space, anything up to the CRLF is ignored, as the spec says."""
    line = b"PROXY UNKNOWN whatever \x00\xff\n here\r\n"
    assert run(line + b"x") == (_hdr(1, "local", None, None, len(line)), b"x")


def test_v1_addresses_come_out_in_canonical_text() -> None:
    """Long-form IPv6 text is accepted and given as ipaddress prints it."""
    line = b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::1 0 65535\r\n"
    header = run(line)
    assert isinstance(header, tuple)
    assert header[0] == _hdr(1, "proxy", ("2001:db8::1", 0), ("::1", 65535), len(line))


def test_v1_tcp6_with_mapped_addresses_gives_ipv4() -> None:
    """A dual-stack sender's TCP6 ::ffff:a.b.c.d is read as the IPv4 client it is."""
    line = b"PROXY TCP6 ::ffff:203.0.113.9 ::ffff:10.1.2.3 5000 443\r\n"
    assert run(line) == (_hdr(1, "proxy", ("203.0.113.9", 5000), ("10.1.2.3", 443), len(line)), b"")


# --- malformed ----------------------------------------------------------------------

_GOOD_TCP4_BLOCK = ipv4(1, 2, 3, 4) + ipv4(5, 6, 7, 8) + struct.pack("!HH", 1, 2)

MALFORMED = {
    # v1
    "v1-too-long-without-crlf": b"PROXY UNKNOWN " + b"f" * 200,
    "v1-cr-without-lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rGET / HTTP/1.1\r\n",
    "v1-bare-lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nGET / HTTP/1.1\r\n",
    "v1-lowercase-proxy": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-mixed-case-proxy": b"Proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-lowercase-protocol": b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-unknown-protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-unknown-glued": b"PROXY UNKNOWNX\r\n",
    "v1-udp": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-empty": b"PROXY \r\n",
    "v1-protocol-only": b"PROXY TCP4\r\n",
    "v1-missing-port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1-missing-address": b"PROXY TCP4 1.2.3.4 1 2\r\n",
    "v1-extra-field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1-double-space-after-proxy": b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-double-space-between": b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
    "v1-trailing-space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1-tab": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-port-too-big": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1-port-huge": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 9999999999\r\n",
    "v1-port-negative": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "v1-port-plus": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "v1-port-leading-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n",
    "v1-port-double-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n",
    "v1-port-hex": b"PROXY TCP4 1.2.3.4 5.6.7.8 0x1f 2\r\n",
    "v1-port-underscore": b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n",
    "v1-port-unicode-digit": "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(),
    "v1-ipv4-leading-zero": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v1-ipv4-octet-256": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v1-ipv4-three-octets": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v1-ipv4-as-integer": b"PROXY TCP4 16909060 5.6.7.8 1 2\r\n",
    "v1-tcp4-with-ipv6": b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n",
    "v1-tcp4-with-mapped": b"PROXY TCP4 ::ffff:1.2.3.4 ::ffff:5.6.7.8 1 2\r\n",
    "v1-tcp6-with-ipv4": b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n",
    "v1-ipv6-scope-id": b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",
    "v1-ipv6-two-double-colons": b"PROXY TCP6 2001::db8::1 ::1 1 2\r\n",
    "v1-hostname": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "v1-non-ascii": b"PROXY TCP4 1.2.3.\xb4 5.6.7.8 1 2\r\n",
    # v2
    "v2-version-1": v2(0x11, 0x11, _GOOD_TCP4_BLOCK),
    "v2-version-3": v2(0x31, 0x11, _GOOD_TCP4_BLOCK),
    "v2-command-2": v2(0x22, 0x11, _GOOD_TCP4_BLOCK),
    "v2-command-15": v2(0x2F, 0x11, _GOOD_TCP4_BLOCK),
    "v2-udp4": v2(PROXY_CMD, 0x12, _GOOD_TCP4_BLOCK),
    "v2-udp6": v2(PROXY_CMD, 0x22, bytes(36)),
    "v2-unix-dgram": v2(PROXY_CMD, 0x32, bytes(216)),
    "v2-family-4": v2(PROXY_CMD, 0x41, _GOOD_TCP4_BLOCK),
    "v2-transport-3": v2(PROXY_CMD, 0x13, _GOOD_TCP4_BLOCK),
    "v2-inet-unspec-transport": v2(PROXY_CMD, 0x10, _GOOD_TCP4_BLOCK),
    "v2-unspec-family-stream": v2(PROXY_CMD, 0x01, b""),
    "v2-tcp4-length-11": v2(PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK[:11]),
    "v2-tcp4-length-0": v2(PROXY_CMD, 0x11, b""),
    "v2-tcp6-length-35": v2(PROXY_CMD, 0x21, bytes(35)),
    "v2-tcp6-with-ipv4-length": v2(PROXY_CMD, 0x21, _GOOD_TCP4_BLOCK),
    "v2-unix-length-215": v2(PROXY_CMD, 0x31, bytes(215)),
    "v2-length-above-limit": v2(
        PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK + tlv(PP2_TYPE_NOOP, bytes(2034))
    ),
    "v2-local-length-above-limit": v2(LOCAL_CMD, 0x00, bytes(2049)),
    "v2-length-65535": v2(PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK, length=0xFFFF),
    "v2-tlv-overruns": v2(PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK + b"\x02\x00\x09abc"),
    "v2-tlv-header-cut": v2(PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK + b"\x04\x00"),
    "v2-tlv-stray-byte": v2(PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK + tlv(PP2_TYPE_NOOP, b"") + b"\x00"),
}


def test_limit_cases_are_where_they_claim() -> None:
    """The 'above limit' cases are one byte over 2048, so they pin the boundary."""
    assert len(MALFORMED["v2-length-above-limit"]) == 16 + 2049
    at_limit = v2(PROXY_CMD, 0x11, _GOOD_TCP4_BLOCK + tlv(PP2_TYPE_NOOP, bytes(2033)))
    assert len(at_limit) == 16 + 2048
    header = run(at_limit)
    assert isinstance(header, tuple) and header[0].size == 16 + 2048


@pytest.mark.parametrize("data", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_raises_the_module_error(data: bytes) -> None:
    """Each malformed header raises ProxyProtocolError(reason='malformed'), in one read or
    one byte at a time."""
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(data)
    assert info.value.reason == "malformed"
    assert run(data, list(range(len(data)))) == ("error", "malformed")


@pytest.mark.parametrize(
    ("data", "decided_at"),
    [
        (v2(0x11, 0x11, b""), 13),  # version
        (v2(0x23, 0x11, b""), 13),  # command
        (v2(PROXY_CMD, 0x12, b""), 14),  # datagram
        (v2(PROXY_CMD, 0x21, bytes(35)), 16),  # too short for IPv6
        (v2(PROXY_CMD, 0x11, b"", length=4096), 16),  # above the cap
        (b"proxy ", 6),  # a PROXY header in the wrong case
    ],
)
def test_bad_fixed_fields_are_refused_as_they_arrive(data: bytes, decided_at: int) -> None:
    """A bad version, command, family or length is refused at its own byte, without waiting
    for the block the length announces."""
    reader = ProxyHeaderReader()
    for i in range(decided_at - 1):
        assert reader.feed(data[i : i + 1]) is NEED_MORE
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(data[decided_at - 1 : decided_at])
    assert info.value.reason == "malformed"


def test_unspec_block_is_skipped_whole() -> None:
    """After AF_UNSPEC the block may hold foreign address data, so it is not read as TLVs."""
    data = v2(PROXY_CMD, 0x00, b"\x01")
    assert run(data + b"x") == (_hdr(2, "proxy", None, None, 17), b"x")


@pytest.mark.parametrize("fam", [0x12, 0x22, 0x32])
def test_datagram_is_refused_by_name(fam: int) -> None:
    """UDP and UNIX datagram headers are refused with a message that says why, for the log."""
    with pytest.raises(ProxyProtocolError, match="datagram") as info:
        ProxyHeaderReader().feed(v2(PROXY_CMD, fam, bytes(216)))
    assert info.value.reason == "malformed"


def test_local_ignores_family_and_address_block() -> None:
    """LOCAL is accepted whatever its family (even DGRAM or unassigned), as the spec asks."""
    for fam in (0x00, 0x11, 0x12, 0x21, 0x32, 0x99):
        data = v2(LOCAL_CMD, fam, bytes(7))
        assert run(data + b"x") == (_hdr(2, "local", None, None, 23), b"x")


# --- not PROXY at all ---------------------------------------------------------------

NOT_PROXY = [
    # (first bytes, 1-based index of the byte that rules out both signatures)
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 1),  # TLS ClientHello
    (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 1),
    (b"CONNECT registry.cn-beijing.aliyuncs.com:443 HTTP/1.1\r\n", 1),
    (b"PUT /v2/ HTTP/1.1\r\n", 2),
    (b"POST /auth HTTP/1.1\r\n", 2),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 3),
    (b"PROXZ TCP4", 5),
    (b"PROXY\r\n", 6),
    (b"SSH-2.0-OpenSSH_9.2\r\n", 1),
    (b"\r\n\r\nGET / HTTP/1.1\r\n", 5),
    (V2_SIG[:11] + b"X", 12),
    (b"\x00\x00\x00\x00", 1),
    (b"\x80\x2e\x01\x00\x02", 1),  # SSLv2-style hello
]


@pytest.mark.parametrize(
    ("data", "decided_at"),
    NOT_PROXY,
    ids=[
        "tls",
        "http-get",
        "connect",
        "http-put",
        "http-post",
        "h2-preface",
        "proxz",
        "proxy-no-space",
        "ssh",
        "crlf-then-http",
        "v2-signature-typo",
        "zeros",
        "sslv2",
    ],
)
def test_not_proxy_is_told_at_the_first_contradicting_byte(data: bytes, decided_at: int) -> None:
    """TLS, HTTP, SSH and other first bytes raise not_proxy at the first byte that rules
    out both signatures, and is_proxy_signature agrees at every length."""
    reader = ProxyHeaderReader()
    for i in range(decided_at - 1):
        assert reader.feed(data[i : i + 1]) is NEED_MORE
        assert is_proxy_signature(data[: i + 1]) is None
    with pytest.raises(ProxyProtocolError) as info:
        reader.feed(data[decided_at - 1 : decided_at])
    assert info.value.reason == "not_proxy"
    for n in range(decided_at, len(data) + 1):
        assert is_proxy_signature(data[:n]) is False
    assert run(data) == ("error", "not_proxy")


@pytest.mark.parametrize("signature", [b"PROXY ", b"proxy ", V2_SIG], ids=["v1", "v1-lower", "v2"])
def test_is_proxy_signature_for_every_prefix_length(signature: bytes) -> None:
    """Prefixes of a signature are undecided; the whole signature, and anything after it,
    is a PROXY header."""
    assert is_proxy_signature(b"") is None
    for n in range(1, len(signature)):
        assert is_proxy_signature(signature[:n]) is None, n
    assert is_proxy_signature(signature) is True
    assert is_proxy_signature(signature + b"TCP4 1.2.3.4 ...") is True
    assert is_proxy_signature(signature + b"\x16\x03\x01") is True


def test_is_proxy_signature_is_true_for_every_real_header() -> None:
    """Every real header is recognised as one from its signature on."""
    for data, _ in REAL.values():
        assert is_proxy_signature(data) is True
        assert is_proxy_signature(data + PAYLOAD) is True


# --- encoding -----------------------------------------------------------------------


def test_encode_v1_exact_bytes() -> None:
    """v1 lines come out exactly as the spec's example."""
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == _TCP4_V1
    assert encode_v1(("2001:db8::1", 56324), ("2001:db8::ff", 443)) == _TCP6_V1
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_exact_bytes() -> None:
    """v2 headers come out byte for byte as HAProxy's send-proxy-v2 (without TLVs)."""
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == _TCP4_V2
    block = IPV6_SRC + IPV6_DST + struct.pack("!HH", 56324, 443)
    assert encode_v2(("2001:db8::1", 56324), ("2001:db8::ff", 443)) == v2(PROXY_CMD, 0x21, block)
    assert encode_v2(None, None) == _LOCAL_V2
    assert encode_v2(("1.2.3.4", 1), None) == _LOCAL_V2


ROUND_TRIPS = [
    # (source, destination, expected source, expected destination)
    (("1.2.3.4", 5), ("5.6.7.8", 443), ("1.2.3.4", 5), ("5.6.7.8", 443)),
    (("2001:db8::1", 0), ("2001:db8::2", 65535), ("2001:db8::1", 0), ("2001:db8::2", 65535)),
    (("2001:0DB8:0::1", 1), ("::1", 2), ("2001:db8::1", 1), ("::1", 2)),
    (("::ffff:1.2.3.4", 5), ("::ffff:10.0.0.1", 443), ("1.2.3.4", 5), ("10.0.0.1", 443)),
    (("::ffff:1.2.3.4", 5), ("10.0.0.1", 443), ("1.2.3.4", 5), ("10.0.0.1", 443)),
    (("fe80::1%eth0", 5), ("fe80::2%2", 443), ("fe80::1", 5), ("fe80::2", 443)),
]


@pytest.mark.parametrize(("src", "dst", "want_src", "want_dst"), ROUND_TRIPS)
def test_round_trip(
    src: tuple[str, int], dst: tuple[str, int], want_src: tuple[str, int], want_dst: tuple[str, int]
) -> None:
    """Encoding then parsing gives the addresses back, mapped IPv4 as plain IPv4 and scope
    ids dropped, in both versions."""
    for encode, version in ((encode_v1, 1), (encode_v2, 2)):
        data = encode(src, dst)
        assert run(data + PAYLOAD) == (
            _hdr(version, "proxy", want_src, want_dst, len(data)),
            PAYLOAD,
        )


def test_mapped_ipv4_goes_out_as_tcp4_and_af_inet() -> None:
    """A dual-stack socket's ::ffff:a.b.c.d client is sent as TCP4 / AF_INET, not as IPv6."""
    src, dst = ("::ffff:203.0.113.9", 40000), ("::ffff:10.0.0.1", 443)
    assert encode_v1(src, dst) == b"PROXY TCP4 203.0.113.9 10.0.0.1 40000 443\r\n"
    out = encode_v2(src, dst)
    assert out[12:16] == b"\x21\x11\x00\x0c"
    assert out[16:24] == ipv4(203, 0, 113, 9) + ipv4(10, 0, 0, 1)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("1.2.3.4", 5), ("2001:db8::1", 443)),
        (("2001:db8::1", 5), ("1.2.3.4", 443)),
        (("::ffff:1.2.3.4", 5), ("2001:db8::1", 443)),
    ],
)
def test_mixed_families(src: tuple[str, int], dst: tuple[str, int]) -> None:
    """One IPv4 and one IPv6 end give v1 UNKNOWN and v2 PROXY with AF_UNSPEC and no block."""
    assert encode_v1(src, dst) == b"PROXY UNKNOWN\r\n"
    assert run(encode_v1(src, dst)) == (_hdr(1, "local", None, None, 15), b"")
    out = encode_v2(src, dst)
    assert out == v2(PROXY_CMD, 0x00, b"")
    assert run(out + b"x") == (_hdr(2, "proxy", None, None, 16), b"x")


def test_none_round_trips_as_local() -> None:
    """No addresses encode as v1 UNKNOWN and v2 LOCAL; both read back as 'local'."""
    assert run(encode_v1(None, None)) == (_hdr(1, "local", None, None, 15), b"")
    assert run(encode_v2(None, None)) == (_hdr(2, "local", None, None, 16), b"")


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("localhost", 1), ("1.2.3.4", 2)),
        (("1.2.3.4", 65536), ("1.2.3.4", 2)),
        (("1.2.3.4", -1), ("1.2.3.4", 2)),
        (("1.2.3.4", True), ("1.2.3.4", 2)),
        (("1.2.3.4", "443"), ("1.2.3.4", 2)),
        (("1.2.3.4", 1), ("1.2.3", 2)),
    ],
)
def test_encoders_reject_bad_addresses(src: tuple[str, int], dst: tuple[str, int]) -> None:
    """A host that is not an IP address, or a port outside 0..65535, is a caller error."""
    for encode in (encode_v1, encode_v2):
        with pytest.raises(ValueError):
            encode(src, dst)


_PORTS = st.integers(min_value=0, max_value=65535)
_ENDPOINTS = st.tuples(st.ip_addresses(), _PORTS)


def _plain(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@settings(max_examples=100, deadline=None)
@given(_ENDPOINTS, _ENDPOINTS)
def test_round_trip_any_addresses(
    src: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
    dst: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int],
) -> None:
    """Any pair of addresses survives encode then parse, in both versions, split anywhere."""
    want_src, want_dst = (_plain(src[0]), src[1]), (_plain(dst[0]), dst[1])
    same_family = (
        ipaddress.ip_address(want_src[0]).version == ipaddress.ip_address(want_dst[0]).version
    )
    for encode, version in ((encode_v1, 1), (encode_v2, 2)):
        data = encode((str(src[0]), src[1]), (str(dst[0]), dst[1]))
        outcome = run(data + b"!", [len(data) // 2])
        assert isinstance(outcome, tuple) and outcome[1] == b"!"
        header = outcome[0]
        assert header.version == version
        if same_family:
            assert (header.command, header.source, header.destination) == (
                "proxy",
                want_src,
                want_dst,
            )
        else:
            assert header.source is None and header.destination is None


# --- hostile input ------------------------------------------------------------------

_OPENINGS = st.sampled_from(
    [
        b"",
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ::",
        b"PROXY UNKNOWN",
        b"proxy ",
        V2_SIG,
        V2_SIG + b"\x21",
        V2_SIG + b"\x21\x11\x00\x0c",
        V2_SIG + b"\x21\x21\x00",
        V2_SIG + b"\x20",
        V2_SIG[:7],
        *(data for data, _ in REAL.values()),
    ]
)
_TEXT_BYTES = st.binary(max_size=120) | st.lists(
    st.sampled_from([b" ", b"\r", b"\n", b"\r\n", b"0", b"1", b"255", b".", b":", b"f", b"TCP4"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    _OPENINGS,
    _TEXT_BYTES,
    st.lists(st.integers(min_value=0, max_value=360), max_size=6),
    st.sampled_from([216, 2048]),
)
def test_arbitrary_bytes_raise_only_the_module_error(
    opening: bytes, tail: bytes, cuts: list[int], limit: int
) -> None:
    """Any bytes, in any split, give NEED_MORE, a header or ProxyProtocolError only, the same
    outcome whatever the split, and agree with is_proxy_signature."""
    data = opening + tail
    whole = run(data, [], limit)
    assert run(data, cuts, limit) == whole
    assert run(data, range(len(data)), limit) == whole
    signature = is_proxy_signature(data)
    assert (signature is False) == (whole == ("error", "not_proxy"))
    if signature is None:
        assert whole is NEED_MORE
    if isinstance(whole, tuple) and isinstance(whole[0], ProxyHeader):
        header, rest = whole
        assert data == data[: header.size] + rest


_MUTATION_BASES = [data + PAYLOAD for data, _ in REAL.values()]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.sampled_from(_MUTATION_BASES),
    st.binary(min_size=1, max_size=8),
    st.integers(min_value=0, max_value=299),
    st.integers(min_value=0, max_value=300),
)
def test_mutated_real_headers_never_escape(
    base: bytes, mutation: bytes, where: int, cut: int
) -> None:
    """Real headers with bytes overwritten raise only ProxyProtocolError, whatever the split."""
    data = bytearray(base)
    where %= len(data)
    data[where : where + len(mutation)] = mutation[: len(data) - where]
    assert run(bytes(data), [cut]) == run(bytes(data))


# --- bounded memory -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("opening", "filler", "limit"),
    [
        (b"PROXY UNKNOWN ", b"f" * 1024, 107),
        (b"PROXY TCP4 1", b"1" * 1024, 107),
        (V2_SIG + b"\x21\x11\xff\xff", b"\x00" * 1024, 16),
        (V2_SIG + b"\x21\x11\x08\x00" + _GOOD_TCP4_BLOCK, b"\x00" * 1024, 16 + 2048),
        (V2_SIG + b"\x20\x00\x08\x00", b"\x00" * 1024, 16 + 2048),
    ],
)
def test_memory_is_bounded_by_the_limit(opening: bytes, filler: bytes, limit: int) -> None:
    """A megabyte offered 1 KiB at a time after a valid-looking prefix is decided within the
    header limit, with bounded memory."""
    reader = ProxyHeaderReader()
    fed = len(opening)
    tracemalloc.start()
    try:
        outcome = reader.feed(opening)
        for _ in range(1024):
            if outcome is not NEED_MORE:
                break
            outcome = reader.feed(filler)
            fed += len(filler)
        _, peak = tracemalloc.get_traced_memory()
    except ProxyProtocolError:
        _, peak = tracemalloc.get_traced_memory()
        outcome = None
    finally:
        tracemalloc.stop()
    assert fed <= limit + len(filler)
    assert peak < 64 * 1024
    # A header that does end at the limit hands back the rest of that read, untouched.
    if isinstance(outcome, tuple):
        header, rest = outcome
        assert header.size == limit
        assert header.size + len(rest) == fed


def test_need_more_is_the_clienthello_sentinel() -> None:
    """The module reuses the relay's one NEED_MORE, so callers test a single sentinel."""
    assert NEED_MORE is clienthello.NEED_MORE
