"""The transport types: Twisted's real TCP transport has what they declare."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport

from acrrelay.transports import SocketTransport, TCPTransport, socket_of, tcp_transport
from tests.test_twistedinternals import _accepted, _Server, _until


def _members(protocol: type) -> set[str]:
    declared = {name for name in vars(protocol) if not name.startswith("_")}
    return declared | set(getattr(protocol, "__annotations__", {}))


@pytest.fixture
def server() -> Any:
    s = _Server()
    yield s
    s.close()


@pytest_twisted.inlineCallbacks
def test_a_real_tcp_transport_has_every_declared_member(server: _Server) -> Any:
    """Twisted's tcp.Server has every method and attribute TCPTransport and
    SocketTransport declare, so the types describe what the relay really gets."""
    _, transport = yield _accepted(server)
    members = _members(TCPTransport) | _members(SocketTransport)
    assert {"write", "registerProducer", "loseWriteConnection", "fileno"} <= members
    missing = sorted(name for name in members if not hasattr(transport, name))
    assert missing == []


@pytest_twisted.inlineCallbacks
def test_socket_of_gives_the_socket_while_there_is_one(server: _Server) -> Any:
    """A live transport's socket is found; a lost one (Twisted drops it) and a double
    without one give None."""
    _, transport = yield _accepted(server)
    assert isinstance(socket_of(transport), socket.socket)
    transport.abortConnection()
    yield _until(lambda: server.accepted[-1].lost is not None)
    assert socket_of(transport) is None
    assert socket_of(StringTransport()) is None


def test_tcp_transport_refuses_a_protocol_without_one() -> None:
    """A protocol that is not connected has no transport to relay through."""
    with pytest.raises(RuntimeError):
        tcp_transport(None)
    transport = StringTransport()
    assert tcp_transport(transport) is transport
