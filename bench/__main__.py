"""``python -m bench run``: see the package docstring and ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench import report, servers
from bench.run import ALL_PEERS, DEFAULT_PEERS, TESTS, Plan, load_json, run
from bench.tools import ToolMissing

RESULTS = Path(__file__).resolve().parent / "results"


def _names(allowed: tuple[str, ...], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from "
                + ",".join(allowed)
            )
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser(
        "run", help="measure direct and every relay, write bench/results/latest.{md,png,json}"
    )
    run_cmd.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (64 MiB, 2 s, 500 idle connections), one round: about a minute",
    )
    run_cmd.add_argument("--rounds", type=int, help="rounds (default 3, 1 with --quick)")
    run_cmd.add_argument(
        "--only",
        type=_names(TESTS, "test"),
        default=TESTS,
        help="tests, comma-separated (default all): " + ",".join(TESTS),
    )
    run_cmd.add_argument(
        "--peers",
        type=_names(ALL_PEERS, "peer"),
        default=DEFAULT_PEERS,
        help="relays, comma-separated (default: "
        + ",".join(DEFAULT_PEERS)
        + "); also haproxy-splice-auto",
    )
    run_cmd.add_argument(
        "--idle-connections",
        type=int,
        help="idle connections per relay (default 10000, 500 with --quick; capped by the "
        "descriptor limit)",
    )
    run_cmd.add_argument(
        "--acrrelay-src",
        type=Path,
        default=servers.REPO,
        help="the source tree whose acrrelay is measured (default: this one)",
    )
    run_cmd.add_argument("--out", type=Path, default=RESULTS, help="where latest.md/png/json go")
    again = commands.add_parser(
        "report", help="render latest.md and latest.png again from a run's latest.json"
    )
    again.add_argument("--out", type=Path, default=RESULTS, help="where latest.json is")
    prof = commands.add_parser(
        "profile",
        help="py-spy on acrrelay during the connection-rate test: bench/results/profile-conn.md",
    )
    prof.add_argument("--seconds", type=int, default=8, help="how long wrk runs (default 8)")
    prof.add_argument("--out", type=Path, default=RESULTS, help="where profile-conn.md goes")
    gw = commands.add_parser(
        "gateway",
        help="issue 11: N clients through the relay alone and through the gateway, over a "
        "50 MB/s shaper; hit throughput beside nginx proxy_cache: "
        "bench/results/gateway-latest.{md,json}",
    )
    gw.add_argument(
        "--quick", action="store_true", help="a 32 MiB layer, N = 1 and 4: under a minute"
    )
    gw.add_argument("--rate", type=float, default=50e6, help="the line, bytes/s each way")
    gw.add_argument("--out", type=Path, default=RESULTS, help="where gateway-latest.md goes")
    args = parser.parse_args(argv)
    if args.command == "gateway":
        return _gateway(args.quick, args.rate, args.out)
    if args.command == "profile":
        from bench.profile import profile

        try:
            profile(args.out, args.seconds)
        except ToolMissing as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        text = report.write(load_json(args.out / "latest.json"), args.out)
        print(text)
        return 0
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    plan = Plan.make(
        quick=args.quick,
        rounds=args.rounds,
        tests=args.only,
        peers=args.peers,
        acrrelay_src=args.acrrelay_src.resolve(),
        idle_count=args.idle_connections,
    )
    try:
        outcome = run(plan)
    except ToolMissing as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    text = report.write(outcome, args.out)
    print()
    print(text)
    print(f"written: {args.out / 'latest.md'}, latest.png, latest.json")
    measured = [r for r in outcome.records if r.error is None]
    return 0 if measured else 1


def _gateway(quick: bool, rate: float, out: Path) -> int:
    from bench import gwreport
    from bench.gateway import GatewayPlan, run_gateway

    outcome = run_gateway(GatewayPlan.make(quick, rate))
    print(gwreport.write(outcome, out))
    print(f"written: {out / 'gateway-latest.md'}, gateway-latest.json")
    return 0 if outcome.pulls and all(p.get("ok") for p in outcome.pulls) else 1


if __name__ == "__main__":
    raise SystemExit(main())
