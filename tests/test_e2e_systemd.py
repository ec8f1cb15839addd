"""End to end: ``twist acrrelay`` on a listening socket inherited as systemd socket activation
passes it (``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID`` and descriptor 3, set up by
``tests/systemd_activate.py``), read through Twisted's ``systemd:`` endpoint.

What matters is the address family: systemd makes an IPv6 dual-stack socket for a bare
``ListenStream=443`` and an IPv4 one for ``ListenStream=0.0.0.0:443``, and the endpoint's
``domain=`` must say which, or every client address (ACLs, per-client limits, logs) is
read wrongly. Loopback only.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e_support import (
    HERE,
    REGISTRY,
    VENV_BIN,
    BackendServer,
    TestCA,
    _Output,
    clean_env,
    http_get,
    read_response,
    split_http,
    stop_process,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

LAUNCHER = HERE / "systemd_activate.py"
ACTIVATE = re.compile(r"^ACTIVATE port=(\d+)$")
LISTENING = re.compile(r"listening on (\S+) \(sd\) with ")
CANNOT_LISTEN = re.compile(r"^acrrelay: cannot listen on (.*)$")


class Activated:
    """``twist acrrelay`` exec'd by ``systemd_activate.py`` on a ``family`` socket bound to
    ``host`` port 0, with one ``[[listen]]`` (name ``sd``) on ``systemd:domain=DOMAIN:index=0``
    that admits 127.0.0.1 alone."""

    def __init__(
        self, directory: Path, family: str, host: str, domain: str, routes: Mapping[str, str]
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.access_log_path = directory / "access.log"
        self.config_path = directory / "acrrelay.toml"
        lines = [
            "[relay]",
            'peek_timeout = "5s"',
            'connect_timeout = "5s"',
            f'access_log = "{self.access_log_path}"',
            "",
            "[[listen]]",
            f'endpoint = "systemd:domain={domain}:index=0"',
            'name = "sd"',
            'allow = ["127.0.0.1/32"]',
        ]
        for name, backend in routes.items():
            lines += ["", "[[route]]", f'name = "{name}"', f'backend = "{backend}"']
        self.config_path.write_text("\n".join(lines) + "\n")
        command = [
            sys.executable,
            str(LAUNCHER),
            family,
            host,
            str(VENV_BIN / "twist"),
            "--log-format=text",
            "acrrelay",
            "--config",
            str(self.config_path),
        ]
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
        try:
            self.port = int(self.output.wait_for(ACTIVATE, 10).group(1))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)

    def access_entries(self) -> list[dict[str, object]]:
        if not self.access_log_path.exists():
            return []
        text = self.access_log_path.read_text()
        return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[list[Activated]]:
    started: list[Activated] = []
    try:
        yield started
    finally:
        for relay in started:
            relay.stop()


def _get_through(relay: Activated, ca: TestCA) -> tuple[str, dict[str, object]]:
    """GET /name for REGISTRY over TLS through the adopted port: our address, its entry."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        local = raw.getsockname()
        with ca.client_context().wrap_socket(raw, server_hostname=REGISTRY) as tls:
            http_get(tls, REGISTRY, "/name")
            status, _, body = split_http(read_response(tls, timeout=10))
    assert (status, body) == (200, f"backend={REGISTRY}\n".encode()), (status, body)
    deadline = time.monotonic() + 10
    while True:
        ours = f":{local[1]}"
        entries = [e for e in relay.access_entries() if str(e.get("client")).endswith(ours)]
        if entries or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(entries) == 1, relay.access_entries()
    return f"{local[0]}:{local[1]}", entries[0]


def test_an_ipv4_socket_as_inet_logs_the_true_client_address(
    test_ca: TestCA, backend: BackendServer, activate: list[Activated], tmp_path: Path
) -> None:
    """``ListenStream=0.0.0.0:443`` with ``domain=INET``: a download through the inherited
    socket passes the 127.0.0.1 ACL, and the access log names the client as 127.0.0.1:PORT."""
    relay = Activated(
        tmp_path / "inet", "inet", "127.0.0.1", "INET", {REGISTRY: backend.backend(REGISTRY)}
    )
    activate.append(relay)
    relay.output.wait_for(LISTENING, 10)
    client, entry = _get_through(relay, test_ca)
    print(f"\nsystemd INET socket, domain=INET: access log client {entry['client']}")
    assert entry["client"] == client and client.startswith("127.0.0.1:"), entry
    assert entry["listener"] == "sd" and entry["route"] == REGISTRY, entry


def test_a_dual_stack_socket_as_inet6_admits_and_logs_ipv4_clients(
    test_ca: TestCA, backend: BackendServer, activate: list[Activated], tmp_path: Path
) -> None:
    """A bare ``ListenStream=443`` (an IPv6 socket taking IPv4 too) with ``domain=INET6``:
    an IPv4 client arrives as ::ffff:127.0.0.1, which the ACL reads as 127.0.0.1, and the
    access log shows that address and the client's own port."""
    relay = Activated(
        tmp_path / "inet6",
        "inet6",
        "::ffff:127.0.0.1",
        "INET6",
        {REGISTRY: backend.backend(REGISTRY)},
    )
    activate.append(relay)
    relay.output.wait_for(LISTENING, 10)
    client, entry = _get_through(relay, test_ca)
    print(f"systemd dual-stack socket, domain=INET6: access log client {entry['client']}")
    port = client.rpartition(":")[2]
    assert entry["client"] in (f"127.0.0.1:{port}", f"[::ffff:127.0.0.1]:{port}"), entry
    assert entry["listener"] == "sd" and entry["route"] == REGISTRY, entry


def test_a_dual_stack_socket_as_inet_is_refused_at_start(
    backend: BackendServer, activate: list[Activated], tmp_path: Path
) -> None:
    """A bare ``ListenStream=443`` with ``domain=INET`` (Twisted would read every IPv6
    sockaddr as IPv4, garbling the client address) stops the start with one line that
    says what to write instead, and a non-zero exit."""
    relay = Activated(
        tmp_path / "mismatch",
        "inet6",
        "::ffff:127.0.0.1",
        "INET",
        {REGISTRY: backend.backend(REGISTRY)},
    )
    activate.append(relay)
    said = relay.output.wait_for(CANNOT_LISTEN, 10).group(1)
    status = relay.proc.wait(timeout=10)
    print(f"systemd dual-stack socket, domain=INET: exit {status}: {said}")
    assert status != 0
    assert said.startswith(
        "systemd:domain=INET:index=0: the socket systemd passed is INET6, not INET"
    ), said
    assert "write domain=INET6, or ListenStream=0.0.0.0:PORT" in said, said
    assert "Traceback" not in relay.output.text(), relay.output.text()
