"""End to end, the byte pump: large transfers, a slow reader, half-close, and failing backends.

Each test runs its own ``twist acrrelay`` process against the threaded TLS backend of
``tls_backend.py``; TLS runs end to end between the test and that backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from acrrelay.testing import alert_description, client_hello_bytes, records_of
from tests.e2e_support import (
    BUCKET,
    DOCKERAUTH,
    REGISTRY,
    ZERO_COPY,
    BioTLS,
    MiB,
    Relay,
    TestCA,
    http_get,
    read_all,
    rss_bytes,
    split_http,
)
from tests.tls_backend import ECHO_RESPONSE_SIZE, blob_chunks, echo_response

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

BIG = 512 * MiB
ALERT_INTERNAL_ERROR = 80


def _read_head(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    head = bytearray()
    while b"\r\n\r\n" not in head:
        data = tls.recv(65536)
        assert data, f"EOF before the end of the response head: {bytes(head)!r}"
        head += data
    return split_http(bytes(head))


def _download(
    relay: Relay, ca: TestCA, name: str, size: int, seed: int
) -> tuple[tuple[str, int], float]:
    """GET /blob through the relay; check length and sha256 against X-Sha256."""
    context = ca.client_context()
    with (
        relay.connect(timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        local = tls.getsockname()
        http_get(tls, name, f"/blob?size={size}&seed={seed}")
        status, headers, first = _read_head(tls)
        assert status == 200 and int(headers["content-length"]) == size, headers
        started = time.monotonic()
        digest = hashlib.sha256(first)
        count = len(first)
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        while n := tls.recv_into(buf):
            digest.update(view[:n])
            count += n
        elapsed = time.monotonic() - started
    assert count == size, f"received {count} of {size} bytes"
    assert digest.hexdigest() == headers["x-sha256"], "the body differs from what was sent"
    return local, elapsed


def _connect_bio(
    relay: Relay, ca: TestCA, name: str, **kwargs: Any
) -> tuple[socket.socket, BioTLS]:
    sock = relay.connect(**kwargs)
    client = BioTLS(sock, ca.client_context(), name)
    sock.sendall(client.first_flight())
    client.handshake()
    return sock, client


def test_512_mib_download_arrives_with_the_same_sha256(test_ca: TestCA, relay: Relay) -> None:
    """A 512 MiB download through the relay arrives complete, with the backend's sha256."""
    local, elapsed = _download(relay, test_ca, BUCKET, BIG, seed=5120)
    print(f"\ndownload: {BIG / MiB:.0f} MiB in {elapsed:.1f} s = {BIG / elapsed / 1e6:.0f} MB/s")

    entry = relay.access_for(local)
    assert entry["sni"] == BUCKET and entry["close_reason"] == "done", str(entry)
    assert entry["bytes_down"] >= BIG, str(entry)
    # The blob moved by splice(2) unless this run is the normal path's.
    assert entry.get("zero_copy") == ("down" if ZERO_COPY else None), str(entry)


def test_512_mib_upload_arrives_with_the_same_sha256(test_ca: TestCA, relay: Relay) -> None:
    """A 512 MiB upload ended by a TCP FIN reaches the backend complete and byte-exact."""
    sock, client = _connect_bio(relay, test_ca, REGISTRY, timeout=30)
    with sock:
        local = sock.getsockname()
        client.sendall(b"UPLOAD\n")
        digest = hashlib.sha256()
        started = time.monotonic()
        for chunk in blob_chunks(BIG, seed=2048):
            digest.update(chunk)
            client.sendall(chunk)
        client.shutdown_write()
        reply = client.recv_line()
        elapsed = time.monotonic() - started
        tail = read_all(client)
    print(f"\nupload: {BIG / MiB:.0f} MiB in {elapsed:.1f} s = {BIG / elapsed / 1e6:.0f} MB/s")
    assert reply == f"{digest.hexdigest()} {BIG}\n".encode(), reply
    assert tail == b""

    entry = relay.access_for(local)
    assert entry["sni"] == REGISTRY and entry["close_reason"] == "done", str(entry)
    assert entry["closed_first"] == "client", str(entry)
    assert entry["bytes_up"] >= BIG, str(entry)
    assert entry.get("zero_copy") == ("up" if ZERO_COPY else None), str(entry)


