"""HAProxy PROXY protocol, versions 1 and 2: read one header inbound, encode one outbound.

A load balancer in front of the relay (HAProxy, an SLB, nginx ``proxy_protocol``)
prepends a PROXY header that names the real client; the relay may also send one to
a backend. Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

:class:`ProxyHeaderReader` is fed whatever bytes the socket produced, in any split,
and answers ``NEED_MORE`` until it has a whole header; then it returns the
:class:`ProxyHeader` and the bytes that followed it, which are the start of the real
stream and must be passed on byte-exact. Anything that is not an acceptable header
raises :class:`ProxyProtocolError` and nothing else. The reader buffers at most the
header itself (107 bytes for v1, ``16 + max_v2_length`` for v2), and its cost is
linear in the bytes fed.

Choices where the spec leaves room:

- Addresses come out as :mod:`ipaddress` prints them, except that IPv4-mapped IPv6
  addresses (``::ffff:1.2.3.4``) are given as the IPv4 address, inbound and outbound,
  so a client has one identity for policy whatever socket type each hop used.
- The v1 signature is recognised case-insensitively, so ``proxy tcp4 ...`` is a
  *malformed* PROXY header (a sender got it wrong), not someone else's protocol.
- v2 datagram transports are malformed: this relay carries TCP only. AF_UNIX stream
  is accepted with no addresses. A LOCAL header ignores its family and address block.
- v2 TLVs are skipped unread, but after an AF_INET, AF_INET6 or AF_UNIX block their
  type-length framing must fill the declared length exactly, so a TLV cannot claim
  bytes beyond the header. After AF_UNSPEC the block is skipped whole: the spec lets
  a sender put address information of an unsupported family there.

This module is pure: no reactor, no sockets, no Twisted.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

import attrs

from acrrelay.addresses import ipv4_unmapped
from acrrelay.clienthello import NEED_MORE, NeedMore

__all__ = [
    "DEFAULT_MAX_V2_LENGTH",
    "NEED_MORE",
    "V1_MAX_LENGTH",
    "NeedMore",
    "ProxyHeader",
    "ProxyHeaderReader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "is_proxy_signature",
]

#: Longest v1 line the spec allows, CRLF included (``PROXY UNKNOWN`` with full IPv6 fields).
V1_MAX_LENGTH: Final = 107
#: Default cap on a v2 header's address and TLV block (the 16 fixed bytes not counted).
DEFAULT_MAX_V2_LENGTH: Final = 2048

_V1_SIGNATURE: Final = b"PROXY "
_V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16
_V2_VERSION: Final = 0x20
_V2_LOCAL: Final = 0x0
_V2_PROXY: Final = 0x1

_AF_UNSPEC: Final = 0x00
_TCP4: Final = 0x11
_TCP6: Final = 0x21
_UNIX_STREAM: Final = 0x31
# Address block size of each accepted family/transport byte.
_V2_ADDRESS_LENGTH: Final = {_AF_UNSPEC: 0, _TCP4: 12, _TCP6: 36, _UNIX_STREAM: 216}
_V2_DATAGRAM: Final = frozenset({0x12, 0x22, 0x32})
_TLV_HEADER: Final = 3

_DIGITS: Final = frozenset(b"0123456789")
_IPV4_CHARS: Final = frozenset(b"0123456789.")
# No "%": ipaddress would accept a scope id, which has no place on the wire.
_IPV6_CHARS: Final = frozenset(b"0123456789abcdefABCDEF:.")

Address = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyProtocolError(ValueError):
    """The stream does not start with an acceptable PROXY header.

    ``reason`` is a short stable token for counters and logs: ``malformed`` (it is
    a PROXY header, but a bad one) or ``not_proxy`` (it is not a PROXY header at
    all). The message says what was wrong without quoting payload.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.frozen
class ProxyHeader:
    """What one PROXY header says about the connection it precedes."""

    #: Protocol version, 1 or 2.
    version: int
    #: ``"proxy"`` (addresses relayed) or ``"local"`` (v2 LOCAL, v1 UNKNOWN: use the socket's).
    command: str
    #: Original client address and port; None when the header gives none.
    source: Address | None
    #: Address and port the client connected to; None when the header gives none.
    destination: Address | None
    #: Bytes the header took from the stream.
    size: int


