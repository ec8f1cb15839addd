"""Helpers for the end-to-end tests: real sockets, real peers, loopback only.

- :class:`TestCA`: a root CA and one leaf certificate per name (SAN = DNS name), on disk.
- :class:`BackendServer`: ``tests/tls_backend.py`` as its own process, one TLS port per name.
- :class:`Relay`: ``twist acrrelay --config <tmp>.toml`` as its own process, port 0; any
  number of listeners, any route keys, static resolver hosts, a file-descriptor limit and
  the admin listeners; its config can be rewritten and reloaded (SIGHUP).
- :class:`AdminKeys`: throw-away SSH keys and OpenSSH's client, without any user config.
- :class:`BioTLS`: a TLS client driven through memory BIOs over a blocking socket, so a
  test controls the raw bytes (first flight byte by byte, re-framed, a TCP-only FIN).
- :func:`rss_bytes`, :func:`fd_count`: a process's resident set size and open file
  descriptors, from ``/proc``.
- :func:`silent_listener`: a loopback port that drops SYNs (a black-holed backend);
  :func:`netns_socket`: a socket that lives in another network namespace.

The fixtures are in ``tests.e2e_fixtures`` (test modules name it in ``pytest_plugins``).
Every process started here is stopped by its PID in a fixture finaliser, whatever the
outcome of the test.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import queue
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from acrrelay.testing import client_hello_bytes

HERE = Path(__file__).resolve().parent
BACKEND_SCRIPT = HERE / "tls_backend.py"
VENV_BIN = Path(sys.executable).parent

#: The names the TLS backend serves, each with its own certificate and port.
NAMES = (
    "registry.cn-beijing.aliyuncs.com",
    "dockerauth.cn-beijing.aliyuncs.com",
    "bucket.oss-cn-beijing.aliyuncs.com",
)
REGISTRY, DOCKERAUTH, BUCKET = NAMES

#: Names the front-door tests add (``.test`` is reserved: never in real DNS).
WILD_NAME = "a.wild.e2e.test"  # served by the route *.wild.e2e.test
OPEN_LOOPBACK = "open-loopback.e2e.test"  # resolve -> 127.0.0.1, allowed by allow_addresses
PROXIED_V1 = "proxied-v1.e2e.test"  # routes that send a PROXY header to their backend
PROXIED_V2 = "proxied-v2.e2e.test"
FRONTDOOR_NAMES = (REGISTRY, DOCKERAUTH, WILD_NAME, OPEN_LOOPBACK, PROXIED_V1, PROXIED_V2)

MiB = 1 << 20
#: How long a process may take to say it is ready. Each wait ends at the line, so this
#: costs nothing when all is well; on a busy 2-core machine, ``twist acrrelay`` alone has
#: taken over 10 s to print its first line (issue 12's load runs).
STARTUP_TIMEOUT = 60.0
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(")
#: Any IPv4 address: a listener may be on a network namespace's veth (registry_world.py).
LISTENING_NAMED = re.compile(r"listening on (?:\d{1,3}(?:\.\d{1,3}){3}):(\d+) \((.*?)\) with ")
#: What the backend prints for each accepted connection, each request head it reads and
#: each connection it has closed (name, then the connecting side's ip:port).
BACKEND_ACCEPT = re.compile(r"^ACCEPT (\S+) (\S+)$")
BACKEND_REQUEST = re.compile(r"^REQUEST (\S+) (\S+) (tls|plain) (\S*) (\S*) (.*)$")
BACKEND_CLOSED = re.compile(r"^CLOSED (\S+) (\S+)$")
#: The source address of :meth:`BackendServer.sync`'s barrier connections (Linux answers
#: on all of 127.0.0.0/8); nothing else connects to a backend from it, so its accepts are
#: told apart from the relay's by address alone, whatever ports the kernel reuses.
SYNC_SOURCE = "127.0.0.86"
#: How long a test waits for an event a backend reports: generous, as the machine is shared.
EVENT_TIMEOUT = 30.0
#: The relay's start-up lines for its admin listeners, and its reload outcomes.
ADMIN_SHELL = re.compile(r"admin shell on 127\.0\.0\.1:(\d+): ")
METRICS_PAGE = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
RELOAD_OUTCOME = re.compile(r"\] ((?:reloaded |reload rejected).*)$")
SSH = "/usr/bin/ssh"


def clean_env(home: Path) -> dict[str, str]:
    """The whole environment of every subprocess: nothing inherited but PATH."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "LANG": "C.UTF-8"}


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            assert unit == "kB", line
            return int(value) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    """How many file descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
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


_CLONE_NEWNET = 0x40000000


def netns_socket(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket created inside the network namespace ``netns`` (``ip netns`` name).

    A socket stays in the namespace it was made in, whichever thread uses it later, and
    a thread can switch its own network namespace alone: a throw-away thread enters the
    namespace, makes the socket and ends, and the test process stays where it was.
    """
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            with open(f"/var/run/netns/{netns}", "rb") as handle:
                if libc.setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
            made.append(socket.socket(family, socket.SOCK_STREAM))
        except BaseException as e:
            made.append(e)

    thread = threading.Thread(target=make, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert made, f"no socket made in {netns} within 10s"
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


# ---------------------------------------------------------------- certificates


class TestCA:
    """A throw-away root CA and one leaf certificate per name, written to ``directory``.

    Files: ``ca.pem``; ``NAME.pem`` (leaf then root) and ``NAME.key`` for each name.
    """

    __test__ = False  # not a test class, whatever its name

    def __init__(self, directory: Path, names: tuple[str, ...]) -> None:
        self.directory = directory
        self.names = names
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self._not_before = now - datetime.timedelta(hours=1)
        self._not_after = now + datetime.timedelta(days=2)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acrrelay e2e test CA")])
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_file = directory / "ca.pem"
        self.ca_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        for name in names:
            self._issue(name)

    def _issue(self, name: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self._not_before)
            .not_valid_after(self._not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self._cert.public_bytes(
            serialization.Encoding.PEM
        )
        (self.directory / f"{name}.pem").write_bytes(chain)
        (self.directory / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
        return context


# ---------------------------------------------------------------- processes


class _Output:
    """Drains a process's stdout on a thread (so the pipe never fills) and keeps the lines.

    ``lines`` lags what the process has written by however long this thread waits for a
    CPU: a test that needs a line waits for it (:meth:`wait_line`), never reads a count
    off ``lines`` right after the event it is about."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        self._thread.start()

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
            self._queue.put(line)
        with self._changed:
            self._ended = True
            self._changed.notify_all()
        self._queue.put(None)

    def wait_line(
        self, predicate: Callable[[str], object], start: int = 0, timeout: float = EVENT_TIMEOUT
    ) -> int:
        """The index of the first line at or after ``start`` that ``predicate`` accepts,
        waiting for it if need be; fail after ``timeout`` or at the end of the output."""
        deadline = time.monotonic() + timeout
        index = start
        with self._changed:
            while True:
                while index < len(self.lines):
                    if predicate(self.lines[index]):
                        return index
                    index += 1
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    break
                self._changed.wait(remaining)
        raise AssertionError(
            f"no such line (from line {start}) within {timeout}s"
            f"{' before the output ended' if self._ended else ''}; output:\n" + self.text()
        )

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first line (from now on) matching ``pattern``; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            m = pattern.search(line)
            if m:
                return m
        raise AssertionError(
            f"no line matching {pattern.pattern!r} within {timeout}s; output:\n" + self.text()
        )

    def text(self) -> str:
        return "\n".join(self.lines)


class BackendServer:
    """``tests/tls_backend.py`` in its own process: one port per name of ``ca``, serving TLS
    with that name's certificate, or plain HTTP when the first byte is not TLS."""

    def __init__(self, ca: TestCA, home: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(BACKEND_SCRIPT), str(ca.directory), *ca.names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(home),
            cwd=home,
        )
        self.output = _Output(self.proc)
        try:
            ready = self.output.wait_for(re.compile(r"^READY (.*)$"), STARTUP_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        self.ports: dict[str, int] = {}
        for item in ready.group(1).split():
            name, _, port = item.partition("=")
            self.ports[name] = int(port)
        assert set(self.ports) == set(ca.names), ready.group(0)

    def backend(self, name: str) -> str:
        """The relay's endpoint string for ``name``'s backend."""
        return f"tcp:host=127.0.0.1:port={self.ports[name]}"

    def sync(self, timeout: float = EVENT_TIMEOUT) -> int:
        """Wait until every connection to any of the backend's ports that was established
        before this call, and every line the backend printed before it, is in the output;
        return how many lines there were then.

        A barrier per port: connect from :data:`SYNC_SOURCE` and wait for the backend's
        ``ACCEPT`` of exactly that connection. One thread per port accepts in the kernel's
        queue order and reports each accept before taking the next (and stdout is one
        ordered pipe), so every connection queued ahead of the barrier was reported
        before it. This is what makes :meth:`accepted` and :meth:`requests` exact right
        after the event they count, however late the output's reader thread runs."""
        start = len(self.output.lines)
        barriers: list[socket.socket] = []
        try:
            wanted = []
            for name, port in self.ports.items():
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                barriers.append(sock)
                sock.settimeout(timeout)
                sock.bind((SYNC_SOURCE, 0))
                sock.connect(("127.0.0.1", port))
                host, source_port = sock.getsockname()[:2]
                wanted.append(f"ACCEPT {name} {host}:{source_port}")
            last = start
            for line in wanted:
                last = max(last, self.output.wait_line(line.__eq__, start, timeout))
        finally:
            for sock in barriers:
                sock.close()
        return last + 1

    def accept_counts(self) -> dict[str, int]:
        """Connections accepted so far by each name's port (barriers left out), exact as of
        this call (see :meth:`sync`)."""
        end = self.sync()
        counts = dict.fromkeys(self.ports, 0)
        for line in self.output.lines[:end]:
            m = BACKEND_ACCEPT.match(line)
            if m and not m.group(2).startswith(SYNC_SOURCE + ":"):
                counts[m.group(1)] += 1
        return counts

    def accepted(self, name: str | None = None) -> int:
        """Connections accepted so far (by ``name``'s port, or by any port), exact as of
        this call (see :meth:`sync`)."""
        counts = self.accept_counts()
        return sum(counts.values()) if name is None else counts[name]

    def requests(self) -> list[tuple[str, str, str, str, str]]:
        """Every request head read so far: (name, tls|plain, method, target, host); every
        one whose answer a client has already had is there (see :meth:`sync`)."""
        end = self.sync()
        return [_without_peer(r) for r in self._requests(self.output.lines[:end])]

    @staticmethod
    def _requests(lines: list[str]) -> list[tuple[str, str, str, str, str, str]]:
        """(name, peer, tls|plain, method, target, host) of each REQUEST line."""
        out = []
        for line in lines:
            m = BACKEND_REQUEST.match(line)
            if m:
                name, peer, kind, method, target, host = m.groups()
                out.append((name, peer, kind, method, target, host))
        return out

    def wait_request(self, marker: str, timeout: float = EVENT_TIMEOUT) -> None:
        """Wait until the backend has read a request head whose target contains ``marker``."""

        def read(line: str) -> bool:
            m = BACKEND_REQUEST.match(line)
            return m is not None and marker in m.group(5)

        self.output.wait_line(read, 0, timeout)

    def requests_with(
        self, marker: str, timeout: float = EVENT_TIMEOUT
    ) -> list[tuple[str, str, str, str, str]]:
        """Every request head whose target contains ``marker``, as :meth:`requests` gives
        them, once each backend connection that carried one has closed.

        A connection reports ``CLOSED`` after every request head it read, so nothing the
        relay let through on it can be reported later. Call it once the client's side is
        over: a connection the relay keeps open fails it after ``timeout``."""
        self.sync()
        lines = list(self.output.lines)
        for index, line in enumerate(lines):
            m = BACKEND_REQUEST.match(line)
            if m and marker in m.group(5):
                closed = f"CLOSED {m.group(1)} {m.group(2)}"
                self.output.wait_line(closed.__eq__, index + 1, timeout)
        found = self._requests(list(self.output.lines))
        return [_without_peer(r) for r in found if marker in r[4]]

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_process(self.proc)


def _without_peer(
    request: tuple[str, str, str, str, str, str],
) -> tuple[str, str, str, str, str]:
    name, _, kind, method, target, host = request
    return name, kind, method, target, host


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


#: Which byte path every e2e relay uses: splice(2) (default) or the normal path. The test
#: command runs the e2e tests once more with ACRRELAY_E2E_ZERO_COPY=false.
ZERO_COPY = os.environ.get("ACRRELAY_E2E_ZERO_COPY", "true").lower() != "false"


def _toml_value(value: Any) -> str:
    """A TOML value for a str, bool, int or a list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


#: The listener a :class:`Relay` has unless it is given others.
DEFAULT_LISTENER: Mapping[str, Any] = {"endpoint": "tcp:0:interface=127.0.0.1", "name": "e2e"}


class Relay:
    """One ``twist acrrelay`` process on 127.0.0.1, port 0, with its own config and access log.

    ``routes`` maps names to backend endpoint strings, or to tables of route keys
    (``backend``, ``ports``, ``proxy_protocol``, ``allow_addresses``); ``relay`` adds
    or overrides ``[relay]`` settings (strings such as ``"1s"`` or ``"64KiB"``, or
    integers). ``listeners`` replaces the one default listener by ``[[listen]]`` tables
    (each with a ``name``, on 127.0.0.1 port 0); ``hosts`` is ``[resolver.hosts]``;
    ``nofile`` runs the relay under that file-descriptor limit (soft and hard);
    ``admin`` is the ``[admin]`` table (see :meth:`AdminKeys.admin`); ``wrap`` is a command
    prefix the relay runs under, which must exec it (so the PID stays the relay's), such as
    ``unshare`` giving it files of its own.
    It is running once constructed (``port`` of the first listener, ``ports`` by
    listener name, ``ssh_port`` and ``metrics_port`` if configured, ``access_log_path``,
    ``pid``); ``stop()`` or ``with`` ends it. :meth:`write_config` then :meth:`reload`
    changes its configuration.
    """

    def __init__(
        self,
        directory: Path,
        routes: Mapping[str, str | Mapping[str, Any]],
        *,
        listeners: Sequence[Mapping[str, Any]] = (DEFAULT_LISTENER,),
        hosts: Mapping[str, str | Sequence[str]] | None = None,
        nofile: int | None = None,
        admin: Mapping[str, str] | None = None,
        wrap: Sequence[str] = (),
        **relay: str | int,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.access_log_path = directory / "access.log"
        self.config_path = directory / "acrrelay.toml"
        self.write_config(routes, listeners=listeners, hosts=hosts, admin=admin, **relay)
        command = [
            str(VENV_BIN / "twist"),
            "--log-format=text",
            "acrrelay",
            "--config",
            str(self.config_path),
        ]
        if nofile is not None:
            # prlimit sets the limit on itself and then execs the command: same PID.
            command = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *command]
        command = [*wrap, *command]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(directory),
            cwd=directory,
        )
        self.output = _Output(self.proc)
        self.ports: dict[str, int] = {}
        #: The admin shell's and the metrics page's ports, if ``admin`` configures them.
        self.ssh_port: int | None = None
        self.metrics_port: int | None = None
        try:
            for _ in listeners:
                m = self.output.wait_for(LISTENING_NAMED, STARTUP_TIMEOUT)
                self.ports[m.group(2)] = int(m.group(1))
        except BaseException:
            self.stop()
            raise
        self.port = self.ports[str(listeners[0].get("name", listeners[0]["endpoint"]))]
        # The admin listeners are bound (and logged) before the relay's own.
        for line in list(self.output.lines):
            if m := ADMIN_SHELL.search(line):
                self.ssh_port = int(m.group(1))
            elif m := METRICS_PAGE.search(line):
                self.metrics_port = int(m.group(1))

    def write_config(
        self,
        routes: Mapping[str, str | Mapping[str, Any]],
        *,
        listeners: Sequence[Mapping[str, Any]] = (DEFAULT_LISTENER,),
        hosts: Mapping[str, str | Sequence[str]] | None = None,
        admin: Mapping[str, str] | None = None,
        **relay: str | int,
    ) -> None:
        """(Re)write the configuration file from these arguments (the constructor's);
        a running relay reads it again on :meth:`reload`."""
        settings = {
            "peek_timeout": "5s",
            "connect_timeout": "5s",
            "idle_timeout": "60s",
            "zero_copy": ZERO_COPY,
            **relay,
            "access_log": str(self.access_log_path),
        }
        lines = ["[relay]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
        for listener in listeners:
            lines += ["", "[[listen]]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in listener.items()]
        for name, route in routes.items():
            keys = {"backend": route} if isinstance(route, str) else dict(route)
            lines += ["", "[[route]]", f"name = {_toml_string(name)}"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in keys.items()]
        if hosts:
            lines += ["", "[resolver.hosts]"]
            lines += [f"{_toml_string(name)} = {_toml_value(a)}" for name, a in hosts.items()]
        if admin:
            lines += ["", "[admin]"]
            lines += [f"{key} = {_toml_value(value)}" for key, value in admin.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def reload(self, timeout: float = 10.0) -> str:
        """SIGHUP, then the relay's log line saying how the reload went ("reloaded ..." or
        "reload rejected ...")."""
        self.proc.send_signal(signal.SIGHUP)
        return self.output.wait_for(RELOAD_OUTCOME, timeout).group(1)

    def wait_exit(self, timeout: float) -> int:
        """The exit status, once the process ended (fails after ``timeout`` seconds)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the relay did not exit within {timeout}s; output:\n{self.output.text()}"
            ) from None

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def connect(
        self,
        *,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        listener: str | None = None,
        source: str | None = None,
    ) -> socket.socket:
        """A raw TCP connection to the relay (``listener``, or the first), TCP_NODELAY on,
        from ``source`` (a loopback address) if given."""
        port = self.port if listener is None else self.ports[listener]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            if source is not None:
                sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock

    def access_entries(self) -> list[dict[str, Any]]:
        if not self.access_log_path.exists():
            return []
        text = self.access_log_path.read_text()
        # Only whole lines: the relay may be writing the next one right now.
        text = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_access(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        count: int = 1,
        timeout: float = EVENT_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """The access entries matching ``predicate``, once there are ``count`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.access_entries() if predicate(e)]
            if len(found) >= count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert len(found) >= count, (
            f"expected {count} matching access entries within {timeout}s, found {found}\n"
            f"all entries: {self.access_entries()}\nrelay output:\n{self.output.text()}"
        )
        return found

    def access_for(
        self, sock_name: tuple[str, int], timeout: float = EVENT_TIMEOUT
    ) -> dict[str, Any]:
        """The access entry of the connection whose client address was ``sock_name``."""
        client = f"{sock_name[0]}:{sock_name[1]}"
        return self.wait_access(lambda e: e.get("client") == client, timeout=timeout)[0]


# ---------------------------------------------------------------- a TLS client we can steer


class BioTLS:
    """A TLS client over memory BIOs and a blocking socket: the test owns every raw byte."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_name: str) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        self.raw_in = 0

    def first_flight(self) -> bytes:
        """The client's first flight (the ClientHello), not yet sent."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        flight = self.outgoing.read()
        assert flight and flight[0] == 22, flight[:8]
        return flight

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self, size: int = 1 << 18) -> bool:
        data = self.sock.recv(size)
        if not data:
            self.incoming.write_eof()
            return False
        self.raw_in += len(data)
        self.incoming.write(data)
        return True

    def handshake(self) -> None:
        """Finish the handshake (after the first flight was sent some way or other)."""
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionError("EOF during the TLS handshake") from None
            else:
                self._flush()
                return

    def sendall(self, data: bytes | memoryview) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self, size: int = 1 << 20, raw_size: int = 1 << 18) -> bytes:
        """Up to ``size`` plaintext bytes; b"" at EOF (close_notify or a bare TCP FIN)."""
        while True:
            try:
                return self.tls.read(size)
            except ssl.SSLWantReadError:
                self._flush()
                if self.incoming.eof:
                    return b""
                self._fill(raw_size)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def recv_exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.recv(n - len(out))
            if not data:
                raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
            out += data
        return bytes(out)

    def recv_line(self, limit: int = 4096) -> bytes:
        out = bytearray()
        while not out.endswith(b"\n"):
            data = self.recv(1)
            if not data or len(out) > limit:
                raise ConnectionError(f"no complete line: {bytes(out)!r}")
            out += data
        return bytes(out)

    def shutdown_write(self) -> None:
        """Send a TCP FIN (no close_notify): TLS stays up for reading."""
        self._flush()
        self.sock.shutdown(socket.SHUT_WR)


def http_get(tls: BioTLS | ssl.SSLSocket, name: str, target: str) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    tls.sendall(request.encode())


def read_all(tls: BioTLS | ssl.SSLSocket) -> bytes:
    out = bytearray()
    while True:
        data = tls.recv(1 << 16)
        if not data:
            return bytes(out)
        out += data


def split_http(response: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of a complete HTTP/1.1 response."""
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, f"no end of headers in {response[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def run(
    args: list[str],
    home: Path,
    *,
    stdin: str = "",
    timeout: float = 20.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """A client command with a clean environment (plus ``env``, set on purpose) and a
    timeout; never raises on its status."""
    return subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        env={**clean_env(home), **(env or {})},
        cwd=home,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------- the SSH admin shell


class AdminKeys:
    """Throw-away SSH keys for the admin shell, made by ``ssh-keygen`` in ``directory``.

    ``good`` is listed in ``authorized_keys``, ``bad`` is not. :meth:`ssh` runs OpenSSH's
    client with no user configuration, no agent, an empty HOME and ``known_hosts`` of its own.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.home = directory / "home"
        self.home.mkdir(exist_ok=True)
        self.good = directory / "id_good"
        self.bad = directory / "id_bad"
        for path in (self.good, self.bad):
            made = run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                self.home,
            )
            assert made.returncode == 0, made.stderr
        self.authorized_keys = directory / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.good}.pub").read_text())
        self.known_hosts = directory / "known_hosts"

    def admin(self, host_key: Path, *, metrics: bool = True) -> dict[str, str]:
        """An ``[admin]`` table: the SSH shell (and the metrics page) on 127.0.0.1, port 0."""
        table = {
            "ssh": "tcp:0",
            "authorized_keys": str(self.authorized_keys),
            "host_key": str(host_key),
        }
        if metrics:
            table["metrics"] = "tcp:0"
        return table

    def ssh_args(
        self, port: int, *, identity: Path | None = None, known_hosts: Path | None = None
    ) -> list[str]:
        """``ssh`` with every option that keeps the user's own configuration out."""
        return [
            SSH,
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-i",
            str(identity or self.good),
            "-p",
            str(port),
        ]

    def ssh(
        self,
        port: int,
        *remote: str,
        identity: Path | None = None,
        known_hosts: Path | None = None,
        options: Sequence[str] = (),
        user: str = "admin",
        timeout: float = 20.0,
    ) -> subprocess.CompletedProcess[str]:
        """``ssh [options] user@127.0.0.1 REMOTE...`` (the good key unless told), finished."""
        args = self.ssh_args(port, identity=identity, known_hosts=known_hosts)
        return run([*args, *options, f"{user}@127.0.0.1", *remote], self.home, timeout=timeout)


# ---------------------------------------------------------------- raw front-door clients


def hello_with_sni(server_name: bytes | None) -> bytes:
    """A real OpenSSL ClientHello whose SNI is exactly ``server_name``, any bytes at all
    (an IP literal, raw UTF-8, a NUL), or a hello without SNI for None.

    OpenSSL makes the hello for a placeholder name of the same length, whose bytes are
    then swapped inside the server_name extension, so every length field stays right.
    """
    if server_name is None:
        return client_hello_bytes(None)
    size = len(server_name)
    assert 1 <= size <= 253, size
    labels = [("x" * size)[i : i + 50] for i in range(0, size, 51)]
    placeholder = ".".join(labels)[:size]
    if placeholder.endswith("."):
        placeholder = placeholder[:-1] + "x"
    hello = client_hello_bytes(placeholder)
    needle = b"\x00" + size.to_bytes(2, "big") + placeholder.encode()
    assert hello.count(needle) == 1, (placeholder, hello)
    return hello.replace(needle, b"\x00" + size.to_bytes(2, "big") + server_name)


class NoEOF(TimeoutError):
    """The peer did not close in time; ``data`` is what it sent until then."""

    def __init__(self, data: bytes, timeout: float) -> None:
        super().__init__(f"no EOF within {timeout}s; received {data[:200]!r}")
        self.data = data


def recv_to_eof(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes; a reset ends it too. Raises :class:`NoEOF` (a
    TimeoutError) if the peer does not close within ``timeout`` seconds."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    out = bytearray()
    while len(out) < limit:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise NoEOF(bytes(out), timeout) from None
        if not data:
            break
        out += data
    return bytes(out)


def read_response(sock: socket.socket | ssl.SSLSocket, timeout: float = 5.0) -> bytes:
    """One whole HTTP/1.1 response with a Content-Length (keep-alive safe), or what came
    before EOF."""
    sock.settimeout(timeout)
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return bytes(buf)
        buf += data
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    rest = bytearray(body)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            break
        rest += data
    return head + b"\r\n\r\n" + bytes(rest)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for programs that need a number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening_ports() -> set[int]:
    """The TCP ports in LISTEN state on 127.0.0.1 or 0.0.0.0, from /proc/net/tcp."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        address, _, port = local.partition(":")
        if state == "0A" and address in ("0100007F", "00000000"):
            ports.add(int(port, 16))
    return ports


def wait_listening(ports: Sequence[int], proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait until every port listens (without connecting to any), or fail."""
    deadline = time.monotonic() + timeout
    while not set(ports) <= listening_ports():
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise AssertionError(f"ports {ports} not listening within {timeout}s")
        time.sleep(0.05)


class HAProxy:
    """Debian's ``haproxy`` in the foreground (``-db``) with ``config``, until ``stop()``.

    ``ports`` are the ports its config binds; it is running once they all listen.
    """

    BINARY = "/usr/sbin/haproxy"

    def __init__(self, directory: Path, config: str, ports: Sequence[int]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "haproxy.cfg"
        self.config_path.write_text(config)
        self.proc = subprocess.Popen(
            [self.BINARY, "-db", "-f", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(directory),
            cwd=directory,
        )
        self.output = _Output(self.proc)
        try:
            wait_listening(ports, self.proc, STARTUP_TIMEOUT)
        except BaseException as e:
            self.stop()
            raise AssertionError(f"{e}; haproxy said:\n{self.output.text()}") from None

    def stop(self) -> None:
        stop_process(self.proc)


__all__ = [
    "BUCKET",
    "DOCKERAUTH",
    "FRONTDOOR_NAMES",
    "NAMES",
    "OPEN_LOOPBACK",
    "PROXIED_V1",
    "PROXIED_V2",
    "REGISTRY",
    "SYNC_SOURCE",
    "WILD_NAME",
    "AdminKeys",
    "BackendServer",
    "BioTLS",
    "HAProxy",
    "MiB",
    "NoEOF",
    "Relay",
    "TestCA",
    "clean_env",
    "fd_count",
    "free_port",
    "hello_with_sni",
    "http_get",
    "listening_ports",
    "netns_socket",
    "read_all",
    "read_response",
    "recv_to_eof",
    "rss_bytes",
    "run",
    "silent_listener",
    "split_http",
    "stop_process",
    "wait_listening",
]
