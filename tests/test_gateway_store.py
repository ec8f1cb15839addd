"""Layer 1: the blob store on real directories: publish, verify, evict, restart, full disk."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from acrrelay.gateway.store import (
    BlobStore,
    Mismatch,
    Published,
    StoreFull,
)


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob(n: int, fill: int = 0) -> bytes:
    return bytes([fill]) * n


def put(store: BlobStore, data: bytes) -> str:
    digest = digest_of(data)
    spool = store.begin(digest, len(data))
    assert spool is not None
    spool.write(data)
    assert isinstance(spool.publish(), Published)
    return digest


def tmp_files(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "tmp").iterdir())


def test_publish_is_atomic(tmp_path: Path) -> None:
    """While a download is written nothing exists under the blob path; after publish all of it."""
    store = BlobStore(tmp_path, 1 << 20)
    data = os.urandom(300_000)
    digest = digest_of(data)
    spool = store.begin(digest, len(data))
    assert spool is not None
    final = store.path_of(digest)
    for i in range(0, len(data), 65536):
        spool.write(data[i : i + 65536])
        assert not final.exists()
        assert store.open_blob(digest) is None
        assert spool.written == min(i + 65536, len(data))
    result = spool.publish()
    assert result == Published(digest, len(data), final)
    assert final.read_bytes() == data
    assert stat.S_IMODE(final.stat().st_mode) == 0o600
    assert tmp_files(tmp_path) == []
    with store.open_blob(digest) as handle:  # type: ignore[union-attr]
        assert (handle.size, handle.read()) == (len(data), data)


def test_abandon_keeps_nothing(tmp_path: Path) -> None:
    """An abandoned download leaves neither a temporary file nor a blob."""
    store = BlobStore(tmp_path, 1 << 20)
    spool = store.begin(digest_of(b"x" * 10), 10)
    assert spool is not None
    spool.write(b"x" * 5)
    spool.abandon()
    spool.abandon()
    assert tmp_files(tmp_path) == []
    assert store.entries() == []
    assert store.stats().spooling == 0


def test_leftovers_of_a_crash_are_removed_at_open(tmp_path: Path) -> None:
    """A download cut by a crash (a file left in tmp/) is gone at the next open, never a blob."""
    store = BlobStore(tmp_path, 1 << 20)
    data = b"half of it"
    spool = store.begin(digest_of(data * 2), len(data) * 2)
    assert spool is not None
    spool.write(data)
    del store, spool  # the process dies: no abandon, no publish
    assert len(tmp_files(tmp_path)) == 1
    reopened = BlobStore(tmp_path, 1 << 20)
    assert tmp_files(tmp_path) == []
    assert reopened.entries() == []
    assert reopened.open_blob(digest_of(data * 2)) is None


def test_wrong_sha256_keeps_nothing_and_counts(tmp_path: Path) -> None:
    """Bytes that do not hash to the digest are not published, and the mismatch is counted."""
    store = BlobStore(tmp_path, 1 << 20)
    claimed = digest_of(b"the real bytes")
    spool = store.begin(claimed, 14)
    assert spool is not None
    spool.write(b"the fake bytes")
    result = spool.publish()
    assert result == Mismatch(claimed, 14, 14, digest_of(b"the fake bytes"))
    assert not store.path_of(claimed).exists()
    assert tmp_files(tmp_path) == []
    assert store.stats().mismatches == 1
    assert store.open_blob(claimed) is None


def test_wrong_size_keeps_nothing(tmp_path: Path) -> None:
    """Bytes of the right hash but not the announced size are a mismatch too."""
    store = BlobStore(tmp_path, 1 << 20)
    data = b"0123456789"
    spool = store.begin(digest_of(data), 11)
    assert spool is not None
    spool.write(data)
    assert isinstance(spool.publish(), Mismatch)
    assert store.entries() == []
    assert store.stats().mismatches == 1


def test_lru_eviction_by_last_use(tmp_path: Path) -> None:
    """When the cap is reached, the blob hit longest ago goes first."""
    store = BlobStore(tmp_path, 3000)
    a, b, c = (put(store, blob(1000, i)) for i in range(3))
    store.open_blob(a).close()  # type: ignore[union-attr]
    d = put(store, blob(1000, 3))
    assert [e.digest for e in store.entries()] == [c, a, d]
    assert not store.path_of(b).exists()
    assert store.stats().evictions == 1
    assert store.stats().size == 3000


def test_a_blob_in_use_is_never_evicted(tmp_path: Path) -> None:
    """An open handle or a download keeps a blob; with only those left, begin says no."""
    store = BlobStore(tmp_path, 2000)
    a = put(store, blob(1000, 1))
    b = put(store, blob(1000, 2))
    handle = store.open_blob(a)
    assert handle is not None
    store.open_blob(b).close()  # type: ignore[union-attr]
    c = put(store, blob(1000, 3))  # evicts b, the LRU one not in use
    assert {e.digest for e in store.entries()} == {a, c}
    assert not store.evict(a)
    spool = store.begin(digest_of(blob(1000, 4)), 1000)
    assert spool is not None  # c goes; a stays under its reader
    assert store.begin(digest_of(blob(1000, 5)), 1000) is None  # a and the spool in use
    assert store.stats().full == 1
    assert store.path_of(a).exists()
    handle.close()
    assert store.evict(a)


def test_a_blob_larger_than_the_cap_is_not_cacheable(tmp_path: Path) -> None:
    """begin returns None for a blob larger than the cap, evicting nothing."""
    store = BlobStore(tmp_path, 1000)
    a = put(store, blob(600))
    assert store.begin(digest_of(blob(1001)), 1001) is None
    assert store.stats().too_large == 1
    assert a in store


def test_unknown_size_is_bounded_by_the_cap(tmp_path: Path) -> None:
    """A download of unknown size that outgrows the cap raises StoreFull and leaves nothing."""
    store = BlobStore(tmp_path, 1000)
    spool = store.begin(digest_of(blob(1500)), None)
    assert spool is not None
    spool.write(blob(900))
    with pytest.raises(StoreFull):
        spool.write(blob(600))
    assert not spool.open
    assert tmp_files(tmp_path) == []
    assert store.stats().full == 1


def test_lowering_the_cap_evicts_lazily(tmp_path: Path) -> None:
    """set_cap evicts free blobs at once and a blob under a reader once it is let go."""
    store = BlobStore(tmp_path, 3000)
    a, b, c = (put(store, blob(1000, i)) for i in range(3))
    handle = store.open_blob(a)
    assert handle is not None
    store.set_cap(500)
    assert [e.digest for e in store.entries()] == [a]  # b and c went; a is under its reader
    assert store.stats().size > store.stats().cap
    handle.close()
    assert store.entries() == []
    assert store.stats().evictions == 3
    assert b not in store and c not in store


def test_verify_finds_a_flipped_byte_and_drops_the_blob(tmp_path: Path) -> None:
    """verify re-hashes on disk: one flipped byte makes that blob corrupt and gone."""
    store = BlobStore(tmp_path, 1 << 20)
    good = put(store, os.urandom(5000))
    bad = put(store, os.urandom(5000))
    path = store.path_of(bad)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))
    seen: list[tuple[str, int, int]] = []
    results = {r.digest: r for r in store.verify(progress=lambda *a: seen.append(a))}
    assert results[good].status == "ok"
    assert results[bad].status == "corrupt"
    assert results[bad].actual == digest_of(bytes(raw))
    assert not path.exists()
    assert store.open_blob(bad) is None
    assert store.stats().corrupt == 1
    assert (bad, 5000, 5000) in seen
    assert [r.status for r in store.verify(bad)] == ["missing"]


def test_a_truncated_blob_is_not_served(tmp_path: Path) -> None:
    """A blob whose size changed on disk since the scan is dropped at open, never served."""
    store = BlobStore(tmp_path, 1 << 20)
    d = put(store, blob(4096, 7))
    os.truncate(store.path_of(d), 100)
    assert store.open_blob(d) is None
    assert d not in store
    assert store.stats().corrupt == 1


def test_discard_drops_a_blob_under_its_reader(tmp_path: Path) -> None:
    """A blob a hit found corrupt is dropped at once; the reader's open file still reads."""
    store = BlobStore(tmp_path, 1 << 20)
    d = put(store, blob(2000, 9))
    handle = store.open_blob(d)
    assert handle is not None
    assert store.discard(d)
    assert d not in store and not store.path_of(d).exists()
    assert handle.read() == blob(2000, 9)
    handle.close()
    assert store.stats().in_use == 0


