"""``python -m soak``: see the package docstring."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soak.run import SoakOptions, run_soak

QUICK_CONNECTIONS = 2_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description=__doc__)
    parser.add_argument("--connections", type=int, default=100_000, help="default 100000")
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_CONNECTIONS} connections (the test suite)"
    )
    parser.add_argument("--workers", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--seed", type=int, default=1, help="the mix's random seed")
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results"), help="default bench/results"
    )
    args = parser.parse_args(argv)
    connections = QUICK_CONNECTIONS if args.quick else args.connections
    if connections < 1 or args.workers < 1:
        parser.error("--connections and --workers must be at least 1")
    options = SoakOptions(
        connections=connections, workers=args.workers, seed=args.seed, out=args.out
    )
    return run_soak(options)


if __name__ == "__main__":
    sys.exit(main())
