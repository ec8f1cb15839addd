"""TLS termination for routed names only, on a real loopback port with real TLS clients."""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from acrrelay.gateway.tls import SNIServerContexts, tls_factory
from acrrelay.routing import Refusal
from tests import gateway_support as gs


class _Hello(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"hello " + data)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, Any, list[Refusal], gs.FilesIssuer]]:
    from twisted.internet import reactor

    ca = gs.make_ca(tmp_path / "ca")
    issuer = gs.FilesIssuer(ca)
    refusals: list[Refusal] = []
    contexts = SNIServerContexts(issuer, gs.decider(gs.policy()), refused=refusals.append)
    port = reactor.listenTCP(
        0, tls_factory(contexts, Factory.forProtocol(_Hello)), interface="127.0.0.1"
    )
    yield port.getHost().port, ca, refusals, issuer
    port.stopListening()


def _handshake(port: int, ca: Any, name: str) -> tuple[dict[str, Any], bytes]:
    context = ca.client_context()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(b"x")
        return tls.getpeercert(), tls.recv(100)


def _s_client(port: int, *servername: str) -> subprocess.CompletedProcess[str]:
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *servername]
    return subprocess.run(args, input="", capture_output=True, text=True, timeout=30, check=False)


@pytest_twisted.inlineCallbacks
def test_a_routed_name_gets_a_leaf_that_verifies_for_that_name(served: Any) -> Any:
    """A client asking for a routed name gets a certificate that the CA verifies for it."""
    port, ca, refusals, issuer = served
    cert, answer = yield deferToThread(_handshake, port, ca, gs.REGISTRY)
    assert ("DNS", gs.REGISTRY) in cert["subjectAltName"]
    assert answer == b"hello x"
    cert, _ = yield deferToThread(_handshake, port, ca, gs.OSS)  # under the *. route
    assert ("DNS", gs.OSS) in cert["subjectAltName"]
    assert refusals == []
    assert issuer.issued == [gs.REGISTRY, gs.OSS]


@pytest.mark.parametrize(
    ("servername", "reason"),
    [
        (["-servername", gs.UNROUTED], "not_allowed"),
        (["-noservername"], "no_sni"),
        (["-servername", "127.0.0.1"], "ip_literal"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_an_unserved_name_gets_the_alert_and_no_certificate(
    served: Any, servername: list[str], reason: str
) -> Any:
    """An unrouted name, no SNI, or an IP literal aborts with unrecognized_name, no cert."""
    port, _, refusals, issuer = served
    result = yield deferToThread(_s_client, port, *servername)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unrecognized name" in output or "alert number 112" in output, output
    assert "no peer certificate available" in output
    assert "BEGIN CERTIFICATE" not in output
    assert [r.reason for r in refusals] == [reason]
    assert issuer.issued == []


@pytest_twisted.inlineCallbacks
def test_python_ssl_sees_the_unrecognized_name_alert(served: Any) -> Any:
    """Python's ssl client fails the handshake with the unrecognized_name alert."""
    port, ca, _, _ = served
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        yield deferToThread(_handshake, port, ca, gs.UNROUTED)
