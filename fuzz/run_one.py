"""Fuzz one target in this process.

``python -m fuzz.run_one NAME [--rss-log=PATH] [libFuzzer flags...]``

With ``--rss-log``, the process samples its own RSS as it fuzzes and keeps the figures
in PATH (:mod:`fuzz.memory`), for ``python -m fuzz run`` to judge memory growth.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]

from fuzz.memory import MemoryWatch

with atheris.instrument_imports(include=["acrrelay", "h11"]):
    from fuzz.targets import reachable


def main() -> None:
    name = sys.argv[1]
    flags = [arg for arg in sys.argv[2:] if not arg.startswith("--rss-log=")]
    logs = [arg.partition("=")[2] for arg in sys.argv[2:] if arg.startswith("--rss-log=")]
    target = reachable()[name]
    if logs:
        target = MemoryWatch(logs[-1]).wrap(target)
    atheris.Setup([sys.argv[0], *flags], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
