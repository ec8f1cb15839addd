"""The zero-copy path: move one direction's bytes with splice(2), never through Python.

Once a direction of a spliced pair has carried :data:`PROMOTE_AFTER` bytes the normal
way (a blob download, not an API call), :func:`promote` gives it a pipe and takes over
two methods of the Twisted transports, so the reactor's own readiness events drive it:

- the source's ``doRead`` splices socket -> pipe -> destination socket;
- the destination's ``doWrite`` drains the pipe when the destination was full.

What the normal path guarantees still holds:

- **order**: a read is spliced only while the destination's Twisted write buffer is
  empty (the peeked bytes, a PROXY header, CONNECT's 200 go first); otherwise that read
  takes the normal path;
- **flow control**: a full pipe, or a destination that takes no more, stops reading the
  source until the pipe drains;
- **half-close**: end of stream is reported to Twisted as ``CONNECTION_DONE`` from
  ``doRead`` (after the pipe has drained), which the pump already turns into a FIN;
- **errors**: a source error is returned from ``doRead``; a destination error is
  returned from the destination's next ``doWrite``, so Twisted disconnects each side
  the normal way and the pump reports it;
- **counters**: bytes are counted as they are read from the source, as on the normal
  path, so the idle timeout, the access log and the metrics do not change.

Taking over those methods, and reading Twisted's write buffer, goes through
:mod:`acrrelay.twistedinternals`, where each such internal has its canary test.

Where splice is unavailable, or anything fails before bytes move (no pipe: EMFILE), the
direction stays on the normal path. ``zero_copy = false`` in the config turns it off.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable
from typing import Final

from twisted.internet import error, main
from twisted.internet.interfaces import IReactorTime

from acrrelay.transports import SocketTransport, TCPTransport
from acrrelay.twistedinternals import (
    buffered_bytes,
    can_drive,
    hold_reads,
    is_connected,
    resume_reads,
    swap_read_write,
    want_write,
)

__all__ = ["AVAILABLE", "PROMOTE_AFTER", "SpliceDirection", "promote"]

#: splice(2) exists here (Linux, Python 3.10+).
AVAILABLE: Final = hasattr(os, "splice") and hasattr(os, "pipe2")
#: Bytes a direction carries the normal way before it moves to splice.
PROMOTE_AFTER: Final = 512 * 1024
_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
#: Pipe-fulls one readiness event may move while both sides keep up. A reactor event
#: costs several times the two splice calls it drives, so moving only one pipe-full per
#: event spent most of the CPU on the event; the cap keeps one transfer from holding the
#: reactor long (sixteen 64 KiB pipe-fulls take well under a millisecond here).
BURST: Final = 16
#: The smallest pipe worth splicing through. Past the owner's pipe budget
#: (/proc/sys/fs/pipe-user-pages-soft) Linux hands out one-page pipes, which would move
#: a blob 4 KiB per event: the normal path is faster than that.
MIN_PIPE: Final = 64 * 1024
_GONE: Final = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)


class SpliceDirection:
    """One direction (source socket -> destination socket) moved by splice(2)."""

    def __init__(
        self,
        source: SocketTransport,
        destination: SocketTransport,
        count: Callable[[int], None],
        pipe_size: int,
        clock: IReactorTime,
    ) -> None:
        self.source = source
        self.destination = destination
        self._count = count
        self._clock = clock
        self._held_since: float | None = None  # the source waits for the destination
        self._held_total = 0.0
        self._read_end, self._write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # the default size may do
                fcntl.fcntl(self._write_end, _F_SETPIPE_SZ, pipe_size)
            size = fcntl.fcntl(self._write_end, _F_GETPIPE_SZ)
            if size < min(pipe_size, MIN_PIPE):
                raise OSError(errno.ENOBUFS, f"a pipe of {size} bytes is too small to splice")
        except OSError:
            os.close(self._read_end)
            os.close(self._write_end)
            raise
        self.pipe_size = size
        self.pending = 0  # bytes in the pipe
        self._destination_error: Exception | None = None
        self.closed = False
        self._swap = swap_read_write(source, destination, self.do_read, self.do_write)

    # -- the source

    def do_read(self) -> object:
        if self.pending:
            # The destination is behind: stop reading until the pipe drains.
            self._hold()
            return None
        if buffered_bytes(self.destination):
            return self._swap.normal_read()  # keep order behind bytes Twisted still holds
        for _ in range(BURST):
            try:
                moved = os.splice(self.source.fileno(), self._write_end, 1 << 20, flags=_FLAGS)
            except BlockingIOError:
                return None
            except OSError as e:
                return error.ConnectionLost(str(e))
            if moved == 0:
                return main.CONNECTION_DONE  # end of stream: the pump passes it on as a FIN
            self.pending += moved
            self._count(moved)
            self._drain()
            if self.pending:
                self._hold()
                return None
        return None

    def _hold(self) -> None:
        hold_reads(self.source)
        want_write(self.destination)
        if self._held_since is None:
            self._held_since = self._clock.seconds()

    @property
    def held(self) -> bool:
        """Whether back-pressure holds the source now."""
        return self._held_since is not None

    def held_seconds(self) -> float:
        """Time the source spent held back by a destination that took no more."""
        if self._held_since is None:
            return self._held_total
        return self._held_total + self._clock.seconds() - self._held_since

    # -- the destination

    def do_write(self) -> object:
        if self._destination_error is not None:
            return self._destination_error
        if buffered_bytes(self.destination):
            return self._swap.normal_write()
        if self.pending:
            self._drain()
            if self._destination_error is not None:
                return self._destination_error
            if self.pending:
                return None  # still full: wait for the next writable event
            if self._held_since is not None:
                self._held_total += self._clock.seconds() - self._held_since
                self._held_since = None
            if not self.closed and is_connected(self.source):
                resume_reads(self.source)
        # The pipe is empty: whatever Twisted has to do (its buffer, a FIN, a close).
        return self._swap.normal_write()

    def _drain(self) -> None:
        while self.pending:
            try:
                # fileno() each time, never a cached number: once Twisted closes a socket
                # it answers -1, where a cached number could name the next connection's.
                moved = os.splice(
                    self._read_end, self.destination.fileno(), self.pending, flags=_FLAGS
                )
            except BlockingIOError:
                return
            except OSError as e:
                gone = e.errno in _GONE
                self._destination_error = (
                    error.ConnectionLost(str(e)) if gone else error.ConnectionLost(repr(e))
                )
                want_write(self.destination)  # its doWrite reports the error
                return
            if moved == 0:
                return
            self.pending -= moved

    def close(self) -> None:
        """Give the transports their own methods back and free the pipe."""
        if self.closed:
            return
        self.closed = True
        for fd in (self._read_end, self._write_end):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._swap.restore()


def promote(
    source: TCPTransport,
    destination: TCPTransport,
    count: Callable[[int], None],
    pipe_size: int,
    clock: IReactorTime,
) -> SpliceDirection | None:
    """Move ``source`` -> ``destination`` to splice, or None to stay on the normal path.

    Both must be plain socket transports whose reads and writes can be driven.
    """
    if AVAILABLE and can_drive(source) and can_drive(destination):
        try:
            return SpliceDirection(source, destination, count, pipe_size, clock)
        except OSError:
            pass  # no pipe (EMFILE, say): the normal path goes on
    return None
