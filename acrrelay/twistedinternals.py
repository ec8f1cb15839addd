"""The one place that reads or replaces what Twisted does not promise.

The data path takes three shortcuts past Twisted's public API, and the connection limit
one more. Each reads or replaces an attribute of Twisted's socket classes
(``twisted.internet.abstract.FileDescriptor``, ``twisted.internet.tcp.Connection`` and
``tcp.Port``) that no interface declares. They are all here, behind named functions, so
that a Twisted upgrade has one module to review, and ``tests/test_twistedinternals.py``
holds one canary per internal, on real Twisted sockets, that fails loudly if a release
renames or changes one. Every function degrades safely: an object without the
attribute (a test double, a TLS transport, a protocol wrapper) takes the normal,
public path.

Checked against Twisted :data:`CHECKED_AGAINST`:

- the write buffer (``dataBuffer``, ``offset``, ``_tempDataLen``): :func:`buffered_bytes`;
- the write-half flags (``connected``, ``disconnecting``, ``_writeDisconnecting``,
  ``_writeDisconnected``): :func:`can_send_now`, :func:`is_connected`;
- the reactor's readiness callbacks (``doRead``, ``doWrite``) replaced per instance, and
  their registration (``startReading``, ``stopReading``, ``startWriting``):
  :func:`can_drive`, :func:`swap_read_write`, :func:`hold_reads`, :func:`resume_reads`,
  :func:`want_write`;
- a listening port's accept batch (``tcp.Port.doRead``, ``numberAccepts``):
  :func:`cap_accept_batches`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import attrs

if TYPE_CHECKING:
    from acrrelay.transports import SocketTransport

__all__ = [
    "CHECKED_AGAINST",
    "ReadWriteSwap",
    "buffered_bytes",
    "can_drive",
    "can_send_now",
    "cap_accept_batches",
    "hold_reads",
    "is_connected",
    "resume_reads",
    "swap_read_write",
    "want_write",
]

#: The Twisted release these functions and their canaries were last checked against.
CHECKED_AGAINST: Final = "26.10.0"

#: What the reactor calls when a descriptor is ready: None, or why it is gone.
ReadinessCallback = Callable[[], object]

_CAPPED: Final = "_acrrelay_capped"


def buffered_bytes(transport: object) -> int | None:
    """Bytes waiting in a socket transport's own (userspace) write buffer, or None if it
    keeps none the way Twisted's socket transports do (a test double, a TLS transport).

    ``FileDescriptor.write`` appends to ``_tempDataBuffer`` and adds to ``_tempDataLen``;
    ``doWrite`` moves those into ``dataBuffer`` and sends from ``offset``. Unsent bytes
    are therefore ``len(dataBuffer) - offset + _tempDataLen``, the sum Twisted's own
    ``doWrite`` and ``_isSendBufferFull`` work from. Reading them is safe: nothing is
    changed, and a missing attribute means "unknown", never "empty".
    """
    t: Any = transport
    try:
        pending: int = len(t.dataBuffer) - t.offset + t._tempDataLen
    except AttributeError:
        return None
    return pending


def is_connected(transport: object) -> bool:
    """Whether a transport's socket is still open (``FileDescriptor.connected``); False
    for anything without the flag."""
    return bool(getattr(transport, "connected", False))


def can_send_now(transport: object) -> bool:
    """Whether bytes may go straight to ``transport``'s socket, skipping Twisted's buffer.

    That is safe only while the transport is connected, no close or half-close has begun
    (``disconnecting``, ``_writeDisconnecting``, ``_writeDisconnected``: after those,
    Twisted's ``write`` decides, and drops what comes after the FIN) and nothing is
    queued ahead (:func:`buffered_bytes` is 0), so order is kept. A missing flag reads as
    "not safe", so an unknown transport always takes ``write``.
    """
    t: Any = transport
    try:  # it runs for every chunk: plain attribute reads, no getattr defaults
        if not t.connected or t.disconnecting or t._writeDisconnecting or t._writeDisconnected:
            return False
        pending: int = len(t.dataBuffer) - t.offset + t._tempDataLen
    except AttributeError:
        return False
    return pending == 0


def can_drive(transport: object) -> TypeGuard[SocketTransport]:
    """Whether the reactor's readiness callbacks of ``transport`` can be taken over.

    The object must be a socket descriptor itself: its class defines ``doRead``,
    ``doWrite`` and the reading/writing registration, and it keeps Twisted's write
    buffer. A wrapper that forwards attributes by ``__getattr__`` (``ProtocolWrapper``)
    does not qualify: replacing ``doRead`` on it would never reach the reactor, which
    calls the socket transport's own.
    """
    kind = type(transport)
    return (
        hasattr(transport, "fileno")
        and all(
            callable(getattr(kind, name, None))
            for name in ("doRead", "doWrite", "startReading", "stopReading", "startWriting")
        )
        and buffered_bytes(transport) is not None
    )


@attrs.define
class ReadWriteSwap:
    """A source's ``doRead`` and a destination's ``doWrite``, taken over; see
    :func:`swap_read_write`."""

    source: Any
    destination: Any
    do_read: ReadinessCallback
    do_write: ReadinessCallback
    #: The transports' own callbacks, for the cases the taker hands back to Twisted.
    normal_read: ReadinessCallback
    normal_write: ReadinessCallback

    def restore(self) -> None:
        """Give both transports their own callbacks back, unless someone else took them."""
        if self.source.doRead == self.do_read:
            self.source.doRead = self.normal_read
        if self.destination.doWrite == self.do_write:
            self.destination.doWrite = self.normal_write


def swap_read_write(
    source: object,
    destination: object,
    do_read: ReadinessCallback,
    do_write: ReadinessCallback,
) -> ReadWriteSwap:
    """Have the reactor call ``do_read`` when ``source`` is readable and ``do_write`` when
    ``destination`` is writable, instead of their own ``doRead`` / ``doWrite``.

    The reactor looks both up on the descriptor at every event (``posixbase
    _doReadOrWrite``), so an instance attribute replaces the method for this connection
    only. The replacements follow the same contract: return None, or the reason the
    connection is gone (``main.CONNECTION_DONE`` for an end of stream, a
    ``ConnectionLost``), which the reactor hands to ``connectionLost`` as usual. Only for
    transports :func:`can_drive` accepts.
    """
    src: Any = source
    dst: Any = destination
    swap = ReadWriteSwap(
        source=src,
        destination=dst,
        do_read=do_read,
        do_write=do_write,
        normal_read=src.doRead,
        normal_write=dst.doWrite,
    )
    src.doRead = do_read
    dst.doWrite = do_write
    return swap


def hold_reads(transport: object) -> None:
    """Stop the reactor reporting ``transport`` readable (``FileDescriptor.stopReading``)."""
    t: Any = transport
    t.stopReading()


def resume_reads(transport: object) -> None:
    """Let the reactor report ``transport`` readable again (``startReading``)."""
    t: Any = transport
    t.startReading()


def want_write(transport: object) -> None:
    """Have the reactor call ``transport``'s ``doWrite`` once it is writable
    (``startWriting``), even with Twisted's own buffer empty."""
    t: Any = transport
    t.startWriting()


def cap_accept_batches(port: object, room: Callable[[], int]) -> None:
    """Let a listening TCP port accept at most ``room()`` connections per pass (at least 1).

    ``tcp.Port.doRead`` accepts up to ``numberAccepts`` connections in one pass, and
    adjusts that number after each pass, whatever ``stopReading`` says meanwhile. Capping
    the batch to the room left just before each pass keeps a burst waiting in the
    kernel's backlog instead of accepting and dropping it. The port is wrapped once: a
    relay watches its ports again at every reload, and nested wrappers would hit the
    recursion limit after about a thousand. Ports without an accept batch are left as
    they are.
    """
    p: Any = port
    if getattr(p, _CAPPED, False):
        return
    accept_pass = getattr(p, "doRead", None)
    if accept_pass is None or not hasattr(p, "numberAccepts"):
        return

    def capped_accept_pass() -> object:
        p.numberAccepts = max(1, min(p.numberAccepts, room()))
        return accept_pass()

    p.doRead = capped_accept_pass
    setattr(p, _CAPPED, True)
