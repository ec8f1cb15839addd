"""The least a Python server does to send one file over TLS, two ways, to price TLS itself.

``python -m bench.tlsserve twisted|stdlib PORT CERT KEY FILE``: any request on a connection
gets ``200`` and the whole FILE, then the connection closes.

- ``twisted``: pyOpenSSL through Twisted's ``TLSMemoryBIOProtocol`` (the gateway's TLS path),
  the file sent by ``FileSender`` (64 KiB reads as the transport asks for more).
- ``stdlib``: Python's ``ssl`` module on a blocking socket, one thread per connection, 256 KiB
  ``readinto`` + ``sendall`` (``socket.sendfile`` on an ``SSLSocket`` falls back to the same
  loop without kernel TLS, and kernel TLS is not in this kernel).

The gap between either one and nginx serving the same file is Python's share of the cost; the
gap between the two is Twisted's and pyOpenSSL's.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

CHUNK = 256 * 1024


def _head(size: int) -> bytes:
    return (
        f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    ).encode()


def serve_stdlib(port: int, cert: str, key: str, path: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    size = path.stat().st_size

    def one(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls, path.open("rb") as f:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = tls.recv(65536)
                    if not data:
                        return
                    request += data
                tls.sendall(_head(size))
                buffer = bytearray(CHUNK)
                view = memoryview(buffer)
                while n := f.readinto(buffer):
                    tls.sendall(view[:n])
        except OSError:
            pass

    with socket.create_server(("127.0.0.1", port), backlog=128) as listener:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()


def serve_twisted(port: int, cert: str, key: str, path: Path) -> None:
    from twisted.internet import reactor
    from twisted.internet import ssl as tssl
    from twisted.internet.protocol import Factory, Protocol
    from twisted.protocols.basic import FileSender

    size = path.stat().st_size

    class OneFile(Protocol):
        transport: Any
        _asked = b""

        def dataReceived(self, data: bytes) -> None:
            if self._asked is None:
                return
            self._asked += data
            if b"\r\n\r\n" not in self._asked:
                return
            self._asked = None  # type: ignore[assignment]
            self.transport.write(_head(size))
            f = path.open("rb")
            done = FileSender().beginFileTransfer(f, self.transport)
            done.addBoth(lambda _: (f.close(), self.transport.loseConnection()))

    options = tssl.DefaultOpenSSLContextFactory(key, cert)
    reactor.listenSSL(port, Factory.forProtocol(OneFile), options, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: list[str]) -> int:
    kind, port, cert, key, file = argv
    if kind == "twisted":
        serve_twisted(int(port), cert, key, Path(file))
    else:
        serve_stdlib(int(port), cert, key, Path(file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
