"""A threaded TLS test backend for the end-to-end tests: one port per name, one cert per name.

Run as its own process::

    python tests/tls_backend.py CERT_DIR NAME [NAME...]

For each NAME it loads ``CERT_DIR/NAME.pem`` and ``CERT_DIR/NAME.key``, listens on
127.0.0.1:0 and, once every socket listens, prints one line
``READY name=port name=port ...``. Each connection is served on its own thread:

- ``GET /name``: ``backend=<name>\\n``;
- ``GET /blob?size=N&seed=S``: ``N`` deterministic bytes (:func:`blob_block` repeated),
  with ``X-Sha256`` the hex digest of exactly that body;
- ``UPLOAD\\n``: read to EOF, reply ``<sha256 hex> <byte count>\\n``, close;
- ``ECHOALL\\n``: read to EOF, reply ``<sha256 hex> <byte count>\\n`` of what was read,
  then :data:`ECHO_RESPONSE_SIZE` deterministic bytes (:func:`echo_response`), close.

HTTP answers carry ``Connection: close``. After its answer the backend sends a TLS
close_notify for HTTP (so curl and openssl see a clean end) and, for the raw commands,
only a TCP FIN; then it reads until the peer closes, so no close ever becomes a reset.

A connection whose first byte is not a TLS handshake record (``0x16``) is served as
plain HTTP/1.1 on the same port, with keep-alive: ``GET /name`` answers
``backend=<name>\n``, ``GET /blob?size=N&seed=S`` the same body and ``X-Sha256`` as over
TLS, ``GET /reset?size=N&seed=S&after=M`` announces that blob but sends only its first
``M`` bytes, waits (bounded) until the peer's kernel acknowledged them, and resets
(``SO_LINGER`` 0: a backend dying mid-blob); anything else 404. So one backend endpoint
serves a route whatever the relay's front door (SNI, CONNECT, Host or absolute URI).

For the tests that check what reached a backend, each on one line: every accepted
connection prints ``ACCEPT <name> <peer>``, every request head read prints ``REQUEST
<name> <peer> <tls|plain> <method> <target> <host>`` (host ``-`` if none) and every
connection, once served and closed, prints ``CLOSED <name> <peer>`` (``peer`` is the
connecting side's ``ip:port``). One thread per port accepts and prints ``ACCEPT`` before
it accepts the next, so one port's ``ACCEPT`` lines are in the order the kernel queued the
connections: a test that connects to a port and sees its own ``ACCEPT`` knows every
earlier connection to that port has been reported (see ``BackendServer.sync``). A
connection's ``REQUEST`` lines all come before its ``CLOSED``.
The module is also imported by the tests for :func:`blob_block` and friends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import random
import socket
import ssl
import struct
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

BLOCK_SIZE = 1 << 20
ECHO_RESPONSE_SIZE = 8 << 20
ECHO_SEED = 8
IO_TIMEOUT = 120.0
#: How long /reset waits for its bytes to be acknowledged before it resets anyway.
RESET_DRAIN_SECONDS = 10.0

_blocks: dict[int, bytes] = {}
_print_lock = threading.Lock()
_digests: dict[tuple[int, int], str] = {}
_lock = threading.Lock()


def blob_block(seed: int) -> bytes:
    """The 1 MiB block that blobs of ``seed`` repeat."""
    with _lock:
        block = _blocks.get(seed)
        if block is None:
            block = _blocks[seed] = random.Random(seed).randbytes(BLOCK_SIZE)
        return block


def blob_chunks(size: int, seed: int) -> Iterator[memoryview]:
    """The body of ``/blob?size=size&seed=seed``, in chunks of at most 1 MiB.

    Chunk ``i`` is the seed's block with ``i`` in its first 8 bytes, so a lost,
    repeated or reordered chunk changes the digest. Each chunk is a view of one
    reused buffer: use it before taking the next.
    """
    buf = bytearray(blob_block(seed))
    view = memoryview(buf)
    full, rest = divmod(size, BLOCK_SIZE)
    for i in range(full + (1 if rest else 0)):
        buf[:8] = i.to_bytes(8, "big")
        yield view if i < full else view[:rest]


def blob_sha256(size: int, seed: int) -> str:
    """The hex sha256 of that body (cached: a 512 MiB body costs one pass, once)."""
    with _lock:
        known = _digests.get((size, seed))
    if known is None:
        h = hashlib.sha256()
        for chunk in blob_chunks(size, seed):
            h.update(chunk)
        known = h.hexdigest()
        with _lock:
            _digests[(size, seed)] = known
    return known


def echo_response() -> bytes:
    """The fixed response ECHOALL sends after the digest line."""
    return random.Random(ECHO_SEED).randbytes(ECHO_RESPONSE_SIZE)


def _say(line: str) -> None:
    """One whole line on stdout, whichever thread writes it."""
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _host_of(head: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"host":
            return value.strip().decode("latin-1") or "-"
    return "-"


def _read_line(conn: ssl.SSLSocket, limit: int = 16384) -> tuple[bytes, bytes]:
    """(first line without its newline, the bytes read after it)."""
    buf = bytearray()
    while b"\n" not in buf:
        data = conn.recv(4096)
        if not data or len(buf) > limit:
            raise ConnectionError("no complete first line")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    return line.rstrip(b"\r"), rest


def _read_to_eof(conn: ssl.SSLSocket, first: bytes) -> tuple[str, int]:
    h = hashlib.sha256(first)
    count = len(first)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = conn.recv_into(buf)
        if not n:
            return h.hexdigest(), count
        h.update(view[:n])
        count += n


def _finish(conn: socket.socket, *, close_notify: bool) -> None:
    """End our side, then wait (bounded) for the peer to end its side before closing."""
    raw: socket.socket = conn
    conn.settimeout(15)
    if close_notify and isinstance(conn, ssl.SSLSocket):
        with contextlib.suppress(OSError, ValueError):
            raw = conn.unwrap()
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)
        raw.settimeout(30)
        while raw.recv(65536):
            pass
    raw.close()


def _http(conn: ssl.SSLSocket, name: str, peer: str, line: bytes, rest: bytes) -> None:
    head = bytearray(rest)
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        data = conn.recv(4096)
        if not data or len(head) > 65536:
            return
        head += data
    target = line.split()[1].decode("ascii")
    method = line.split()[0].decode("latin-1")
    host = _host_of(line + b"\r\n" + bytes(head))
    _say(f"REQUEST {name} {peer} tls {method} {target} {host}")
    url = urlsplit(target)
    if url.path == "/name":
        body = f"backend={name}\n".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    elif url.path == "/blob":
        query = parse_qs(url.query)
        size = int(query["size"][0])
        seed = int(query.get("seed", ["0"])[0])
        digest = blob_sha256(size, seed)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {size}\r\nX-Sha256: {digest}\r\nConnection: close\r\n\r\n".encode()
        )
        for chunk in blob_chunks(size, seed):
            conn.sendall(chunk)
    else:
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    _finish(conn, close_notify=True)


def _plain(sock: socket.socket, name: str, peer: str) -> None:
    """Plain HTTP/1.1 with keep-alive (Content-Length bodies only), until the peer closes."""
    buf = bytearray()
    while True:
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data or len(buf) > 65536:
                return
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, version = [*request_line.split(" "), "", "", ""][:3]
        host = _host_of(head)
        _say(f"REQUEST {name} {peer} plain {method} {target} {host}")
        headers = [line.lower() for line in head.split(b"\r\n")[1:]]
        length = 0
        for line in headers:
            key, _, value = line.partition(b":")
            if key.strip() == b"content-length":
                length = int(value.strip())
        body = bytearray(rest)
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                return
            body += data
        buf = body[length:]
        close = version != "HTTP/1.1" or any(
            line.replace(b" ", b"") == b"connection:close" for line in headers
        )
        url = urlsplit(target)
        if url.path in ("/blob", "/reset"):
            if not _plain_blob(sock, url.path, parse_qs(url.query), close):
                return
            if close:
                _finish(sock, close_notify=False)
                return
            continue
        if url.path == "/name":
            status, payload = "200 OK", f"backend={name}\n".encode()
        else:
            status, payload = "404 Not Found", b""
        sock.sendall(
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(payload)}\r\n".encode()
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n"
            + payload
        )
        if close:
            _finish(sock, close_notify=False)
            return


def _plain_blob(sock: socket.socket, path: str, query: dict[str, list[str]], close: bool) -> bool:
    """Answer /blob or /reset on a plain connection; False once the connection is reset."""
    size = int(query["size"][0])
    seed = int(query.get("seed", ["0"])[0])
    after = int(query.get("after", [str(size)])[0]) if path == "/reset" else size
    sock.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {size}\r\nX-Sha256: {blob_sha256(size, seed)}\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
    )
    left = after
    for chunk in blob_chunks(size, seed):
        if left <= 0:
            break
        piece = chunk[:left]
        sock.sendall(piece)
        left -= len(piece)
    if path == "/blob":
        return True
    _wait_acknowledged(sock, RESET_DRAIN_SECONDS)
    reset(sock)
    return False


def _wait_acknowledged(sock: socket.socket, timeout: float) -> None:
    """Wait until the peer's kernel acknowledged everything sent (TIOCOUTQ is 0)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        if struct.unpack("i", queued)[0] == 0:
            return
        time.sleep(0.002)


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _serve(raw: socket.socket, context: ssl.SSLContext, name: str, peer: str) -> None:
    conn: socket.socket = raw
    try:
        raw.settimeout(IO_TIMEOUT)
        first = raw.recv(1, socket.MSG_PEEK)
        if not first:
            return
        if first[0] != 0x16:
            _plain(raw, name, peer)
            return
        conn = tls = context.wrap_socket(
            raw, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=True
        )
        tls.do_handshake()
        line, rest = _read_line(tls)
        if line.startswith(b"GET "):
            _http(tls, name, peer, line, rest)
        elif line == b"UPLOAD":
            digest, count = _read_to_eof(tls, rest)
            tls.sendall(f"{digest} {count}\n".encode())
            _finish(tls, close_notify=False)
        elif line == b"ECHOALL":
            digest, count = _read_to_eof(tls, rest)
            tls.sendall(f"{digest} {count}\n".encode())
            tls.sendall(echo_response())
            _finish(tls, close_notify=False)
        else:
            tls.sendall(b"ERROR unknown command\n")
            _finish(tls, close_notify=False)
    except (OSError, ValueError):
        pass  # peers that vanish mid-test (the slow reader is cut on purpose) are normal
    finally:
        conn.close()
        _say(f"CLOSED {name} {peer}")


def _accept_loop(listener: socket.socket, context: ssl.SSLContext, name: str) -> None:
    while True:
        raw, (host, port) = listener.accept()
        peer = f"{host}:{port}"
        _say(f"ACCEPT {name} {peer}")
        threading.Thread(target=_serve, args=(raw, context, name, peer), daemon=True).start()


def main(argv: list[str]) -> int:
    cert_dir = Path(argv[1])
    names = argv[2:]
    ready = []
    threads = []
    echo_response()  # warm the caches before READY so timings measure the relay
    for name in names:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_dir / f"{name}.pem", cert_dir / f"{name}.key")
        # Raw-command clients end their upload with a bare TCP FIN. OpenSSL 3 treats that
        # as a fatal error (it sends decode_error and the session is dead) unless told
        # to take it as the end of the peer's stream; suppress_ragged_eofs is not enough.
        context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        ready.append(f"{name}={listener.getsockname()[1]}")
        threads.append(
            threading.Thread(target=_accept_loop, args=(listener, context, name), daemon=True)
        )
    for thread in threads:
        thread.start()
    print("READY " + " ".join(ready), flush=True)
    # Until our parent closes our stdin (or stops us), serve.
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
