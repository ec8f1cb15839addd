"""End to end, operating the relay: the SSH admin shell with OpenSSH's own client, reload on
SIGHUP under load, drain on SIGTERM, the Prometheus metrics page, and the systemd unit.

Each test runs its own ``twist acrrelay`` process (loopback only, port 0) against the
threaded TLS backend of ``tls_backend.py``. Downloads that must still be in flight when the
test acts are *gated*: a thread reads the body and stands still at chosen offsets until the
test lets it go on, so "in flight" never depends on timing.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.client
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from acrrelay.config import load_config
from acrrelay.testing import alert_description, client_hello_bytes
from tests.e2e_support import (
    BUCKET,
    DOCKERAUTH,
    NAMES,
    REGISTRY,
    VENV_BIN,
    AdminKeys,
    BackendServer,
    MiB,
    Relay,
    TestCA,
    clean_env,
    free_port,
    http_get,
    listening_ports,
    read_response,
    recv_to_eof,
    run,
    split_http,
    stop_process,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
BIG = 512 * MiB
ALERT_INTERNAL_ERROR = 80
ALERT_UNRECOGNIZED_NAME = 112
GATE_TIMEOUT = 60.0

#: The relay's log lines about draining (see RelayService.drain).
DRAINING = re.compile(r"draining (\d+) connections for up to (\S+)")
DRAINED = re.compile(r"drained: every connection finished")
CUTTING = re.compile(r"drain deadline: cutting (\d+) (\S+) -> (\S+) \(")
#: A row of relay.connections(): ID CLIENT DOOR TARGET ROUTE BACKEND UP DOWN AGE STATE PAUSED.
ROW = re.compile(r"^ *(\d+)" + r" +(\S+)" * 10 + r" *$", re.MULTILINE)
COLUMNS = ("id", "client", "door", "target", "route", "backend", "up", "down", "age", "state")
#: Terminal control sequences the manhole draws with (CSI ..., ESC c and the like).
ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-_a-z])|\r")


def _routes(backend: BackendServer, names: Sequence[str] = NAMES) -> dict[str, str]:
    return {name: backend.backend(name) for name in names}


def _address(sock_name: tuple[str, int]) -> str:
    return f"{sock_name[0]}:{sock_name[1]}"


def _connection_rows(text: str) -> list[dict[str, str]]:
    """The rows of a relay.connections() table."""
    rows = []
    for match in ROW.finditer(text):
        row = dict(zip(COLUMNS, match.groups(), strict=False))
        row["paused"] = match.group(11)
        rows.append(row)
    return rows


#: relay.connections() shows bytes as admin.shell.human_bytes does: "517", "1.5K", "4.1M".
HUMAN_BYTES = re.compile(r"(\d+(?:\.\d)?)([KMGT]?)")


def _shown_bytes(text: str) -> tuple[float, float]:
    """A byte count as the table shows it: (value, how far off the rounding may be)."""
    m = HUMAN_BYTES.fullmatch(text)
    assert m, f"not a byte count: {text!r}"
    unit = 1024 ** " KMGT".index(m.group(2) or " ")
    return float(m.group(1)) * unit, (0.05 * unit if m.group(2) else 0.0)


def _held_row(admin_keys: AdminKeys, port: int, client: str) -> tuple[str, dict[str, str]]:
    """``relay.connections()`` over ssh, and ``client``'s row, once back-pressure holds its
    backend (the reader stands still; the relay's buffers take a moment to fill)."""
    deadline = time.monotonic() + 15
    while True:
        shown = admin_keys.ssh(port, "relay.connections()")
        assert shown.returncode == 0, shown
        rows = [r for r in _connection_rows(shown.stdout) if r["client"] == client]
        assert len(rows) == 1, shown.stdout
        if rows[0]["paused"] == "backend" or time.monotonic() > deadline:
            return shown.stdout, rows[0]
        time.sleep(0.2)


# ---------------------------------------------------------------- gated downloads


def _read_head(tls: ssl.SSLSocket) -> tuple[int, dict[str, str], bytes]:
    head = bytearray()
    while b"\r\n\r\n" not in head:
        data = tls.recv(65536)
        assert data, f"EOF before the end of the response head: {bytes(head)!r}"
        head += data
    return split_http(bytes(head))


class GatedDownload:
    """``GET /blob?size=SIZE&seed=SEED`` through the relay, read on a thread that stands
    still (reads nothing) once the body reaches each of ``stops`` until :meth:`release`.

    Afterwards: ``received`` body bytes, ``complete`` (all of Content-Length with the
    backend's sha256), ``error`` (what ended the read early, if anything).
    """

    def __init__(
        self,
        relay: Relay,
        ca: TestCA,
        name: str,
        size: int,
        seed: int,
        stops: Sequence[int] = (),
        *,
        listener: str | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        self.size = size
        self.stops = sorted(stops)
        self._reached = [threading.Event() for _ in self.stops]
        self._released = [threading.Event() for _ in self.stops]
        self.received = 0
        self.complete = False
        self.error: BaseException | None = None
        self.headers: dict[str, str] = {}
        self.ended_at: float | None = None
        sock = relay.connect(timeout=30, rcvbuf=rcvbuf, listener=listener)
        self.local = sock.getsockname()
        try:
            self.tls = ca.client_context().wrap_socket(sock, server_hostname=name)
        except BaseException:
            sock.close()
            raise
        try:
            http_get(self.tls, name, f"/blob?size={size}&seed={seed}")
        except BaseException:
            self.tls.close()
            raise
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        count = 0
        try:
            status, self.headers, first = _read_head(self.tls)
            assert status == 200 and int(self.headers["content-length"]) == self.size
            digest = hashlib.sha256(first)
            count = len(first)
            buf = bytearray(1 << 20)
            view = memoryview(buf)
            stop = 0
            while True:
                while stop < len(self.stops) and count >= self.stops[stop]:
                    self._reached[stop].set()
                    if not self._released[stop].wait(GATE_TIMEOUT):
                        raise TimeoutError(f"stop {stop} was never released")
                    stop += 1
                room = len(buf) if stop == len(self.stops) else self.stops[stop] - count
                n = self.tls.recv_into(buf, min(len(buf), room))
                if not n:
                    break
                digest.update(view[:n])
                count += n
            self.complete = count == self.size and digest.hexdigest() == self.headers["x-sha256"]
        except BaseException as e:  # recorded for the test to judge
            self.error = e
        finally:
            self.received = count
            self.ended_at = time.monotonic()
            # Done, as a client of a Connection: close response is: close our side too.
            with contextlib.suppress(OSError):
                self.tls.close()
            for event in self._reached:
                event.set()  # nobody waits for a stop that will never come

    def wait_stop(self, index: int, timeout: float = 30.0) -> None:
        """Wait until the reader stands still at stop ``index``."""
        assert self._reached[index].wait(timeout), f"stop {index} not reached in {timeout}s"
        assert self.error is None, f"the download failed before stop {index}: {self.error!r}"

    def release(self, index: int) -> None:
        self._released[index].set()

    def finish(self, timeout: float = 60.0) -> None:
        """Let it run to its end (every stop released) and wait for that."""
        for event in self._released:
            event.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the download did not end within {timeout}s"

    def close(self) -> None:
        """Stop it, whatever its state (the TLS socket owns the descriptor now)."""
        for event in self._released:
            event.set()
        if self._thread.is_alive():
            with contextlib.suppress(OSError):
                self.tls.shutdown(socket.SHUT_RDWR)  # wakes a blocked read
        self._thread.join(10)
        self.tls.close()


@contextlib.contextmanager
def _gated(*args: Any, **kwargs: Any) -> Iterator[GatedDownload]:
    download = GatedDownload(*args, **kwargs)
    try:
        yield download
    finally:
        download.close()


def _assert_cut(download: GatedDownload) -> None:
    """The transfer ended early: EOF or a reset before Content-Length."""
    assert not download.complete, "the transfer completed; it should have been cut"
    assert download.received < download.size, download.received
    assert download.error is None or isinstance(download.error, ConnectionError | ssl.SSLError), (
        repr(download.error)
    )


def _get_name(relay: Relay, ca: TestCA, name: str, listener: str | None = None) -> bytes:
    """GET /name over TLS through the relay; the body."""
    with (
        relay.connect(timeout=10, listener=listener) as raw,
        ca.client_context().wrap_socket(raw, server_hostname=name) as tls,
    ):
        http_get(tls, name, "/name")
        status, _, body = split_http(read_response(tls, timeout=10))
    assert status == 200, (name, status, body)
    return body


def _tls_alert(relay: Relay, name: str, listener: str | None = None) -> tuple[int | None, str]:
    """Send a real ClientHello for ``name``; the alert the relay answers with, and our address."""
    with relay.connect(timeout=10, listener=listener) as sock:
        local = _address(sock.getsockname())
        sock.sendall(client_hello_bytes(name))
        received = recv_to_eof(sock, timeout=10)
    return alert_description(received), local


def _assert_refused_not_allowed(relay: Relay, name: str, listener: str | None = None) -> None:
    alert, local = _tls_alert(relay, name, listener)
    assert alert == ALERT_UNRECOGNIZED_NAME, f"{name} on {listener}: alert {alert}"
    entry = relay.wait_access(lambda e: e.get("client") == local)[0]
    assert entry["close_reason"] == "refused:not_allowed", str(entry)


# ---------------------------------------------------------------- a terminal


class PtySession:
    """A command on a pseudo-terminal of its own, typed at as a person would."""

    def __init__(self, args: Sequence[str], home: Path) -> None:
        master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(
                list(args),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env={**clean_env(home), "TERM": "xterm"},
                cwd=home,
                start_new_session=True,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        self.raw = bytearray()
        self._matched = 0
        self._eof = False

    def text(self) -> str:
        """Everything shown so far, without the terminal's control sequences."""
        return ESCAPES.sub("", self.raw.decode("utf-8", "replace"))

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], max(0.0, timeout))
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the other side of the terminal is closed
                data = b""
            if data:
                self.raw += data
            else:
                self._eof = True

    def expect(self, pattern: str, timeout: float = 10.0) -> str:
        """Read until ``pattern`` shows (after the previous match); the text up to it."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            m = compiled.search(text, self._matched)
            if m:
                start, self._matched = self._matched, m.end()
                return text[start : m.end()]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._eof:
                raise AssertionError(f"{pattern!r} not shown within {timeout}s; screen:\n{text}")
            self._read(min(remaining, 0.2))

    def wait(self, timeout: float) -> int:
        """The exit status, reading the terminal meanwhile."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"still running after {timeout}s; screen:\n{self.text()}")
            self._read(0.1)
        return self.proc.returncode

    def close(self) -> None:
        stop_process(self.proc)
        os.close(self.master)


# ---------------------------------------------------------------- metrics


class Scrape:
    """One GET /metrics with a plain HTTP client, parsed by prometheus_client."""

    def __init__(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert response.status == 200, (response.status, body[:200])
        self.text = body.decode()
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in self.families.values():
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: v for (sample, labels), v in self.samples.items() if sample == name}


def _moved(before: Scrape, after: Scrape, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """How each series of ``name`` moved between two scrapes (unchanged ones left out)."""
    old, new = before.series(name), after.series(name)
    moved = {}
    for labels in old.keys() | new.keys():
        delta = new.get(labels, 0.0) - old.get(labels, 0.0)
        if delta:
            moved[tuple(sorted(labels))] = delta
    return moved


# ================================================================ 1. the SSH admin shell


def test_ssh_command_lists_a_live_transfer_and_kill_cuts_it(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """``ssh admin@relay 'relay.connections()'`` shows a live download (id, target,
    splicing, its bytes each way growing as the client reads, and its backend paused while
    the reader stands still) and ``relay.kill(ID)`` cuts it: the client gets less than
    Content-Length and the access log says killed; ``relay.reload()`` prints what changed
    and applies it; an expression that raises makes ssh exit 1."""
    admin = admin_keys.admin(tmp_path / "state" / "host_key")
    relay = start_relay(_routes(backend), admin=admin)
    assert relay.ssh_port is not None
    stops = [4 * MiB, 16 * MiB]
    with _gated(relay, test_ca, BUCKET, 256 * MiB, 71, stops, rcvbuf=64 * 1024) as download:
        client = _address(download.local)
        download.wait_stop(0)
        shown, row = _held_row(admin_keys, relay.ssh_port, client)
        print(f"\nrelay.connections() over ssh:\n{shown}")
        assert row["target"] == f"{BUCKET}:443" and row["route"] == BUCKET, row
        assert row["door"] == "tls" and row["state"] == "splicing", row
        assert row["backend"] == f"127.0.0.1:{backend.ports[BUCKET]}", row
        assert row["paused"] == "backend", f"the reader stands still: {row}"
        assert shown.endswith("1 connection(s)\n"), shown
        # DOWN counts TLS records, so at least the body the client has read.
        down, off = _shown_bytes(row["down"])
        assert down + off >= stops[0], row

        # The reader moves on by 12 MiB and stands still again: DOWN grew, past what the
        # client has now read. (By how much depends on how much the kernel buffers: the
        # relay's send buffer sizes itself.)
        download.release(0)
        download.wait_stop(1)
        later, again = _held_row(admin_keys, relay.ssh_port, client)
        assert again["id"] == row["id"] and again["paused"] == "backend", later
        down_later, off_later = _shown_bytes(again["down"])
        print(f"DOWN {row['down']} then {again['down']}; UP {row['up']} then {again['up']}")
        assert down_later + off_later >= stops[1], again
        assert down_later - off_later > down + off, (row, again)

        killed = admin_keys.ssh(relay.ssh_port, f"relay.kill({row['id']})")
        assert killed.returncode == 0, killed
        assert killed.stdout == f"killed {row['id']} ({client} -> {BUCKET}:443)\n", killed.stdout
        download.finish(timeout=20)
    _assert_cut(download)
    print(f"killed after {download.received / MiB:.1f} of {download.size / MiB:.0f} MiB")

    entry = relay.access_for(download.local)
    assert entry["close_reason"] == "killed" and entry["closed_first"] == "relay", str(entry)
    assert entry["id"] == int(row["id"]), str(entry)
    # UP was the ClientHello, the rest of the handshake and the request: all sent before the
    # first listing, so it shows what the access log counted, and at least the hello.
    up, off = _shown_bytes(row["up"])
    assert again["up"] == row["up"], (row, again)
    assert up + off >= entry["hello_bytes"] > 0, (row, entry)
    assert abs(up - entry["bytes_up"]) <= off, (row, entry)
    assert down_later - off_later <= entry["bytes_down"], (again, entry)

    after = admin_keys.ssh(relay.ssh_port, "relay.connections()")
    assert (after.returncode, after.stdout) == (0, "0 connection(s)\n"), after
    raised = admin_keys.ssh(relay.ssh_port, "relay.kill()")
    assert raised.returncode == 1 and "TypeError" in raised.stdout, raised

    # relay.reload() typed over ssh: the summary, then the route is gone for new connections.
    relay.write_config(_routes(backend, [REGISTRY, BUCKET]), admin=admin)
    reloaded = admin_keys.ssh(relay.ssh_port, "relay.reload()")
    print(f"relay.reload() over ssh: {reloaded.stdout.strip()}")
    assert reloaded.returncode == 0, reloaded
    assert reloaded.stdout == (
        f"reloaded {relay.config_path}: routes +0 -1 ~0 (now 2); listeners +0 -0; "
        f"removed: {DOCKERAUTH}\n"
    ), reloaded.stdout
    _assert_refused_not_allowed(relay, DOCKERAUTH)
    assert _get_name(relay, test_ca, REGISTRY) == f"backend={REGISTRY}\n".encode()
    stats = admin_keys.ssh(relay.ssh_port, "relay.stats()")
    assert "reloads       1 ok, 0 failed" in stats.stdout, stats


def test_interactive_manhole_on_a_pty_lists_and_kills(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """Through ``ssh -tt`` on a terminal, typing ``relay.connections()`` shows the live
    download's row and ``relay.kill(ID)`` cuts it; Ctrl-D ends the session."""
    relay = start_relay(_routes(backend), admin=admin_keys.admin(tmp_path / "state" / "host_key"))
    assert relay.ssh_port is not None
    command = [*admin_keys.ssh_args(relay.ssh_port), "-tt", "admin@127.0.0.1"]
    with _gated(relay, test_ca, BUCKET, 256 * MiB, 72, [4 * MiB], rcvbuf=64 * 1024) as download:
        download.wait_stop(0)
        # Wait (over a plain ssh command) until back-pressure holds the backend, so the table
        # typed below has settled.
        _, held = _held_row(admin_keys, relay.ssh_port, _address(download.local))
        assert held["paused"] == "backend", held
        session = PtySession(command, admin_keys.home)
        try:
            session.expect(">>> ", timeout=15)
            session.send("relay.connections()\r")
            table = session.expect(r"\n\d+ connection\(s\)\n", timeout=10)
            print(f"\nrelay.connections() typed at the manhole:\n{table}")
            rows = [r for r in _connection_rows(table) if r["client"] == _address(download.local)]
            assert len(rows) == 1, table
            row = rows[0]
            assert row["target"] == f"{BUCKET}:443" and row["state"] == "splicing", row
            assert row["paused"] == "backend" and row["down"] == held["down"], (row, held)
            down, off = _shown_bytes(row["down"])
            assert down + off >= 4 * MiB, row
            session.expect(">>> ", timeout=10)
            session.send(f"relay.kill({row['id']})\r")
            session.expect(rf"killed {row['id']} \({re.escape(_address(download.local))} -> ")
            session.expect(">>> ", timeout=10)
            download.finish(timeout=20)
            session.send("\x04")
            session.wait(timeout=10)
        finally:
            session.close()
    _assert_cut(download)
    entry = relay.access_for(download.local)
    assert entry["close_reason"] == "killed" and entry["id"] == int(row["id"]), str(entry)
    up, off = _shown_bytes(row["up"])
    assert up + off >= entry["hello_bytes"] > 0 and abs(up - entry["bytes_up"]) <= off, (
        row,
        entry,
    )


def test_interactive_manhole_exits_0_on_ctrl_d(
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """Ctrl-D at the manhole's prompt is a clean logout: ssh exits 0, as after any shell."""
    relay = start_relay(_routes(backend), admin=admin_keys.admin(tmp_path / "state" / "host_key"))
    assert relay.ssh_port is not None
    command = [*admin_keys.ssh_args(relay.ssh_port), "-v", "-tt", "admin@127.0.0.1"]
    session = PtySession(command, admin_keys.home)
    try:
        session.expect(">>> ", timeout=15)
        session.send("\x04")
        status = session.wait(timeout=10)
    finally:
        session.close()
    said = [line for line in session.text().splitlines() if "Exit status" in line]
    assert status == 0, f"ssh exited {status} after Ctrl-D ({said}): no exit-status was sent"


def test_ssh_refuses_a_wrong_key_another_user_and_passwords(
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """A key not in authorized_keys, the right key for another user, and password or
    keyboard-interactive logins are refused (ssh exits 255): the server offers publickey
    alone."""
    relay = start_relay(_routes(backend), admin=admin_keys.admin(tmp_path / "state" / "host_key"))
    port = relay.ssh_port
    assert port is not None

    wrong_key = admin_keys.ssh(port, "relay.stats()", identity=admin_keys.bad)
    assert wrong_key.returncode == 255, wrong_key
    assert "admin@127.0.0.1: Permission denied (publickey)." in wrong_key.stderr, wrong_key
    assert wrong_key.stdout == ""

    other_user = admin_keys.ssh(port, "relay.stats()", user="root")
    assert other_user.returncode == 255, other_user
    assert "Permission denied (publickey)." in other_user.stderr, other_user

    password = admin_keys.ssh(
        port,
        "relay.stats()",
        options=[
            "-v",
            "-o",
            "PreferredAuthentications=password,keyboard-interactive",
            "-o",
            "PubkeyAuthentication=no",
        ],
    )
    assert password.returncode == 255, password
    offered = [line for line in password.stderr.splitlines() if "can continue:" in line]
    print(f"\nwhat the server offers: {offered}")
    assert offered == ["debug1: Authentications that can continue: publickey"], password.stderr
    assert "No more authentication methods to try." in password.stderr, password.stderr
    assert "Permission denied (publickey)." in password.stderr, password.stderr
    assert password.stdout == ""

    # The same client with the authorized key gets in: the refusals were about the key.
    good = admin_keys.ssh(port, "relay.stats()")
    assert good.returncode == 0 and good.stdout.startswith("accepted "), good


def _fingerprints(path: Path, home: Path) -> set[str]:
    listed = run(["ssh-keygen", "-l", "-f", str(path)], home)
    assert listed.returncode == 0, listed
    return {line.split()[1] for line in listed.stdout.splitlines() if line.strip()}


def test_ssh_host_key_is_made_0600_at_first_start_and_reused(
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """The first start creates the host key (Ed25519, mode 0600, its directory too); a
    second start reuses it, so ssh sees the same fingerprint; a key others can read is
    refused at start."""
    host_key = tmp_path / "state" / "ssh_host_ed25519_key"
    assert not host_key.parent.exists()
    routes = _routes(backend)
    first = start_relay(routes, admin=admin_keys.admin(host_key))
    assert first.ssh_port is not None
    assert host_key.stat().st_mode & 0o777 == 0o600, oct(host_key.stat().st_mode)
    created = host_key.read_bytes()
    assert created.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"), created[:40]
    known_first = tmp_path / "known_hosts_first"
    login = admin_keys.ssh(first.ssh_port, "relay.stats()", known_hosts=known_first)
    assert login.returncode == 0, login
    first.stop()

    second = start_relay(routes, admin=admin_keys.admin(host_key))
    assert second.ssh_port is not None and second.ssh_port != first.ssh_port
    known_second = tmp_path / "known_hosts_second"
    login = admin_keys.ssh(second.ssh_port, "relay.stats()", known_hosts=known_second)
    assert login.returncode == 0, login
    second.stop()

    on_disk = _fingerprints(host_key, admin_keys.home)
    seen_first = _fingerprints(known_first, admin_keys.home)
    seen_second = _fingerprints(known_second, admin_keys.home)
    print(f"\nhost key {on_disk}; ssh saw {seen_first} then {seen_second}")
    assert len(on_disk) == 1 and seen_first == on_disk and seen_second == on_disk
    assert "ssh-ed25519 " in known_first.read_text()
    assert host_key.read_bytes() == created and host_key.stat().st_mode & 0o777 == 0o600

    host_key.chmod(0o644)
    refused = run(
        [
            str(VENV_BIN / "twist"),
            "--log-format=text",
            "acrrelay",
            "--config",
            str(second.config_path),
        ],
        second.directory,
        timeout=15,
    )
    said = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "readable by others" in said, said
    assert host_key.read_bytes() == created


# ================================================================ 2. reload under load


def test_reload_under_load_adds_and_removes_routes_and_rejects_a_broken_config(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """While a 512 MiB download is in flight, SIGHUPs add a route and a listener, then
    remove a route, then meet broken TOML: each applies to new connections at once, the
    broken one is rejected with the old routes kept, the download ends with the same
    sha256, and stats and metrics count 2 good reloads and 1 failed."""
    admin = admin_keys.admin(tmp_path / "state" / "host_key")
    relay = start_relay(_routes(backend, [REGISTRY, BUCKET]), admin=admin)
    assert relay.metrics_port is not None and relay.ssh_port is not None
    first_listener = {"endpoint": "tcp:0:interface=127.0.0.1", "name": "e2e"}
    second_port = free_port()
    second_listener = {"endpoint": f"tcp:{second_port}:interface=127.0.0.1", "name": "second"}

    # Before: DOCKERAUTH has no route and nothing listens on the second port.
    _assert_refused_not_allowed(relay, DOCKERAUTH)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", second_port), timeout=5).close()

    started = time.monotonic()
    with _gated(relay, test_ca, BUCKET, BIG, 5121, [64 * MiB, 192 * MiB]) as download:
        download.wait_stop(0)

        # 1: add a route and a listener. (The first listener keeps its endpoint string,
        # port 0, so it is the same listener and keeps its port.)
        relay.write_config(
            _routes(backend, [REGISTRY, BUCKET, DOCKERAUTH]),
            listeners=[first_listener, second_listener],
            admin=admin,
        )
        said = relay.reload()
        print(f"\nSIGHUP 1: {said}")
        assert said.startswith("reloaded ") and "routes +1 -0" in said, said
        assert "listeners +1 -0" in said and f"added: {DOCKERAUTH}" in said, said
        relay.ports["second"] = second_port
        for listener in ("e2e", "second"):
            for name in (DOCKERAUTH, REGISTRY):
                assert _get_name(relay, test_ca, name, listener) == f"backend={name}\n".encode()
        assert all(e.get("client") != _address(download.local) for e in relay.access_entries()), (
            "the download ended before the reload"
        )
        download.release(0)
        download.wait_stop(1)

        # 2: remove a route. It is refused from the moment the reload is logged.
        relay.write_config(
            _routes(backend, [BUCKET, DOCKERAUTH]),
            listeners=[first_listener, second_listener],
            admin=admin,
        )
        said = relay.reload()
        print(f"SIGHUP 2: {said}")
        assert said.startswith("reloaded ") and "routes +0 -1" in said, said
        assert f"removed: {REGISTRY}" in said, said
        _assert_refused_not_allowed(relay, REGISTRY)
        _assert_refused_not_allowed(relay, REGISTRY, "second")
        assert _get_name(relay, test_ca, DOCKERAUTH, "second") == f"backend={DOCKERAUTH}\n".encode()

        # 3: broken TOML is rejected; what was in force stays in force.
        relay.config_path.write_text('[relay]\ndrain_timeout = "5s"\n[[route]\nname = \n')
        said = relay.reload()
        print(f"SIGHUP 3: {said}")
        assert said.startswith("reload rejected") and "not valid TOML" in said, said
        for listener in ("e2e", "second"):
            for name in (DOCKERAUTH, BUCKET):
                assert _get_name(relay, test_ca, name, listener) == f"backend={name}\n".encode()
            _assert_refused_not_allowed(relay, REGISTRY, listener)
        table = admin_keys.ssh(relay.ssh_port, "relay.routes()")
        assert table.returncode == 0, table
        shown = sorted(line.split()[0] for line in table.stdout.splitlines()[1:-1])
        assert shown == sorted([BUCKET, DOCKERAUTH]), table.stdout
        assert all(e.get("client") != _address(download.local) for e in relay.access_entries())
        download.finish(timeout=120)
    elapsed = time.monotonic() - started
    print(f"{BIG / MiB:.0f} MiB through 3 reloads in {elapsed:.1f} s")
    assert download.error is None, repr(download.error)
    assert download.received == BIG and download.complete, "the body differs from what was sent"
    entry = relay.access_for(download.local)
    assert entry["close_reason"] == "done" and entry["bytes_down"] >= BIG, str(entry)

    stats = admin_keys.ssh(relay.ssh_port, "relay.stats()")
    assert stats.returncode == 0 and "reloads       2 ok, 1 failed" in stats.stdout, stats
    scrape = Scrape(relay.metrics_port)
    assert scrape.value("acrrelay_reloads_total", result="ok") == 2, scrape.text
    assert scrape.value("acrrelay_reloads_total", result="failed") == 1, scrape.text
    assert relay.alive()


def test_a_listener_removed_by_reload_closes_while_its_transfer_finishes(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
) -> None:
    """A reload that removes a listener closes its port (a new connection there is refused)
    while a download that came in through it before the reload ends with the same sha256;
    the listener kept keeps serving."""
    first = {"endpoint": "tcp:0:interface=127.0.0.1", "name": "e2e"}
    second_port = free_port()
    second = {"endpoint": f"tcp:{second_port}:interface=127.0.0.1", "name": "second"}
    relay = start_relay(_routes(backend), listeners=[first, second])
    assert relay.ports["second"] == second_port
    size = 64 * MiB
    with _gated(relay, test_ca, BUCKET, size, 6401, [8 * MiB], listener="second") as download:
        download.wait_stop(0)
        relay.write_config(_routes(backend), listeners=[first])
        said = relay.reload()
        print(f"\nreload removing a listener: {said}")
        assert said.startswith("reloaded ") and "listeners +0 -1" in said, said
        # The port closes on the reactor's next turn after the reload line.
        _wait_not_listening(second_port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", second_port), timeout=5).close()
        assert _get_name(relay, test_ca, REGISTRY, "e2e") == f"backend={REGISTRY}\n".encode()
        assert all(e.get("client") != _address(download.local) for e in relay.access_entries()), (
            "the download ended before the reload"
        )
        download.finish(timeout=60)
    assert download.error is None, repr(download.error)
    assert download.received == size and download.complete, "the body differs from what was sent"
    entry = relay.access_for(download.local)
    assert entry["listener"] == "second" and entry["close_reason"] == "done", str(entry)


# ================================================================ 3. drain


def test_sigterm_drains_transfers_to_their_end_then_exits_0(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """On SIGTERM the relay stops accepting at once and for good, lets in-flight transfers
    finish (same sha256, logged done) within drain_timeout, and only then exits 0."""
    admin = admin_keys.admin(tmp_path / "state" / "host_key")
    relay = start_relay(_routes(backend), admin=admin, drain_timeout="30s")
    assert relay.metrics_port is not None
    with (
        _gated(relay, test_ca, BUCKET, 32 * MiB, 33, [4 * MiB]) as short,
        _gated(relay, test_ca, BUCKET, 128 * MiB, 129, [8 * MiB]) as long,
    ):
        short.wait_stop(0)
        long.wait_stop(0)
        sent = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        m = relay.output.wait_for(DRAINING, timeout=10)
        assert m.group(1) == "2" and m.group(2) == "30s", m.group(0)

        _wait_not_listening(relay.port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
        scrape = Scrape(relay.metrics_port)
        assert scrape.value("acrrelay_accepting") == 0, scrape.text
        assert sum(scrape.series("acrrelay_connections_active").values()) == 2, scrape.text

        # One ends while the drain goes on: logged as usual, and nothing reopens.
        short.finish(timeout=30)
        assert short.error is None and short.complete, repr(short.error)
        entry = relay.access_for(short.local)
        assert entry["close_reason"] == "done", str(entry)
        scrape = Scrape(relay.metrics_port)
        assert scrape.value("acrrelay_accepting") == 0, scrape.text
        assert sum(scrape.series("acrrelay_connections_active").values()) == 1, scrape.text
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()

        # The other, held still well past the time a drain takes when idle: still there.
        while time.monotonic() - sent < 2.0:
            assert relay.alive(), "the relay exited with a transfer in flight"
            time.sleep(0.1)
        long.finish(timeout=60)
        status = relay.wait_exit(timeout=15)
    exited = time.monotonic()
    print(
        f"\ndrain: last transfer done {long.ended_at - sent:.1f} s after SIGTERM; "
        f"exit {status} seen {exited - sent:.1f} s after"
    )
    assert long.error is None and long.complete, repr(long.error)
    assert DRAINED.search(relay.output.text()), relay.output.text()
    entry = relay.access_for(long.local)
    assert entry["close_reason"] == "done", str(entry)
    _assert_no_traceback(relay)
    assert status == 0, f"exit status {status} after SIGTERM\n{relay.output.text()}"


def test_sigterm_cuts_what_outlasts_a_short_drain_timeout_then_exits_0(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
) -> None:
    """With drain_timeout 2s, a transfer that cannot finish (its reader stands still) is cut
    at the deadline, logged by id and client, recorded as drained, and the relay exits 0;
    no new connection is accepted meanwhile."""
    relay = start_relay(_routes(backend), drain_timeout="2s")
    with _gated(relay, test_ca, BUCKET, 256 * MiB, 257, [1 * MiB], rcvbuf=64 * 1024) as download:
        download.wait_stop(0)
        sent = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        relay.output.wait_for(DRAINING, timeout=10)
        _wait_not_listening(relay.port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
        # That refusal came from a relay still draining, not from one that had gone.
        assert relay.alive() and not CUTTING.search(relay.output.text()), relay.output.text()
        cut = relay.output.wait_for(CUTTING, timeout=10)
        cut_after = time.monotonic() - sent
        status = relay.wait_exit(timeout=15)
        download.finish(timeout=20)
    print(f"\ndrain 2s: {cut.group(0)} {cut_after:.2f} s after SIGTERM; exit {status}")
    assert 1.9 <= cut_after <= 5.0, cut_after
    assert cut.group(2) == _address(download.local) and cut.group(3) == f"{BUCKET}:443", cut
    _assert_cut(download)
    entry = relay.access_for(download.local)
    assert entry["close_reason"] == "drained" and entry["id"] == int(cut.group(1)), str(entry)
    assert len(relay.access_entries()) == 1, relay.access_entries()
    _assert_no_traceback(relay)
    assert status == 0, f"exit status {status} after SIGTERM\n{relay.output.text()}"


#: A connection cut by a second stop signal while draining (see drain.cut_all).
CUTTING_NOW = re.compile(r"cutting now: (\d+) (\S+) -> (\S+) \(")


def test_a_second_sigterm_while_draining_cuts_at_once_then_exits_0(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
) -> None:
    """With a long drain_timeout, a second SIGTERM during the drain cuts the stalled
    transfer at once (logged by id and client, recorded as drained), and the relay exits 0
    long before the deadline."""
    relay = start_relay(_routes(backend), drain_timeout="10m")
    with _gated(relay, test_ca, BUCKET, 256 * MiB, 257, [1 * MiB], rcvbuf=64 * 1024) as download:
        download.wait_stop(0)
        relay.proc.send_signal(signal.SIGTERM)
        relay.output.wait_for(DRAINING, timeout=10)
        assert relay.alive() and not CUTTING_NOW.search(relay.output.text())
        sent = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        cut = relay.output.wait_for(CUTTING_NOW, timeout=10)
        status = relay.wait_exit(timeout=15)
        exited_after = time.monotonic() - sent
        download.finish(timeout=20)
    print(f"\nsecond SIGTERM: {cut.group(0)} exit {status} {exited_after:.2f} s after it")
    assert cut.group(2) == _address(download.local) and cut.group(3) == f"{BUCKET}:443", cut
    _assert_cut(download)
    entry = relay.access_for(download.local)
    assert entry["close_reason"] == "drained" and entry["id"] == int(cut.group(1)), str(entry)
    _assert_no_traceback(relay)
    assert status == 0, f"exit status {status} after two SIGTERMs\n{relay.output.text()}"


def _assert_no_traceback(relay: Relay) -> None:
    output = relay.output.text()
    assert "Traceback" not in output and "Unhandled Error" not in output, output


def _wait_not_listening(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while port in listening_ports():
        assert time.monotonic() < deadline, f"port {port} still listening after {timeout}s"
        time.sleep(0.02)


# ================================================================ 4. metrics


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _download(relay: Relay, ca: TestCA, name: str, size: int, seed: int) -> str:
    with _gated(relay, ca, name, size, seed) as download:
        download.finish(timeout=30)
    assert download.error is None and download.complete, repr(download.error)
    return _address(download.local)


def _plain(relay: Relay, host: str) -> tuple[bytes, str]:
    with relay.connect(timeout=10) as sock:
        local = _address(sock.getsockname())
        sock.sendall(f"GET /name HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return recv_to_eof(sock, timeout=10), local


def test_metrics_move_by_exactly_what_was_done(
    test_ca: TestCA,
    backend: BackendServer,
    start_relay: Callable[..., Relay],
    admin_keys: AdminKeys,
    tmp_path: Path,
) -> None:
    """After 4 downloads through 2 routes and 2 front doors, 2 unknown names and 1 refused
    backend, /metrics moved by exactly that: connections by route pattern and front door,
    refusals and backend failures by reason, bytes and ClientHello sizes as in the access
    log, and nothing left active."""
    oss = "*.oss-cn-beijing.aliyuncs.com"
    refused_name = "refused.e2e.test"
    relay = start_relay(
        {
            REGISTRY: backend.backend(REGISTRY),
            oss: backend.backend(BUCKET),
            refused_name: f"tcp:host=127.0.0.1:port={_closed_port()}",
        },
        listeners=[
            {"endpoint": "tcp:0:interface=127.0.0.1", "name": "e2e", "protocols": ["tls", "http"]}
        ],
        admin=admin_keys.admin(tmp_path / "state" / "host_key"),
    )
    assert relay.metrics_port is not None
    before = Scrape(relay.metrics_port)

    clients = [_download(relay, test_ca, BUCKET, 3 * MiB, 31)]
    with _gated(relay, test_ca, BUCKET, 24 * MiB, 24, [1 * MiB], rcvbuf=64 * 1024) as held:
        held.wait_stop(0)
        time.sleep(0.5)  # the relay holds the backend back meanwhile
        during = Scrape(relay.metrics_port)
        held.finish(timeout=30)
    assert held.error is None and held.complete, repr(held.error)
    clients.append(_address(held.local))
    clients.append(_download(relay, test_ca, REGISTRY, 2 * MiB, 21))
    response, local = _plain(relay, REGISTRY)
    assert split_http(response)[2] == f"backend={REGISTRY}\n".encode(), response
    clients.append(local)

    alert, local = _tls_alert(relay, "unknown-1.e2e.test")
    assert alert == ALERT_UNRECOGNIZED_NAME
    clients.append(local)
    response, local = _plain(relay, "unknown-2.e2e.test")
    assert response.startswith(b"HTTP/1.1 403 "), response
    clients.append(local)
    alert, local = _tls_alert(relay, refused_name)
    assert alert == ALERT_INTERNAL_ERROR
    clients.append(local)

    entries = relay.wait_access(lambda e: e.get("client") in clients, count=len(clients))
    assert len(entries) == len(clients) == 7, entries
    after = Scrape(relay.metrics_port)

    active = {k: v for k, v in during.series("acrrelay_connections_active").items() if v}
    assert active == {frozenset({("route", oss), ("front_door", "tls")}): 1}, during.text
    assert not any(after.series("acrrelay_connections_active").values()), after.text

    routed = _moved(before, after, "acrrelay_connections_total")
    print(f"\nconnections_total moved: {routed}")
    assert routed == {
        (("front_door", "tls"), ("route", oss)): 2,
        (("front_door", "tls"), ("route", REGISTRY)): 1,
        (("front_door", "http"), ("route", REGISTRY)): 1,
        (("front_door", "tls"), ("route", refused_name)): 1,
    }, after.text
    assert _moved(before, after, "acrrelay_refusals_total") == {(("reason", "not_allowed"),): 2}, (
        after.text
    )
    assert _moved(before, after, "acrrelay_backend_failures_total") == {
        (("reason", "connect_failed"),): 1
    }, after.text

    logged: collections.Counter[tuple[tuple[str, str], ...]] = collections.Counter()
    for entry in entries:
        for direction in ("up", "down"):
            if entry.get("route") and entry.get(f"bytes_{direction}"):
                key = (("direction", direction), ("route", entry["route"]))
                logged[key] += entry[f"bytes_{direction}"]
    moved_bytes = _moved(before, after, "acrrelay_bytes_total")
    print(f"bytes_total moved: {moved_bytes}")
    assert moved_bytes == dict(logged), (moved_bytes, logged)
    assert moved_bytes[(("direction", "down"), ("route", oss))] >= 27 * MiB

    hellos = [e["hello_bytes"] for e in entries if "hello_bytes" in e]
    assert len(hellos) == 5, entries
    count = after.value("acrrelay_client_hello_bytes_count") - before.value(
        "acrrelay_client_hello_bytes_count"
    )
    total = after.value("acrrelay_client_hello_bytes_sum") - before.value(
        "acrrelay_client_hello_bytes_sum"
    )
    print(f"client_hello_bytes: count +{count:g}, sum +{total:g}; access log {sum(hellos)}")
    assert (count, total) == (5, sum(hellos)), after.text
    assert after.value("acrrelay_client_hello_bytes_bucket", le="+Inf") == count

    peeked = _moved(before, after, "acrrelay_peek_seconds_count")
    assert peeked == {(("front_door", "tls"),): 5, (("front_door", "http"),): 2}, peeked
    connected = _moved(before, after, "acrrelay_connect_seconds_count")
    assert connected == {(("route", oss),): 2, (("route", REGISTRY),): 2}, connected

    assert "acrrelay_backpressure_seconds" in after.families, after.text
    for direction in ("up", "down"):
        waited = after.value("acrrelay_backpressure_seconds_total", direction=direction)
        logged_ms = sum(e.get(f"paused_{direction}_ms", 0) for e in entries)
        print(f"backpressure {direction}: {waited:.3f} s; access log {logged_ms / 1000:.3f} s")
        assert abs(waited - logged_ms / 1000) < 0.01, (direction, waited, logged_ms)
    assert after.value("acrrelay_backpressure_seconds_total", direction="down") > 0.2
    assert after.value("acrrelay_accepting") == 1
    assert after.value("acrrelay_reloads_total", result="ok") == 0


# ================================================================ 5. systemd


def _unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def _seconds(timespan: str, home: Path) -> float:
    """A systemd time span in seconds, as systemd itself reads it."""
    parsed = run(["systemd-analyze", "timespan", timespan], home)
    assert parsed.returncode == 0, parsed
    micro = re.search(r"μs: (\d+)", parsed.stdout)
    assert micro, parsed.stdout
    return int(micro.group(1)) / 1e6


def test_systemd_unit_verifies_cleanly_and_asks_for_what_operating_needs(
    home: Path, tmp_path: Path
) -> None:
    """``systemd-analyze verify`` passes the unit with no warning at all, and the unit runs as
    a non-root user with only CAP_NET_BIND_SERVICE, restarts on failure, reloads by SIGHUP
    and gives a drain more time than the example config's drain_timeout."""
    source = (REPO / "etc" / "acrrelay.service").read_text()
    assert "/opt/acrrelay/bin/twist " in source
    unit = tmp_path / "acrrelay.service"
    unit.write_text(source.replace("/opt/acrrelay/bin/twist ", f"{VENV_BIN / 'twist'} "))
    verified = run(["systemd-analyze", "verify", str(unit)], home, timeout=60)
    print(f"\nsystemd-analyze verify: exit {verified.returncode}, stderr {verified.stderr!r}")
    assert verified.returncode == 0, verified
    assert verified.stderr == "", verified.stderr

    service = dict(_unit(source)["Service"])
    assert service.get("User") not in (None, "", "root", "0"), service
    assert service.get("AmbientCapabilities") == "CAP_NET_BIND_SERVICE", service
    assert service.get("Restart") == "on-failure", service
    reload_command = service.get("ExecReload", "").split()
    assert reload_command[:2] in (["/bin/kill", "-HUP"], ["/usr/bin/kill", "-HUP"]), reload_command
    assert reload_command[2:] == ["$MAINPID"], reload_command
    assert service.get("KillSignal", "SIGTERM") in ("SIGTERM", "SIGINT"), service

    example = load_config(str(REPO / "etc" / "acrrelay.toml"))
    stop_after = _seconds(service["TimeoutStopSec"], home)
    print(f"TimeoutStopSec {stop_after:g} s; example drain_timeout {example.drain_timeout:g} s")
    assert stop_after > example.drain_timeout, (stop_after, example.drain_timeout)