def _malformed(message: str) -> ProxyProtocolError:
    return ProxyProtocolError("malformed", message)


def _sniff(prefix: bytes | bytearray) -> int | None:
    """Which signature ``prefix`` starts: 1 or 2 when complete, 0 if neither, None if unsure."""
    if not prefix:
        return None
    head = bytes(prefix[: len(_V1_SIGNATURE)])
    if head.upper() == _V1_SIGNATURE[: len(head)]:
        return 1 if len(head) == len(_V1_SIGNATURE) else None
    head = bytes(prefix[: len(_V2_SIGNATURE)])
    if head == _V2_SIGNATURE[: len(head)]:
        return 2 if len(head) == len(_V2_SIGNATURE) else None
    return 0


def is_proxy_signature(prefix: bytes) -> bool | None:
    """Say whether a stream starting with ``prefix`` is trying to send a PROXY header.

    True once a v1 (``PROXY ``, any case) or v2 signature is complete; False as soon
    as a byte rules both out; None while ``prefix`` is too short to tell. It agrees
    with :class:`ProxyHeaderReader`: False exactly when the reader says ``not_proxy``.
    """
    version = _sniff(prefix)
    return None if version is None else version != 0


class ProxyHeaderReader:
    """Reads one PROXY header (v1 or v2) from a byte stream fed in arbitrary pieces.

    Call :meth:`feed` with each piece. Once it has returned a header or raised, the
    reader is finished and must not be fed again.
    """

    def __init__(self, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        largest = max(_V2_ADDRESS_LENGTH.values())
        if not largest <= max_v2_length <= 0xFFFF:
            raise ValueError(f"max_v2_length must be between {largest} and 65535")
        self._max_v2_length = max_v2_length
        self._buf = bytearray()  # the header so far, never a byte of what follows
        self._version = 0  # 0 while the signature is incomplete
        self._cr = -1  # v1: index of the CR that ends the line, once seen
        self._command = _V2_PROXY  # v2
        self._family = _AF_UNSPEC  # v2
        self._total = 0  # v2: whole header size, once the fixed part is read
        self._done = False

    def feed(self, data: bytes) -> NeedMore | tuple[ProxyHeader, bytes]:
        """Take more bytes; give the header and the bytes after it, or ``NEED_MORE``."""
        if self._done:
            raise RuntimeError("ProxyHeaderReader was already finished")
        if not data:
            return NEED_MORE
        try:
            outcome = self._advance(data)
        except ProxyProtocolError:
            self._done = True
            raise
        if not isinstance(outcome, NeedMore):
            self._done = True
        return outcome

    def _advance(self, data: bytes) -> NeedMore | tuple[ProxyHeader, bytes]:
        pos = 0
        # The signatures are at most 12 bytes: go byte by byte so that a foreign
        # protocol is told apart at its first contradicting byte.
        while self._version == 0:
            if pos == len(data):
                return NEED_MORE
            self._buf.append(data[pos])
            pos += 1
            version = _sniff(self._buf)
            if version == 0:
                raise ProxyProtocolError("not_proxy", "the stream does not start with PROXY")
            if version == 1 and self._buf != _V1_SIGNATURE:
                raise _malformed("v1 signature is not upper-case PROXY followed by a space")
            if version is not None:
                self._version = version
        if self._version == 1:
            return self._advance_v1(data, pos)
        return self._advance_v2(data, pos)

    def _advance_v1(self, data: bytes, pos: int) -> NeedMore | tuple[ProxyHeader, bytes]:
        if self._cr < 0:
            # The CR may come at index 105 at most (LF at 106); each byte is scanned once.
            room = V1_MAX_LENGTH - 1 - len(self._buf)
            chunk = data[pos : pos + room]
            cr = chunk.find(b"\r")
            if cr < 0:
                self._buf += chunk
                if len(self._buf) >= V1_MAX_LENGTH - 1:
                    raise _malformed(f"no CRLF within {V1_MAX_LENGTH} bytes of a v1 header")
                return NEED_MORE
            self._buf += chunk[: cr + 1]
            pos += cr + 1
            self._cr = len(self._buf) - 1
        if pos == len(data):
            return NEED_MORE
        if data[pos] != 0x0A:
            raise _malformed("v1 line ends with a CR that is not followed by LF")
        header = _parse_v1(bytes(self._buf[len(_V1_SIGNATURE) : self._cr]), self._cr + 2)
        return header, data[pos + 1 :]

    def _advance_v2(self, data: bytes, pos: int) -> NeedMore | tuple[ProxyHeader, bytes]:
        # Each fixed byte is judged as it arrives, so a bad one is refused at once.
        while len(self._buf) < _V2_FIXED:
            if pos == len(data):
                return NEED_MORE
            self._buf.append(data[pos])
            pos += 1
            index = len(self._buf) - 1
            if index == 12:
                self._check_version_command(self._buf[12])
            elif index == 13:
                self._check_family(self._buf[13])
            elif index == 15:
                self._check_length((self._buf[14] << 8) | self._buf[15])
        take = data[pos : pos + self._total - len(self._buf)]
        self._buf += take
        pos += len(take)
        if len(self._buf) < self._total:
            return NEED_MORE
        return self._parse_v2_block(bytes(self._buf[_V2_FIXED:])), data[pos:]

    def _check_version_command(self, byte: int) -> None:
        if byte & 0xF0 != _V2_VERSION:
            raise _malformed(f"v2 header has version {byte >> 4}")
        command = byte & 0x0F
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise _malformed(f"v2 header has command {command}")
        self._command = command

    def _check_family(self, byte: int) -> None:
        self._family = byte
        if self._command == _V2_LOCAL:
            return  # the spec: a LOCAL receiver discards the block, family included
        if byte in _V2_DATAGRAM:
            raise _malformed("v2 header announces a datagram transport to a TCP relay")
        if byte not in _V2_ADDRESS_LENGTH:
            raise _malformed(f"v2 header has family/transport 0x{byte:02x}")

    def _check_length(self, length: int) -> None:
        if length > self._max_v2_length:
            raise _malformed(f"v2 address block of {length} bytes exceeds {self._max_v2_length}")
        if self._command == _V2_PROXY and length < _V2_ADDRESS_LENGTH[self._family]:
            raise _malformed(f"v2 length {length} is too short for its family")
        self._total = _V2_FIXED + length

    def _parse_v2_block(self, block: bytes) -> ProxyHeader:
        size = _V2_FIXED + len(block)
        if self._command == _V2_LOCAL:
            return ProxyHeader(version=2, command="local", source=None, destination=None, size=size)
        family = self._family
        if family != _AF_UNSPEC:
            _check_tlv_framing(block, _V2_ADDRESS_LENGTH[family])
        source: Address | None = None
        destination: Address | None = None
        if family in (_TCP4, _TCP6):
            width = 4 if family == _TCP4 else 16
            sport, dport = struct.unpack_from("!HH", block, 2 * width)
            source = (_text(ipaddress.ip_address(block[:width])), sport)
            destination = (_text(ipaddress.ip_address(block[width : 2 * width])), dport)
        return ProxyHeader(
            version=2, command="proxy", source=source, destination=destination, size=size
        )


def _check_tlv_framing(block: bytes, start: int) -> None:
    pos = start
    while pos < len(block):
        if len(block) - pos < _TLV_HEADER:
            raise _malformed("v2 header ends inside a TLV header")
        (length,) = struct.unpack_from("!H", block, pos + 1)
        pos += _TLV_HEADER + length
        if pos > len(block):
            raise _malformed("v2 TLV runs past the end of the header")


def _parse_v1(rest: bytes, size: int) -> ProxyHeader:
    """Parse what follows ``PROXY `` up to (not including) the CRLF."""
    if rest == b"UNKNOWN" or rest.startswith(b"UNKNOWN "):
        # The spec: the receiver must ignore anything after UNKNOWN before the CRLF.
        return ProxyHeader(version=1, command="local", source=None, destination=None, size=size)
    fields = rest.split(b" ")
    if len(fields) != 5:
        raise _malformed("v1 line does not have five single-space-separated fields")
    protocol, src, dst, sport, dport = fields
    if protocol == b"TCP4":
        version = 4
    elif protocol == b"TCP6":
        version = 6
    else:
        raise _malformed("v1 protocol is not TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(
        version=1,
        command="proxy",
        source=(_parse_v1_address(src, version), _parse_v1_port(sport)),
        destination=(_parse_v1_address(dst, version), _parse_v1_port(dport)),
        size=size,
    )


def _parse_v1_address(raw: bytes, version: int) -> str:
    try:
        if version == 4:
            if not _IPV4_CHARS.issuperset(raw):
                raise ValueError(raw)
            # ipaddress refuses leading zeros in IPv4 octets, as the spec asks.
            return _text(ipaddress.IPv4Address(raw.decode("ascii")))
        if not _IPV6_CHARS.issuperset(raw):
            raise ValueError(raw)
        return _text(ipaddress.IPv6Address(raw.decode("ascii")))
    except ValueError:
        raise _malformed(f"v1 address is not an IPv{version} address") from None


def _parse_v1_port(raw: bytes) -> int:
    if not 1 <= len(raw) <= 5 or not _DIGITS.issuperset(raw):
        raise _malformed("v1 port is not a decimal number")
    if len(raw) > 1 and raw.startswith(b"0"):
        raise _malformed("v1 port has a leading zero")
    port = int(raw)
    if port > 0xFFFF:
        raise _malformed("v1 port is above 65535")
    return port


def _unmap(ip: _IP) -> _IP:
    """Give an IPv4-mapped IPv6 address as plain IPv4; drop any IPv6 scope id."""
    ip = ipv4_unmapped(ip)
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _text(ip: _IP) -> str:
    return str(_unmap(ip))


def _outbound(address: Address) -> tuple[_IP, int]:
    host, port = address
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} is not an integer in 0..65535")
    return _unmap(ipaddress.ip_address(host)), port


