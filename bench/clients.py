"""The bench's own Python clients: TTFB probes, the slow reader, and the idle-connection
holder (``python -m bench.clients idle ...``, its own process so its descriptors and CPU
are its own).

Every client connects to 127.0.0.1 only and names the benchmark host in SNI and Host.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


def client_context(ca_file: Path) -> ssl.SSLContext:
    """Verifies the backend's certificate against the test CA, as a real client would."""
    return ssl.create_default_context(cafile=str(ca_file))


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def ttfb_once(context: ssl.SSLContext, port: int, name: str, timeout: float = 10.0) -> float:
    """Seconds from connect() to the first byte of the answer to ``GET /small`` on a new
    TCP connection with a full TLS handshake (TCP connect, handshake, request, first byte)."""
    request = f"GET /small HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
    started = time.perf_counter()
    sock = _connect(port, timeout)
    try:
        tls = context.wrap_socket(sock, server_hostname=name)
        tls.sendall(request)
        first = tls.recv(1)
        elapsed = time.perf_counter() - started
        if not first:
            raise ConnectionError(f"no answer through port {port}")
        while tls.recv(4096):
            pass
        return elapsed
    finally:
        sock.close()


def ttfb_pairs(
    context: ssl.SSLContext, direct_port: int, relay_port: int, name: str, pairs: int
) -> tuple[list[float], list[float]]:
    """``pairs`` TTFB samples direct and through the relay, interleaved one by one (the
    order alternating) so both see the same machine."""
    direct, relayed = [], []
    for i in range(pairs):
        if i % 2:
            relayed.append(ttfb_once(context, relay_port, name))
            direct.append(ttfb_once(context, direct_port, name))
        else:
            direct.append(ttfb_once(context, direct_port, name))
            relayed.append(ttfb_once(context, relay_port, name))
    return direct, relayed


def slow_read(
    context: ssl.SSLContext,
    port: int,
    name: str,
    *,
    rate: float,
    seconds: float,
    sample: Callable[[], None],
    sample_every: float = 0.05,
) -> int:
    """Download ``/big`` at ``rate`` bytes per second for ``seconds`` while the backend sends
    as fast as it can; call ``sample()`` every ``sample_every`` seconds. Returns the bytes
    read (TLS plaintext)."""
    sock = _connect(port, 30.0)
    got = 0
    try:
        tls = context.wrap_socket(sock, server_hostname=name)
        tls.sendall(f"GET /big HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        started = time.monotonic()
        next_sample = started
        while True:
            now = time.monotonic()
            if now >= next_sample:
                sample()
                next_sample = now + sample_every
            if now - started >= seconds:
                break
            may_read_at = started + got / rate  # keeps the average at ``rate``
            if now < may_read_at:
                time.sleep(min(may_read_at, next_sample) - now)
                continue
            data = tls.recv(16384)
            if not data:
                break
            got += len(data)
        sample()
    finally:
        sock.close()
    return got


def hold_idle(port: int, name: str, ca_file: Path, count: int, threads: int) -> None:
    """Open ``count`` TLS connections (full handshake each, so an SNI relay has routed every
    one of them), print ``OPEN <opened> <failed> <seconds>``, hold them idle until standard
    input closes, then close them all."""
    context = client_context(ca_file)
    held: list[ssl.SSLSocket] = []
    failed = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def opener(n: int) -> None:
        for _ in range(n):
            try:
                sock = _connect(port, 30.0)
                tls = context.wrap_socket(sock, server_hostname=name)
            except OSError as e:
                with lock:
                    failed[0] += 1
                    if len(errors) < 3:
                        errors.append(repr(e))
                continue
            with lock:
                held.append(tls)

    started = time.monotonic()
    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=opener, args=(n,)) for n in share]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    took = time.monotonic() - started
    print(f"OPEN {len(held)} {failed[0]} {took:.2f} {' | '.join(errors)}", flush=True)
    sys.stdin.read()
    for tls in held:
        tls.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    commands = parser.add_subparsers(dest="command", required=True)
    idle = commands.add_parser("idle", help="hold COUNT idle TLS connections open")
    idle.add_argument("--port", type=int, required=True)
    idle.add_argument("--name", required=True)
    idle.add_argument("--ca", type=Path, required=True)
    idle.add_argument("--count", type=int, required=True)
    idle.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    hold_idle(args.port, args.name, args.ca, args.count, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
