"""Serving a stored blob, or a download still being written, to one client at its own pace.

:class:`BlobSender` is a streaming producer registered with the client's transport: it reads
its own open file (a stored blob, or the growing spool of a download) in chunks while the client
takes them, pauses when the client's transport is full, and, on a download, waits for more
bytes when it has caught up. A slow reader therefore slows only itself. It ends cleanly only when
every byte promised by the Content-Length was sent; a failed download, or a stored blob whose
bytes no longer hash to its digest, cuts the client with a reset instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, BinaryIO, Final, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from acrrelay.gateway.server import Exchange

__all__ = ["CHUNK", "BlobSender", "Source"]

#: Bytes read from the file per write to the client.
CHUNK: Final = 256 * 1024
#: Chunks written per reactor turn, so one fast reader never starves the others.
CHUNKS_PER_TURN: Final = 8


class Source(Protocol):
    """How much of the file can be read now, and whether it will ever grow or fail."""

    def available(self) -> int: ...

    def failed(self) -> bool: ...

    def complete(self) -> bool:
        """Every byte is in and verified: only then may an answer end cleanly."""
        ...


class _Complete:
    def __init__(self, size: int) -> None:
        self._size = size

    def available(self) -> int:
        return self._size

    def failed(self) -> bool:
        return False

    def complete(self) -> bool:
        return True


@implementer(IPushProducer)
class BlobSender:
    """Sends bytes ``[start, end)`` of ``file`` to ``exchange``, then finishes it."""

    def __init__(
        self,
        reactor: Any,
        exchange: Exchange,
        file: BinaryIO,
        start: int,
        end: int,
        *,
        source: Source | None = None,
        digest: str | None = None,
        sent: Callable[[int], None] | None = None,
        closed: Callable[[str], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._exchange = exchange
        self._file = file
        self._position = start
        self._end = end
        self._source = source or _Complete(end)
        #: Hash the stream (whole-blob answers only) and cut if it does not match.
        self._hash = hashlib.sha256() if digest is not None and start == 0 else None
        self._digest = digest
        self._sent = sent
        self._closed = closed
        self._paused = False
        self._scheduled: Any = None
        self._done = False
        file.seek(start)

    def start(self) -> None:
        self._exchange.register_producer(self)
        self._exchange.when_lost(lambda _: self._close("client_closed"))
        self.wake()

    def wake(self) -> None:
        """More bytes may be available (or the download ended): send what the client takes."""
        if self._done or self._paused or self._scheduled is not None:
            return
        self._scheduled = self._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._scheduled = None
        for _ in range(CHUNKS_PER_TURN):
            if self._done or self._paused:
                return
            if self._source.failed():
                return self._cut("upstream_failed")
            if self._position >= self._end:
                if not self._source.complete():
                    return  # hold the clean end until the download is verified
                return self._finish()
            limit = min(self._end, self._source.available())
            if not self._source.complete():
                # The last byte waits for the download's verification: a client whose
                # download fails can never have read a whole body.
                limit = min(limit, self._end - 1)
            if self._position >= limit:
                return  # caught up with the download: its next write wakes us
            data = self._file.read(min(CHUNK, limit - self._position))
            if not data:
                return self._cut("short_file")
            self._position += len(data)
            if self._hash is not None:
                self._hash.update(data)
                if self._position >= self._end and not self._verified():
                    # Checked before the last chunk leaves, so the client never has it all.
                    return self._cut("digest_mismatch")
            if self._sent is not None:
                self._sent(len(data))
            self._exchange.write(data)
        self.wake()

    def _verified(self) -> bool:
        return self._hash is None or "sha256:" + self._hash.hexdigest() == self._digest

    def _finish(self) -> None:
        self._exchange.unregister_producer()
        self._close("done")
        self._exchange.finish()

    def _cut(self, why: str) -> None:
        self._close(why)
        self._exchange.abort(why)

    def _close(self, why: str) -> None:
        if self._done:
            return
        self._done = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None
        if self._closed is not None:
            self._closed(why)

    # IPushProducer, called by the client's transport

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.wake()

    def stopProducing(self) -> None:
        self._close("client_closed")