def test_the_store_survives_a_restart(tmp_path: Path) -> None:
    """A new store on the same root sees the same blobs in the same LRU order."""
    store = BlobStore(tmp_path, 1 << 20)
    digests = [put(store, blob(100 + i, i)) for i in range(5)]
    for d in (digests[2], digests[0], digests[4]):
        store.open_blob(d).close()  # type: ignore[union-attr]
    before = store.entries()
    again = BlobStore(tmp_path, 1 << 20)
    assert again.entries() == before
    assert [e.digest for e in before] == [
        digests[1],
        digests[3],
        digests[2],
        digests[0],
        digests[4],
    ]
    with again.open_blob(digests[3]) as handle:  # type: ignore[union-attr]
        assert handle.read() == blob(103, 3)


def test_junk_under_blobs_is_ignored(tmp_path: Path) -> None:
    """Files that are not named by a sha256 in the right place are not blobs."""
    (tmp_path / "blobs" / "sha256" / "ab").mkdir(parents=True)
    (tmp_path / "blobs" / "sha256" / "ab" / "not-a-digest").write_bytes(b"x")
    (tmp_path / "blobs" / "sha256" / "ab" / ("cd" * 32)).write_bytes(b"x")
    assert BlobStore(tmp_path, 100).entries() == []


def test_a_reader_tails_a_download_and_keeps_the_published_blob(tmp_path: Path) -> None:
    """A spool reader sees bytes as they are written, reads on after publish, holds the blob."""
    store = BlobStore(tmp_path, 2000)
    data = os.urandom(2000)
    spool = store.begin(digest_of(data), len(data))
    assert spool is not None
    spool.write(data[:700])
    reader = spool.open_reader()
    assert reader.read(spool.written) == data[:700]
    spool.write(data[700:])
    assert isinstance(spool.publish(), Published)
    assert reader.read() == data[700:]
    assert store.begin(digest_of(b"other"), 5) is None  # the blob under the reader stays
    reader.close()
    assert store.begin(digest_of(b"other"), 5) is not None


