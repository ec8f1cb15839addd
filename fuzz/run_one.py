"""Fuzz one target in this process: ``python -m fuzz.run_one NAME [libFuzzer flags...]``."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["acrrelay", "h11"]):
    from fuzz.targets import TARGETS


def main() -> None:
    name = sys.argv[1]
    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
