"""Public test helpers for acrrelay and for programs that embed it.

- :func:`client_hello_bytes` makes a *real* ClientHello with the local OpenSSL
  (through :mod:`ssl` memory BIOs), for any server name and ALPN list.
- :func:`reframe` re-splits one handshake message into several TLS records, as a
  client may legally do.
- :func:`records_of` splits a stream of records back into (type, fragment) pairs.

Nothing here opens a socket or needs a reactor.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence

__all__ = ["alert_description", "client_hello_bytes", "records_of", "reframe"]


def client_hello_bytes(
    server_name: str | None,
    *,
    alpn: Sequence[str] = (),
    tls13_only: bool = False,
) -> bytes:
    """The first flight of a real OpenSSL client for ``server_name``: one ClientHello.

    ``server_name=None`` makes a hello without SNI. A long ``alpn`` list makes a
    large hello (each name may be up to 255 bytes), which is the portable way to
    get a multi-kilobyte hello from stock OpenSSL.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls13_only:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records_of(stream: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of complete TLS records into (content type, fragment)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < 5:
            raise ValueError("trailing bytes shorter than a record header")
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        fragment = stream[pos + 5 : pos + 5 + length]
        if len(fragment) != length:
            raise ValueError("truncated record")
        out.append((stream[pos], fragment))
        pos += 5 + length
    return out


def reframe(stream: bytes, pieces: int, *, version: bytes = b"\x03\x01") -> bytes:
    """Re-frame the handshake bytes of ``stream`` into ``pieces`` TLS records.

    The handshake message is cut into near-equal fragments; the bytes are the
    same, only the record boundaries move.
    """
    handshake = b"".join(fragment for kind, fragment in records_of(stream) if kind == 22)
    if not 1 <= pieces <= len(handshake):
        raise ValueError("pieces must be between 1 and the handshake length")
    size, extra = divmod(len(handshake), pieces)
    out = bytearray()
    pos = 0
    for i in range(pieces):
        n = size + (1 if i < extra else 0)
        out += b"\x16" + version + n.to_bytes(2, "big") + handshake[pos : pos + n]
        pos += n
    return bytes(out)


def alert_description(record: bytes) -> int | None:
    """The description code of a TLS alert record, or None if it is not one."""
    if len(record) >= 7 and record[0] == 21 and record[3:5] == b"\x00\x02":
        return record[6]
    return None