def test_begin_refuses_duplicates_and_non_digests(tmp_path: Path) -> None:
    """One download per digest, none for a stored digest, and only sha256 digests at all."""
    store = BlobStore(tmp_path, 1 << 20)
    stored = put(store, b"here")
    assert store.begin(stored, 4) is None
    first = store.begin(digest_of(b"new"), 3)
    assert first is not None
    assert store.begin(digest_of(b"new"), 3) is None
    with pytest.raises(ValueError):
        store.begin("sha512:abc", 3)
    with pytest.raises(ValueError):
        store.path_of("sha256:../../etc/passwd")


def fake_statvfs(free: int) -> Any:
    return lambda path: SimpleNamespace(f_bavail=free, f_frsize=1)


def test_begin_declines_when_the_filesystem_has_no_room(tmp_path: Path) -> None:
    """When statvfs reports too little free space and nothing can be evicted, begin says no."""
    store = BlobStore(tmp_path, 1 << 30, statvfs=fake_statvfs(4096))
    assert store.begin(digest_of(b"a"), 4096) is not None
    assert store.begin(digest_of(b"b"), 4097) is None
    assert store.stats().full == 1


def test_begin_evicts_to_make_room_on_disk(tmp_path: Path) -> None:
    """Below the cap but short of disk space, begin evicts LRU blobs until the disk has room."""
    disk = 10_000
    holder: list[BlobStore] = []

    def statvfs(path: Path) -> Any:
        used = holder[0].stats().size if holder else 0
        return SimpleNamespace(f_bavail=disk - used, f_frsize=1)

    store = BlobStore(tmp_path, 1 << 30, statvfs=statvfs)
    holder.append(store)
    a, b, c = (put(store, blob(3000, i)) for i in range(3))
    assert store.begin(digest_of(blob(5000)), 5000) is not None
    assert [e.digest for e in store.entries()] == [c]
    assert a not in store and b not in store


def test_an_injected_enospc_raises_store_full(tmp_path: Path) -> None:
    """A write failing with ENOSPC or EDQUOT raises StoreFull and leaves nothing behind."""

    for code in (errno.ENOSPC, errno.EDQUOT):

        def write(fd: int, data: memoryview, code: int = code) -> int:
            raise OSError(code, os.strerror(code))

        store = BlobStore(tmp_path / str(code), 1 << 20, write=write)
        spool = store.begin(digest_of(b"data"), 4)
        assert spool is not None
        with pytest.raises(StoreFull):
            spool.write(b"data")
        assert tmp_files(tmp_path / str(code)) == []
        assert store.stats().full == 1


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs, mounted for the test and unmounted after it."""
    mountpoint = tmp_path / f"fs-{uuid.uuid4().hex[:8]}"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def test_a_real_full_filesystem_raises_store_full(small_fs: Path) -> None:
    """On a real 8 MiB filesystem, a blob that does not fit ends in StoreFull, not an error."""
    store = BlobStore(small_fs / "cache", 1 << 30)
    data = os.urandom(12 << 20)
    spool = store.begin(digest_of(data), None)  # size unknown: statvfs cannot say no up front
    assert spool is not None
    with pytest.raises(StoreFull):
        for i in range(0, len(data), 1 << 20):
            spool.write(data[i : i + (1 << 20)])
    assert tmp_files(small_fs / "cache") == []
    assert store.stats().full == 1
    small = put(store, b"still works")
    assert small in store


def test_a_real_full_filesystem_declines_up_front(small_fs: Path) -> None:
    """With the size known, statvfs on a real 8 MiB filesystem makes begin decline at once."""
    store = BlobStore(small_fs / "cache", 1 << 30)
    assert store.begin(digest_of(b"big"), 9 << 20) is None
    assert store.stats().full == 1
