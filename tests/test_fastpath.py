"""The data path's two shortcuts past Twisted's buffering: ``send_now`` and splice(2).

``send_now`` is tested on real Twisted TCP transports, so a Twisted release that
renames the attributes it reads would fail here instead of quietly falling back to
the slower path. The splice direction is tested on real loopback sockets with minimal
transport doubles, driving ``do_read`` and ``do_write`` by hand as the reactor would.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import main
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from acrrelay import twistedinternals, zerocopy
from acrrelay.splice import Pump
from acrrelay.transports import send_now

# -- send_now, on real transports


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.callback(self.transport)  # type: ignore[attr-defined]


@pytest.fixture
def tcp_pair() -> Iterator[tuple[Any, Deferred[Any]]]:
    """A listening port on 127.0.0.1 and a Deferred for the server transport of the next
    connection; the test connects a plain blocking socket to it."""
    factory = Factory.forProtocol(_Accepted)
    factory.accepted = Deferred()  # type: ignore[attr-defined]
    port = _reactor().listenTCP(0, factory, interface="127.0.0.1")
    yield port, factory.accepted  # type: ignore[attr-defined]
    port.stopListening()


def _connect(port: Any) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
    return client


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest_twisted.inlineCallbacks
def test_send_now_puts_bytes_on_the_wire_before_the_reactor_runs(tcp_pair: Any) -> Any:
    """With nothing queued, the bytes leave at once and Twisted's write is not used."""
    port, accepted = tcp_pair
    client = _connect(port)
    transport = yield accepted
    writes: list[bytes] = []
    transport.write = writes.append  # the instance attribute shadows Twisted's method
    try:
        send_now(transport, b"hello, backend")
        # The reactor has not run since: only an immediate send can have delivered them.
        assert _recv_exactly(client, 14) == b"hello, backend"
        assert writes == []
    finally:
        del transport.write
        client.close()
        transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_send_now_queues_behind_bytes_twisted_still_holds(tcp_pair: Any) -> Any:
    """Bytes already in Twisted's buffer go first: send_now must not overtake them."""
    port, accepted = tcp_pair
    client = _connect(port)
    transport = yield accepted
    try:
        transport.write(b"first ")  # buffered until the reactor's next pass
        send_now(transport, b"second")
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)  # nothing was sent ahead of the buffer
        client.setblocking(True)
        yield deferLater(_reactor(), 0.05, lambda: None)
        assert _recv_exactly(client, 12) == b"first second"
    finally:
        client.close()
        transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_send_now_hands_what_the_kernel_refuses_to_twisted_in_order(tcp_pair: Any) -> Any:
    """A send the kernel takes only part of leaves the rest, in order, to Twisted."""
    port, accepted = tcp_pair
    client = _connect(port)
    transport = yield accepted
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    data = os.urandom(4 << 20)
    try:
        send_now(transport, data)
        assert twistedinternals.buffered_bytes(transport), "the kernel took 4 MiB at once"
        got = bytearray()
        client.setblocking(False)
        for _ in range(2000):
            try:
                while chunk := client.recv(1 << 16):
                    got += chunk
            except BlockingIOError:
                pass
            if len(got) >= len(data):
                break
            yield deferLater(_reactor(), 0.005, lambda: None)
        assert bytes(got) == data
    finally:
        client.close()
        transport.abortConnection()


@pytest_twisted.inlineCallbacks
def test_send_now_leaves_a_closing_write_half_to_twisted(tcp_pair: Any) -> Any:
    """Once a half-close has begun, bytes go through Twisted's write, which decides; once
    the write half is shut, nothing more reaches the peer."""
    port, accepted = tcp_pair
    client = _connect(port)
    transport = yield accepted
    try:
        transport.loseWriteConnection()
        writes: list[bytes] = []
        transport.write = writes.append
        send_now(transport, b"while closing")
        assert writes == [b"while closing"]
        del transport.write
        yield deferLater(_reactor(), 0.05, lambda: None)
        assert client.recv(100) == b""  # the FIN
        send_now(transport, b"too late")
        yield deferLater(_reactor(), 0.05, lambda: None)
        assert client.recv(100) == b""  # still only the end of stream
    finally:
        client.close()
        transport.abortConnection()


def test_send_now_falls_back_to_write_for_transports_without_a_socket() -> None:
    """Anything that is not a plain socket transport just gets write()."""
    from twisted.internet.testing import StringTransport

    transport = StringTransport()
    send_now(transport, b"abc")
    assert transport.value() == b"abc"


# -- the splice direction, on real sockets


