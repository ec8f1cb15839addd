"""The transports the relay drives, typed by what it calls on them.

Twisted's interfaces split a TCP connection's methods over ``ITCPTransport``,
``IHalfCloseableDescriptor``, ``IPushProducer`` and ``IConsumer``, and a protocol's
``transport`` attribute is typed as the narrowest, ``ITransport | None``. The pump needs
the union: a :class:`TCPTransport` is anything with those methods, as Twisted's
``tcp.Connection`` has and the tests' ``StringTransport`` doubles imitate. mypy checks
each call against it instead of being told to look away.

What the relay reads beyond these public methods lives in
:mod:`acrrelay.twistedinternals`.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Protocol, cast

from twisted.internet.interfaces import IAddress, IProducer, ITransport

__all__ = ["SocketTransport", "TCPTransport", "socket_of", "tcp_transport"]


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
