"""``python -m fuzz run|seed``: see the package docstring."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.memory import Memory, read_memory
from fuzz.targets import TARGETS, reachable

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MiB = 1 << 20
#: RSS a run may gain after its warm-up before it fails, like a crash. Correct runs gain
#: only what libFuzzer keeps for the inputs it adds to its corpus: measured, at most
#: 1.3 MiB over 10^6 inputs (httphead; the parser alone stays flat). A parser that keeps
#: 8 bytes per input passes this within 10^6 inputs.
RSS_GROWTH_LIMIT = 6 * MiB
_STATS = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)")
_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
# -print_final_stats: also printed when a crash ends the run early, unlike "Done".
_EXECUTED = re.compile(r"stat::number_of_executed_units: *(\d+)")


@dataclass
class FuzzResult:
    """The figures of one parser's run."""

    parser: str
    runs: int
    seconds: float
    coverage: int
    features: int
    crashes: list[str] = field(default_factory=list)
    memory: Memory | None = None
    status: int = 0

    @property
    def grew(self) -> bool:
        """Whether RSS grew past :data:`RSS_GROWTH_LIMIT` after the warm-up."""
        return self.memory is not None and self.memory.growth > RSS_GROWTH_LIMIT

    @property
    def failed(self) -> bool:
        return bool(self.crashes) or self.status != 0 or self.grew

    def memory_text(self) -> str:
        memory = self.memory
        if memory is None or not memory.warmed:
            return "RSS growth not measured (the run ended in its warm-up)"
        return (
            f"RSS {memory.growth / MiB:+.1f} MiB after warm-up ({memory.warm_rss / MiB:.1f} "
            f"-> {memory.last_rss / MiB:.1f} MiB from input {memory.warm_inputs} to "
            f"{memory.last_inputs}, limit +{RSS_GROWTH_LIMIT / MiB:g})"
        )

    def summary(self) -> str:
        return (
            f"fuzz {self.parser}: {self.runs} inputs in {self.seconds} s, "
            f"coverage {self.coverage} edges / {self.features} features, "
            f"{self.memory_text()}, {len(self.crashes)} crashes"
            + (f" (reproducers: {', '.join(self.crashes)})" if self.crashes else "")
        )


def run_one(
    name: str, *, runs: int | None, seconds: int | None, artifacts: Path, quiet: bool
) -> FuzzResult:
    """Fuzz one parser in a subprocess; its figures."""
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as work:
        corpus = Path(work) / "corpus"
        if (CORPUS / name).is_dir():
            shutil.copytree(CORPUS / name, corpus)
        else:  # a planted target has no seeds
            corpus.mkdir()
        rss_log = Path(work) / "rss"
        flags = [
            f"--rss-log={rss_log}",
            f"-artifact_prefix={artifacts}/{name}-",
            "-timeout=10",  # one input taking 10 s is a hang
            "-rss_limit_mb=1024",  # a blow-up stops the run at once; growth is judged after
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
        memory = read_memory(rss_log)
    output = process.stdout + process.stderr
    stats = _STATS.findall(output)
    done = _DONE.search(output) or _EXECUTED.search(output)
    result = FuzzResult(
        parser=name,
        runs=int(done.group(1)) if done else (int(stats[-1][0]) if stats else 0),
        seconds=round(elapsed, 1),
        coverage=int(stats[-1][1]) if stats else 0,
        features=int(stats[-1][2]) if stats else 0,
        crashes=_ARTIFACT.findall(output),
        memory=memory,
        status=process.returncode,
    )
    if (result.crashes or result.status) and not quiet:
        sys.stderr.write(output[-4000:])
    return result


def main(argv: list[str] | None = None) -> int:
    targets = reachable()
    parser = argparse.ArgumentParser(prog="python -m fuzz")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="fuzz the parsers")
    run.add_argument("--parser", choices=sorted(targets), action="append")
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
    for name in args.parser or sorted(TARGETS):  # a planted target runs only when named
        result = run_one(
            name, runs=runs, seconds=args.seconds, artifacts=args.artifacts, quiet=False
        )
        print(result.summary(), flush=True)
        if result.grew and result.memory is not None:
            print(
                f"fuzz {name}: FAILED: RSS grew by {result.memory.growth / MiB:.1f} MiB "
                f"after the warm-up, over the limit of {RSS_GROWTH_LIMIT / MiB:g} MiB",
                flush=True,
            )
        failed += result.failed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
