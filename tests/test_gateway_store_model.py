"""Layer 1: the blob store under random sequences of operations (Hypothesis state machine)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from acrrelay.gateway.store import BlobHandle, BlobStore, Published, Spool, StoreFull


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class StoreMachine(RuleBasedStateMachine):
    """Puts, hits, readers, downloads, cap changes and restarts, with the invariants below."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="gw-store-"))
        self.store = BlobStore(self.root, 4000)
        self.handles: list[BlobHandle] = []
        self.spools: list[tuple[Spool, bytes]] = []
        self.serial = 0

    def teardown(self) -> None:
        for handle in self.handles:
            handle.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def fresh(self, size: int) -> bytes:
        self.serial += 1
        return self.serial.to_bytes(4, "big") * (size // 4 + 1)

    @rule(size=st.integers(0, 2500), known=st.booleans())
    def put(self, size: int, known: bool) -> None:
        data = self.fresh(size)
        spool = self.store.begin(digest_of(data), len(data) if known else None)
        if spool is None:
            return
        try:
            spool.write(data)
        except StoreFull:
            assert not spool.open
            return
        assert isinstance(spool.publish(), Published)

    @rule(size=st.integers(1, 2000))
    def start_download(self, size: int) -> None:
        data = self.fresh(size)
        spool = self.store.begin(digest_of(data), len(data))
        if spool is not None:
            spool.write(data[: len(data) // 2])
            self.spools.append((spool, data))

    @precondition(lambda self: self.spools)
    @rule(publish=st.booleans())
    def end_download(self, publish: bool) -> None:
        spool, data = self.spools.pop(0)
        if publish:
            spool.write(data[spool.written :])
            assert isinstance(spool.publish(), Published)
        else:
            spool.abandon()

    @rule(pick=st.integers(0, 100))
    def hit(self, pick: int) -> None:
        entries = self.store.entries()
        if entries:
            handle = self.store.open_blob(entries[pick % len(entries)].digest)
            assert handle is not None
            self.handles.append(handle)

    @precondition(lambda self: self.handles)
    @rule(pick=st.integers(0, 100))
    def let_go(self, pick: int) -> None:
        self.handles.pop(pick % len(self.handles)).close()

    @rule(pick=st.integers(0, 100))
    def evict(self, pick: int) -> None:
        entries = self.store.entries()
        if entries:
            digest = entries[pick % len(entries)].digest
            in_use = any(h.digest == digest for h in self.handles)
            assert self.store.evict(digest) is not in_use

    @rule(cap=st.integers(0, 6000))
    def set_cap(self, cap: int) -> None:
        self.store.set_cap(cap)

    @precondition(lambda self: not self.handles and not self.spools)
    @rule()
    def restart(self) -> None:
        before = self.store.entries()
        self.store = BlobStore(self.root, self.store.cap)
        assert self.store.entries() == before

    @invariant()
    def readers_keep_their_blob(self) -> None:
        for handle in self.handles:
            assert handle.digest in self.store
            assert self.store.path_of(handle.digest).exists()

    @invariant()
    def over_the_cap_only_under_readers(self) -> None:
        stats = self.store.stats()
        if stats.size + stats.spooling > stats.cap:
            in_use = {h.digest for h in self.handles}
            assert all(e.digest in in_use for e in self.store.entries())

    @invariant()
    def disk_matches_the_index(self) -> None:
        on_disk = {
            "sha256:" + p.name: p.stat().st_size
            for p in (self.root / "blobs" / "sha256").glob("*/*")
        }
        assert on_disk == {e.digest: e.size for e in self.store.entries()}
        assert self.store.stats().size == sum(on_disk.values())
        assert len(list((self.root / "tmp").iterdir())) == len(self.spools)


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_store_model = StoreMachine.TestCase
test_store_model.__doc__ = (
    "Random operations never evict a blob under a reader, exceed the cap except under readers, "
    "or let disk and index disagree."
)
