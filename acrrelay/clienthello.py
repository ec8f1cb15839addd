"""An incremental TLS ClientHello reader: just enough TLS to learn where a connection goes.

The reader is fed whatever bytes the socket produced, in any split. It reassembles
the handshake across TCP reads *and* across TLS records, and answers with one of:

- ``NEED_MORE``: give me more bytes;
- a :class:`NotTLS`: the first bytes are not a TLS handshake record (for example an
  HTTP request, or an SSLv2-style hello), so another front door may claim them;
- a :class:`ClientHello`: the parsed hello, with its server name (SNI), ALPN list,
  size and record count.

Malformed or oversized input raises :class:`ClientHelloError` and nothing else. The
reader never buffers more than its ``limit`` (16 KiB by default), record headers
included, and its cost is linear in the bytes fed, however they are split.

This module is pure: no reactor, no sockets, no Twisted.
"""

from __future__ import annotations

from typing import Final, final

import attrs

__all__ = [
    "DEFAULT_LIMIT",
    "NEED_MORE",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloReader",
    "NeedMore",
    "NotTLS",
    "parse_client_hello",
]

DEFAULT_LIMIT: Final = 16 * 1024

_CONTENT_HANDSHAKE: Final = 22
_HANDSHAKE_CLIENT_HELLO: Final = 1
_RECORD_HEADER: Final = 5
# RFC 8446 5.1: a plaintext record fragment is at most 2^14 bytes.
_MAX_FRAGMENT: Final = 1 << 14

_EXT_SERVER_NAME: Final = 0
_EXT_ALPN: Final = 16
_EXT_ENCRYPTED_CLIENT_HELLO: Final = 0xFE0D

_HOSTNAME_CHARS: Final = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
)


class ClientHelloError(ValueError):
    """The bytes are TLS but not an acceptable ClientHello.

    ``reason`` is a short stable token for counters and logs: ``malformed`` or
    ``too_large``. The message says what was wrong without quoting payload.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@final
class NeedMore:
    """The reader needs more bytes before it can decide."""

    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()


@attrs.frozen
class NotTLS:
    """The stream does not start with a TLS handshake record.

    ``detail`` says why, for the log (``sslv2`` for an SSLv2-style hello).
    """

    detail: str


@attrs.frozen
class ClientHello:
    """What the relay learns from a ClientHello. Values only; never payload."""

    #: The host_name from the server_name extension, lower-cased; None without SNI.
    server_name: str | None
    #: ALPN protocol names offered, in the client's order.
    alpn: tuple[str, ...]
    #: Size of the handshake message, header included.
    size: int
    #: How many TLS records carried it.
    records: int
    #: Bytes consumed from the stream to read it (records with headers).
    stream_bytes: int
    #: Whether an encrypted_client_hello extension is present; the SNI is then the outer one.
    ech: bool


class ClientHelloReader:
    """Reassembles one ClientHello from a byte stream fed in arbitrary pieces.

    Call :meth:`feed` with each piece. Once it has returned a :class:`ClientHello`
    or a :class:`NotTLS`, or raised, the reader is finished and must not be fed again.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 64:
            raise ValueError("limit must be at least 64 bytes")
        self._limit = limit
        self._pending = bytearray()  # bytes of the record being read
        self._handshake = bytearray()  # reassembled handshake fragments
        self._consumed = 0  # complete records taken out of _pending
        self._records = 0
        self._done = False

    def feed(self, data: bytes) -> NeedMore | NotTLS | ClientHello:
        """Take more bytes from the stream and say what is known now."""
        if self._done:
            raise RuntimeError("ClientHelloReader was already finished")
        if not data:
            return NEED_MORE
        if self._records == 0 and not self._pending:
            not_tls = _sniff(data[0])
            if not_tls is not None:
                self._done = True
                return not_tls
        self._pending += data
        try:
            return self._advance()
        except ClientHelloError:
            self._done = True
            raise

    def _advance(self) -> NeedMore | ClientHello:
        while len(self._pending) >= _RECORD_HEADER:
            header = self._pending
            content_type = header[0]
            length = (header[3] << 8) | header[4]
            if content_type != _CONTENT_HANDSHAKE:
                raise ClientHelloError(
                    "malformed", f"record type {content_type} arrived before the ClientHello ended"
                )
            if header[1] != 3:
                raise ClientHelloError("malformed", f"record version {header[1]}.{header[2]}")
            if length == 0 or length > _MAX_FRAGMENT:
                raise ClientHelloError("malformed", f"handshake record length {length}")
            if self._consumed + _RECORD_HEADER + length > self._limit:
                raise ClientHelloError(
                    "too_large", f"ClientHello exceeds the peek limit of {self._limit} bytes"
                )
            if len(self._pending) < _RECORD_HEADER + length:
                return NEED_MORE
            self._handshake += self._pending[_RECORD_HEADER : _RECORD_HEADER + length]
            del self._pending[: _RECORD_HEADER + length]
            self._consumed += _RECORD_HEADER + length
            self._records += 1
            hello = self._try_hello()
            if hello is not None:
                self._done = True
                return hello
        if self._consumed + len(self._pending) > self._limit:
            raise ClientHelloError(
                "too_large", f"ClientHello exceeds the peek limit of {self._limit} bytes"
            )
        return NEED_MORE

    def _try_hello(self) -> ClientHello | None:
        hs = self._handshake
        if len(hs) < 4:
            return None
        if hs[0] != _HANDSHAKE_CLIENT_HELLO:
            raise ClientHelloError("malformed", f"first handshake message has type {hs[0]}")
        body_length = (hs[1] << 16) | (hs[2] << 8) | hs[3]
        if 4 + body_length > self._limit:
            raise ClientHelloError(
                "too_large",
                f"ClientHello of {4 + body_length} bytes exceeds the peek limit of {self._limit}",
            )
        if len(hs) < 4 + body_length:
            return None
        if len(hs) > 4 + body_length:
            raise ClientHelloError("malformed", "handshake data follows the ClientHello")
        server_name, alpn, ech = _parse_body(bytes(hs[4:]))
        return ClientHello(
            server_name=server_name,
            alpn=alpn,
            size=4 + body_length,
            records=self._records,
            stream_bytes=self._consumed,
            ech=ech,
        )