def _outbound_pair(
    source: Address | None, destination: Address | None
) -> tuple[tuple[_IP, int], tuple[_IP, int]] | None:
    """Both ends normalised, or None when either is missing or their families differ."""
    if source is None or destination is None:
        return None
    src, dst = _outbound(source), _outbound(destination)
    if src[0].version != dst[0].version:
        return None
    return src, dst


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """Encode a v1 line for a connection from ``source`` to ``destination``.

    IPv4-mapped addresses go out as TCP4. Without both addresses, or with one IPv4
    and one IPv6 address, the line is ``PROXY UNKNOWN``: the receiver then uses the
    connection's own endpoints. Bad addresses or ports raise :class:`ValueError`.
    """
    pair = _outbound_pair(source, destination)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = pair
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(source: Address | None, destination: Address | None) -> bytes:
    """Encode a v2 header (no TLVs) for a connection from ``source`` to ``destination``.

    IPv4-mapped addresses go out as AF_INET. Without addresses the header is a
    LOCAL with AF_UNSPEC, as a health check sends. With one IPv4 and one IPv6
    address it is a PROXY with AF_UNSPEC and no address block: "relayed, addresses
    unknown", which the spec lets the receiver accept or refuse. Bad addresses or
    ports raise :class:`ValueError`.
    """
    if source is None or destination is None:
        return _V2_SIGNATURE + bytes((_V2_VERSION | _V2_LOCAL, _AF_UNSPEC)) + b"\x00\x00"
    pair = _outbound_pair(source, destination)
    if pair is None:
        return _V2_SIGNATURE + bytes((_V2_VERSION | _V2_PROXY, _AF_UNSPEC)) + b"\x00\x00"
    (src, sport), (dst, dport) = pair
    family = _TCP4 if src.version == 4 else _TCP6
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return (
        _V2_SIGNATURE
        + bytes((_V2_VERSION | _V2_PROXY, family))
        + struct.pack("!H", len(block))
        + block
    )
