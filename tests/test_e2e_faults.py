"""End to end, reliability: faults injected over real sockets, a flood, concurrency, a soak.

Every connection that runs into trouble must end (and be logged with its reason), and
the relay must go on: after each fault, a fresh request still goes through, and the
relay's open file descriptors return to the count they had before.

The misbehaving backends here are TLS servers on threads of the test process
(:class:`FaultBackend`), so a test knows to the millisecond when a backend reset, and
sees when the relay closed a backend connection. The well-behaved backend is
``tls_backend.py``, as in the other end-to-end tests.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import http.client
import os
import re
import resource
import selectors
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from acrrelay.testing import alert_description, client_hello_bytes, records_of
from tests.e2e_support import (
    BUCKET,
    DEFAULT_LISTENER,
    REGISTRY,
    BackendServer,
    BioTLS,
    MiB,
    Relay,
    TestCA,
    fd_count,
    http_get,
    netns_socket,
    rss_bytes,
    silent_listener,
    split_http,
)
from tests.registry_world import ClientNamespace
from tests.tls_backend import blob_chunks, reset

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
#: The misbehaving backends serve the OSS name: OSS is where the big blobs come from.
FAULTY = BUCKET
#: Timeouts of the socket operations in these tests: long enough for a loaded machine.
IO_TIMEOUT = 15.0
ALERT_INTERNAL_ERROR = 80


# ---------------------------------------------------------------- misbehaving backends


@dataclass
class Served:
    """What one connection to a :class:`FaultBackend` came to."""

    #: monotonic time the backend reset (``reset``) or saw its connection end.
    ended_at: float = 0.0
    #: "reset sent", or how the relay ended the connection: "eof" or "reset" (seen by a
    #: read or a write), "broken pipe", or "timeout".
    how: str = ""
    #: Body bytes sent (queued to the kernel; for reset and stall, acknowledged too).
    body_sent: int = 0


def _head(size: int) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        + f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    )


def _blob_prefix(size: int, seed: int) -> bytes:
    """The first ``size`` bytes of the blob of ``seed`` (any blob of ``seed`` starts so)."""
    out = bytearray()
    for chunk in blob_chunks(size, seed):
        out += chunk
    return bytes(out)


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that its peer's kernel has not acknowledged yet."""
    queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", queued)[0])


