"""The report of a run: a Markdown table (medians over rounds), notes on what limits each
figure, the targets of issue 6, and a PNG chart of the ratios to direct."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.run import DISTURBED, GiB, Outcome, Record

#: (column heading, test, key, format): the figures of the table, in order.
COLUMNS: tuple[tuple[str, str, str, str], ...] = (
    ("bulk \u00d7 direct", "bulk", "ratio", "{:.2f}"),
    ("bulk MB/s", "bulk", "mb_s", "{:.0f}"),
    ("relay CPU s/GiB", "bulk", "cpu_s_per_gib", "{:.2f}"),
    ("new conn \u00d7 direct", "conn", "ratio", "{:.2f}"),
    ("new conn/s", "conn", "conn_s", "{:.0f}"),
    ("relay CPU µs/conn", "conn", "cpu_us_per_conn", "{:.0f}"),
    ("TTFB added p50 ms", "ttfb", "added_p50_ms", "{:+.2f}"),
    ("TTFB added p99 ms", "ttfb", "added_p99_ms", "{:+.2f}"),
    ("TTFB p50 \u00d7 direct", "ttfb", "ratio_p50", "{:.2f}"),
    ("slow reader RSS growth MiB", "slow", "rss_growth_mib", "{:.1f}"),
    ("idle KiB/conn", "idle", "kib_per_conn", "{:.1f}"),
)

#: Issue 6's targets: (what, test, key, limit, higher is better).
TARGETS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("bulk ≥ 0.90 \u00d7 direct", "bulk", "ratio", 0.90, True),
    ("relay CPU ≤ 0.25 s/GiB", "bulk", "cpu_s_per_gib", 0.25, False),
    ("relay CPU ≤ 200 µs per new connection", "conn", "cpu_us_per_conn", 200.0, False),
    ("TTFB added at p99 ≤ 0.4 ms", "ttfb", "added_p99_ms", 0.4, False),
    ("slow reader RSS growth ≤ 4 MiB", "slow", "rss_growth_mib", 4.0, False),
    ("10 000 idle connections ≤ 20 KiB each", "idle", "kib_per_conn", 20.0, False),
)


@dataclass
class Figures:
    """Medians over rounds of one target's figures, and how many rounds made them."""

    values: dict[tuple[str, str], float]
    rounds: dict[str, tuple[int, int]]  # test -> (rounds that worked, rounds run)

    def get(self, test: str, key: str) -> float | None:
        return self.values.get((test, key))


def with_ratios(records: list[Record]) -> list[Record]:
    """Add each relay's ratio to the direct measurement paired with it (bulk, conn)."""
    main = {"bulk": "mb_s", "conn": "conn_s"}
    direct: dict[tuple[int, str, str], float] = {}
    for r in records:
        key = main.get(r.test)
        if r.target == "direct" and r.pair and r.error is None and key and key in r.values:
            direct[(r.round, r.test, r.pair)] = r.values[key]
    for r in records:
        key = main.get(r.test)
        if key is None or r.error is not None or key not in r.values:
            continue
        if r.target == "direct":
            r.values["ratio"] = 1.0
        elif base := direct.get((r.round, r.test, r.target)):
            r.values["ratio"] = r.values[key] / base
    return records


def figures(records: list[Record], target: str) -> Figures:
    values: dict[tuple[str, str], list[float]] = {}
    rounds: dict[str, list[int]] = {}
    for r in records:
        if r.target != target:
            continue
        counts = rounds.setdefault(r.test, [0, 0])
        counts[1] += 1
        if r.error is not None:
            continue
        counts[0] += 1
        for key, value in r.values.items():
            values.setdefault((r.test, key), []).append(value)
    return Figures(
        {k: statistics.median(v) for k, v in values.items()},
        {k: (v[0], v[1]) for k, v in rounds.items()},
    )


def _cell(fig: Figures, test: str, key: str, fmt: str) -> str:
    worked, ran = fig.rounds.get(test, (0, 0))
    if ran == 0:
        return ""
    if worked == 0:
        return "failed"
    value = fig.get(test, key)
    if value is None:
        return "\u2013"
    text = fmt.format(value)
    return text if worked == ran else f"{text} ({worked}/{ran})"


