"""End to end: ``twist acrrelay`` on a listening socket inherited as systemd socket activation
passes it (``LISTEN_FDS``, ``LISTEN_FDNAMES``, ``LISTEN_PID`` and descriptor 3, set up by
``tests/systemd_activate.py``), read through Twisted's ``systemd:`` endpoint.

What matters is the address family: systemd makes an IPv6 dual-stack socket for a bare
``ListenStream=443`` and an IPv4 one for ``ListenStream=0.0.0.0:443``, and the endpoint's
``domain=`` must say which, or every client address (ACLs, per-client limits, logs) is
read wrongly. Loopback only.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e_support import (
    HERE,
    REGISTRY,
    VENV_BIN,
    BackendServer,
    Relay,
    TestCA,
    clean_env,
    http_get,
    read_response,
    split_http,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

LAUNCHER = HERE / "systemd_activate.py"
CANNOT_LISTEN = re.compile(r"^acrrelay: cannot listen on (.*)$", re.M)


def _listener(domain: str) -> dict[str, object]:
    """One [[listen]] (name ``sd``) on the inherited socket, admitting 127.0.0.1 alone."""
    return {
        "endpoint": f"systemd:domain={domain}:index=0",
        "name": "sd",
        "allow": ["127.0.0.1/32"],
    }


def activated(directory: Path, family: str, host: str, domain: str, backend: str) -> Relay:
    """``twist acrrelay`` exec'd by ``systemd_activate.py`` on a ``family`` socket bound to
    ``host`` port 0, routing REGISTRY to ``backend``."""
    return Relay(
        directory,
        {REGISTRY: backend},
        listeners=[_listener(domain)],
        wrap=[sys.executable, str(LAUNCHER), family, host],
    )


def _get_through(relay: Relay, ca: TestCA) -> tuple[str, dict[str, object]]:
    """GET /name for REGISTRY over TLS through the adopted port: our address, its entry."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw:
        local = raw.getsockname()
        with ca.client_context().wrap_socket(raw, server_hostname=REGISTRY) as tls:
            http_get(tls, REGISTRY, "/name")
            status, _, body = split_http(read_response(tls, timeout=10))
    assert (status, body) == (200, f"backend={REGISTRY}\n".encode()), (status, body)
    ours = f":{local[1]}"
    entries = relay.wait_access(lambda e: str(e.get("client")).endswith(ours))
    assert len(entries) == 1, relay.access_entries()
    return f"{local[0]}:{local[1]}", entries[0]


def test_an_ipv4_socket_as_inet_logs_the_true_client_address(
    test_ca: TestCA, backend: BackendServer, tmp_path: Path
) -> None:
    """``ListenStream=0.0.0.0:443`` with ``domain=INET``: a download through the inherited
    socket passes the 127.0.0.1 ACL, and the access log names the client as 127.0.0.1:PORT."""
    with activated(
        tmp_path / "inet", "inet", "127.0.0.1", "INET", backend.backend(REGISTRY)
    ) as relay:
        client, entry = _get_through(relay, test_ca)
    print(f"\nsystemd INET socket, domain=INET: access log client {entry['client']}")
    assert entry["client"] == client and client.startswith("127.0.0.1:"), entry
    assert entry["listener"] == "sd" and entry["route"] == REGISTRY, entry


def test_a_dual_stack_socket_as_inet6_admits_and_logs_ipv4_clients(
    test_ca: TestCA, backend: BackendServer, tmp_path: Path
) -> None:
    """A bare ``ListenStream=443`` (an IPv6 socket taking IPv4 too) with ``domain=INET6``:
    an IPv4 client arrives as ::ffff:127.0.0.1, which the ACL and the access log read as
    127.0.0.1, with the client's own port."""
    with activated(
        tmp_path / "inet6", "inet6", "::ffff:127.0.0.1", "INET6", backend.backend(REGISTRY)
    ) as relay:
        client, entry = _get_through(relay, test_ca)
    print(f"systemd dual-stack socket, domain=INET6: access log client {entry['client']}")
    port = client.rpartition(":")[2]
    assert entry["client"] == f"127.0.0.1:{port}", entry
    assert entry["listener"] == "sd" and entry["route"] == REGISTRY, entry


def test_a_dual_stack_socket_as_inet_is_refused_at_start(
    backend: BackendServer, tmp_path: Path
) -> None:
    """A bare ``ListenStream=443`` with ``domain=INET`` (Twisted would read every IPv6
    sockaddr as IPv4, garbling the client address) stops the start with one line that
    says what to write instead, and a non-zero exit."""
    directory = tmp_path / "mismatch"
    directory.mkdir()
    config = directory / "acrrelay.toml"
    endpoint = _listener("INET")["endpoint"]
    config.write_text(
        f'[[listen]]\nendpoint = "{endpoint}"\nname = "sd"\n\n'
        f'[[route]]\nname = "{REGISTRY}"\nbackend = "{backend.backend(REGISTRY)}"\n'
    )
    twist = [str(VENV_BIN / "twist"), "--log-format=text", "acrrelay", "--config", str(config)]
    done = subprocess.run(
        [sys.executable, str(LAUNCHER), "inet6", "::ffff:127.0.0.1", *twist],
        capture_output=True,
        text=True,
        env=clean_env(directory),
        cwd=directory,
        timeout=30,
        check=False,
    )
    output = done.stdout + done.stderr
    match = CANNOT_LISTEN.search(output)
    assert match, output
    said, status = match.group(1), done.returncode
    print(f"systemd dual-stack socket, domain=INET: exit {status}: {said}")
    assert status != 0
    assert said.startswith(
        "systemd:domain=INET:index=0: the socket systemd passed is INET6, not INET"
    ), said
    assert "write domain=INET6, or ListenStream=0.0.0.0:PORT" in said, said
    assert "Traceback" not in output, output
