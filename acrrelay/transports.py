"""The transports the relay drives: typed by what it calls on them, and their sockets.

Twisted's interfaces split a TCP connection's methods over ``ITCPTransport``,
``IHalfCloseableDescriptor``, ``IPushProducer`` and ``IConsumer``, and a protocol's
``transport`` attribute is typed as the narrowest, ``ITransport | None``. The pump needs
the union: a :class:`TCPTransport` is anything with those methods, as Twisted's
``tcp.Connection`` has and the tests' ``StringTransport`` doubles imitate. mypy checks
each call against it instead of being told to look away.

Beside the types, the few things the pump does with a transport's socket itself:
send at once when nothing is queued (:func:`send_now`), tell a reset from an end of
stream (:func:`reset_not_eof`), count what the peer has not acknowledged, and end with a
reset. What the relay reads beyond Twisted's public methods lives in
:mod:`acrrelay.twistedinternals`.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
from collections.abc import Iterable
from typing import Final, Protocol, cast

from twisted.internet.interfaces import IAddress, IProducer, ITCPTransport, ITransport

from acrrelay.twistedinternals import buffered_bytes, can_send_now

__all__ = [
    "SocketTransport",
    "TCPTransport",
    "linger_zero",
    "peer_gone",
    "reset_not_eof",
    "send_now",
    "socket_of",
    "tcp_transport",
    "tune",
    "unsent_bytes",
]

_TCP_CLOSE: Final = 7  # tcpi_state of a socket the kernel has closed (after a reset)


class TCPTransport(Protocol):
    """A connected TCP stream, as the pump uses it: a consumer, a producer, half-closeable."""

    #: The write-buffer high-water mark: above it, the registered producer is paused.
    bufferSize: int

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Iterable[bytes]) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def loseWriteConnection(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...

    def registerProducer(self, producer: IProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def getHandle(self) -> object: ...


class SocketTransport(TCPTransport, Protocol):
    """A TCP transport over a socket of this process, whose descriptor splice(2) can use."""

    def fileno(self) -> int: ...


def tcp_transport(transport: ITransport | None) -> TCPTransport:
    """A protocol's ``transport``, as the TCP stream a relay connection always has.

    Every connection the relay accepts or opens is TCP (its listeners and backends are
    stream endpoints), so this only tells mypy what Twisted's ``ITransport`` typing
    cannot. It fails on a protocol that has no transport yet.
    """
    if transport is None:
        raise RuntimeError("the protocol has no transport: it is not connected")
    return cast(TCPTransport, transport)


def socket_of(transport: object) -> socket.socket | None:
    """The socket under ``transport`` (``ISystemHandle.getHandle``), or None if it has
    none (a test double, a transport of another kind)."""
    get_handle = getattr(transport, "getHandle", None)
    try:
        handle = get_handle() if get_handle is not None else None
    except AttributeError:
        return None  # Twisted drops a transport's socket once the connection is lost
    return handle if isinstance(handle, socket.socket) else None


def send_now(transport: TCPTransport, data: bytes) -> None:
    """Write ``data`` to ``transport``, sending what the kernel takes at once.

    Twisted's ``write`` only buffers, and sends on the reactor's next pass once the socket
    reports writable: one more epoll round trip, and two more epoll_ctl calls, for each
    hop of a TLS handshake through the relay. When nothing is queued ahead of ``data``,
    sending now keeps the order and saves that pass. What the kernel does not take, and
    every error, goes to ``transport.write``: Twisted's buffering, flow control and
    disconnection handle them as they would have.
    """
    if can_send_now(transport):
        sock = transport.getHandle()
        try:
            sent = sock.send(data) if isinstance(sock, socket.socket) else 0
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's own write will meet and report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def reset_not_eof(transport: ITransport | None) -> bool:
    """Whether an end of stream was really a reset; if so, abort ``transport`` for it.

    epoll can report a reset socket with EPOLLERR alone, which Twisted's reactor, seeing
    a socket "disconnected while reading", hands on as a clean end of stream. The pending
    socket error tells them apart; the abort then reaches the protocol as a connection
    lost, which the pump passes on as a reset, never as a FIN.
    """
    sock = socket_of(transport)
    if sock is None:
        return False
    try:
        pending = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError:
        return False
    if not pending:
        return False
    tcp_transport(transport).abortConnection()
    return True


def unsent_bytes(transport: TCPTransport) -> int:
    """Bytes written to ``transport`` that its peer has not acknowledged yet."""
    pending = buffered_bytes(transport) or 0
    if pending:
        return pending
    sock = socket_of(transport)
    if sock is None:
        return 0
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", buf)[0])


def peer_gone(transport: TCPTransport) -> bool:
    """Whether the kernel has given up on this socket: a pending error, or TCP_CLOSE."""
    sock = socket_of(transport)
    if sock is None:
        return False
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return bool(info) and info[0] == _TCP_CLOSE


def linger_zero(transport: TCPTransport) -> None:
    """Make the coming close send a RST, as the other side did, rather than a FIN."""
    sock = socket_of(transport)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def tune(transport: TCPTransport, buffer_size: int) -> None:
    """Set the high-water mark, and TCP options that suit a relay."""
    if hasattr(transport, "bufferSize"):
        transport.bufferSize = buffer_size
    if ITCPTransport.providedBy(transport):
        tcp: ITCPTransport = transport
        try:
            tcp.setTcpNoDelay(True)
            tcp.setTcpKeepAlive(True)
        except OSError:
            pass  # the socket may already be gone; the pump will learn soon enough