def markdown(outcome: Outcome) -> str:
    plan = outcome.plan
    records = with_ratios(outcome.records)
    targets = ["direct", *outcome.peers]
    figs = {t: figures(records, t) for t in targets}
    columns = [c for c in COLUMNS if c[1] in plan.tests]
    m = outcome.machine
    lines = [
        "# acrrelay benchmark",
        "",
        f"{outcome.started}; {plan.rounds} round(s), medians over rounds"
        f"{' (quick mode: small sizes, for smoke tests only)' if plan.quick else ''}; "
        f"took {outcome.seconds / 60:.1f} min.",
        f"Machine: {m['cpu']}, {m['memory']}, Linux {m['kernel']}; load average "
        f"{m['load_start']} at the start, {m['load_end']} at the end (the machine is shared).",
        f"acrrelay: {m['acrrelay']}. Python {m['python']}, {m['openssl']}.",
        f"Tools: {m['versions']}.",
        "",
        "Every figure is measured through the relay and, where it has one, directly (client "
        "to backend) in the same round; **\u00d7 direct** is the median over rounds of "
        "relay ÷ direct taken round by round: for bulk and new conn each relay's "
        "measurement is paired with a direct one right before or after it (the order "
        "alternating), the relays' order rotating from round to round; TTFB interleaves "
        "direct and relayed requests one by one. The direct row gives the median of all "
        "direct measurements. Relay CPU is utime + stime of the relay's processes (all "
        "threads, all children) from `/proc/PID/stat`, before and after.",
        "",
        "| peer | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for target in targets:
        fig = figs[target]
        cells = []
        for _, test, key, fmt in columns:
            if target == "direct":
                if test in ("bulk", "conn") and key == "ratio":
                    cells.append("1.00" if fig.rounds.get(test) else "")
                elif test in ("bulk", "conn") and key in ("mb_s", "conn_s"):
                    cells.append(_cell(fig, test, key, fmt))
                else:
                    cells.append("")
            else:
                cells.append(_cell(fig, test, key, fmt))
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines.append("")
    if "ttfb" in plan.tests:
        d50 = _median_over_peers(figs, outcome.peers, "direct_p50_ms")
        d99 = _median_over_peers(figs, outcome.peers, "direct_p99_ms")
        if d50 is not None and d99 is not None:
            lines.append(
                f"Direct TTFB (new connection, TCP + TLS handshake + request + first byte): "
                f"p50 {d50:.2f} ms, p99 {d99:.2f} ms. **TTFB added** is the relay's quantile "
                "minus the direct quantile, from samples taken alternately direct and "
                "through the relay."
            )
            lines.append("")
    lines += _targets_section(outcome, figs)
    lines += _method_section(outcome)
    lines += _limits_section(outcome, figs)
    if outcome.skipped or outcome.notes:
        lines += ["## Skipped and notes", ""]
        lines += [f"- {name}: {why}" for name, why in outcome.skipped.items()]
        lines += [f"- {note}" for note in outcome.notes]
        lines.append("")
    failures = [r for r in records if r.error]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- round {r.round} {r.test} {r.target}: {r.error}" for r in failures]
        lines.append("")
    lines += _rounds_section(records)
    return "\n".join(lines) + "\n"


def _median_over_peers(figs: dict[str, Figures], peers: list[str], key: str) -> float | None:
    found = [v for p in peers if (v := figs[p].get("ttfb", key)) is not None]
    return statistics.median(found) if found else None


def _targets_section(outcome: Outcome, figs: dict[str, Figures]) -> list[str]:
    variants = [p for p in outcome.peers if p.startswith("acrrelay")]
    tests = outcome.plan.tests
    rows = [t for t in TARGETS if t[1] in tests]
    if not variants or not rows:
        return []
    lines = [
        "## Issue 6's targets",
        "",
        "| target | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for what, test, key, limit, higher in rows:
        cells = []
        for v in variants:
            value = figs[v].get(test, key)
            if value is None:
                cells.append("\u2013")
                continue
            met = value >= limit if higher else value <= limit
            shown = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
            cells.append(
                f"met ({shown})" if met else f"**missed** ({shown}, by {abs(value - limit):.2g})"
            )
        lines.append(f"| {what} | " + " | ".join(cells) + " |")
    if "bulk" in tests and "haproxy-splice" in figs:
        hs = figs["haproxy-splice"].get("bulk", "ratio")
        cells = []
        for v in variants:
            value = figs[v].get("bulk", "ratio")
            if value is None or hs is None:
                cells.append("\u2013")
            else:
                cells.append(
                    f"met ({value:.2f} vs {hs:.2f})"
                    if value > hs
                    else f"**missed** ({value:.2f} vs {hs:.2f})"
                )
        lines.append("| bulk ahead of HAProxy with splice | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _method_section(outcome: Outcome) -> list[str]:
    plan = outcome.plan
    tests = plan.tests
    lines = [
        "## How it was measured",
        "",
        "- **Backend**: nginx (2 workers) on 127.0.0.1 serving TLS for `bench.acrrelay.test` "
        "with a test-CA ECDSA P-256 certificate: `/big` is a sparse file read once beforehand "
        "(so it is in the page cache), `/small` a 3-byte answer. No session cache and no "
        "tickets, so every new connection is a full TLS 1.3 handshake.",
        "- **Relays**: each started fresh for every test of every round, in the foreground "
        "with its own configuration, on 127.0.0.1, one SNI route to the backend, no access "
        "log. acrrelay: "
        '`access_log = "off"`, everything else default; nginx: stream `ssl_preread` with '
        "a `map`, `worker_processes auto`; HAProxy: `mode tcp`, `inspect-delay 5s`, "
        "`req.ssl_hello_type 1`, `use_backend` by `req.ssl_sni`, default threads (one per "
        "core), `haproxy-splice` adds `option splice-request` and `option splice-response` "
        "(with `option splice-auto` alone, HAProxy 2.6 spliced almost nothing here: the "
        "same CPU per GiB as without); sniproxy: a `listener` with a "
        "`table`.",
    ]
    if "bulk" in tests:
        lines.append(
            f"- **bulk**: one download of {plan.bulk_bytes / GiB:g} GiB with "
            "`curl -o /dev/null` (OpenSSL; it verifies the certificate), MB = 10⁶ bytes. "
            "curl rather than a Python `ssl` reader: both spent the same client CPU per "
            "byte when tried here (about 0.77 s/GiB), and curl is the standard tool."
        )
    if "conn" in tests:
        lines.append(
            f"- **new conn**: `wrk -t{plan.wrk_threads} -c{plan.wrk_connections} "
            f"-d{plan.conn_seconds:g}s -H 'Connection: close'` on `/small`, so each request is "
            "a new TCP connection and a full TLS handshake; a Lua `wrk.resolve` sends it to "
            "127.0.0.1 while SNI and Host name the benchmark host. Relay CPU µs/conn = relay "
            "CPU ÷ requests completed."
        )
    if "ttfb" in tests:
        lines.append(
            f"- **TTFB**: {plan.ttfb_pairs} pairs of sequential requests from one Python "
            "client, each on a new connection (connect, TLS handshake with certificate "
            "check, `GET /small`, first byte), direct and through the relay alternately."
        )
    if "slow" in tests:
        lines.append(
            f"- **slow reader**: one TLS download of `/big` read at {plan.slow_rate / 1e6:g} MB/s "
            f"for {plan.slow_seconds:g} s by a Python client while the backend sends as fast as "
            "TCP lets it; peak minus starting RSS (VmRSS summed over the relay's processes, "
            "sampled every 50 ms). Kernel socket buffers are not in RSS."
        )
    if "idle" in tests:
        lines.append(
            f"- **idle**: {plan.idle_count} TLS connections opened through the relay (a full "
            "handshake each, so each is routed and has its backend connection), held idle; "
            "(RSS with them \u2212 RSS before) ÷ connections. The client is its own process."
        )
    lines.append("")
    return lines


def _limits_section(outcome: Outcome, figs: dict[str, Figures]) -> list[str]:
    direct = figs.get("direct")
    lines = ["## What limits the figures", ""]
    if direct is None:
        return []
    cores = _cores(outcome)
    if (c := direct.get("bulk", "client_cores")) is not None:
        b = direct.get("bulk", "backend_cores") or 0.0
        busy = direct.get("bulk", "machine_busy") or 0.0
        limit = _limit_words(c, b, busy)
        lines.append(
            f"- **bulk, direct**: curl used {c:.2f} of a core, the backend's nginx worker "
            f"{b:.2f} (one connection is one worker), the machine's {cores} cores were "
            f"{busy:.0%} busy: {limit}. Through a relay its CPU comes out of the same "
            f"{cores} cores, so the bulk ratio mostly measures the relay's CPU per byte "
            "against the client's and the backend's; no relay can reach 1.00 here."
        )
    if (c := direct.get("conn", "client_cores")) is not None:
        b = direct.get("conn", "backend_cores") or 0.0
        busy = direct.get("conn", "machine_busy") or 0.0
        n = direct.get("conn", "conn_s") or 0.0
        per = (direct.get("conn", "client_cpu") or 0.0) / max(
            (direct.get("conn", "connections") or 1.0), 1.0
        )
        lines.append(
            f"- **new conn, direct**: wrk used {c:.2f} cores ({per * 1e6:.0f} µs of client "
            f"CPU per TLS handshake: OpenSSL 3.0 client handshakes are expensive), the backend "
            f"{b:.2f}, the machine was {busy:.0%} busy at {n:.0f} conn/s: "
            f"{_limit_words(c / outcome.plan.wrk_threads, b / 2, busy)}. A relay's µs per "
            "connection is taken from the same cores, so the ratio shows that cost more than "
            "the relay's own ceiling."
        )
    foreign = [
        v
        for t in figs.values()
        for test in ("bulk", "conn")
        if (v := t.get(test, "foreign_cores")) is not None
    ]
    steal = [
        v
        for t in figs.values()
        for test in ("bulk", "conn")
        if (v := t.get(test, "steal_cores")) is not None
    ]
    disturbed = [
        r
        for r in outcome.records
        if r.error is None and r.values.get("foreign_cores", 0.0) > DISTURBED
    ]
    if disturbed:
        total = sum(1 for r in outcome.records if r.error is None and "foreign_cores" in r.values)
        by_round = Counter(r.round for r in disturbed)
        lines.append(
            f"- **disturbed measurements**: {len(disturbed)} of the {total} bulk and conn "
            f"measurements ran while other processes used more than {DISTURBED} cores ("
            + ", ".join(f"round {n}: {c}" for n, c in sorted(by_round.items()))
            + "; marked in the table of every measurement). Pairing with direct and medians "
            "over rounds damp them; the relays' CPU per GiB and per connection are their own "
            "CPU time and move least."
        )
    if foreign:
        lines.append(
            f"- **other load**: CPU used on the machine by processes other than the client, "
            f"backend, relay and the bench itself, during bulk and conn measurements: median "
            f"{statistics.median(foreign):.2f} cores (max of the medians {max(foreign):.2f}); "
            f"hypervisor steal {statistics.median(steal):.2f} cores."
        )
    floor = figs.get("twisted-floor")
    relay = figs.get("acrrelay")
    if floor is not None and relay is not None:
        lines.append("- **the Twisted floor**: " + _floor_words(floor, relay))
    if "ttfb" in outcome.plan.tests:
        lines.append(
            "- **TTFB**: the client is one Python process doing sequential handshakes, so "
            "both paths pay the same client cost; the difference is the relay's accept, "
            "ClientHello read, backend connect and the extra loopback hops."
        )
    lines.append("")
    return lines


#: (test, key, unit, format, the issue's target for acrrelay or None)
_FLOOR_FIGURES: tuple[tuple[str, str, str, str, float | None], ...] = (
    ("conn", "cpu_us_per_conn", "µs of relay CPU per new connection", ".0f", 200.0),
    ("ttfb", "added_p50_ms", "ms of TTFB added at p50", ".2f", None),
    ("ttfb", "added_p99_ms", "ms of TTFB added at p99", ".2f", 0.4),
    ("bulk", "cpu_s_per_gib", "s of relay CPU per GiB", ".2f", 0.25),
)


def _floor_words(floor: Figures, relay: Figures) -> str:
    """acrrelay's figures beside those of ``twisted-floor``, the least a Twisted relay does."""
    parts = []
    for test, key, unit, fmt, target in _FLOOR_FIGURES:
        f, a = floor.get(test, key), relay.get(test, key)
        if f is None or a is None:
            continue
        text = f"{unit}: floor {f:{fmt}}, acrrelay {a:{fmt}} ({a - f:+{fmt}})"
        if target is not None and a > target and f > target:
            text += f"; the target ({target:g}) is below the floor"
        parts.append(text)
    return (
        "`twisted-floor` (`bench/floor.py`) does only what every Twisted relay must: read "
        "the first bytes, `connectTCP`, replay them, then producers both ways; no parsing, "
        "policy, timers or logs, and Twisted's own buffered writes. "
        + "; ".join(parts)
        + ". No relay built on Twisted's transports and CPython does less than the floor "
        "per connection on this machine; where acrrelay is under it, that is its zero-copy "
        "path and its direct sends, which step past Twisted's buffered writes."
    )


def _cores(outcome: Outcome) -> int:
    text = outcome.machine.get("cpu", "")
    try:
        return int(text.rsplit(",", 1)[1].split()[0])
    except (IndexError, ValueError):
        return 2


def _limit_words(client: float, backend: float, busy: float) -> str:
    saturated = []
    if client >= 0.9:
        saturated.append("the client is CPU-bound")
    if backend >= 0.9:
        saturated.append("the backend worker is CPU-bound")
    if busy >= 0.85:
        saturated.append("the machine's CPU is saturated")
    return "; ".join(saturated) if saturated else "no single process is CPU-bound"


_CORES = ("client_cores", "backend_cores", "relay_cores", "foreign_cores")


def _rounds_section(records: list[Record]) -> list[str]:
    keys: dict[str, tuple[str, ...]] = {
        "bulk": ("mb_s", "ratio", "cpu_s_per_gib", *_CORES),
        "conn": ("conn_s", "ratio", "cpu_us_per_conn", *_CORES, "socket_errors"),
        "ttfb": ("direct_p50_ms", "relay_p50_ms", "direct_p99_ms", "relay_p99_ms"),
        "slow": ("rss_base_mib", "rss_growth_mib", "read_mb_s"),
        "idle": ("opened", "open_seconds", "rss_base_mib", "rss_mib", "kib_per_conn"),
    }  # fmt: skip
    lines = ["## Every measurement", "", "<details><summary>per round</summary>", ""]
    lines += ["| round | test | target | figures |", "|---|---|---|---|"]
    for r in records:
        if r.error:
            shown = f"failed: {r.error[:200]}"
        else:
            shown = ", ".join(
                f"{k} {_num(r.values[k])}" for k in keys.get(r.test, ()) if k in r.values
            )
            if r.values.get("foreign_cores", 0.0) > DISTURBED:
                shown += " **(disturbed by other load)**"
        target = f"direct (paired with {r.pair})" if r.pair else r.target
        lines.append(f"| {r.round} | {r.test} | {target} | {shown} |")
    lines += ["", "</details>", ""]
    return lines


def _num(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    return f"{value:.3g}"


def chart(outcome: Outcome, path: Path) -> None:
    """A grouped bar chart of the ratios to direct: throughput (higher is better) on the
    left, time to first byte (lower is better) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = with_ratios(outcome.records)
    peers = outcome.peers
    figs = {p: figures(records, p) for p in peers}
    panels: list[tuple[str, list[tuple[str, str, str]]]] = [
        (
            "throughput \u00d7 direct (higher is better)",
            [("bulk MB/s", "bulk", "ratio"), ("new conn/s", "conn", "ratio")],
        ),
        (
            "TTFB \u00d7 direct (lower is better)",
            [("TTFB p50", "ttfb", "ratio_p50"), ("TTFB p99", "ttfb", "ratio_p99")],
        ),
    ]
    panels = [(t, [g for g in groups if g[1] in outcome.plan.tests]) for t, groups in panels]
    panels = [p for p in panels if p[1]]
    if not panels or not peers:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 1, 4.8), squeeze=False)
    width = 0.8 / len(peers)
    colours = plt.get_cmap("tab10")
    for ax, (title, groups) in zip(axes[0], panels, strict=True):
        for i, peer in enumerate(peers):
            heights = [figs[peer].get(test, key) or 0.0 for _, test, key in groups]
            xs = [g + (i - (len(peers) - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, heights, width, label=peer, color=colours(i % 10))
            ax.bar_label(bars, fmt="%.2f", fontsize=7, rotation=90, padding=2)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(groups)), [g[0] for g in groups])
        ax.set_title(title)
        ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.1))
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(len(peers), 8))
    m = outcome.machine
    fig.suptitle(
        f"acrrelay bench, {outcome.started}: {outcome.plan.rounds} round(s), medians; {m['cpu']}",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(outcome: Outcome, directory: Path, *, log: Callable[[str], None] = print) -> str:
    """Write latest.md, latest.png and latest.json into ``directory``; return the Markdown."""
    from bench.run import save_json

    directory.mkdir(parents=True, exist_ok=True)
    text = markdown(outcome)
    (directory / "latest.md").write_text(text)
    save_json(outcome, directory / "latest.json")
    try:
        chart(outcome, directory / "latest.png")
    except ImportError as e:
        log(f"no chart ({e}): pip install matplotlib")
    return text