class _Side:
    """The parts of a Twisted socket transport that SpliceDirection uses."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.connected = True
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.reading = True
        self.writing = False
        self.normal_reads = 0
        self.normal_writes = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> Any:
        self.normal_reads += 1
        return None

    def doWrite(self) -> Any:
        self.normal_writes += 1
        return None

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startWriting(self) -> None:
        self.writing = True


class _Clock:
    def seconds(self) -> float:
        return 0.0


def _socketpair_tcp() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    listener.close()
    return a, b


@pytest.fixture
def spliced() -> Iterator[tuple[socket.socket, _Side, _Side, socket.socket, list[int]]]:
    """writer -> [source side] relay [destination side] -> reader, over two TCP pairs."""
    if not zerocopy.AVAILABLE:
        pytest.fail("splice(2) is not available: the zero-copy path cannot be tested here")
    writer, source_sock = _socketpair_tcp()
    destination_sock, reader = _socketpair_tcp()
    for s in (source_sock, destination_sock, reader):
        s.setblocking(False)
    counted: list[int] = []
    yield writer, _Side(source_sock), _Side(destination_sock), reader, counted
    for s in (writer, source_sock, destination_sock, reader):
        s.close()


def _drain(reader: socket.socket) -> bytes:
    out = bytearray()
    try:
        while chunk := reader.recv(1 << 20):
            out += chunk
    except BlockingIOError:
        pass
    return bytes(out)


def test_one_readiness_event_moves_several_pipe_fulls(spliced: Any) -> None:
    """A burst moves more than one pipe-full per event, and at most BURST of them."""
    writer, source, destination, _, counted = spliced
    direction = zerocopy.promote(source, destination, counted.append, 64 * 1024, _Clock())
    assert direction is not None
    try:
        # More than one pipe-full, and little enough for the kernel to queue at once.
        writer.sendall(os.urandom(768 * 1024))
        assert direction.do_read() is None
        assert direction.pipe_size < sum(counted) <= zerocopy.BURST * direction.pipe_size
    finally:
        direction.close()


def test_every_byte_arrives_in_order_and_end_of_stream_is_a_clean_done(spliced: Any) -> None:
    """Driven like the reactor does, the spliced direction is byte-exact up to EOF."""
    writer, source, destination, reader, counted = spliced
    direction = zerocopy.promote(source, destination, counted.append, 64 * 1024, _Clock())
    assert direction is not None
    data = os.urandom(3 << 20)
    writer.setblocking(False)
    sent = 0
    got = bytearray()
    result = None
    try:
        for _ in range(100_000):
            if sent < len(data):
                with contextlib.suppress(BlockingIOError):
                    sent += writer.send(data[sent : sent + (1 << 18)])
                if sent == len(data):
                    writer.shutdown(socket.SHUT_WR)
            if source.reading:
                result = direction.do_read()
            if destination.writing:
                direction.do_write()
                destination.writing = bool(direction.pending)
            got += _drain(reader)
            if result is main.CONNECTION_DONE:
                break
        assert result is main.CONNECTION_DONE
        assert bytes(got) == data
        assert sum(counted) == len(data)
    finally:
        direction.close()


def test_bytes_twisted_still_holds_go_first(spliced: Any) -> None:
    """While the destination's Twisted buffer holds bytes, reads take the normal path."""
    _, source, destination, _, counted = spliced
    direction = zerocopy.promote(source, destination, counted.append, 64 * 1024, _Clock())
    assert direction is not None
    try:
        destination.dataBuffer = b"peeked bytes not sent yet"
        direction.do_read()
        assert source.normal_reads == 1
        assert counted == []
    finally:
        direction.close()


def test_a_pipe_smaller_than_asked_keeps_the_normal_path_and_leaks_nothing(
    spliced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the user's pipe budget Linux gives one-page pipes: they are not used."""
    _, source, destination, _, counted = spliced
    real_fcntl = zerocopy.fcntl.fcntl

    def over_budget(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == zerocopy._F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "over pipe-user-pages-soft")
        if cmd == zerocopy._F_GETPIPE_SZ:
            return 4096
        return real_fcntl(fd, cmd, arg)  # type: ignore[no-any-return]

    monkeypatch.setattr(zerocopy.fcntl, "fcntl", over_budget)
    before = len(os.listdir("/proc/self/fd"))
    normal_read = source.doRead
    assert zerocopy.promote(source, destination, counted.append, 64 * 1024, _Clock()) is None
    assert len(os.listdir("/proc/self/fd")) == before
    assert source.doRead == normal_read  # nothing was taken over


# -- the whole promotion, on real Twisted transports


class _PumpSide(Protocol):
    """One of the relay's two connections, handing everything to the pump."""

    pump: Pump | None = None
    backend = False

    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        assert self.pump is not None
        (self.pump.backend_data if self.backend else self.pump.client_data)(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.pump is not None:
            (self.pump.backend_lost if self.backend else self.pump.client_lost)(reason)


@pytest_twisted.inlineCallbacks
def test_a_long_download_between_real_transports_moves_to_splice() -> Any:
    """Between two real Twisted TCP transports, the download direction moves to splice(2)
    once past PROMOTE_AFTER, and the client gets every byte in order."""
    reactor = _reactor()
    factory = Factory.forProtocol(_PumpSide)
    factory.accepted = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client, backend = _connect(port), _connect(port)
    try:
        for _ in range(1000):
            if len(factory.accepted) == 2:  # type: ignore[attr-defined]
                break
            yield deferLater(reactor, 0.005, lambda: None)
        by_port = {s.transport.getPeer().port: s for s in factory.accepted}  # type: ignore[attr-defined]
        client_side = by_port[client.getsockname()[1]]
        backend_side = by_port[backend.getsockname()[1]]
        backend_side.backend = True
        pump = Pump(
            reactor,
            client_side.transport,
            idle_timeout=60,
            buffer_size=65536,
            on_done=lambda result: None,
            zero_copy=True,
        )
        client_side.pump = backend_side.pump = pump
        pump.start(backend_side.transport, b"")
        data = os.urandom(2 * zerocopy.PROMOTE_AFTER + 12345)
        got = bytearray()
        sent = 0
        for sock in (client, backend):
            sock.setblocking(False)
        for _ in range(4000):
            with contextlib.suppress(BlockingIOError):
                sent += backend.send(data[sent : sent + (1 << 16)])
            got += _drain(client)
            if len(got) >= len(data):
                break
            yield deferLater(reactor, 0.001, lambda: None)
        assert bytes(got) == data
        assert pump.zero_copy == (False, True)
    finally:
        for side in factory.accepted:  # type: ignore[attr-defined]
            side.transport.abortConnection()
        client.close()
        backend.close()
        yield port.stopListening()
