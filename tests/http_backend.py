"""In-process test backends for the front-door end-to-end tests, on 127.0.0.1 port 0.

- :class:`HoldingBackend`: plain HTTP, one request per connection, answered after a
  hold; it counts connections and the most it ever had open at once.
- :class:`ProxyCheckingBackend`: expects a PROXY header (read with
  :class:`~acrrelay.proxyproto.ProxyHeaderReader`), then serves TLS or plain HTTP
  and answers with what the header said and a digest of the request head it read.

Each serves on daemon threads; ``close()`` stops accepting. Nothing here leaves loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import attrs

from acrrelay.proxyproto import NEED_MORE, ProxyHeader, ProxyHeaderReader, ProxyProtocolError

IO_TIMEOUT = 20.0


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def read_head(sock: socket.socket | ssl.SSLSocket, limit: int = 65536) -> bytes:
    """Bytes up to and including the blank line that ends a request head."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        data = sock.recv(1)  # one at a time: nothing after the head is consumed
        if not data or len(head) > limit:
            raise ConnectionError(f"no complete request head: {bytes(head[:80])!r}")
        head += data
    return bytes(head)


def _answer(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def _linger_close(sock: socket.socket | ssl.SSLSocket) -> None:
    """FIN our side, drain the peer's, then close, so no close turns into a reset."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(65536):
            pass
    sock.close()


class _Server:
    def __init__(self) -> None:
        self._sock = _listener()
        self.port: int = self._sock.getsockname()[1]
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        """The relay's client endpoint string for this backend."""
        return f"tcp:host=127.0.0.1:port={self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IO_TIMEOUT)
            self.serve(conn)
        except (OSError, ValueError, ProxyProtocolError):
            pass  # a peer cut off on purpose is normal here
        finally:
            conn.close()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class HoldingBackend(_Server):
    """Plain HTTP: read one request head, wait ``hold`` seconds, answer ``ok N``, close.

    ``accepted`` counts connections; ``max_active`` is the most that were being served at
    once, each from its accept to its answer (not through the lingering close after it,
    which overlaps the relay's next connection).
    """

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self._lock = threading.Lock()
        self.accepted = 0
        self.active = 0
        self.max_active = 0
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.accepted += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            number = self.accepted
        try:
            read_head(conn)
            time.sleep(self.hold)
            conn.sendall(_answer(f"ok {number}\n".encode()))
        finally:
            with self._lock:
                self.active -= 1
        _linger_close(conn)


@attrs.define
class Seen:
    """What the PROXY-checking backend saw on one connection."""

    header: ProxyHeader | None
    tls: bool
    head: bytes
    error: str | None = None


class ProxyCheckingBackend(_Server):
    """Reads a PROXY header first, byte by byte, so that not one byte after it is consumed.

    With ``cert`` (a ``(chain, key)`` pair) a stream that then starts with a TLS record
    is served over TLS with that certificate, else as plain HTTP. The answer body is::

        proxy=v2 proxy source=127.0.0.55:40000 destination=127.0.0.1:8443
        tls=yes head-sha256=<hex digest of the request head as read>

    and every connection is recorded in ``seen``. A stream without a valid header is
    closed without an answer (and recorded with ``error``).
    """

    def __init__(self, cert: tuple[Path, Path] | None = None) -> None:
        self.seen: list[Seen] = []
        self._context: ssl.SSLContext | None = None
        if cert is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.load_cert_chain(*cert)
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        reader = ProxyHeaderReader()
        header: ProxyHeader | None = None
        try:
            while header is None:
                data = conn.recv(1)
                if not data:
                    raise ConnectionError("EOF inside the PROXY header")
                outcome: Any = reader.feed(data)
                if outcome is not NEED_MORE:
                    header, rest = outcome
                    assert rest == b"", rest  # one byte at a time: nothing beyond
        except (ProxyProtocolError, ConnectionError) as e:
            self.seen.append(Seen(None, False, b"", error=str(e)))
            return
        first = conn.recv(1, socket.MSG_PEEK)
        stream: socket.socket | ssl.SSLSocket = conn
        tls = bool(first) and first[0] == 0x16 and self._context is not None
        if tls:
            assert self._context is not None
            stream = self._context.wrap_socket(conn, server_side=True)
        head = read_head(stream)
        self.seen.append(Seen(header, tls, head))
        body = (
            f"proxy=v{header.version} {header.command} source={_show(header.source)} "
            f"destination={_show(header.destination)}\n"
            f"tls={'yes' if tls else 'no'} head-sha256={hashlib.sha256(head).hexdigest()}\n"
        )
        stream.sendall(_answer(body.encode()))
        if isinstance(stream, ssl.SSLSocket):
            with contextlib.suppress(OSError, ValueError):
                stream = stream.unwrap()
        _linger_close(stream)


def _show(address: tuple[str, int] | None) -> str:
    return "-" if address is None else f"{address[0]}:{address[1]}"


__all__ = ["HoldingBackend", "ProxyCheckingBackend", "Seen", "read_head"]
