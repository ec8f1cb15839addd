"""Helpers for the end-to-end tests: real sockets, real peers, loopback only.

- :class:`TestCA`: a root CA and one leaf certificate per name (SAN = DNS name), on disk.
- :class:`BackendServer`: ``tests/tls_backend.py`` as its own process, one TLS port per name.
- :class:`Relay`: ``twist acrrelay --config <tmp>.toml`` as its own process, port 0.
- :class:`BioTLS`: a TLS client driven through memory BIOs over a blocking socket, so a
  test controls the raw bytes (first flight byte by byte, re-framed, a TCP-only FIN).
- :func:`rss_bytes`: a process's resident set size from ``/proc``.

The fixtures are in ``tests.e2e_fixtures`` (test modules name it in ``pytest_plugins``).
Every process started here is stopped by its PID in a fixture finaliser, whatever the
outcome of the test.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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

MiB = 1 << 20
STARTUP_TIMEOUT = 10.0
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(")


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
    """Drains a process's stdout on a thread (so the pipe never fills) and keeps the lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        self._thread.start()

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._queue.put(line)
        self._queue.put(None)

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
    """``tests/tls_backend.py`` in its own process: one TLS port per name of ``ca``."""

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

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_process(self.proc)


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class Relay:
    """One ``twist acrrelay`` process on 127.0.0.1, port 0, with its own config and access log.

    ``routes`` maps names to backend endpoint strings; ``relay`` adds or overrides
    ``[relay]`` settings (strings such as ``"1s"`` or ``"64KiB"``). It is running once
    constructed (``port``, ``access_log_path``, ``pid``); ``stop()`` or ``with`` ends it.
    """

    def __init__(self, directory: Path, routes: Mapping[str, str], **relay: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.access_log_path = directory / "access.log"
        settings = {
            "peek_timeout": "5s",
            "connect_timeout": "5s",
            "idle_timeout": "60s",
            **relay,
            "access_log": str(self.access_log_path),
        }
        lines = ["[relay]"]
        lines += [f"{key} = {_toml_string(value)}" for key, value in settings.items()]
        lines += ["", "[[listen]]", 'endpoint = "tcp:0:interface=127.0.0.1"', 'name = "e2e"']
        for name, backend in routes.items():
            lines += ["", "[[route]]", f"name = {_toml_string(name)}"]
            lines += [f"backend = {_toml_string(backend)}"]
        self.config_path = directory / "acrrelay.toml"
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "twist"),
                "--log-format=text",
                "acrrelay",
                "--config",
                str(self.config_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(directory),
            cwd=directory,
        )
        self.output = _Output(self.proc)
        try:
            self.port = int(self.output.wait_for(LISTENING, STARTUP_TIMEOUT).group(1))
        except BaseException:
            self.stop()
            raise

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

    def connect(self, *, timeout: float = 10.0, rcvbuf: int | None = None) -> socket.socket:
        """A raw TCP connection to the relay, TCP_NODELAY on."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def access_entries(self) -> list[dict[str, Any]]:
        if not self.access_log_path.exists():
            return []
        text = self.access_log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def wait_access(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        *,
        count: int = 1,
        timeout: float = 10.0,
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

    def access_for(self, sock_name: tuple[str, int], timeout: float = 10.0) -> dict[str, Any]:
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
    args: list[str], home: Path, *, stdin: str = "", timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """A client command with a clean environment and a timeout; never raises on its status."""
    return subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        env=clean_env(home),
        cwd=home,
        timeout=timeout,
        check=False,
    )


__all__ = [
    "BUCKET",
    "DOCKERAUTH",
    "NAMES",
    "REGISTRY",
    "BackendServer",
    "BioTLS",
    "MiB",
    "Relay",
    "TestCA",
    "http_get",
    "read_all",
    "rss_bytes",
    "run",
    "split_http",
]
