"""A short fuzz of every network parser, so the harnesses cannot rot (about 20 s each),
and planted faults that show a crash and memory growth are caught.

The documented long run is `python -m fuzz run` (10^6 inputs per parser).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from acrrelay.clienthello import ClientHelloReader
from acrrelay.httphead import HttpHeadReader
from acrrelay.proxyproto import ProxyHeaderReader
from fuzz import targets
from fuzz.__main__ import RSS_GROWTH_LIMIT

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SUMMARY = re.compile(
    r"fuzz (?P<parser>[\w-]+): (?P<inputs>\d+) inputs in [\d.]+ s, coverage (?P<edges>\d+) "
    r"edges / \d+ features, (?:RSS (?P<growth>[+-][\d.]+) MiB after warm-up \([^)]*\)|"
    r"RSS growth not measured \([^)]*\)), (?P<crashes>\d+) crashes\b"
)


def _fuzz(
    *args: str, planted: bool = False, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, targets.PLANTED_ENV: "1"} if planted else {**os.environ}
    if not planted:
        env.pop(targets.PLANTED_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "fuzz", "run", *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _summary(result: subprocess.CompletedProcess[str], parser: str) -> re.Match[str]:
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"fuzz {parser}: ")]
    assert lines, result.stdout + result.stderr[-3000:]
    match = SUMMARY.match(lines[0])
    assert match, lines[0]
    return match


@pytest.mark.parametrize("parser", ["clienthello", "httphead", "proxyproto"])
def test_short_fuzz_finds_nothing(parser: str, tmp_path: Path) -> None:
    """20 s of coverage-guided fuzzing: only the parser's own error, no hang, no growth."""
    result = _fuzz("--parser", parser, "--seconds", "20", "--artifacts", str(tmp_path))
    print(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    match = _summary(result, parser)
    assert int(match["inputs"]) > 10_000, line  # it really ran
    assert int(match["edges"]) > 50, line  # and reached into the parser
    assert match["growth"] is not None, line  # past the warm-up, so memory was judged
    assert float(match["growth"]) * MiB <= RSS_GROWTH_LIMIT, line
    assert re.search(r"\b0 crashes\b", line), line
    assert list(tmp_path.iterdir()) == []  # no reproducer was written


def test_a_crash_is_reported_with_a_reproducer_that_reproduces(tmp_path: Path) -> None:
    """A planted target that lets a KeyError escape: the run exits 1, says "1 crashes",
    and leaves a reproducer that makes the target fail again."""
    result = _fuzz(
        "--parser", "planted-crash", "--seconds", "30", "--artifacts", str(tmp_path), planted=True
    )
    print(result.stdout.strip())
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    match = _summary(result, "planted-crash")
    assert match["crashes"] == "1", match[0]
    (reproducer,) = tmp_path.iterdir()
    assert reproducer.name.startswith("planted-crash-crash-"), reproducer
    assert str(reproducer) in match.string, match.string
    assert reproducer.read_bytes()[:1] == b"!", reproducer.read_bytes()
    again = subprocess.run(
        [sys.executable, "-m", "fuzz.run_one", "planted-crash", str(reproducer)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, targets.PLANTED_ENV: "1"},
    )  # fmt: skip
    output = again.stdout + again.stderr
    assert again.returncode != 0, output[-3000:]
    assert "KeyError: 'planted crash'" in output, output[-3000:]


def test_memory_growth_fails_the_run(tmp_path: Path) -> None:
    """A planted target that keeps 1 MiB per 50 ms: the run reports the growth after its
    warm-up and exits 1, though nothing crashed."""
    result = _fuzz(
        "--parser", "planted-leak", "--seconds", "5", "--artifacts", str(tmp_path), planted=True
    )
    print(result.stdout.strip())
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    match = _summary(result, "planted-leak")
    assert match["crashes"] == "0", match[0]
    assert match["growth"] is not None and float(match["growth"]) * MiB > RSS_GROWTH_LIMIT, match[0]
    assert "fuzz planted-leak: FAILED: RSS grew by" in result.stdout, result.stdout


def test_planted_targets_are_out_of_reach_by_default() -> None:
    """Without the tests' environment variable, a run cannot name a planted target, and a
    run of every parser never includes one."""
    result = _fuzz("--parser", "planted-crash", "--runs", "1")
    assert result.returncode == 2 and "invalid choice" in result.stderr, result.stderr
    assert not set(targets.PLANTED) & set(targets.TARGETS)


def test_buffer_checks_fire_on_a_reader_past_its_limit() -> None:
    """The harnesses' buffer checks look at the real buffers: one byte past the bound and
    each check fails."""
    hello = ClientHelloReader(targets.LIMIT)
    hello._pending += b"\x16" * (targets.LIMIT + 1)
    head = HttpHeadReader(targets.LIMIT)
    head._raw += b"A" * (targets.LIMIT + 1)
    proxy = ProxyHeaderReader()
    proxy.feed(b"PROXY ")
    proxy._buf += b"1" * 200
    checks = [
        targets._hello_within_limit(hello),
        targets._head_within_limit(head),
        targets._proxy_within_limit(proxy),
    ]
    for check in checks:
        with pytest.raises(AssertionError):
            check(b"")
    # And they pass on what a reader holds while it waits.
    hello, head, proxy = (
        ClientHelloReader(targets.LIMIT),
        HttpHeadReader(targets.LIMIT),
        ProxyHeaderReader(),
    )
    hello.feed(b"\x16\x03\x01\x08\x00")
    head.feed(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"A" * (targets.LIMIT - 100))
    proxy.feed(b"PROXY TCP4 1.2.3.4")
    targets._hello_within_limit(hello)(b"")
    targets._head_within_limit(head)(b"")
    targets._proxy_within_limit(proxy)(b"")
