"""``python -m fuzz run|seed``: see the package docstring."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
_STATS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def run_one(
    name: str, *, runs: int | None, seconds: int | None, artifacts: Path, quiet: bool
) -> dict[str, object]:
    """Fuzz one parser in a subprocess; its figures."""
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        corpus = Path(work) / "corpus"
        shutil.copytree(CORPUS / name, corpus)
        flags = [
            f"-artifact_prefix={artifacts}/{name}-",
            "-timeout=10",  # one input taking 10 s is a hang
            "-rss_limit_mb=1024",  # memory growth is a crash too
            "-max_len=8192",
            "-print_final_stats=1",
        ]
        if runs is not None:
            flags.append(f"-runs={runs}")
        if seconds is not None:
            flags.append(f"-max_total_time={seconds}")
        started = time.monotonic()
        process = subprocess.run(
            [sys.executable, "-m", "fuzz.run_one", name, *flags, str(corpus)],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
        )
        elapsed = time.monotonic() - started
    output = process.stdout + process.stderr
    stats = _STATS.findall(output)
    done = _DONE.search(output)
    crashes = _ARTIFACT.findall(output)
    result: dict[str, object] = {
        "parser": name,
        "runs": int(done.group(1)) if done else (int(stats[-1][0]) if stats else 0),
        "seconds": round(elapsed, 1),
        "coverage": int(stats[-1][1]) if stats else 0,
        "features": int(stats[-1][2]) if stats else 0,
        "crashes": crashes,
        "status": process.returncode,
    }
    if (crashes or process.returncode) and not quiet:
        sys.stderr.write(output[-4000:])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fuzz the parsers")
    run.add_argument("--parser", choices=sorted(TARGETS), action="append")
    run.add_argument("--runs", type=int, help="inputs per parser (default 1000000)")
    run.add_argument("--seconds", type=int, help="time per parser instead of a count")
    run.add_argument(
        "--artifacts",
        type=Path,
        default=Path("fuzz-artifacts"),
        help="where crash reproducers are written",
    )
    commands.add_parser("seed", help="rebuild the seed corpus from real clients")
    args = parser.parse_args(argv)
    if args.command == "seed":
        from fuzz.seed import build

        build(CORPUS)
        return 0
    runs = args.runs if args.runs is not None or args.seconds is not None else 1_000_000
    failed = 0
    for name in args.parser or sorted(TARGETS):
        result = run_one(
            name, runs=runs, seconds=args.seconds, artifacts=args.artifacts, quiet=False
        )
        crashes = result["crashes"]
        print(
            f"fuzz {name}: {result['runs']} inputs in {result['seconds']} s, "
            f"coverage {result['coverage']} edges / {result['features']} features, "
            f"{len(crashes)} crashes"
            + (f" (reproducers: {', '.join(crashes)})" if crashes else ""),  # type: ignore[arg-type]
            flush=True,
        )
        failed += bool(crashes) or result["status"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
