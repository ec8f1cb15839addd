"""Canaries: each Twisted internal the relay relies on, checked on real Twisted sockets.

:mod:`acrrelay.twistedinternals` reads or replaces attributes of Twisted's socket
classes that no interface promises. Each test here pins one of them on a real
``listenTCP`` port and its real transports, so a Twisted release that renames or
changes one fails here, by name, instead of quietly sending the relay down its slow
path (or, for the swaps, stalling a transfer).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import main
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from acrrelay import twistedinternals as ti


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@implementer(IHalfCloseableProtocol)
class _Recorder(Protocol):
    """A half-closeable server protocol that records what Twisted tells it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.read_closed = False
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.read_closed = True

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = main.CONNECTION_DONE) -> None:  # type: ignore[assignment]
        self.lost = reason


class _Server:
    """A real listening port on 127.0.0.1, and the clients connected to it."""

    def __init__(self) -> None:
        self.factory = Factory.forProtocol(_Recorder)
        self.factory.accepted = []  # type: ignore[attr-defined]
        self.port = _reactor().listenTCP(0, self.factory, interface="127.0.0.1")
        self.clients: list[socket.socket] = []

    @property
    def accepted(self) -> list[_Recorder]:
        return self.factory.accepted  # type: ignore[attr-defined,no-any-return]

    def connect(self) -> socket.socket:
        client = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for protocol in self.accepted:
            if protocol.transport is not None:
                protocol.transport.abortConnection()  # type: ignore[attr-defined]
        self.port.stopListening()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _until(predicate: Callable[[], object], timeout: float = 10.0) -> Deferred[None]:
    """Let the reactor run until ``predicate()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout

    async def wait() -> None:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("the reactor never got there")
            await deferLater(_reactor(), 0.005, lambda: None)

    return Deferred.fromCoroutine(wait())


@inlineCallbacks
def _accepted(server: _Server) -> Any:
    """A new client socket, and the server transport Twisted accepted for it."""
    before = len(server.accepted)
    client = server.connect()
    yield _until(lambda: len(server.accepted) > before)
    return client, server.accepted[-1].transport


# -- the write buffer: dataBuffer, offset, _tempDataLen


@pytest_twisted.inlineCallbacks
def test_buffered_bytes_counts_a_real_transports_unsent_writes(server: _Server) -> Any:
    """buffered_bytes is exactly what Twisted has not sent: writes not yet moved to its
    buffer, plus its buffer past the offset already sent; 0 once the reactor flushed."""
    _, transport = yield _accepted(server)
    assert ti.buffered_bytes(transport) == 0
    transport.write(b"x" * 10)  # waits in _tempDataBuffer until the reactor's next pass
    assert ti.buffered_bytes(transport) == 10
    yield _until(lambda: ti.buffered_bytes(transport) == 0)

    # A send that takes only part: Twisted keeps dataBuffer and where it got to (offset).
    transport.writeSomeData = lambda data: 1000  # the socket "took" 1000 bytes
    transport.write(b"y" * 50_000)
    transport.doWrite()
    assert transport.offset == 1000, "Twisted no longer tracks a partial send in offset"
    transport.write(b"z" * 5)
    assert ti.buffered_bytes(transport) == 50_000 - 1000 + 5


def test_buffered_bytes_is_none_for_what_keeps_no_such_buffer() -> None:
    """A transport without Twisted's socket buffer is "unknown", never "empty"."""
    from twisted.internet.testing import StringTransport

    assert ti.buffered_bytes(StringTransport()) is None


# -- the write-half flags: connected, disconnecting, _writeDisconnecting, _writeDisconnected


@pytest_twisted.inlineCallbacks
def test_can_send_now_follows_a_real_transports_write_half(server: _Server) -> Any:
    """A fresh real transport may be sent to directly; one with bytes queued, a
    half-close begun, or a close begun may not; a closed one is no longer connected."""
    _, transport = yield _accepted(server)
    assert ti.can_send_now(transport), "a renamed flag sends every byte the slow way"
    transport.write(b"queued")
    assert not ti.can_send_now(transport)
    yield _until(lambda: ti.buffered_bytes(transport) == 0)
    assert ti.can_send_now(transport)
    transport.loseWriteConnection()
    assert not ti.can_send_now(transport), "_writeDisconnecting no longer marks a half-close"
    yield _until(lambda: transport._writeDisconnected)

    _, other = yield _accepted(server)
    assert ti.can_send_now(other) and ti.is_connected(other)
    other.loseConnection()
    assert not ti.can_send_now(other), "disconnecting no longer marks a close"
    yield _until(lambda: server.accepted[-1].lost is not None)
    assert not ti.is_connected(other)