class _ServerBio:
    """The server side of TLS over memory BIOs and a blocking socket."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def _flush(self) -> None:
        if data := self.outgoing.read():
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise EOFError
        self.incoming.write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            else:
                self._flush()
                return

    def recv(self) -> bytes:
        while True:
            try:
                return self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                self._fill()

    def send(self, data: bytes | memoryview) -> None:
        self.tls.write(data)
        self._flush()


class FaultBackend:
    """A TLS server for ``name`` on 127.0.0.1 that answers any request with a blob
    announced as ``declared`` bytes, and then, by ``mode``:

    - ``reset``: sends the first ``part`` bytes, waits until the relay's kernel
      acknowledged them all, and resets (SO_LINGER 0);
    - ``stall``: sends the first ``part`` bytes and goes silent, reading until the
      relay ends the connection;
    - ``stream``: sends until the relay ends the connection.

    Each connection's story is appended to ``served`` when it ends.
    """

    def __init__(
        self, ca: TestCA, name: str, mode: str, *, part: int = 0, declared: int = 1 << 40
    ) -> None:
        assert mode in ("reset", "stall", "stream"), mode
        self.mode = mode
        self.part = part
        self.declared = declared
        self.seed = 71
        self.served: list[Served] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(ca.directory / f"{name}.pem", ca.directory / f"{name}.key")
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.endpoint = f"tcp:host=127.0.0.1:port={self.port}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        # TLS over memory BIOs, so every socket error is the kernel's own: Python's
        # SSLSocket reports a reset as an EOF.
        story = Served()
        tls = _ServerBio(raw, self.context)
        try:
            raw.settimeout(30)
            tls.handshake()
            head = bytearray()
            while b"\r\n\r\n" not in head:
                head += tls.recv()
            tls.send(_head(self.declared))
            budget = self.part if self.mode != "stream" else self.declared
            for chunk in blob_chunks(self.declared, self.seed):
                if story.body_sent >= budget:
                    break
                piece = chunk[: budget - story.body_sent]
                for i in range(0, len(piece), 1 << 16):
                    tls.send(piece[i : i + (1 << 16)])
                story.body_sent += len(piece)
            deadline = time.monotonic() + 10
            while _unacknowledged(raw) and time.monotonic() < deadline:
                time.sleep(0.002)
            if self.mode == "reset":
                story.ended_at = time.monotonic()
                story.how = "reset sent"
                reset(raw)
                return
            while raw.recv(65536):
                pass
            story.how = "eof"
        except EOFError:
            story.how = "eof"
        except ConnectionResetError:
            story.how = "reset"
        except BrokenPipeError:
            story.how = "broken pipe"
        except TimeoutError:
            story.how = "timeout"
        except (ssl.SSLError, OSError) as e:
            story.how = repr(e)
        finally:
            if not story.ended_at:
                story.ended_at = time.monotonic()
            raw.close()
            self.served.append(story)

    def wait_served(self, count: int = 1, timeout: float = IO_TIMEOUT) -> list[Served]:
        """The stories of the first ``count`` connections, once they ended."""
        deadline = time.monotonic() + timeout
        while len(self.served) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.served) >= count, (
            f"{count - len(self.served)} backend connection(s) still open after {timeout}s"
        )
        return self.served[:count]

    def close(self) -> None:
        self.server.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def fault_backend(test_ca: TestCA) -> Iterator[Callable[..., FaultBackend]]:
    """A factory: ``fault_backend(mode, part=..., declared=...)`` for the name FAULTY."""
    started: list[FaultBackend] = []

    def start(mode: str, **options: int) -> FaultBackend:
        server = FaultBackend(test_ca, FAULTY, mode, **options)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()


# ---------------------------------------------------------------- clients


@dataclass
class Received:
    """What a client read through the relay, and how its connection ended."""

    plain: bytearray = field(default_factory=bytearray)
    #: Every byte the relay sent to this client (TLS records included).
    raw: int = 0
    #: "reset", "eof", "timeout", or "stopped" (the client stopped reading on purpose).
    how: str = ""
    ended_at: float = 0.0
    last_data_at: float = 0.0


def _tls_get(sock: socket.socket, ca: TestCA, target: str) -> BioTLS:
    """A TLS handshake with FAULTY over ``sock`` (connected to the relay), and a GET."""
    sock.settimeout(IO_TIMEOUT)
    client = BioTLS(sock, ca.client_context(), FAULTY)
    sock.sendall(client.first_flight())
    client.handshake()
    http_get(client, FAULTY, target)
    return client


def _read(
    client: BioTLS, *, stop_after: int | None = None, timeout: float = IO_TIMEOUT
) -> Received:
    """Read until the relay ends the connection (or ``stop_after`` plaintext bytes)."""
    got = Received(raw=client.raw_in)
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
            while chunk := client.tls.read(1 << 20):
                got.plain += chunk
        if stop_after is not None and len(got.plain) >= stop_after:
            got.how = "stopped"
            break
        client.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = client.sock.recv(1 << 18)
        except ConnectionResetError:
            got.how = "reset"
            break
        except TimeoutError:
            got.how = "timeout"
            break
        if not data:
            got.how = "eof"
            break
        got.raw += len(data)
        got.last_data_at = time.monotonic()
        client.incoming.write(data)
    got.ended_at = time.monotonic()
    return got


def _last_id(relay: Relay) -> int:
    """The highest connection id in the access log so far."""
    return max((e.get("id", 0) for e in relay.access_entries()), default=0)


def _entry_for(relay: Relay, local: tuple[str, int], after: int) -> dict[str, Any]:
    """The access entry of the connection from ``local`` whose id is above ``after`` (an
    earlier connection may have had the same client port)."""
    client = "{}:{}".format(*local)
    return relay.wait_access(lambda e: e.get("client") == client and e.get("id", 0) > after)[0]


def _fresh_request(relay: Relay, ca: TestCA) -> None:
    """A new TLS request through the relay to the well-behaved backend gets its answer."""
    after = _last_id(relay)
    with (
        relay.connect(timeout=IO_TIMEOUT) as raw,
        ca.client_context().wrap_socket(raw, server_hostname=REGISTRY) as tls,
    ):
        local = tls.getsockname()
        http_get(tls, REGISTRY, "/name")
        response = bytearray()
        while data := tls.recv(65536):
            response += data
    status, _, body = split_http(bytes(response))
    assert (status, body) == (200, f"backend={REGISTRY}\n".encode()), response
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "done", str(entry)


def _baseline_fds(relay: Relay, ca: TestCA) -> int:
    """The relay's open descriptors at rest, after one request has gone through."""
    _fresh_request(relay, ca)
    count = fd_count(relay.pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = fd_count(relay.pid)
        if again == count:
            return count
        count = again
    raise AssertionError(f"the relay's descriptor count did not settle: {count}")


def _leaked_fds(relay: Relay, baseline: int, timeout: float = 10.0) -> int:
    """Descriptors still open beyond ``baseline`` once they had ``timeout`` s to close."""
    deadline = time.monotonic() + timeout
    while (count := fd_count(relay.pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return max(0, count - baseline)


@dataclass
class Survival:
    """How the relay came out of a fault: the descriptors it left open beyond baseline."""

    leaked: int
    listing: list[str]

    def check(self) -> None:
        assert self.leaked == 0, f"{self.leaked} descriptors left open: {self.listing}"


def _survived(relay: Relay, ca: TestCA, baseline: int) -> Survival:
    """The relay goes on: it is alive and serves a fresh request; and what fds it left."""
    assert relay.alive(), f"the relay died:\n{relay.output.text()}"
    leaked = _leaked_fds(relay, baseline)
    _fresh_request(relay, ca)
    leaked = max(leaked, _leaked_fds(relay, baseline))
    listing = sorted(str(p.readlink()) for p in Path(f"/proc/{relay.pid}/fd").iterdir())
    return Survival(leaked, listing)


def _routes(backend: BackendServer, faulty: str) -> dict[str, str]:
    return {FAULTY: faulty, REGISTRY: backend.backend(REGISTRY)}


# ---------------------------------------------------------------- 1. backend reset


def test_backend_reset_mid_blob_resets_the_client_within_a_second(
    test_ca: TestCA,
    backend: BackendServer,
    fault_backend: Callable[..., FaultBackend],
    start_relay: Callable[..., Relay],
) -> None:
    """A backend that resets 4 MiB into a 64 MiB blob: the client gets those bytes and then
    a reset within a second, logged backend_reset with those bytes, and no fd is left."""
    part = 4 * MiB
    server = fault_backend("reset", part=part, declared=64 * MiB)
    relay = start_relay(_routes(backend, server.endpoint), idle_timeout="60s")
    baseline = _baseline_fds(relay, test_ca)
    after = _last_id(relay)

    with relay.connect(timeout=IO_TIMEOUT) as sock:
        local = sock.getsockname()
        got = _read(_tls_get(sock, test_ca, "/blob"))
    (story,) = server.wait_served()
    delay = got.ended_at - story.ended_at
    health = _survived(relay, test_ca, baseline)
    print(
        f"\nfaults: backend reset mid-blob: client {got.how} {delay * 1000:.0f} ms after the "
        f"backend's, {part / MiB:.0f} MiB of 64 delivered, {health.leaked} fds leaked"
    )
    assert got.how == "reset", f"the client's connection ended by {got.how}, not a reset"
    assert delay < 1.0, f"the client was closed {delay:.2f}s after the backend reset"
    assert bytes(got.plain) == _head(64 * MiB) + _blob_prefix(part, server.seed), (
        f"the client got {len(got.plain)} bytes, not the head and the {part} sent"
    )
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "backend_reset", str(entry)
    assert entry["closed_first"] == "backend", str(entry)
    assert entry["bytes_down"] == got.raw, (
        f"the relay logged bytes_down={entry['bytes_down']}, the client got {got.raw}"
    )
    health.check()


def _reset_through(port: int, after: int, seed: int) -> tuple[str, bytes]:
    """GET /reset from tls_backend over plain HTTP: (how the client's connection ended, the
    body bytes before that)."""
    target = f"/reset?size={8 * MiB}&after={after}&seed={seed}"
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {FAULTY}\r\n\r\n".encode())
        received = bytearray()
        try:
            while data := sock.recv(65536):
                received += data
            how = "eof"
        except ConnectionResetError:
            how = "reset"
        except TimeoutError:
            how = "timeout"
    return how, bytes(received).partition(b"\r\n\r\n")[2]


def test_every_backend_reset_under_load_reaches_its_client_as_a_reset(
    test_ca: TestCA, backend: BackendServer, start_relay: Callable[..., Relay]
) -> None:
    """2400 backends that reset after their first 1000 bytes, 8 at a time: every client
    gets those bytes and then a reset, never a clean close, logged backend_reset."""
    clients, each, after = 8, 300, 1000
    relay = start_relay(
        {FAULTY: backend.backend(FAULTY), REGISTRY: backend.backend(REGISTRY)},
        listeners=[{**DEFAULT_LISTENER, "protocols": ["tls", "http"]}],
    )
    baseline = _baseline_fds(relay, test_ca)
    after_id = _last_id(relay)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(each):
            seed = (n * each + i) % 8
            try:
                how, body = _reset_through(relay.port, after, seed)
            except OSError as e:
                how, body = repr(e), b""
            if how == "reset" and body != _blob_prefix(after, seed):
                how = f"reset after {len(body)} bytes, not the {after} sent"
            with lock:
                outcomes[how] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    elapsed = time.monotonic() - started
    total = clients * each
    entries = relay.wait_access(
        lambda e: e.get("id", 0) > after_id and e.get("target", "").startswith(FAULTY),
        count=total,
        timeout=30,
    )
    reasons = Counter(e["close_reason"] for e in entries)
    health = _survived(relay, test_ca, baseline)
    print(
        f"\nfaults: {total} backend resets under load ({clients} at a time, {elapsed:.1f} s): "
        f"{outcomes['reset']} reached the client as resets, {outcomes['eof']} as clean "
        f"closes; logged {dict(reasons)}; {health.leaked} fds leaked"
    )
    assert not any(thread.is_alive() for thread in threads), "clients still running"
    assert outcomes == {"reset": total}, (
        f"of {total} backend resets, the clients saw {dict(outcomes)}: a reset passed on as "
        f"a clean close makes a cut transfer look complete; the relay logged {dict(reasons)}"
    )
    assert reasons == {"backend_reset": total}, dict(reasons)
    health.check()


# ---------------------------------------------------------------- 2. backend stalls


def test_backend_silent_mid_blob_is_cut_on_both_sides_at_the_idle_timeout(
    test_ca: TestCA,
    backend: BackendServer,
    fault_backend: Callable[..., FaultBackend],
    start_relay: Callable[..., Relay],
) -> None:
    """A backend that sends half a blob and goes silent: the 2 s idle timeout closes the
    client's and the backend's connections, logged idle_timeout."""
    part = 8 * MiB
    server = fault_backend("stall", part=part, declared=2 * part)
    relay = start_relay(_routes(backend, server.endpoint), idle_timeout="2s")
    baseline = _baseline_fds(relay, test_ca)
    after = _last_id(relay)

    with relay.connect(timeout=IO_TIMEOUT) as sock:
        local = sock.getsockname()
        got = _read(_tls_get(sock, test_ca, "/blob"))
    (story,) = server.wait_served()
    idle = got.ended_at - got.last_data_at
    health = _survived(relay, test_ca, baseline)
    print(
        f"\nfaults: backend silent mid-blob: client {got.how} after {idle:.1f} s idle, backend "
        f"{story.how}, idle_timeout 2s, {part / MiB:.0f} MiB delivered, {health.leaked} fds "
        "leaked"
    )
    assert got.how in ("reset", "eof"), f"the client's connection was not closed: {got.how}"
    assert story.how in ("reset", "eof"), f"the backend's connection was not closed: {story.how}"
    # (The client's silence starts when it read the last byte, a little after the relay's.)
    assert idle >= 1.5, f"cut after {idle:.2f}s of silence; idle_timeout is 2s"
    # The idle timer fires between the timeout and 1.25 times it; a second for a loaded box.
    assert idle <= 2 * 1.25 + 1, f"cut only after {idle:.2f}s of silence; idle_timeout is 2s"
    assert bytes(got.plain) == _head(2 * part) + _blob_prefix(part, server.seed)
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "idle_timeout", str(entry)
    assert entry["closed_first"] == "relay", str(entry)
    assert entry["bytes_down"] == got.raw, str(entry)
    health.check()


# ---------------------------------------------------------------- 3. client vanishes


def test_client_reset_mid_blob_closes_the_backend(
    test_ca: TestCA,
    backend: BackendServer,
    fault_backend: Callable[..., FaultBackend],
    start_relay: Callable[..., Relay],
) -> None:
    """A client that resets (SO_LINGER 0) 4 MiB into an endless blob: the relay closes the
    backend's connection at once, logged client_reset."""
    server = fault_backend("stream")
    relay = start_relay(_routes(backend, server.endpoint), idle_timeout="60s")
    baseline = _baseline_fds(relay, test_ca)
    after = _last_id(relay)

    sock = relay.connect(timeout=IO_TIMEOUT)
    local = sock.getsockname()
    got = _read(_tls_get(sock, test_ca, "/blob"), stop_after=4 * MiB)
    reset_at = time.monotonic()
    reset(sock)
    (story,) = server.wait_served()
    delay = story.ended_at - reset_at
    health = _survived(relay, test_ca, baseline)
    print(
        f"\nfaults: client reset mid-blob: backend connection {story.how} "
        f"{delay * 1000:.0f} ms later, {health.leaked} fds leaked"
    )
    assert got.how == "stopped", f"the relay ended the download first: {got.how}"
    # Expected: "reset". Once, on the copying path under load, the backend's write met
    # EPIPE ("broken pipe") 1 ms after the client's reset instead; Linux gives EPIPE for a
    # RST in CLOSE_WAIT, so a FIN may have gone first there. Open question (see the stop
    # notes): accepted here, with the relay's own record still required to be a reset.
    assert story.how in ("reset", "broken pipe"), f"the backend's connection ended by {story.how}"
    assert delay < 1.0, f"the backend's connection was closed {delay:.2f}s after the client's"
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "client_reset", str(entry)
    assert entry["closed_first"] == "client", str(entry)
    health.check()


def test_client_silently_gone_mid_blob_closes_the_backend_at_the_idle_timeout(
    test_ca: TestCA,
    backend: BackendServer,
    fault_backend: Callable[..., FaultBackend],
    start_relay: Callable[..., Relay],
    tmp_path: Path,
) -> None:
    """A client in a network namespace whose link goes down 4 MiB into an endless blob
    (no FIN, no RST, nothing): the 2 s idle timeout closes the backend's connection."""
    server = fault_backend("stream")
    netns = ClientNamespace(tmp_path / "netns")
    try:
        listeners = [
            {"endpoint": "tcp:0:interface=127.0.0.1", "name": "e2e"},
            {"endpoint": f"tcp:0:interface={netns.host_address}", "name": "netns"},
        ]
        relay = start_relay(
            _routes(backend, server.endpoint), listeners=listeners, idle_timeout="2s"
        )
        baseline = _baseline_fds(relay, test_ca)
        after = _last_id(relay)

        with netns_socket(netns.name) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect((netns.host_address, relay.ports["netns"]))
            local = sock.getsockname()
            assert local[0] == netns.client_address, local
            got = _read(_tls_get(sock, test_ca, "/blob"), stop_after=4 * MiB)
            down = subprocess.run(
                ["ip", "-n", netns.name, "link", "set", netns.client_link, "down"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            gone_at = time.monotonic()
            assert down.returncode == 0, down.stderr
            (story,) = server.wait_served(timeout=30)
        delay = story.ended_at - gone_at
        health = _survived(relay, test_ca, baseline)
    finally:
        netns.close()
    print(
        f"\nfaults: client silently gone mid-blob: backend connection {story.how} "
        f"{delay:.1f} s later (idle_timeout 2s), {health.leaked} fds leaked"
    )
    assert got.how == "stopped", f"the relay ended the download first: {got.how}"
    assert story.how == "reset", f"the backend's connection ended by {story.how}"
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "idle_timeout", str(entry)
    assert entry["closed_first"] == "relay", str(entry)
    health.check()


# ---------------------------------------------------------------- 4. black hole


def _hello_exchange(relay: Relay, name: str) -> tuple[float, bytes, tuple[str, int]]:
    """Send a real ClientHello for ``name``; (seconds until EOF, what came, local address)."""
    with relay.connect(timeout=IO_TIMEOUT) as sock:
        local = sock.getsockname()
        started = time.monotonic()
        sock.sendall(client_hello_bytes(name))
        received = bytearray()
        try:
            while data := sock.recv(4096):
                received += data
        except TimeoutError:
            raise AssertionError(
                f"the relay neither answered nor closed within {IO_TIMEOUT}s: {bytes(received)!r}"
            ) from None
        return time.monotonic() - started, bytes(received), local


def test_black_holed_backend_runs_into_the_connect_timeout(
    test_ca: TestCA, backend: BackendServer, start_relay: Callable[..., Relay]
) -> None:
    """A backend whose SYNs are dropped: the client is answered internal_error after the
    1 s connect timeout, logged connect_timeout, and no fd is left."""
    with silent_listener() as port:
        relay = start_relay(
            _routes(backend, f"tcp:host=127.0.0.1:port={port}"), connect_timeout="1s"
        )
        baseline = _baseline_fds(relay, test_ca)
        after = _last_id(relay)
        elapsed, received, local = _hello_exchange(relay, FAULTY)
        health = _survived(relay, test_ca, baseline)
    print(
        f"\nfaults: black-holed backend: client answered after {elapsed:.1f} s "
        f"(connect_timeout 1s), {health.leaked} fds leaked"
    )
    assert len(records_of(received)) == 1, received
    assert alert_description(received) == ALERT_INTERNAL_ERROR, received
    assert elapsed >= 0.9, f"answered after {elapsed:.2f}s, before the connect timeout"
    assert elapsed < 2.0, f"answered only after {elapsed:.2f}s; connect_timeout is 1s"
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "connect_timeout", str(entry)
    assert "backend_address" not in entry, str(entry)
    health.check()


# ---------------------------------------------------------------- 5. resolve fails


#: A name under the reserved .invalid TLD (RFC 6761): no DNS anywhere may answer it.
UNRESOLVABLE = "no-such-registry.acrrelay.invalid"


def _without_dns(directory: Path) -> list[str]:
    """A command prefix that runs a program with host names from /etc/hosts alone.

    In a private mount namespace, ``/etc/nsswitch.conf`` says ``hosts: files`` and
    ``/etc/resolv.conf`` names only 127.0.0.1: the program's resolver sends no query
    off the machine, whatever it is asked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    nsswitch = directory / "nsswitch.conf"
    nsswitch.write_text(
        "passwd: files\ngroup: files\nshadow: files\nhosts: files\nnetworks: files\n"
        "protocols: files\nservices: files\n"
    )
    resolv = directory / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    script = (
        'mount --bind "$0" /etc/nsswitch.conf && mount --bind "$1" /etc/resolv.conf '
        '&& shift && exec "$@"'
    )
    return [
        "unshare", "--mount", "--propagation", "private", "--",
        "sh", "-c", script, str(nsswitch), str(resolv),
    ]  # fmt: skip


def _scrape(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=IO_TIMEOUT)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
    finally:
        connection.close()
    assert response.status == 200, body[:200]
    return body


def _resolve_failures(port: int) -> float:
    text = _scrape(port)
    m = re.search(r'^acrrelay_backend_failures_total\{reason="resolve_failed"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_unresolvable_resolve_route_is_refused_cleanly_and_counted(
    test_ca: TestCA, backend: BackendServer, start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    """A resolve route whose name does not resolve: the client is answered internal_error
    at once, logged resolve_failed and counted in the metrics; no DNS query leaves."""
    wrap = _without_dns(tmp_path / "etc")
    # Under that wrapper, the name does not resolve and localhost does (from /etc/hosts).
    probe = subprocess.run(
        [*wrap, sys.executable, "-c",
         "import socket, sys\n"
         "socket.getaddrinfo('localhost', 443)\n"
         "try:\n    socket.getaddrinfo(sys.argv[1], 443)\n"
         "except socket.gaierror as e:\n    print('gaierror', e.errno)\n",
         UNRESOLVABLE],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert probe.returncode == 0 and probe.stdout.startswith("gaierror"), probe

    routes = {UNRESOLVABLE: {"backend": "resolve"}, REGISTRY: backend.backend(REGISTRY)}
    relay = start_relay(routes, wrap=wrap, admin={"metrics": "tcp:0"}, connect_timeout="5s")
    assert relay.metrics_port is not None
    counted_before = _resolve_failures(relay.metrics_port)
    baseline = _baseline_fds(relay, test_ca)
    after = _last_id(relay)
    elapsed, received, local = _hello_exchange(relay, UNRESOLVABLE)
    counted = _resolve_failures(relay.metrics_port) - counted_before
    health = _survived(relay, test_ca, baseline)
    print(
        f"\nfaults: unresolvable name: refused after {elapsed * 1000:.0f} ms, "
        f"resolve_failed counted {counted:g}, {health.leaked} fds leaked"
    )
    assert alert_description(received) == ALERT_INTERNAL_ERROR, received
    assert elapsed < 4.0, f"answered after {elapsed:.2f}s: it waited for a timeout"
    entry = _entry_for(relay, local, after)
    assert entry["close_reason"] == "resolve_failed", str(entry)
    assert entry["sni"] == UNRESOLVABLE and "backend_address" not in entry, str(entry)
    assert counted == 1, f"acrrelay_backend_failures_total{{reason=resolve_failed}} moved {counted}"
    health.check()


# ---------------------------------------------------------------- 6. flood


def _tally(entries: list[dict[str, Any]]) -> str:
    """How many entries ended each way, and after how long (by the relay's clock)."""
    ways: dict[str, list[float]] = {}
    for e in entries:
        ways.setdefault(f"{e['close_reason']} ({e.get('detail', '')})", []).append(e["total_ms"])
    return "; ".join(
        f"{len(ms)} {way} after {min(ms) / 1000:.2f}-{max(ms) / 1000:.2f}s"
        for way, ms in sorted(ways.items(), key=lambda item: -len(item[1]))
    )


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= needed, f"cannot open {needed} files (limit {soft})"


def _download(relay: Relay, ca: TestCA, size: int, seed: int) -> bool:
    """GET /blob of ``size`` bytes through the relay: True if its sha256 is the backend's."""
    with (
        relay.connect(timeout=60) as raw,
        ca.client_context().wrap_socket(raw, server_hostname=BUCKET) as tls,
    ):
        http_get(tls, BUCKET, f"/blob?size={size}&seed={seed}")
        head = bytearray()
        while b"\r\n\r\n" not in head:
            data = tls.recv(65536)
            if not data:
                return False
            head += data
        status, headers, first = split_http(bytes(head))
        digest = hashlib.sha256(first)
        count = len(first)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := tls.recv_into(buf):
            digest.update(view[:n])
            count += n
    return status == 200 and count == size and digest.hexdigest() == headers["x-sha256"]


class _Downloads:
    """Blob downloads on threads of their own; ``results`` says which were intact."""

    def __init__(self, relay: Relay, ca: TestCA, sizes_seeds: list[tuple[int, int]]) -> None:
        self.results: list[bool | BaseException] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._one, args=(relay, ca, size, seed), daemon=True)
            for size, seed in sizes_seeds
        ]
        for thread in self._threads:
            thread.start()

    def _one(self, relay: Relay, ca: TestCA, size: int, seed: int) -> None:
        try:
            ok: bool | BaseException = _download(relay, ca, size, seed)
        except BaseException as e:
            ok = e
        with self._lock:
            self.results.append(ok)

    def join(self, timeout: float) -> int:
        """Wait for them all; how many arrived intact."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), (
            f"downloads still running after {timeout}s"
        )
        return sum(1 for r in self.results if r is True)


def test_flood_of_silent_connections_is_reaped_at_the_peek_timeout(
    test_ca: TestCA, backend: BackendServer, start_relay: Callable[..., Relay]
) -> None:
    """1000 connections opened at once that send nothing or one byte are each closed at
    the 5 s peek timeout, while 20 downloads through the same relay arrive intact."""
    flood, peek_timeout, margin = 1000, 5.0, 2.5
    _raise_fd_limit(flood + 256)
    # A listener as an operator writes it: no backlog given, TLS and plain HTTP.
    listener = {
        "endpoint": "tcp:0:interface=127.0.0.1",
        "name": "e2e",
        "protocols": ["tls", "http"],
    }
    relay = start_relay(
        {BUCKET: backend.backend(BUCKET), REGISTRY: backend.backend(REGISTRY)},
        listeners=[listener],
        peek_timeout="5s",
    )
    baseline = _baseline_fds(relay, test_ca)
    after = _last_id(relay)

    # A burst, as a scanner sends it: every connect() at once, without waiting for any.
    selector = selectors.DefaultSelector()
    began: dict[str, float] = {}  # client address -> when its connect() began
    connected: dict[str, float] = {}  # client address -> seconds its connect() took
    reaped: dict[str, float] = {}  # client address -> seconds from connect() to EOF
    sockets: list[socket.socket] = []
    first_bytes = (b"", b"\x16", b"", b"G")  # half nothing, a quarter TLS, a quarter HTTP
    started = time.monotonic()
    try:
        for i in range(flood):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setblocking(False)
            connecting = time.monotonic()
            assert sock.connect_ex(("127.0.0.1", relay.port)) in (0, errno.EINPROGRESS)
            name = "{}:{}".format(*sock.getsockname())
            began[name] = connecting
            selector.register(sock, selectors.EVENT_WRITE, (name, first_bytes[i % 4]))
        downloads = _Downloads(relay, test_ca, [(8 * MiB, 9000 + n) for n in range(20)])
        deadline = time.monotonic() + peek_timeout + 20
        while len(reaped) < flood and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                name, first = key.data
                if name not in connected:
                    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    assert error == 0, f"connect: {os.strerror(error)}"
                    connected[name] = time.monotonic() - began[name]
                    if first:
                        sock.send(first)
                    selector.modify(sock, selectors.EVENT_READ, key.data)
                    continue
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    pass
                reaped[name] = time.monotonic() - began[name]
                selector.unregister(sock)
        all_reaped = time.monotonic() - started
        intact = downloads.join(timeout=120)
    finally:
        selector.close()
        for sock in sockets:
            sock.close()

    def flooders() -> list[dict[str, Any]]:
        # A download may have had a flood connection's port before it: it has a route.
        return [
            e
            for e in relay.access_entries()
            if e.get("id", 0) > after and e.get("client") in began and "route" not in e
        ]

    deadline = time.monotonic() + 10
    while len(entries := flooders()) < len(reaped) and time.monotonic() < deadline:
        time.sleep(0.1)
    reasons = {e["close_reason"] for e in entries}
    relay_lives = sorted(e["total_ms"] / 1000 for e in entries) or [0.0]
    lives = sorted(reaped.values()) or [0.0]
    late = [life for life in lives if life > peek_timeout + margin]
    health = _survived(relay, test_ca, baseline)
    print(
        f"\nflood: {len(reaped)} silent connections reaped in {all_reaped:.1f} s (each "
        f"{lives[0]:.2f}-{lives[-1]:.2f} s after its connect, "
        f"{relay_lives[0]:.2f}-{relay_lives[-1]:.2f} s after its accept; peek_timeout "
        f"{peek_timeout:g}s), {intact}/20 transfers intact, {health.leaked} fds leaked"
    )
    # Every connection the client sees as open must be closed by the relay, at the peek
    # timeout counted from the client's connect(): a handshake the kernel completed but
    # the relay never accepted leaves the client hanging all the same.
    assert len(reaped) == flood, (
        f"{flood - len(reaped)} of {flood} connections were still open "
        f"{time.monotonic() - started:.0f}s after the burst ({len(connected)} had connected, "
        f"the relay logged {len(entries)}: {_tally(entries)})"
    )
    assert not late, (
        f"{len(late)} of {flood} connections were closed more than {margin}s after the peek "
        f"timeout, counted from their connect() (up to {lives[-1]:.1f}s)"
    )
    assert lives[0] >= peek_timeout - 0.01, lives[:5]
    assert intact == 20, f"only {intact}/20 downloads arrived intact: {downloads.results}"
    assert reasons == {"refused:peek_timeout"}, reasons
    # One access entry per flood connection: none lost, none logged twice.
    assert len(entries) == flood, f"{len(entries)} access entries for {flood} connections"
    # The relay's clock: from its accept to the close, the peek timeout.
    assert relay_lives[0] >= peek_timeout - 0.01, relay_lives[:5]
    assert relay_lives[-1] <= peek_timeout + margin, relay_lives[-5:]
    health.check()


# ---------------------------------------------------------------- 7. concurrency


@contextlib.contextmanager
def _sampler(pid: int, interval: float = 0.1) -> Iterator[list[int]]:
    """RSS of ``pid`` every ``interval`` seconds while the block runs."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                samples.append(rss_bytes(pid))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=5)


#: The relay's per-connection high-water mark with its default buffer_size (64 KiB):
#: in each direction a transport holds at most buffer_size before it pauses the other
#: side, plus the one read (64 KiB) that crossed it.
BUFFER_SIZE = 64 * 1024
READ_SIZE = 64 * 1024
HIGH_WATER = 2 * (BUFFER_SIZE + READ_SIZE)


def test_50_concurrent_64_mib_transfers_are_intact_in_bounded_memory(
    test_ca: TestCA, backend: BackendServer, start_relay: Callable[..., Relay]
) -> None:
    """50 concurrent 64 MiB downloads all arrive with their sha256, and the relay's RSS
    stays under base + 50 x 2 x the per-connection high-water mark."""
    count, size = 50, 64 * MiB
    relay = start_relay({BUCKET: backend.backend(BUCKET), REGISTRY: backend.backend(REGISTRY)})
    baseline_fds = _baseline_fds(relay, test_ca)
    # Warm-up: a few transfers at once, so the allocator reaches its working size.
    warm = _Downloads(relay, test_ca, [(8 * MiB, 7000 + i) for i in range(4)])
    assert warm.join(timeout=60) == 4, warm.results
    time.sleep(0.5)
    base = rss_bytes(relay.pid)
    bound = base + count * 2 * HIGH_WATER

    started = time.monotonic()
    with _sampler(relay.pid) as samples:
        downloads = _Downloads(relay, test_ca, [(size, 6400 + i) for i in range(count)])
        intact = downloads.join(timeout=240)
    elapsed = time.monotonic() - started
    peak = max(samples)
    health = _survived(relay, test_ca, baseline_fds)
    print(
        f"\nconcurrency: {intact}/{count} x {size // MiB} MiB intact in {elapsed:.1f} s "
        f"({count * size / elapsed / 1e6:.0f} MB/s); relay RSS peak {peak / MiB:.1f} MiB "
        f"(bound {bound / MiB:.1f} MiB = base {base / MiB:.1f} + {count} x 2 x "
        f"{HIGH_WATER // 1024} KiB high-water); {len(samples)} samples, {health.leaked} fds "
        "leaked"
    )
    assert intact == count, f"only {intact}/{count} arrived intact: {downloads.results}"
    assert len(samples) >= 10, len(samples)
    assert peak <= bound, f"relay RSS peaked at {peak / MiB:.1f} MiB, over {bound / MiB:.1f}"
    health.check()


# ---------------------------------------------------------------- 8. many short ones


HTTP_LISTENER = {"endpoint": "tcp:0:interface=127.0.0.1", "name": "http", "protocols": ["http"]}


def _short_requests(port: int, count: int) -> None:
    """``count`` plain-HTTP GET /name requests through the relay, one connection each."""
    request = f"GET /name HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: close\r\n\r\n".encode()
    expected = f"backend={REGISTRY}\n".encode()
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(request)
            response = bytearray()
            while data := sock.recv(4096):
                response += data
        assert response.startswith(b"HTTP/1.1 200 ") and response.endswith(expected), (
            f"request {i}: {bytes(response)!r}"
        )


def _access_lines(relay: Relay) -> int:
    with relay.access_log_path.open("rb") as log:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))


def test_10000_short_connections_leak_no_fd_and_little_memory(
    test_ca: TestCA, backend: BackendServer, start_relay: Callable[..., Relay]
) -> None:
    """10 000 plain-HTTP requests in a row, one connection each: the relay's fd count
    returns to its baseline and its RSS grows by less than 5 MiB."""
    count, warm_up = 10_000, 1_000
    relay = start_relay({REGISTRY: backend.backend(REGISTRY)}, listeners=[HTTP_LISTENER])
    _short_requests(relay.port, warm_up)
    relay.wait_access(lambda e: True, count=warm_up)
    time.sleep(0.5)
    fds_before = fd_count(relay.pid)
    rss_before = rss_bytes(relay.pid)

    started = time.monotonic()
    _short_requests(relay.port, count)
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 30
    while _access_lines(relay) < warm_up + count and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = _access_lines(relay) - warm_up
    time.sleep(0.5)
    leaked = _leaked_fds(relay, fds_before)
    growth = rss_bytes(relay.pid) - rss_before
    print(
        f"\nshort connections: {count} in {elapsed:.1f} s ({count / elapsed:.0f}/s), "
        f"{logged} logged; fds {fds_before} -> {fds_before + leaked}, RSS "
        f"{rss_before / MiB:.1f} -> {(rss_before + growth) / MiB:.1f} MiB "
        f"({growth / MiB:+.2f} MiB)"
    )
    assert logged == count, f"{logged} access entries for {count} connections"
    assert leaked == 0, f"{leaked} descriptors left open"
    assert growth < 5 * MiB, f"relay RSS grew {growth / MiB:.1f} MiB over {count} connections"


# ---------------------------------------------------------------- 9. the soak


SOAK_SUMMARY = re.compile(
    r"^soak: (\d+) connections in [\d.]+ s .*, (\d+) errors; faults: (\d+) backend resets "
    r"\((\d+)/(\d+) delivered all the relay read, .*plot (\S+)$"
)


def test_quick_soak_runs_clean(tmp_path: Path) -> None:
    """``python -m soak --quick`` (2000 connections with faults) finishes with no error
    and writes its plot, so the soak command cannot rot."""
    result = subprocess.run(
        [sys.executable, "-m", "soak", "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    print("\n" + (lines[-1] if lines else "(no output)"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    m = SOAK_SUMMARY.match(lines[-1])
    assert m, lines[-1]
    assert int(m.group(1)) == 2000 and int(m.group(2)) == 0, lines[-1]
    # Every backend reset was matched to its access entry, and its client got all the relay
    # read from the backend before the reset.
    resets, delivered, seen = (int(m.group(i)) for i in (3, 4, 5))
    assert resets > 0 and delivered == seen == resets, lines[-1]
    plot = Path(m.group(6))
    assert plot.parent == tmp_path and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
    assert plot.stat().st_size > 10_000, plot.stat()
