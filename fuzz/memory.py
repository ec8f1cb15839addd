"""RSS of a fuzzing process, sampled as it runs and read back by its parent.

libFuzzer ends the process with C ``exit()``, so no Python code runs after the last
input: :class:`MemoryWatch` rewrites its figures in place every :data:`SAMPLE_EVERY`
inputs instead, and the last sample stands for the end of the run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Inputs between two samples (reading /proc costs about as much as one input).
SAMPLE_EVERY = 1000
#: The warm-up: the baseline is the first sample once both have passed, by when the
#: interpreter, the parser's caches and libFuzzer's tables have reached their size.
WARM_UP_INPUTS = 10_000
WARM_UP_SECONDS = 2.0
_PAGE = os.sysconf("SC_PAGE_SIZE")
_WIDTH = 96


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


@dataclass(frozen=True)
class Memory:
    """What a :class:`MemoryWatch` saw; ``warm_*`` are -1 if the run ended in its warm-up."""

    warm_inputs: int
    warm_rss: int
    last_inputs: int
    last_rss: int
    peak_rss: int

    @property
    def warmed(self) -> bool:
        return self.warm_rss >= 0

    @property
    def growth(self) -> int:
        """Bytes of RSS gained from the end of the warm-up to the last sample."""
        return self.last_rss - self.warm_rss if self.warmed else 0


class MemoryWatch:
    """Samples RSS every :data:`SAMPLE_EVERY` inputs into ``path``: one line of
    :class:`Memory`'s fields, rewritten in place."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._started = time.monotonic()
        self.inputs = 0
        self.warm_inputs = -1
        self.warm_rss = -1
        self.peak_rss = 0

    def wrap(self, target: Callable[[bytes], None]) -> Callable[[bytes], None]:
        def run(data: bytes) -> None:
            self.inputs += 1
            if self.inputs % SAMPLE_EVERY == 0:
                self.sample()
            target(data)

        return run

    def sample(self) -> None:
        rss = rss_bytes()
        self.peak_rss = max(self.peak_rss, rss)
        if (
            self.warm_rss < 0
            and self.inputs >= WARM_UP_INPUTS
            and time.monotonic() - self._started >= WARM_UP_SECONDS
        ):
            self.warm_inputs, self.warm_rss = self.inputs, rss
        line = f"{self.warm_inputs} {self.warm_rss} {self.inputs} {rss} {self.peak_rss}"
        # Fixed width, so a shorter line never leaves the tail of a longer one.
        os.pwrite(self._fd, line.ljust(_WIDTH).encode("ascii"), 0)


def read_memory(path: str | os.PathLike[str]) -> Memory | None:
    """The figures a :class:`MemoryWatch` left in ``path``; None if it sampled nothing."""
    try:
        with open(path, encoding="ascii") as log:
            fields = log.read().split()
    except FileNotFoundError:
        return None
    if len(fields) != 5:
        return None
    return Memory(*map(int, fields))
