"""End to end: the bytes a peer sent just before its TCP reset still reach the other side.

Found with the real-registry world (``test_e2e_registry.py``): Go's TLS stacks often end
a connection with a close_notify alert immediately followed by a RST. Directly, the
other side reads those bytes, then the reset. Through the relay, the side that did not
reset gets the RST without them, although the relay had read them (they are counted in
the access log's ``bytes_up``/``bytes_down``): ``Pump.client_lost``/``backend_lost``
(acrrelay/splice.py) call ``abortConnection()`` on the other transport, which throws
away what is still in its write buffer.

Each test first runs the same exchange directly against the backend, so it shows what
the kernel gives a client without a relay; then it runs it through the relay's plain-HTTP
front door (byte-exact, like TLS passthrough, with no TLS to muddy the bytes).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.e2e_support import Relay

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

NAME = "reset.e2e.test"
TAIL = b"close_notify-sized tail!"  # 24 bytes, like a TLS 1.3 close_notify record
TRIES = 5
HTTP_LISTENER = {"endpoint": "tcp:0:interface=127.0.0.1", "name": "http", "protocols": ["http"]}


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _read_until_reset(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """Everything readable, then how it ended: "reset", "eof" or "timeout"."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    except TimeoutError:
        return bytes(data), "timeout"
    return bytes(data), "eof"


def _read_head(sock: socket.socket) -> bytes:
    head = bytearray()
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return bytes(head)


class ResetBackend:
    """A plain TCP server on 127.0.0.1. ``down``: after a request head it sends TAIL and
    resets at once. ``up``: it answers one byte, waits, then reads everything the client
    sent after its head until the client's reset (kept in ``received``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received: list[bytes] = []
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self._done = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._done.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.settimeout(5)
            head = _read_head(conn)
            if self.mode == "down":
                conn.sendall(TAIL)
                _reset(conn)
                return
            conn.sendall(b"!")  # the client's cue: this connection is spliced to us
            time.sleep(0.3)  # the client's tail and reset are both here by now
            data, _ = _read_until_reset(conn)
            self.received.append(head.partition(b"\r\n\r\n")[2] + data)
            conn.close()

    def close(self) -> None:
        self._done.set()
        self.server.close()


@pytest.fixture
def reset_backend() -> Iterator[Callable[[str], ResetBackend]]:
    started: list[ResetBackend] = []

    def start(mode: str) -> ResetBackend:
        backend = ResetBackend(mode)
        started.append(backend)
        return backend

    try:
        yield start
    finally:
        for backend in started:
            backend.close()


def _down_once(port: int) -> tuple[bytes, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        time.sleep(0.2)  # the backend's tail and reset are both here by now
        return _read_until_reset(sock)


def _up_once(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"POST / HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 24\r\n\r\n".encode())
    assert sock.recv(1) == b"!", "the backend did not answer"
    sock.sendall(TAIL)
    _reset(sock)


def test_bytes_a_backend_sent_before_its_reset_reach_the_client(
    reset_backend: Callable[[str], ResetBackend], start_relay: Callable[..., Relay]
) -> None:
    """A backend that sends its last bytes and resets at once: the client reads those
    bytes, then the reset, through the relay as it does directly."""
    backend = reset_backend("down")
    assert _down_once(backend.port) == (TAIL, "reset"), "directly, the tail arrives first"
    relay = start_relay(
        {NAME: f"tcp:host=127.0.0.1:port={backend.port}"}, listeners=[HTTP_LISTENER]
    )
    outcomes = [_down_once(relay.port) for _ in range(TRIES)]
    entries = relay.wait_access(lambda e: e.get("target", "").startswith(NAME), count=TRIES)
    assert all(e["bytes_down"] == len(TAIL) for e in entries), entries
    lost = [o for o in outcomes if o != (TAIL, "reset")]
    assert not lost, (
        f"{len(lost)} of {TRIES} clients got the reset without the {len(TAIL)} bytes the "
        f"relay had read (and logged as bytes_down): {lost}; entries: {entries}"
    )


def test_bytes_a_client_sent_before_its_reset_reach_the_backend(
    reset_backend: Callable[[str], ResetBackend], start_relay: Callable[..., Relay]
) -> None:
    """A client that sends its last bytes and resets at once: the backend reads those
    bytes, then the reset, through the relay as it does directly."""
    backend = reset_backend("up")
    _up_once(backend.port)
    deadline = time.monotonic() + 5
    while not backend.received and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.received == [TAIL], "directly, the tail arrives first"
    backend.received.clear()
    relay = start_relay(
        {NAME: f"tcp:host=127.0.0.1:port={backend.port}"}, listeners=[HTTP_LISTENER]
    )
    for _ in range(TRIES):
        _up_once(relay.port)
    entries = relay.wait_access(lambda e: e.get("target", "").startswith(NAME), count=TRIES)
    deadline = time.monotonic() + 5
    while len(backend.received) < TRIES and time.monotonic() < deadline:
        time.sleep(0.05)
    lost = [r for r in backend.received if r != TAIL]
    assert len(backend.received) == TRIES and not lost, (
        f"the backend got {backend.received} from {TRIES} clients that each sent "
        f"{TAIL!r} before their reset (the relay logged them in bytes_up); entries: {entries}"
    )