@contextlib.contextmanager
def _rss_sampler(pid: int, interval: float = 0.25) -> Iterator[list[int]]:
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                samples.append(rss_bytes(pid))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(timeout=5)


def test_slow_reader_does_not_grow_relay_memory(test_ca: TestCA, relay: Relay) -> None:
    """A client reading at 1 MB/s from a full-speed backend costs the relay < 16 MiB of RSS."""
    rate = 1e6  # bytes per second
    duration = 10.5
    read_size = 64 * 1024
    # Warm-up: one fast transfer, so allocator and buffers reach their working size.
    _download(relay, test_ca, BUCKET, 32 * MiB, seed=32)
    time.sleep(0.5)
    baseline = rss_bytes(relay.pid)

    sock, client = _connect_bio(relay, test_ca, BUCKET, timeout=30, rcvbuf=read_size)
    with sock, _rss_sampler(relay.pid) as samples:
        local = sock.getsockname()
        http_get(client, BUCKET, f"/blob?size={256 * MiB}&seed=256")
        plain = bytearray()
        received = 0
        started = time.monotonic()
        while (now := time.monotonic()) - started < duration:
            data = sock.recv(read_size)
            assert data, "the relay closed the slow reader"
            received += len(data)
            client.incoming.write(data)
            with contextlib.suppress(ssl.SSLWantReadError):
                while chunk := client.tls.read(1 << 20):
                    if len(plain) < 4096:
                        plain += chunk[:4096]
            pause = started + received / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        elapsed = now - started
        growth = max(samples) - baseline
    achieved = received / elapsed
    print(
        f"\nslow reader: relay RSS grew {growth / MiB:.1f} MiB over {elapsed:.1f} s "
        f"at {achieved / 1e6:.2f} MB/s ({len(samples)} samples, baseline "
        f"{baseline / MiB:.1f} MiB)"
    )
    assert plain.startswith(b"HTTP/1.1 200 OK\r\n"), bytes(plain[:100])
    assert elapsed >= 10 and len(samples) >= 30, (elapsed, len(samples))
    assert achieved >= 0.8 * rate, f"the relay delivered only {achieved / 1e6:.2f} MB/s"
    assert growth < 16 * MiB, f"relay RSS grew {growth / MiB:.1f} MiB for a slow reader"

    entry = relay.access_for(local)
    print(
        f"slow reader: the relay took {entry['bytes_down'] / MiB:.1f} MiB from the backend, "
        f"which it held back for {entry.get('paused_down_ms', 0) / 1000:.1f} s; "
        f"close_reason={entry['close_reason']}"
    )
    # Back-pressure reached the backend: the relay stopped reading from it, for most of
    # the time, instead of taking all 256 MiB at full speed.
    assert entry["bytes_down"] < 48 * MiB, str(entry)
    assert entry["paused_down_ms"] > 5000, str(entry)
    # The client closed with data unread, so its kernel sent a reset.
    assert entry["closed_first"] == "client", str(entry)
    assert entry["close_reason"] in ("client_reset", "client_closed"), str(entry)


