"""The soak's machinery: the peers, the mix of connections, the sampling and the plot.

The peers are the end-to-end tests' own (``tests/e2e_support.py``): ``tls_backend.py``,
which also serves plain HTTP, and ``twist acrrelay`` from this interpreter's
environment. Run from the repository root.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import json
import queue
import random
import re
import resource
import selectors
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.e2e_support import (
    BUCKET,
    NAMES,
    REGISTRY,
    BackendServer,
    MiB,
    Relay,
    TestCA,
    fd_count,
    rss_bytes,
)
from tests.tls_backend import blob_chunks

#: The relay's settings for the soak: silent clients are closed after PEEK_TIMEOUT.
PEEK_TIMEOUT = 2.0
IDLE_TIMEOUT = "30s"
#: Every socket operation of a client; a connection that takes longer is an error.
IO_TIMEOUT = 30.0
#: A silent client must be closed within this much after the peek timeout.
REAP_MARGIN = 5.0
#: Seconds between samples of the relay, for a short run and a long one.
SAMPLE_INTERVAL_SHORT = 0.2
SAMPLE_INTERVAL = 1.0
WARM_UP = 20

#: The mix of connections: kind and weight.
MIX = (
    ("small", 55),  # GET /name over plain HTTP
    ("blob", 18),  # GET /blob of 1 KiB to 1 MiB over plain HTTP
    ("tls_blob", 10),  # the same over TLS (SNI passthrough)
    ("large", 1),  # GET /blob of 2 to 16 MiB over plain HTTP
    ("backend_reset", 5),  # the backend resets after 0 to 1 MiB of an 8 MiB blob
    ("client_reset", 5),  # the client resets after 0 to 2 MiB of a 16 MiB blob
    ("silent", 6),  # connects and sends nothing, or one byte
)
FAULTS = ("backend_reset", "client_reset", "silent")
BLOB_SIZES = tuple(sorted({int(1024 * 2 ** (i / 3)) for i in range(31)}))  # 1 KiB .. 1 MiB
LARGE_SIZES = (2 * MiB, 3 * MiB + 1, 5 * MiB, 8 * MiB - 3, 12 * MiB, 16 * MiB)
SEEDS = tuple(range(8))
RESET_SIZE = 8 * MiB
RESET_AFTER = (0, 1, 1000, 64 * 1024, MiB)
CLIENT_RESET_SIZE = 16 * MiB
CLIENT_RESET_AFTER = (0, 1, 64 * 1024, MiB, 2 * MiB)
#: One listener for both front doors: the relay tells TLS from HTTP by the first byte.
LISTENER = {"endpoint": "tcp:0:interface=127.0.0.1", "name": "front", "protocols": ["tls", "http"]}


@dataclass(frozen=True)
class SoakOptions:
    connections: int
    workers: int
    seed: int
    out: Path


class SoakError(Exception):
    """A connection did not go as the relay promises."""


# ---------------------------------------------------------------- one connection each


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _request(conn: socket.socket, host: str, target: str) -> None:
    conn.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """A response head, its blank line excluded: (status, headers by lower-case name)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def _read_head(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            raise SoakError(f"EOF before the end of the response head: {bytes(buf[:200])!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return (*_parse_head(head), rest)


def _check_blob(conn: socket.socket) -> int:
    """Read a /blob response to EOF; its length and sha256 must be the announced ones."""
    status, headers, first = _read_head(conn)
    if status != 200:
        raise SoakError(f"status {status}")
    digest = hashlib.sha256(first)
    count = len(first)
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    while n := conn.recv_into(buf):
        digest.update(view[:n])
        count += n
    size = int(headers["content-length"])
    if count != size:
        raise SoakError(f"received {count} of {size} bytes")
    if digest.hexdigest() != headers["x-sha256"]:
        raise SoakError(f"the {size}-byte body differs from what the backend sent")
    return count


_prefixes: dict[tuple[int, int], bytes] = {}
_prefix_lock = threading.Lock()


def _blob_prefix(size: int, seed: int) -> bytes:
    with _prefix_lock:
        known = _prefixes.get((size, seed))
        if known is None:
            out = bytearray()
            for chunk in blob_chunks(size, seed):
                out += chunk
            known = _prefixes[(size, seed)] = bytes(out)
        return known


@dataclass(frozen=True)
class ResetSeen:
    """What the client of one backend reset got, to set against the relay's access entry."""

    #: The client's address as the access log writes it.
    client: str
    #: Bytes the client got before the reset, the response head included.
    received: int
    #: Whether those were the whole head and every body byte the backend wrote.
    complete: bool


@dataclass
class ResetAudit:
    """The backend resets, each against the relay's own count of the bytes it read.

    The relay promises that what it read before a reset reaches the client. What the
    backend wrote but its kernel still held when it reset is lost with the reset, before
    the relay could read it: a transfer cut short so is the backend's doing, not an error.
    """

    #: Resets whose client got exactly the bytes the relay logged as read (bytes_down).
    delivered: int = 0
    #: Of those, the ones where the relay had read less than the backend wrote.
    cut_short: int = 0
    errors: list[str] = field(default_factory=list)


def _audit_resets(seen: list[ResetSeen], entries: list[dict[str, Any]]) -> ResetAudit:
    """Match each backend reset to its access entry by client address, in order (an
    address is reused only long after, so one address's resets came one after another)."""
    logged: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        if entry.get("close_reason") == "backend_reset":
            logged[entry.get("client", "?")].append(entry)
    resets: defaultdict[str, list[ResetSeen]] = defaultdict(list)
    for one in seen:
        resets[one.client].append(one)
    audit = ResetAudit()
    for client, mine in resets.items():
        found = logged.get(client, [])
        if len(found) != len(mine):
            audit.errors.append(
                f"{len(mine)} backend resets from {client} reached the client, "
                f"{len(found)} were logged backend_reset"
            )
            continue
        for one, entry in zip(mine, found, strict=True):
            read = entry.get("bytes_down")
            if one.received == read:
                audit.delivered += 1
                audit.cut_short += not one.complete
            else:
                audit.errors.append(
                    f"a backend reset from {client}: the client got {one.received} bytes, "
                    f"the relay read {read} (access entry {entry.get('id')})"
                )
    return audit


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Clients:
    """The kinds of connection, each a method that raises :class:`SoakError` when the
    relay did not do what it promises; each returns the body bytes it moved."""

    def __init__(self, relay: Relay, ca: TestCA, reaper: Reaper) -> None:
        self.port = relay.port
        self.context = ca.client_context()
        self.reaper = reaper
        #: Every backend reset that reached its client as a reset, for :func:`_audit_resets`.
        self.resets: list[ResetSeen] = []

    def small(self, rng: random.Random, source: str) -> int:
        with _connect(self.port, source) as sock:
            _request(sock, REGISTRY, "/name")
            status, _, body = _read_head(sock)
            while data := sock.recv(4096):
                body += data
        if status != 200 or body != f"backend={REGISTRY}\n".encode():
            raise SoakError(f"status {status}, body {body[:100]!r}")
        return len(body)

    def blob(self, rng: random.Random, source: str) -> int:
        size, seed = rng.choice(BLOB_SIZES), rng.choice(SEEDS)
        with _connect(self.port, source) as sock:
            _request(sock, BUCKET, f"/blob?size={size}&seed={seed}")
            return _check_blob(sock)

    def large(self, rng: random.Random, source: str) -> int:
        size, seed = rng.choice(LARGE_SIZES), rng.choice(SEEDS)
        with _connect(self.port, source) as sock:
            _request(sock, BUCKET, f"/blob?size={size}&seed={seed}")
            return _check_blob(sock)

    def tls_blob(self, rng: random.Random, source: str) -> int:
        size, seed = rng.choice(BLOB_SIZES), rng.choice(SEEDS)
        with (
            _connect(self.port, source) as raw,
            self.context.wrap_socket(raw, server_hostname=BUCKET) as tls,
        ):
            _request(tls, BUCKET, f"/blob?size={size}&seed={seed}")
            return _check_blob(tls)

    def backend_reset(self, rng: random.Random, source: str) -> int:
        """The backend resets after ``after`` body bytes. Whether the client got all the
        relay read is judged at the end, from the access log (:func:`_audit_resets`)."""
        after, seed = rng.choice(RESET_AFTER), rng.choice(SEEDS)
        with _connect(self.port, source) as sock:
            client = "{}:{}".format(*sock.getsockname())
            _request(sock, BUCKET, f"/reset?size={RESET_SIZE}&after={after}&seed={seed}")
            raw = bytearray()
            try:
                while data := sock.recv(65536):
                    raw += data
            except ConnectionResetError:
                pass
            else:
                raise SoakError(
                    f"a backend reset after {after} bytes reached the client as a clean "
                    f"close after {len(raw)}"
                )
            head, blank, body = bytes(raw).partition(b"\r\n\r\n")
            # Noted before the socket closes, so no later connection has this address yet.
            self.resets.append(ResetSeen(client, len(raw), bool(blank) and len(body) == after))
        if not blank:
            return 0  # the reset took part of the head: only the audit can judge that
        status, _ = _parse_head(head)
        if status != 200 or len(body) > after:
            raise SoakError(f"status {status}, {len(body)} bytes of {after} sent")
        if body != _blob_prefix(after, seed)[: len(body)]:
            raise SoakError(f"the {len(body)} bytes before the reset differ from those sent")
        return len(body)

    def client_reset(self, rng: random.Random, source: str) -> int:
        after, seed = rng.choice(CLIENT_RESET_AFTER), rng.choice(SEEDS)
        sock = _connect(self.port, source)
        try:
            _request(sock, BUCKET, f"/blob?size={CLIENT_RESET_SIZE}&seed={seed}")
            status, _, body = _read_head(sock)
            received = len(body)
            while received < after:
                data = sock.recv(65536)
                if not data:
                    raise SoakError(f"EOF after {received} of {CLIENT_RESET_SIZE} bytes")
                received += len(data)
        finally:
            _reset(sock)
        if status != 200:
            raise SoakError(f"status {status}")
        return received

    def silent(self, rng: random.Random, source: str) -> int:
        door = rng.choice(("tls", "http"))
        sock = _connect(self.port, source)
        began = time.monotonic()
        first = rng.choice((b"", b"\x16" if door == "tls" else b"G"))
        if first:
            sock.sendall(first)
        self.reaper.add(sock, began)
        return 0


# ---------------------------------------------------------------- silent clients


class Reaper:
    """Watches the silent clients' sockets until the relay closes each (one thread)."""

    def __init__(self) -> None:
        self._incoming: queue.Queue[tuple[socket.socket, float]] = queue.Queue()
        self._selector = selectors.DefaultSelector()
        self.lives: list[float] = []
        self.errors: list[str] = []
        self._pending = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def add(self, sock: socket.socket, began: float) -> None:
        with self._lock:
            self._pending += 1
        self._incoming.put((sock, began))

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def _run(self) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    incoming, began = self._incoming.get_nowait()
                except queue.Empty:
                    break
                incoming.setblocking(False)
                self._selector.register(incoming, selectors.EVENT_READ, began)
            if not self._selector.get_map():
                time.sleep(0.05)
                continue
            for key, _ in self._selector.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    pass
                life = time.monotonic() - key.data
                self._selector.unregister(sock)
                sock.close()
                with self._lock:
                    self._pending -= 1
                    self.lives.append(life)
                    if not PEEK_TIMEOUT - 0.05 <= life <= PEEK_TIMEOUT + REAP_MARGIN:
                        self.errors.append(f"a silent client was closed after {life:.2f}s")

    def finish(self, timeout: float) -> int:
        """Wait for the last ones; close any still open. How many were never closed."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=5)
        left = 0
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
            left += 1
        self._selector.close()
        return left + self._incoming.qsize()


# ---------------------------------------------------------------- sampling


def _active_connections(port: int) -> int:
    """The relay's live connections, from its metrics page (-1 if it did not answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    except OSError:
        return -1
    finally:
        connection.close()
    return int(
        sum(float(v) for v in re.findall(r"^acrrelay_connections_active\{.*\} (\S+)$", text, re.M))
    )


@dataclass
class Sample:
    seconds: float
    rss: int
    fds: int
    active: int
    done: int


class Sampler:
    """The relay's RSS, open fds and active connections, every ``interval`` seconds."""

    def __init__(self, relay: Relay, started: float, done: Any, interval: float) -> None:
        assert relay.metrics_port is not None
        self._interval = interval
        self._relay = relay
        self._started = started
        self._done = done
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.samples.append(
                    Sample(
                        seconds=time.monotonic() - self._started,
                        rss=rss_bytes(self._relay.pid),
                        fds=fd_count(self._relay.pid),
                        active=_active_connections(self._relay.metrics_port),  # type: ignore[arg-type]
                        done=self._done(),
                    )
                )
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


# ---------------------------------------------------------------- the run


@dataclass
class Tally:
    """Outcomes so far, by kind; shared by the workers."""

    ok: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    moved: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self) -> int:
        return sum(self.ok.values()) + sum(self.failed.values())


def _worker(clients: Clients, tally: Tally, indices: Any, seed: int, lock: threading.Lock) -> None:
    kinds = [kind for kind, _ in MIX]
    weights = [weight for _, weight in MIX]
    while True:
        with lock:
            i = next(indices, None)
        if i is None:
            return
        rng = random.Random(seed * 1_000_003 + i)
        kind = rng.choices(kinds, weights)[0]
        source = f"127.0.{1 + i % 200}.{1 + (i // 200) % 250}"
        try:
            moved = getattr(clients, kind)(rng, source)
        except (SoakError, OSError, ssl.SSLError, ValueError, KeyError) as e:
            with tally.lock:
                tally.failed[kind] += 1
                if len(tally.errors) < 50:
                    tally.errors.append(f"connection {i} ({kind}): {type(e).__name__}: {e}")
        else:
            with tally.lock:
                tally.ok[kind] += 1
                tally.moved += moved


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _settle(relay: Relay, timeout: float) -> int:
    """Wait until the relay has no connection left; its open fds then."""
    assert relay.metrics_port is not None
    deadline = time.monotonic() + timeout
    while _active_connections(relay.metrics_port) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    return fd_count(relay.pid)


def _access_entries(relay: Relay) -> list[dict[str, Any]]:
    with relay.access_log_path.open(encoding="utf-8") as log:
        return [json.loads(line) for line in log if line.strip()]


def _plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [s.seconds for s in samples]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(10, 8))
    series = (
        ([s.rss / MiB for s in samples], "relay RSS (MiB)", "tab:blue"),
        ([s.fds for s in samples], "open fds", "tab:orange"),
        ([max(s.active, 0) for s in samples], "active connections", "tab:green"),
    )
    for axis, (values, label, colour) in zip(axes, series, strict=True):
        axis.plot(seconds, values, color=colour, linewidth=1)
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_soak(options: SoakOptions) -> int:
    """Run the soak; print progress to stderr and the summary line last to stdout."""
    _raise_fd_limit(4096)
    options.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="acrrelay-soak-") as work:
        directory = Path(work)
        ca = TestCA(directory / "ca", NAMES)
        home = directory / "home"
        home.mkdir()
        backend = BackendServer(ca, home)
        try:
            relay = Relay(
                directory / "relay",
                {name: backend.backend(name) for name in NAMES},
                listeners=[LISTENER],
                admin={"metrics": "tcp:0"},
                peek_timeout=f"{PEEK_TIMEOUT:g}s",
                idle_timeout=IDLE_TIMEOUT,
                connect_timeout="5s",
            )
            try:
                summary = _soak(options, relay, ca, stamp, problems)
            finally:
                relay.stop()
        finally:
            backend.stop()
    print(summary, flush=True)
    for problem in problems:
        print(f"soak: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _soak(options: SoakOptions, relay: Relay, ca: TestCA, stamp: str, problems: list[str]) -> str:
    reaper = Reaper()
    clients = Clients(relay, ca, reaper)
    warm = Tally()
    for _ in range(WARM_UP):
        try:
            clients.small(random.Random(0), "127.0.0.1")
        except (SoakError, OSError) as e:
            warm.failed["small"] += 1
            warm.errors.append(f"warm-up: {type(e).__name__}: {e}")
    base_fds = _settle(relay, 10)
    base_rss = rss_bytes(relay.pid)

    tally = Tally()
    started = time.monotonic()
    interval = SAMPLE_INTERVAL_SHORT if options.connections <= 10_000 else SAMPLE_INTERVAL
    sampler = Sampler(relay, started, tally.done, interval)
    indices = iter(range(options.connections))
    lock = threading.Lock()
    workers = [
        threading.Thread(
            target=_worker, args=(clients, tally, indices, options.seed, lock), daemon=True
        )
        for _ in range(options.workers)
    ]
    for worker in workers:
        worker.start()
    step = max(1, options.connections // 10)
    reported = 0
    while any(worker.is_alive() for worker in workers):
        time.sleep(0.5)
        done = tally.done()
        if done >= reported + step:
            reported = done - done % step
            print(
                f"soak: {done}/{options.connections} after {time.monotonic() - started:.0f} s, "
                f"{sum(tally.failed.values())} errors",
                file=sys.stderr,
                flush=True,
            )
        if not relay.alive():
            problems.append(f"the relay died:\n{relay.output.text()[-3000:]}")
            break
    for worker in workers:
        worker.join(timeout=IO_TIMEOUT * 3)
    unreaped = reaper.finish(timeout=PEEK_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    end_fds = _settle(relay, 30)
    assert relay.metrics_port is not None
    still_active = _active_connections(relay.metrics_port)
    deadline = time.monotonic() + 10
    while end_fds > base_fds and time.monotonic() < deadline:
        time.sleep(0.2)
        end_fds = fd_count(relay.pid)
    end_rss = rss_bytes(relay.pid)
    sampler.stop()
    samples = sampler.samples

    entries = _access_entries(relay)
    reasons = Counter(e.get("close_reason", "?") for e in entries)
    expected = WARM_UP + options.connections
    audit = _audit_resets(clients.resets, entries)
    errors = (
        sum(tally.failed.values())
        + sum(warm.failed.values())
        + len(reaper.errors)
        + len(audit.errors)
    )
    if warm.failed or tally.failed:
        problems += warm.errors + tally.errors
    problems += reaper.errors[:20]
    problems += audit.errors[:20]
    if unreaped:
        problems.append(f"{unreaped} silent clients were never closed by the relay")
    if still_active:
        problems.append(f"{still_active} connections were still open at the end")
    if end_fds > base_fds:
        problems.append(f"the relay has {end_fds} fds open, {base_fds} before")
    if len(entries) != expected:
        problems.append(f"{len(entries)} access entries for {expected} connections")
    if not relay.alive():
        problems.append("the relay is not running at the end")
    errors += unreaped

    lives = sorted(reaper.lives) or [0.0]
    peak_rss = max([s.rss for s in samples] + [end_rss])
    peak_fds = max([s.fds for s in samples] + [end_fds])
    peak_active = max([s.active for s in samples] + [0])
    png = options.out / f"soak-{stamp}.png"
    summary = (
        f"soak: {options.connections} connections in {elapsed:.1f} s "
        f"({options.connections / elapsed:.0f}/s, {tally.moved / MiB:.0f} MiB checked), "
        f"{errors} errors; faults: {tally.ok['backend_reset']} backend resets "
        f"({audit.delivered}/{len(clients.resets)} delivered all the relay read, "
        f"{audit.cut_short} of them cut short by the backend's reset before the relay read "
        f"it all), {tally.ok['client_reset']} client resets, "
        f"{len(reaper.lives)} silent clients reaped after {lives[0]:.2f}-{lives[-1]:.2f} s; "
        f"relay RSS {base_rss / MiB:.1f} -> {end_rss / MiB:.1f} MiB (peak "
        f"{peak_rss / MiB:.1f}), fds {base_fds} -> {end_fds} (peak {peak_fds}), active "
        f"peak {peak_active}; plot {png}"
    )
    title = (
        f"acrrelay soak: {options.connections} connections, {options.workers} workers, "
        f"{errors} errors\nclose reasons: "
        + ", ".join(f"{reason} {count}" for reason, count in reasons.most_common(6))
    )
    _plot(samples, png, title)
    with (options.out / f"soak-{stamp}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["seconds", "rss_bytes", "open_fds", "active_connections", "done"])
        for s in samples:
            writer.writerow([f"{s.seconds:.2f}", s.rss, s.fds, s.active, s.done])
    reasons_line = ", ".join(f"{reason} {count}" for reason, count in sorted(reasons.items()))
    (options.out / f"soak-{stamp}.txt").write_text(
        f"{summary}\nclose reasons: {reasons_line}\n"
        + "".join(f"problem: {problem}\n" for problem in problems)
    )
    print(f"soak: close reasons: {reasons_line}", file=sys.stderr)
    return summary
