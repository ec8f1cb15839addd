"""End to end, TLS clients: curl, openssl s_client and Python ssl through a real relay process.

Routing by SNI, end-to-end certificate checks, the unknown-name refusal, and ClientHellos
that arrive in pieces. See ``e2e_support`` for the peers.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from acrrelay.testing import records_of, reframe
from tests.e2e_support import (
    NAMES,
    REGISTRY,
    BackendServer,
    BioTLS,
    Relay,
    TestCA,
    http_get,
    read_all,
    run,
    split_http,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

#: A real ACR name, but not one this relay routes.
UNKNOWN = "registry.cn-shanghai.aliyuncs.com"


def _curl(
    relay: Relay, ca: TestCA, name: str, home: Path, path: str = "/name"
) -> subprocess.CompletedProcess[str]:
    return run(
        [
            "curl",
            "-q",
            "-sS",
            "--max-time",
            "15",
            "--cacert",
            str(ca.ca_file),
            "--resolve",
            f"{name}:{relay.port}:127.0.0.1",
            f"https://{name}:{relay.port}{path}",
        ],
        home,
    )


def _s_client(relay: Relay, ca: TestCA, name: str, home: Path) -> subprocess.CompletedProcess[str]:
    request = f"GET /name HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    return run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{relay.port}",
            "-servername",
            name,
            "-CAfile",
            str(ca.ca_file),
            "-verify_hostname",
            name,
            "-verify_return_error",
            "-ign_eof",
        ],
        home,
        stdin=request,
    )


def _with_sni(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda entry: entry.get("sni") == name


def _python_get(relay: Relay, ca: TestCA, name: str) -> tuple[bytes, dict[str, Any]]:
    context = ca.client_context()
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        peer = tls.getpeercert()
        assert peer is not None
        http_get(tls, name, "/name")
        return read_all(tls), peer


@pytest.mark.parametrize("client", ["curl", "openssl", "python"])
def test_each_name_reaches_its_own_backend_with_its_own_certificate(
    client: str, test_ca: TestCA, backend: BackendServer, relay: Relay, home: Path
) -> None:
    """Each of three names reaches its own TLS backend, whose certificate the client verifies."""
    for name in NAMES:
        if client == "curl":
            result = _curl(relay, test_ca, name, home)
            assert result.returncode == 0, result.stderr
            assert result.stdout == f"backend={name}\n"
        elif client == "openssl":
            result = _s_client(relay, test_ca, name, home)
            assert result.returncode == 0, result.stdout + result.stderr
            assert "Verify return code: 0 (ok)" in result.stdout, result.stdout
            assert f"backend={name}\n" in result.stdout
            assert f"CN = {name}" in result.stdout  # the leaf s_client saw
        else:
            response, peer = _python_get(relay, test_ca, name)
            status, _, body = split_http(response)
            assert (status, body) == (200, f"backend={name}\n".encode())
            assert peer["subjectAltName"] == (("DNS", name),)

    for name in NAMES:
        (entry,) = relay.wait_access(_with_sni(name))
        assert entry["route"] == name
        assert entry["backend_address"] == f"127.0.0.1:{backend.ports[name]}"
        assert entry["close_reason"] == "done", str(entry)
        assert entry["bytes_up"] > 0 and entry["bytes_down"] > 0


def test_unknown_name_is_refused_with_unrecognized_name(
    test_ca: TestCA, relay: Relay, home: Path
) -> None:
    """A name without a route gets a TLS unrecognized_name alert and is logged not_allowed."""
    curl = _curl(relay, test_ca, UNKNOWN, home)
    assert curl.returncode == 35, (curl.returncode, curl.stderr)
    assert "unrecognized name" in curl.stderr, curl.stderr
    assert "backend=" not in curl.stdout

    s_client = _s_client(relay, test_ca, UNKNOWN, home)
    out = s_client.stdout + s_client.stderr
    assert s_client.returncode != 0, out
    assert "unrecognized name" in out and "alert number 112" in out, out
    assert "backend=" not in out

    context = test_ca.client_context()
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as caught,
    ):
        context.wrap_socket(raw, server_hostname=UNKNOWN)
    assert "UNRECOGNIZED_NAME" in str(caught.value), caught.value
    assert caught.value.reason == "TLSV1_UNRECOGNIZED_NAME"

    entries = relay.wait_access(lambda e: e.get("sni") == UNKNOWN, count=3)
    assert len(entries) == 3, entries
    for entry in entries:
        assert entry["close_reason"] == "refused:not_allowed", str(entry)
        assert "backend_address" not in entry and entry["bytes_up"] == 0, str(entry)


def _finish_and_fetch(client: BioTLS, name: str) -> bytes:
    client.handshake()
    http_get(client, name, "/name")
    return read_all(client)


def test_client_hello_one_byte_per_write_is_routed(test_ca: TestCA, relay: Relay) -> None:
    """A real ClientHello written one byte per TCP segment is reassembled and routed by SNI."""
    name = NAMES[1]
    delay = 0.002
    with relay.connect() as sock:
        client = BioTLS(sock, test_ca.client_context(), name)
        flight = client.first_flight()
        assert len(records_of(flight)) == 1
        started = time.monotonic()
        for i in range(len(flight)):
            sock.send(flight[i : i + 1])
            time.sleep(delay)
        dribble = time.monotonic() - started
        response = _finish_and_fetch(client, name)
        local = sock.getsockname()
    status, _, body = split_http(response)
    assert (status, body) == (200, f"backend={name}\n".encode())

    entry = relay.access_for(local)
    assert entry["sni"] == name and entry["route"] == name, str(entry)
    assert entry["hello_records"] == 1 and entry["hello_bytes"] == len(flight) - 5, str(entry)
    # The relay waited for the last byte: it routed only after the whole dribble.
    assert entry["peek_ms"] >= (len(flight) - 1) * delay * 1000 * 0.9, (entry, dribble)
    assert entry["close_reason"] == "done", str(entry)


def test_client_hello_reframed_into_three_records_is_routed(test_ca: TestCA, relay: Relay) -> None:
    """A ClientHello split across three TLS records is routed, and the handshake completes."""
    name = NAMES[2]
    with relay.connect() as sock:
        client = BioTLS(sock, test_ca.client_context(), name)
        flight = client.first_flight()
        reframed = reframe(flight, 3)
        assert len(records_of(reframed)) == 3
        sock.sendall(reframed)
        response = _finish_and_fetch(client, name)
        local = sock.getsockname()
    status, _, body = split_http(response)
    assert (status, body) == (200, f"backend={name}\n".encode())

    entry = relay.access_for(local)
    assert entry["sni"] == name and entry["route"] == name, str(entry)
    assert entry["hello_records"] == 3 and entry["hello_bytes"] == len(flight) - 5, str(entry)
    assert entry["bytes_up"] >= len(reframed), str(entry)
    assert entry["close_reason"] == "done", str(entry)


def test_registry_name_is_case_insensitive_end_to_end(test_ca: TestCA, relay: Relay) -> None:
    """An SNI in upper case is routed to the same backend (DNS names ignore case)."""
    context = test_ca.client_context()
    upper = REGISTRY.upper()
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=upper) as tls,
    ):
        http_get(tls, REGISTRY, "/name")
        response = read_all(tls)
    assert split_http(response)[2] == f"backend={REGISTRY}\n".encode()
