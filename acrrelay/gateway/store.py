"""The blob store: content-addressed files on disk under a size cap, LRU by last use.

Layout under ``root``::

    blobs/sha256/<first 2 hex>/<64 hex>    complete, verified blobs (mode 0600)
    tmp/<...>.part                        downloads in progress (emptied at open)

There is no separate index to corrupt: the store rebuilds its view by scanning ``blobs/`` when it
opens, and a blob's last use is its file's mtime (touched on every hit), so the LRU order
survives a restart. A blob appears under ``blobs/`` only through ``os.rename`` after its size
and sha256 were checked, so nothing half-written ever looks complete.

A blob in use (an open :class:`BlobHandle`, a :class:`SpoolReader`, or a download in progress)
is never evicted. One process owns a store; ``acrrelay cache verify`` may run beside it
(``reset_tmp=False``).

Plain synchronous file I/O, no reactor: the Twisted side calls it, and may hand
``handle.file.fileno()`` to sendfile.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import attrs

from acrrelay.gateway.registryapi import parse_digest
from acrrelay.gateway.spool import (
    NO_ROOM,
    BlobHandle,
    Mismatch,
    Published,
    Spool,
    SpoolReader,
    StoreFull,
)

__all__ = [
    "BlobHandle",
    "BlobStore",
    "Entry",
    "Mismatch",
    "Published",
    "Spool",
    "SpoolReader",
    "StoreFull",
    "StoreStats",
    "VerifyResult",
]

_CHUNK = 1 << 20
StatVfs = Callable[[Path], Any]
Write = Callable[[int, memoryview], int]
Progress = Callable[[str, int, int], None]


@attrs.frozen
class Entry:
    """One stored blob, for ``cache.list()``."""

    digest: str
    size: int
    #: Epoch seconds of the last hit (or of the publish).
    last_used: float


@attrs.frozen
class StoreStats:
    size: int
    count: int
    cap: int
    evictions: int
    #: Downloads not cached for want of room (disk or cap), StoreFull included.
    full: int
    #: Downloads whose size or sha256 did not match the digest.
    mismatches: int
    #: Blobs found corrupt on disk (verify, a hit's hash, a wrong size) and dropped.
    corrupt: int
    #: Downloads not cached because the blob alone is larger than the cap.
    too_large: int
    #: Bytes of downloads in progress (counted against the cap).
    spooling: int
    #: Digests with at least one reader or download.
    in_use: int


@attrs.frozen
class VerifyResult:
    digest: str
    status: Literal["ok", "corrupt", "missing"]
    size: int
    #: What the bytes on disk hash to (None when missing).
    actual: str | None


@attrs.define
class _Blob:
    size: int
    mtime_ns: int


class BlobStore:
    """Content-addressed blobs under ``root``, at most ``cap`` bytes (downloads included)."""

    def __init__(
        self,
        root: Path,
        cap: int,
        *,
        reset_tmp: bool = True,
        statvfs: StatVfs = os.statvfs,
        write: Write = os.write,
    ) -> None:
        if cap < 0:
            raise ValueError(f"cap must be zero or more bytes, got {cap}")
        self.root = Path(root)
        self.cap = cap
        self._blob_dir = self.root / "blobs" / "sha256"
        self._tmp = self.root / "tmp"
        self._statvfs = statvfs
        self._write = write
        for directory in (self.root, self._blob_dir, self._tmp):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if reset_tmp:
            for leftover in self._tmp.iterdir():
                leftover.unlink(missing_ok=True)
        # Least recently used first.
        self._blobs: OrderedDict[str, _Blob] = OrderedDict()
        self._users: Counter[str] = Counter()
        self._spools: dict[str, Spool] = {}
        self._stored_bytes = 0
        self._last_stamp = 0
        self._counts: Counter[str] = Counter()
        self._scan()

    # ------------------------------------------------------------ reading

    def path_of(self, digest: str) -> Path:
        hex64 = _hex(digest)
        return self._blob_dir / hex64[:2] / hex64

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and digest in self._blobs

    def open_blob(self, digest: str) -> BlobHandle | None:
        """A hit: the open file, marked in use until closed, its last use touched; else None."""
        blob = self._blobs.get(digest)
        if blob is None:
            return None
        path = self.path_of(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._unindex(digest)  # removed behind our back (cache verify, an operator)
            return None
        size = os.fstat(fd).st_size
        if size != blob.size:
            os.close(fd)
            self.discard(digest)
            return None
        blob.mtime_ns = self._stamp()
        os.utime(fd, ns=(blob.mtime_ns, blob.mtime_ns))
        self._blobs.move_to_end(digest)
        return BlobHandle(self, digest, size, path, open(fd, "rb"))

    def entries(self) -> list[Entry]:
        """Every stored blob, least recently used first (the eviction order)."""
        return [Entry(d, b.size, b.mtime_ns / 1e9) for d, b in self._blobs.items()]

    def stats(self) -> StoreStats:
        c = self._counts
        return StoreStats(
            size=self._stored(),
            count=len(self._blobs),
            cap=self.cap,
            evictions=c["evictions"],
            full=c["full"],
            mismatches=c["mismatches"],
            corrupt=c["corrupt"],
            too_large=c["too_large"],
            spooling=sum(s.charge for s in self._spools.values()),
            in_use=len(+self._users) + len(self._spools.keys() - self._users.keys()),
        )

    # ------------------------------------------------------------ writing

    def begin(self, digest: str, expected_size: int | None) -> Spool | None:
        """Start a download into a temporary file; None when it cannot be cached.

        None: the blob is larger than the cap, the cap is full of blobs in use, the
        filesystem lacks room even after evicting, the digest is stored already, or
        another download of it is in progress.
        """
        _hex(digest)
        if digest in self._blobs or digest in self._spools:
            return None
        needed = expected_size or 0
        if needed > self.cap:
            self._counts["too_large"] += 1
            return None
        if not self._make_room(needed) or not self._make_disk_room(needed):
            self._counts["full"] += 1
            return None
        try:
            fd, name = tempfile.mkstemp(
                prefix=_hex(digest)[:16] + ".", suffix=".part", dir=self._tmp
            )
        except OSError as e:
            if e.errno in NO_ROOM:
                self._counts["full"] += 1
                return None
            raise
        spool = Spool(self, digest, expected_size, Path(name), fd)
        self._spools[digest] = spool
        return spool

    def set_cap(self, cap: int) -> None:
        """A new cap (a reload): evicts now what is free, the rest as readers let go."""
        if cap < 0:
            raise ValueError(f"cap must be zero or more bytes, got {cap}")
        self.cap = cap
        self._make_room(0)

    def evict(self, digest: str) -> bool:
        """Remove one blob now, unless it is in use or absent. True if it was removed."""
        if digest not in self._blobs or self._in_use(digest):
            return False
        self._remove(digest)
        self._counts["evictions"] += 1
        return True

    def discard(self, digest: str) -> bool:
        """Drop a blob found corrupt, even under readers (their open files stay readable)."""
        if digest not in self._blobs:
            return False
        self._remove(digest)
        self._counts["corrupt"] += 1
        return True

    def verify(
        self, digest: str | None = None, *, progress: Progress | None = None
    ) -> list[VerifyResult]:
        """Re-hash blobs on disk (one, or all); a corrupt one is dropped so it is fetched again.

        ``progress(digest, done, size)`` is called after every chunk read.
        """
        digests = list(self._blobs) if digest is None else [digest]
        results: list[VerifyResult] = []
        for d in digests:
            results.append(self._verify_one(d, progress))
        return results

    # ------------------------------------------------------------ internals

    def _verify_one(self, digest: str, progress: Progress | None) -> VerifyResult:
        h = hashlib.sha256()
        size = 0
        try:
            with open(self.path_of(digest), "rb") as f:
                total = os.fstat(f.fileno()).st_size
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    if progress is not None:
                        progress(digest, size, total)
        except FileNotFoundError:
            self._unindex(digest)
            return VerifyResult(digest, "missing", 0, None)
        actual = "sha256:" + h.hexdigest()
        if actual == digest:
            return VerifyResult(digest, "ok", size, actual)
        if not self.discard(digest):
            self.path_of(digest).unlink(missing_ok=True)
            self._counts["corrupt"] += 1
        return VerifyResult(digest, "corrupt", size, actual)

    def _scan(self) -> None:
        found: list[tuple[int, str, int]] = []
        for sub in self._blob_dir.iterdir():
            if not sub.is_dir() or len(sub.name) != 2:
                continue
            for path in sub.iterdir():
                digest = parse_digest("sha256:" + path.name)
                if digest is None or path.name[:2] != sub.name or not path.is_file():
                    continue
                st = path.stat()
                found.append((st.st_mtime_ns, digest, st.st_size))
        for mtime_ns, digest, size in sorted(found):
            self._index(digest, _Blob(size, mtime_ns))
            self._last_stamp = max(self._last_stamp, mtime_ns)

    def _stamp(self) -> int:
        """A strictly increasing mtime, so two hits in one clock tick keep their order."""
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        return self._last_stamp

    def _stored(self) -> int:
        return self._stored_bytes

    def _index(self, digest: str, blob: _Blob) -> None:
        self._unindex(digest)
        self._blobs[digest] = blob
        self._stored_bytes += blob.size

    def _unindex(self, digest: str) -> None:
        blob = self._blobs.pop(digest, None)
        if blob is not None:
            self._stored_bytes -= blob.size

    def _used(self) -> int:
        return self._stored() + sum(s.charge for s in self._spools.values())

    def _in_use(self, digest: str) -> bool:
        return self._users[digest] > 0 or digest in self._spools

    def _evictable(self) -> Iterator[str]:
        return (d for d in list(self._blobs) if not self._in_use(d))

    def _make_room(self, needed: int) -> bool:
        """Evict least recently used blobs not in use until used + needed <= cap."""
        used = self._used()
        for digest in self._evictable():
            if used + needed <= self.cap:
                break
            used -= self._blobs[digest].size
            self.evict(digest)
        return used + needed <= self.cap

    def _make_disk_room(self, needed: int) -> bool:
        def free() -> int:
            st = self._statvfs(self.root)
            return int(st.f_bavail) * int(st.f_frsize)

        if free() >= needed:
            return True
        for digest in self._evictable():
            self.evict(digest)
            if free() >= needed:
                return True
        return False

    def _remove(self, digest: str) -> None:
        self._unindex(digest)
        self.path_of(digest).unlink(missing_ok=True)

    def _release(self, digest: str) -> None:
        self._users[digest] -= 1
        if self._users[digest] <= 0:
            del self._users[digest]
        if self._used() > self.cap:
            self._make_room(0)

    def _finish(self, spool: Spool, published: Published | None) -> None:
        self._spools.pop(spool.digest, None)
        if published is not None:
            stamp = self._stamp()
            os.utime(published.path, ns=(stamp, stamp))
            self._index(spool.digest, _Blob(published.size, stamp))
        if self._used() > self.cap:
            self._make_room(0)


def _hex(digest: str) -> str:
    if parse_digest(digest) is None:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest[len("sha256:") :]