def parse_client_hello(data: bytes, limit: int = DEFAULT_LIMIT) -> NeedMore | NotTLS | ClientHello:
    """Parse a complete buffer at once; a convenience over :class:`ClientHelloReader`."""
    return ClientHelloReader(limit).feed(data)


def _sniff(first: int) -> NotTLS | None:
    if first == _CONTENT_HANDSHAKE:
        return None
    if first & 0x80:
        return NotTLS("sslv2")
    return NotTLS("not a TLS handshake record")


def _truncated(what: str) -> ClientHelloError:
    return ClientHelloError("malformed", f"truncated {what}")


def _malformed(message: str) -> ClientHelloError:
    return ClientHelloError("malformed", message)


#: The fields of a hello without extensions: no SNI, no ALPN, no TLS 1.3, no ECH.
_NO_EXTENSIONS: Final[tuple[str | None, tuple[str, ...], bool]] = (None, (), False)


# The parsers below walk one buffer with plain offsets rather than a cursor object: a
# ClientHello is parsed once per connection, and method calls per field were most of
# its cost. Every length is checked against the end of its enclosing vector before use.


def _parse_body(body: bytes) -> tuple[str | None, tuple[str, ...], bool]:
    """(server name, ALPN, offers TLS 1.3, has ECH) from a ClientHello body."""
    end = len(body)
    if end < 2:
        raise _truncated("legacy_version")
    if body[0] != 3:
        raise _malformed(f"ClientHello version {body[0]}.{body[1]}")
    if end < 34:
        raise _truncated("random")
    session_end = _vector8(body, 34, end, "session id")
    if session_end - 35 > 32:
        raise _malformed("session id longer than 32 bytes")
    suites_end = _vector16(body, session_end, end, "cipher suites")
    suites = suites_end - session_end - 2
    if suites == 0 or suites % 2:
        raise _malformed("cipher suite list is empty or odd")
    compression_end = _vector8(body, suites_end, end, "compression methods")
    if compression_end == suites_end + 1:
        raise _malformed("compression method list is empty")
    if compression_end == end:
        # A hello without extensions (SSLv3 style) is well-formed but carries no SNI.
        return _NO_EXTENSIONS
    if _vector16(body, compression_end, end, "extensions") != end:
        raise _malformed("bytes after the extensions block")
    pos = compression_end + 2

    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    ech = False
    while pos < end:
        if end - pos < 2:
            raise _truncated("extension type")
        ext_type = (body[pos] << 8) | body[pos + 1]
        start, pos = pos + 4, _vector16(body, pos + 2, end, "extension body")
        if ext_type in seen:
            raise _malformed(f"extension {ext_type} appears twice")
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_server_name(body, start, pos)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(body, start, pos)
        elif ext_type == _EXT_ENCRYPTED_CLIENT_HELLO:
            ech = True
    return server_name, alpn, ech


def _vector8(body: bytes, pos: int, end: int, what: str) -> int:
    """The end of the 1-byte-length vector at ``pos``, which must fit before ``end``."""
    if pos >= end:
        raise _truncated(what)
    length = body[pos]
    if length > end - pos - 1:
        raise _truncated(what)
    return pos + 1 + length


def _vector16(body: bytes, pos: int, end: int, what: str) -> int:
    """The end of the 2-byte-length vector at ``pos``, which must fit before ``end``."""
    if end - pos < 2:
        raise _truncated(what)
    length = (body[pos] << 8) | body[pos + 1]
    if length > end - pos - 2:
        raise _truncated(what)
    return pos + 2 + length


def _parse_server_name(body: bytes, pos: int, end: int) -> str | None:
    if pos == end:
        # RFC 6066: a server's *reply* carries an empty extension; a client's never should.
        raise _malformed("empty server_name extension")
    names_end = _vector16(body, pos, end, "server name list")
    if names_end != end:
        raise _malformed("bytes after the server name list")
    pos += 2
    host: str | None = None
    seen_types: set[int] = set()
    while pos < names_end:
        name_type = body[pos]
        name_end = _vector16(body, pos + 1, names_end, "server name")
        name = body[pos + 3 : name_end]
        pos = name_end
        if name_type in seen_types:
            raise _malformed("server name list repeats a name type")
        seen_types.add(name_type)
        if name_type == 0:
            host = _decode_host_name(name)
    return host


def _decode_host_name(raw: bytes) -> str:
    if not raw:
        raise _malformed("empty host_name")
    if len(raw) > 255 or not _HOSTNAME_CHARS.issuperset(raw):
        raise _malformed("host_name is not a DNS host name")
    return raw.decode("ascii").lower()


def _parse_alpn(body: bytes, pos: int, end: int) -> tuple[str, ...]:
    list_end = _vector16(body, pos, end, "ALPN list")
    if list_end != end:
        raise _malformed("bytes after the ALPN list")
    pos += 2
    out: list[str] = []
    while pos < list_end:
        name_end = _vector8(body, pos, list_end, "ALPN protocol")
        if name_end == pos + 1:
            raise _malformed("empty ALPN protocol name")
        out.append(body[pos + 1 : name_end].decode("latin-1"))
        pos = name_end
    if not out:
        raise _malformed("empty ALPN list")
    return tuple(out)
