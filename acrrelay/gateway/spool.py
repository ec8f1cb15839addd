"""One download into the blob store, and the readers of blobs and downloads.

A :class:`Spool` writes a download to a temporary file under the store's ``tmp/``, hashing as it
goes; :meth:`Spool.publish` checks size and sha256 and only then renames the file into place.
Readers (:class:`BlobHandle` on a hit, :class:`SpoolReader` on a download in progress) keep their
blob in use, so it is never evicted under them. Import these names from
:mod:`acrrelay.gateway.store`.

Plain synchronous file I/O, no reactor.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Self

import attrs

if TYPE_CHECKING:
    from acrrelay.gateway.store import BlobStore

__all__ = ["BlobHandle", "Mismatch", "Published", "Spool", "SpoolReader", "StoreFull"]

NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class StoreFull(Exception):
    """The spool cannot grow: the disk is full (ENOSPC/EDQUOT) or the cap is full of blobs in use.

    The spool has been abandoned; the caller goes on without caching (bypass).
    """


@attrs.frozen
class Published:
    """The download matched its digest and is now a stored blob at ``path``."""

    digest: str
    size: int
    path: Path


@attrs.frozen
class Mismatch:
    """The download's size or sha256 did not match: nothing was kept."""

    digest: str
    expected_size: int | None
    size: int
    #: What the bytes actually hash to.
    actual: str


class _Reader:
    """An open file on a blob; the blob stays in the store (in use) until :meth:`close`."""

    def __init__(self, store: BlobStore, digest: str, file: BinaryIO) -> None:
        self.digest = digest
        self.file = file
        self._store: BlobStore | None = store
        store._users[digest] += 1

    def read(self, n: int = -1) -> bytes:
        return self.file.read(n)

    def close(self) -> None:
        if self._store is None:
            return
        store, self._store = self._store, None
        self.file.close()
        store._release(self.digest)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BlobHandle(_Reader):
    """A hit: the stored blob's open file (``file.fileno()`` for sendfile) and its size."""

    def __init__(self, store: BlobStore, digest: str, size: int, path: Path, file: BinaryIO):
        super().__init__(store, digest, file)
        self.size = size
        self.path = path


class SpoolReader(_Reader):
    """A reader of a download in progress: reads ``spool.path`` from its own file position.

    It may read up to ``spool.written`` bytes; the file stays readable after publish or
    abandon (the open file outlives the rename or unlink).
    """

    def __init__(self, store: BlobStore, spool: Spool) -> None:
        super().__init__(store, spool.digest, open(spool.path, "rb"))  # noqa: SIM115
        self.spool = spool


class Spool:
    """One download being written to ``path``; readers may tail it up to ``written`` bytes."""

    def __init__(
        self, store: BlobStore, digest: str, expected_size: int | None, path: Path, fd: int
    ) -> None:
        self.digest = digest
        self.expected_size = expected_size
        self.path = path
        self.written = 0
        self._store = store
        self._fd: int | None = fd
        self._hash = hashlib.sha256()

    @property
    def open(self) -> bool:
        """True until published or abandoned."""
        return self._fd is not None

    @property
    def charge(self) -> int:
        """The bytes this download holds against the cap."""
        return max(self.expected_size or 0, self.written)

    def open_reader(self) -> SpoolReader:
        """A reader from the start of the file, keeping the blob in use until closed."""
        if self._fd is None:
            raise ValueError("the spool is closed")
        return SpoolReader(self._store, self)

    def write(self, data: bytes) -> None:
        """Append ``data``; raises :class:`StoreFull` (and abandons) when there is no room."""
        if self._fd is None:
            raise ValueError("the spool is closed")
        grows = self.written + len(data) - self.charge
        if grows > 0 and not self._store._make_room(grows):
            self._no_room()
        view = memoryview(data)
        while view:
            try:
                n = self._store._write(self._fd, view)
            except OSError as e:
                if e.errno in NO_ROOM:
                    self._no_room()
                self.abandon()
                raise
            view = view[n:]
        self._hash.update(data)
        self.written += len(data)

    def publish(self) -> Published | Mismatch:
        """Check size and sha256, fsync, and rename into place; on a mismatch keep nothing.

        Raises :class:`StoreFull` if the disk fills up at the last step (nothing is kept).
        """
        if self._fd is None:
            raise ValueError("the spool is closed")
        actual = "sha256:" + self._hash.hexdigest()
        size_ok = self.expected_size is None or self.written == self.expected_size
        if actual != self.digest or not size_ok:
            self.abandon()
            self._store._counts["mismatches"] += 1
            return Mismatch(self.digest, self.expected_size, self.written, actual)
        fd, self._fd = self._fd, None
        final = self._store.path_of(self.digest)
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(self.path, final)
        except OSError as e:
            self.path.unlink(missing_ok=True)
            self._store._finish(self, None)
            if e.errno in NO_ROOM:
                self._store._counts["full"] += 1
                raise StoreFull(f"no room to publish {self.digest}") from e
            raise
        with contextlib.suppress(OSError):
            _fsync_dir(final.parent)  # durability only: the blob is verified and in place
        published = Published(self.digest, self.written, final)
        self._store._finish(self, published)
        return published

    def abandon(self) -> None:
        """Give up: the temporary file goes, nothing is stored. Safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)
        self.path.unlink(missing_ok=True)
        self._store._finish(self, None)

    def _no_room(self) -> None:
        self.abandon()
        self._store._counts["full"] += 1
        raise StoreFull(f"no room to cache {self.digest}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