# -- a listening port's accept batch: tcp.Port.doRead and numberAccepts


@pytest_twisted.inlineCallbacks
def test_cap_accept_batches_limits_a_real_ports_accept_pass(server: _Server) -> Any:
    """A capped port accepts at most room() connections per pass, and the reactor calls
    the capped pass, not the port's own."""
    port = server.port
    assert isinstance(port.numberAccepts, int) and port.numberAccepts > 2
    room = [2]
    calls: list[int] = []

    def room_left() -> int:
        calls.append(room[0])
        return room[0]

    ti.cap_accept_batches(port, room_left)
    for _ in range(5):
        server.connect()  # complete in the kernel's backlog; the reactor has not run
    port.doRead()  # one accept pass, as the reactor makes it
    assert len(server.accepted) == 2, "numberAccepts no longer bounds one accept pass"
    room[0] = 100
    yield _until(lambda: len(server.accepted) == 5)
    assert len(calls) >= 2, "the reactor no longer calls the port's doRead attribute"


def test_cap_accept_batches_wraps_a_port_once() -> None:
    """Capping again (every reload does) keeps one wrapper, not a nest of them."""

    class FakePort:
        numberAccepts = 100
        passes = 0

        def doRead(self) -> None:
            self.passes += 1

    port = FakePort()
    ti.cap_accept_batches(port, lambda: 3)
    wrapped = port.doRead
    for _ in range(2000):
        ti.cap_accept_batches(port, lambda: 3)
    assert port.doRead is wrapped
    port.doRead()
    assert port.passes == 1 and port.numberAccepts == 3


# -- the reactor's readiness callbacks: doRead, doWrite, and their registration


@pytest_twisted.inlineCallbacks
def test_swapped_callbacks_are_what_the_reactor_calls(server: _Server) -> Any:
    """Instance doRead / doWrite replace the transport's own for the reactor, and
    restore() hands reads back to the protocol."""
    client, transport = yield _accepted(server)
    protocol = server.accepted[-1]
    reads: list[bytes] = []
    writes: list[int] = []

    def do_read() -> object:
        reads.append(transport.socket.recv(100))
        return None

    def do_write() -> object:
        writes.append(1)
        return swap.normal_write()  # Twisted's own, with nothing to send: stops writing

    assert ti.can_drive(transport)
    swap = ti.swap_read_write(transport, transport, do_read, do_write)
    client.sendall(b"ping")
    yield _until(lambda: reads)
    assert reads == [b"ping"] and protocol.received == b""
    ti.want_write(transport)
    yield _until(lambda: writes)
    swap.restore()
    client.sendall(b"pong")
    yield _until(lambda: protocol.received)
    assert protocol.received == b"pong"


@pytest_twisted.inlineCallbacks
def test_reading_and_writing_registration_reaches_the_reactor(server: _Server) -> Any:
    """hold_reads / resume_reads / want_write add and remove the transport from the
    reactor's readers and writers."""
    _, transport = yield _accepted(server)
    reactor = _reactor()
    assert transport in reactor.getReaders()
    ti.hold_reads(transport)
    assert transport not in reactor.getReaders()
    ti.resume_reads(transport)
    assert transport in reactor.getReaders()
    ti.want_write(transport)
    assert transport in reactor.getWriters()


@pytest_twisted.inlineCallbacks
def test_connection_done_from_do_read_is_a_half_close(server: _Server) -> Any:
    """A doRead that returns CONNECTION_DONE is an end of stream to a half-closeable
    protocol (readConnectionLost), which is how a spliced source reports its FIN."""
    client, transport = yield _accepted(server)
    protocol = server.accepted[-1]
    ti.swap_read_write(transport, transport, lambda: main.CONNECTION_DONE, transport.doWrite)
    client.sendall(b"x")
    yield _until(lambda: protocol.read_closed or protocol.lost)
    assert protocol.read_closed and protocol.lost is None


@pytest_twisted.inlineCallbacks
def test_a_wrapped_transport_is_never_driven(server: _Server) -> Any:
    """Through a ProtocolWrapper, doRead is the socket's, out of reach: splice must keep
    to the normal path there (replacing it on the wrapper would never be called)."""
    _, transport = yield _accepted(server)
    wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
    wrapper.makeConnection(transport)
    assert ti.can_drive(transport)
    assert not ti.can_drive(wrapper)
    assert ti.buffered_bytes(wrapper) == 0  # it forwards to the socket transport's