def test_half_close_both_ways(test_ca: TestCA, relay: Relay) -> None:
    """A client's FIN reaches the backend as a half-close; the backend's reply still arrives."""
    payload = random.Random(6).randbytes(4 * MiB)
    sock, client = _connect_bio(relay, test_ca, DOCKERAUTH, timeout=20)
    with sock:
        local = sock.getsockname()
        client.sendall(b"ECHOALL\n")
        for i in range(0, len(payload), MiB):
            client.sendall(payload[i : i + MiB])
        client.shutdown_write()
        # The backend answers only after it read EOF: the FIN went through, but the
        # backend-to-client direction stayed open.
        line = client.recv_line()
        response = read_all(client)  # ends only if the backend's FIN came through too
    assert line == f"{hashlib.sha256(payload).hexdigest()} {len(payload)}\n".encode(), line
    assert len(response) == ECHO_RESPONSE_SIZE, len(response)
    assert hashlib.sha256(response).digest() == hashlib.sha256(echo_response()).digest()

    entry = relay.access_for(local)
    assert entry["close_reason"] == "done" and entry["closed_first"] == "client", str(entry)
    assert entry["bytes_up"] >= len(payload) and entry["bytes_down"] >= ECHO_RESPONSE_SIZE


# ---------------------------------------------------------------- failing backends


def _closed_port() -> int:
    """A loopback port that was bound and closed: connecting gets ECONNREFUSED."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A loopback port whose accept queue is full, so new SYNs are dropped."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            fillers.append(filler)
            filler.connect_ex(address)
            _, writable, _ = select.select([], [filler], [], 0.3)
            if not writable:
                break  # this one's SYN was dropped: the queue is full
        else:
            raise AssertionError("could not fill the accept queue")
        yield address[1]
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def _time_to_close(relay: Relay, name: str) -> tuple[float, bytes, tuple[str, int]]:
    """Send a real hello for ``name``; seconds until EOF at the client, and what came first."""
    hello = client_hello_bytes(name)
    with relay.connect(timeout=10) as sock:
        local = sock.getsockname()
        started = time.monotonic()
        sock.sendall(hello)
        received = bytearray()
        while data := sock.recv(4096):
            received += data
        return time.monotonic() - started, bytes(received), local


def _assert_internal_error_alert(received: bytes) -> None:
    records = records_of(received)
    assert len(records) == 1 and alert_description(received) == ALERT_INTERNAL_ERROR, received


def test_backend_that_refuses_closes_the_client_at_once(
    start_relay: Callable[..., Relay],
) -> None:
    """A refused backend connection closes the client at once and is logged connect_failed."""
    name = "registry-vpc.cn-beijing.aliyuncs.com"
    relay = start_relay({name: f"tcp:host=127.0.0.1:port={_closed_port()}"}, connect_timeout="1s")
    elapsed, received, local = _time_to_close(relay, name)
    print(f"\nrefusing backend: client closed after {elapsed * 1000:.0f} ms")
    _assert_internal_error_alert(received)
    assert elapsed < 0.5, f"closed after {elapsed:.2f}s, not at once"

    entry = relay.access_for(local)
    assert entry["close_reason"] == "connect_failed", str(entry)
    assert entry["sni"] == name and "backend_address" not in entry, str(entry)


def test_backend_that_never_answers_closes_the_client_at_the_connect_timeout(
    start_relay: Callable[..., Relay],
) -> None:
    """A backend that drops SYNs closes the client after connect_timeout, logged so."""
    name = "dockerauth-vpc.cn-beijing.aliyuncs.com"
    with _silent_listener() as port:
        # Precondition: this port really does not answer.
        with pytest.raises(TimeoutError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        relay = start_relay({name: f"tcp:host=127.0.0.1:port={port}"}, connect_timeout="1s")
        elapsed, received, local = _time_to_close(relay, name)
    print(f"\nsilent backend: client closed after {elapsed * 1000:.0f} ms (connect_timeout 1s)")
    _assert_internal_error_alert(received)
    assert 0.9 <= elapsed <= 3.0, f"closed after {elapsed:.2f}s; connect_timeout is 1s"

    entry = relay.access_for(local)
    assert entry["sni"] == name and "backend_address" not in entry, str(entry)
    assert entry["close_reason"] == "connect_timeout", str(entry)
