"""Show the figures the end-to-end and fuzz tests print, at the end of every run.

Those tests print one line per figure (``faults: 6/6 survived, 0 fds leaked``,
``fuzz httphead: 1000000 inputs ...``); pytest captures them, so without this they would
show only when a test fails. Here they are gathered from the passing tests and printed
under "figures" in the terminal summary, in CI's log too.
"""

from __future__ import annotations

from typing import Any

_FIGURES: list[str] = []
_SOURCES = ("tests/test_e2e_", "tests/test_fuzz.py", "tests/test_bench.py")


def pytest_runtest_logreport(report: Any) -> None:
    if report.when != "call" or not report.passed:
        return
    if not report.nodeid.startswith(_SOURCES):
        return
    for line in report.capstdout.splitlines():
        if line.strip():
            _FIGURES.append(line.strip())


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
