"""A short fuzz of every network parser, so the harnesses cannot rot (about 20 s each).

The documented long run is `python -m fuzz run` (10^6 inputs per parser).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("parser", ["clienthello", "httphead", "proxyproto"])
def test_short_fuzz_finds_nothing(parser: str, tmp_path: Path) -> None:
    """20 s of coverage-guided fuzzing: only the parser's own error, no hang, no growth."""
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "run", "--parser", parser, "--seconds", "20",
         "--artifacts", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    print(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    line = result.stdout.strip().splitlines()[-1]
    match = re.match(rf"fuzz {parser}: (\d+) inputs in [\d.]+ s, coverage (\d+) edges", line)
    assert match, line
    assert int(match.group(1)) > 10_000, line  # it really ran
    assert int(match.group(2)) > 50, line  # and reached into the parser
    assert "0 crashes" in line
    assert list(tmp_path.iterdir()) == []  # no reproducer was written
