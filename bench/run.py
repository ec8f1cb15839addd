"""One benchmark run: set up the backend, then for each round, each test and each target
(direct, then every relay, in an order that rotates from round to round) start a fresh
server, measure, and stop it.

Every figure of a relay that can be compared with a direct connection is also kept as a
ratio to a direct measurement taken right before or after it (bulk, new connections) or
interleaved with it (TTFB); the report takes medians over rounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import clients, procs, servers, tools
from tests.e2e_support import TestCA, clean_env, stop_process

MiB = 1 << 20
GiB = 1 << 30
#: The benchmark's host name: a reserved ``.test`` name, so nothing can ever resolve it
#: off this machine. Every client connects to 127.0.0.1 and only names it in SNI and Host.
NAME = "bench.acrrelay.test"
TESTS = ("bulk", "conn", "ttfb", "slow", "idle")
#: Tests with a direct counterpart (the memory tests measure the relay alone).
DIRECT_TESTS = ("bulk", "conn")
#: What ``--peers`` defaults to: every peer but HAProxy's splice-auto variant (which, with
#: HAProxy 2.6 here, measures the same as plain haproxy).
DEFAULT_PEERS = tuple(p for p in servers.PEERS if p != "haproxy-splice-auto")
ALL_PEERS = tuple(servers.PEERS)
WRK_LUA = """-- Connect to 127.0.0.1 whatever the URL's host is: that name is only the SNI and Host.
function wrk.resolve(host, service)
  wrk.addrs = wrk.lookup("127.0.0.1", service)
end
"""


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how big."""

    quick: bool
    rounds: int
    tests: tuple[str, ...]
    peers: tuple[str, ...]
    bulk_bytes: int
    conn_seconds: int  # wrk takes whole seconds
    wrk_threads: int
    wrk_connections: int
    ttfb_pairs: int
    slow_seconds: float
    slow_rate: float
    idle_count: int
    acrrelay_src: str

    @staticmethod
    def make(
        *,
        quick: bool,
        rounds: int | None,
        tests: tuple[str, ...],
        peers: tuple[str, ...],
        acrrelay_src: Path,
        idle_count: int | None = None,
    ) -> Plan:
        wanted_idle = idle_count or (500 if quick else 10_000)
        return Plan(
            quick=quick,
            rounds=rounds or (1 if quick else 3),
            tests=tests,
            peers=peers,
            bulk_bytes=64 * MiB if quick else GiB,
            conn_seconds=2 if quick else 6,
            wrk_threads=2,
            wrk_connections=16,
            ttfb_pairs=100 if quick else 500,
            slow_seconds=2.0 if quick else 20.0,
            slow_rate=1e6,
            idle_count=min(wanted_idle, max_idle_connections()),
            acrrelay_src=str(acrrelay_src),
        )


def max_idle_connections() -> int:
    """A relay holds two descriptors per connection, under the hard limit we have."""
    return servers.MAX_IDLE


@dataclass
class Record:
    """One measurement: one round, one test, one target."""

    round: int
    test: str
    target: str
    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    #: For a direct measurement: the relay it is paired with (measured right before or after).
    pair: str | None = None


@dataclass
class Outcome:
    """Everything a run produced, for the report."""

    plan: Plan
    records: list[Record]
    notes: list[str]
    skipped: dict[str, str]
    peers: list[str]
    machine: dict[str, str]
    started: str
    seconds: float


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


#: Cores' worth of CPU used by other processes during a measurement, past which the
#: report marks the measurement as disturbed.
DISTURBED = 0.25


def _git(src: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def machine_facts(plan: Plan) -> dict[str, str]:
    src = Path(plan.acrrelay_src)
    commit = _git(src, "rev-parse", "--short", "HEAD")
    dirty = _git(src, "status", "--porcelain", "--", "acrrelay")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": f"{procs.cpu_model()}, {os.cpu_count()} cores",
        "memory": f"{mem / GiB:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "acrrelay": f"{src} @ {commit or '?'}{' + uncommitted changes' if dirty else ''}",
        "fd_limit": str(servers.NOFILE),
    }


def snapshot(src: Path, directory: Path) -> tuple[Path, str]:
    """Copy acrrelay's code (``acrrelay/`` and ``twisted/plugins/``) from ``src`` into
    ``directory``, so one run measures one version even while the tree is being edited;
    return the copy and a short digest of its Python files."""
    digest = hashlib.sha256()
    for part in ("acrrelay", "twisted"):
        shutil.copytree(
            src / part, directory / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    for path in sorted(directory.rglob("*.py")):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return directory, digest.hexdigest()[:12]


def rotated(items: list[str], by: int) -> list[str]:
    by %= len(items)
    return items[by:] + items[:by]


class Bench:
    """The shared set-up of a run (CA, backend files, backend server) and the measurements."""

    def __init__(self, plan: Plan, directory: Path, acrrelay_code: Path) -> None:
        self.plan = plan
        self.directory = directory
        self.acrrelay_code = acrrelay_code
        self.notes: list[str] = []
        self.ca = TestCA(directory / "ca", (NAME,))
        self.context = clients.client_context(self.ca.ca_file)
        www = directory / "www"
        www.mkdir()
        big = www / "big"
        with big.open("wb") as f:
            f.truncate(plan.bulk_bytes)  # sparse: zeros that cost no disk reads
        # Read it once, so every download finds it in the page cache.
        with big.open("rb") as f:
            while f.read(8 * MiB):
                pass
        self.files = servers.BackendFiles(
            NAME,
            self.ca.directory / f"{NAME}.pem",
            self.ca.directory / f"{NAME}.key",
            self.ca.ca_file,
            www,
            plan.bulk_bytes,
        )
        self.lua = directory / "loopback.lua"
        self.lua.write_text(WRK_LUA)
        self.backend = servers.start_backend(self.files, directory / "backend")
        self._warm(self.backend.port)

    def close(self) -> None:
        self.backend.stop()

    # -- helpers

    def _warm(self, port: int, count: int = 10) -> None:
        for _ in range(count):
            clients.ttfb_once(self.context, port, NAME)

    @contextlib.contextmanager
    def peer(self, name: str, label: str) -> Iterator[servers.Server]:
        try:
            server = self._start(name, label)
        except servers.StartFailed as e:
            # Once more: a start can fail for a reason that passes (say, the venv's Twisted
            # plugin directory being rewritten by a pip install while Twisted scans it).
            self.notes.append(f"{label}: the first start failed, retried: {_one_line(str(e))}")
            time.sleep(1.0)
            server = self._start(name, f"{label}-retry")
        try:
            self._warm(server.port)
            servers.settle(server)
            yield server
        finally:
            server.stop()

    def _start(self, name: str, label: str) -> servers.Server:
        return servers.start_peer(
            servers.PEERS[name],
            self.directory / label,
            NAME,
            self.backend.port,
            acrrelay_src=self.acrrelay_code,
        )

    def _run_client(self, command: list[str], timeout: float) -> tuple[str, float, float]:
        """Run a client to completion: (its output, its CPU seconds, wall seconds)."""
        started = time.monotonic()
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(self.directory),
            cwd=self.directory,
        )
        try:
            assert proc.stdout is not None
            output = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            if proc.returncode is None:
                stop_process(proc)
        wall = time.monotonic() - started
        if wall > timeout:
            raise RuntimeError(f"{command[0]} took {wall:.0f}s")
        return output, usage.ru_utime + usage.ru_stime, wall

    # -- the tests; ``relay`` is None for direct

    def bulk(self, port: int, relay: servers.Server | None) -> dict[str, float]:
        """One download of /big with curl; MB/s and the CPU of everyone involved."""
        command = [
            "/usr/bin/curl",
            "-sS",
            "-o",
            "/dev/null",
            "--resolve",
            f"{NAME}:{port}:127.0.0.1",
            "--cacert",
            str(self.ca.ca_file),
            "-w",
            "%{http_code} %{size_download} %{time_total}\n",
            f"https://{NAME}:{port}/big",
        ]
        before = self._cpu(relay)
        output, client_cpu, _ = self._run_client(command, timeout=600)
        after = self._cpu(relay)
        match = re.search(r"^(\d+) (\d+) ([\d.]+)$", output, re.M)
        if not match or match.group(1) != "200":
            raise RuntimeError(f"curl failed: {output.strip()[-500:]}")
        size, seconds = int(match.group(2)), float(match.group(3))
        if size != self.plan.bulk_bytes:
            raise RuntimeError(f"curl got {size} bytes of {self.plan.bulk_bytes}")
        values = self._cpu_values(before, after, client_cpu, seconds)
        values["mb_s"] = size / seconds / 1e6
        if relay is not None:
            values["cpu_s_per_gib"] = values["relay_cpu"] / (size / GiB)
        return values

    def conn(self, port: int, relay: servers.Server | None) -> dict[str, float]:
        """wrk, each request on a new connection (Connection: close): a full TLS handshake
        each, since the backend keeps no session cache and sends no tickets."""
        plan = self.plan
        command = [
            "/usr/bin/wrk",
            f"-t{plan.wrk_threads}",
            f"-c{plan.wrk_connections}",
            f"-d{plan.conn_seconds:g}s",
            "-H",
            "Connection: close",
            "-s",
            str(self.lua),
            f"https://{NAME}:{port}/small",
        ]
        before = self._cpu(relay)
        output, client_cpu, _ = self._run_client(command, timeout=plan.conn_seconds + 60)
        after = self._cpu(relay)
        match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", output)
        if not match or int(match.group(1)) == 0:
            raise RuntimeError(f"wrk made no request: {output.strip()[-800:]}")
        count = int(match.group(1))
        seconds = (
            float(match.group(2)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[match.group(3)]
        )
        values = self._cpu_values(before, after, client_cpu, seconds)
        values["conn_s"] = count / seconds
        values["connections"] = count
        errors = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
        )
        values["socket_errors"] = sum(int(g) for g in errors.groups()) if errors else 0
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        values["non_2xx"] = int(non2xx.group(1)) if non2xx else 0
        if relay is not None:
            values["cpu_us_per_conn"] = values["relay_cpu"] / count * 1e6
        return values

    def ttfb(self, relay: servers.Server) -> dict[str, float]:
        direct, relayed = clients.ttfb_pairs(
            self.context, self.backend.port, relay.port, NAME, self.plan.ttfb_pairs
        )
        d50, d99 = _quantiles(direct)
        r50, r99 = _quantiles(relayed)
        return {
            "direct_p50_ms": d50 * 1e3,
            "direct_p99_ms": d99 * 1e3,
            "relay_p50_ms": r50 * 1e3,
            "relay_p99_ms": r99 * 1e3,
            "added_p50_ms": (r50 - d50) * 1e3,
            "added_p99_ms": (r99 - d99) * 1e3,
            "ratio_p50": r50 / d50,
            "ratio_p99": r99 / d99,
            "samples": len(relayed),
        }

    def slow(self, relay: servers.Server) -> dict[str, float]:
        pids = procs.tree(relay.pid)
        time.sleep(0.5)
        baseline = sum(procs.rss_bytes(p) for p in pids)
        peak = [baseline]

        def sample() -> None:
            peak[0] = max(peak[0], sum(procs.rss_bytes(p) for p in pids))

        got = clients.slow_read(
            self.context,
            relay.port,
            NAME,
            rate=self.plan.slow_rate,
            seconds=self.plan.slow_seconds,
            sample=sample,
        )
        if not relay.alive():
            raise RuntimeError(f"the relay died: {relay.log_tail()}")
        return {
            "rss_base_mib": baseline / MiB,
            "rss_growth_mib": (peak[0] - baseline) / MiB,
            "read_mb_s": got / self.plan.slow_seconds / 1e6,
        }

    def idle(self, relay: servers.Server) -> dict[str, float]:
        time.sleep(0.5)
        baseline = relay.rss()
        command = [
            "/usr/bin/prlimit",
            f"--nofile={servers.NOFILE}:{servers.NOFILE}",
            "--",
            sys.executable,
            "-m",
            "bench.clients",
            "idle",
            "--port",
            str(relay.port),
            "--name",
            NAME,
            "--ca",
            str(self.ca.ca_file),
            "--count",
            str(self.plan.idle_count),
        ]
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**clean_env(self.directory), "PYTHONPATH": str(servers.REPO)},
            cwd=self.directory,
            text=True,
        )
        try:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline()
            match = re.match(r"OPEN (\d+) (\d+) ([\d.]+) ?(.*)", line)
            if not match:
                rest = proc.stdout.read() if proc.poll() is not None else ""
                raise RuntimeError(f"idle client: {line}{rest}"[-1500:])
            opened, failed = int(match.group(1)), int(match.group(2))
            if opened == 0:
                raise RuntimeError(f"no idle connection opened: {match.group(4)}")
            time.sleep(1.0)
            held = 0
            for _ in range(4):
                held = max(held, relay.rss())
                time.sleep(0.25)
            if not relay.alive():
                raise RuntimeError(f"the relay died: {relay.log_tail()}")
            proc.stdin.close()
            proc.wait(timeout=120)
        finally:
            stop_process(proc)
        if failed:
            self.notes.append(
                f"idle: {failed} of {self.plan.idle_count} connections to {relay.name} "
                f"failed ({match.group(4)})"
            )
        return {
            "opened": opened,
            "failed": failed,
            "open_seconds": float(match.group(3)),
            "rss_base_mib": baseline / MiB,
            "rss_mib": held / MiB,
            "kib_per_conn": (held - baseline) / opened / 1024,
        }

    # -- CPU accounting

    def _cpu(self, relay: servers.Server | None) -> tuple[float, float, procs.MachineCPU, float]:
        return (
            relay.cpu() if relay else 0.0,
            self.backend.cpu(),
            procs.MachineCPU.now(),
            _self_cpu(),
        )

    def _cpu_values(
        self,
        before: tuple[float, float, procs.MachineCPU, float],
        after: tuple[float, float, procs.MachineCPU, float],
        client_cpu: float,
        seconds: float,
    ) -> dict[str, float]:
        relay_cpu = after[0] - before[0]
        backend_cpu = after[1] - before[1]
        machine = after[2] - before[2]
        ours = relay_cpu + backend_cpu + client_cpu + (after[3] - before[3])
        return {
            "seconds": seconds,
            "relay_cpu": relay_cpu,
            "backend_cpu": backend_cpu,
            "client_cpu": client_cpu,
            # Cores' worth of CPU over the measurement, for the "what limits it" notes.
            "client_cores": client_cpu / seconds,
            "backend_cores": backend_cpu / seconds,
            "relay_cores": relay_cpu / seconds,
            "machine_busy": (machine.busy + machine.softirq) / max(machine.total, 1e-9),
            "foreign_cores": max(0.0, machine.busy - ours) / seconds,
            "steal_cores": machine.steal / seconds,
        }


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _quantiles(samples: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[98]


def run(plan: Plan, *, log: Callable[[str], None] = _log) -> Outcome:
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    started = time.monotonic()
    try:
        import cryptography  # noqa: F401  (the test CA)

        import twisted  # noqa: F401  (acrrelay runs as python -m twisted)
    except ImportError as e:
        raise tools.ToolMissing(
            f"{e.name} is not importable by {sys.executable}: run the bench with the "
            "project's venv (.venv/bin/python -m bench run)"
        ) from None
    needed = ["nginx", "curl", "prlimit"]
    if "conn" in plan.tests:
        needed.append("wrk")
    for name in plan.peers:
        kind = servers.PEERS[name].kind
        if kind in servers.TOOL_OF_KIND:
            needed.append(servers.TOOL_OF_KIND[kind])
    tools.ensure(sorted(set(needed)), log=log)

    notes: list[str] = []
    skipped: dict[str, str] = {}
    records: list[Record] = []
    machine = machine_facts(plan)
    machine["load_start"] = procs.loadavg()
    machine["versions"] = "; ".join(tools.version(t) for t in sorted(set(needed)))
    if plan.idle_count < (500 if plan.quick else 10_000) and "idle" in plan.tests:
        notes.append(
            f"idle: {plan.idle_count} connections, not more: the descriptor hard limit here "
            f"is {servers.NOFILE} (no CAP_SYS_RESOURCE to raise it) and a relay holds two "
            "per connection"
        )
    with tempfile.TemporaryDirectory(prefix="acrrelay-bench-") as work:
        directory = Path(work)
        directory.chmod(0o755)  # nginx's workers (nobody) read the document root
        code, digest = snapshot(Path(plan.acrrelay_src), directory / "acrrelay-code")
        machine["acrrelay"] += f", code digest {digest} (copied at the start of the run)"
        peers: list[str] = []
        for name in plan.peers:
            peer = servers.PEERS[name]
            if peer.kind == "acrrelay":
                why = servers.check_acrrelay(peer, directory / "check", NAME, code)
                if why:
                    log(f"{name}: {why}")
                    skipped[name] = why
                    continue
            peers.append(name)
        log(
            f"{plan.rounds} round(s) of {', '.join(plan.tests)} for direct and "
            f"{', '.join(peers) or 'no peer'} (work directory {directory})"
        )
        bench = Bench(plan, directory, code)
        try:
            for round_no in range(1, plan.rounds + 1):
                for test in plan.tests:
                    takers = [p for p in peers if test in (servers.PEERS[p].tests or (test,))]
                    for i, target in enumerate(rotated(takers, round_no - 1)):
                        if test not in DIRECT_TESTS:
                            records.append(_measure(bench, round_no, test, target, log))
                            continue
                        # Each relay's figure is paired with a direct one taken right before
                        # or after it (the order alternating), so a burst of load from
                        # elsewhere on the machine skews one pair, not a whole round.
                        order = ["direct", target] if (round_no + i) % 2 else [target, "direct"]
                        for one in order:
                            paired = target if one == "direct" else None
                            records.append(_measure(bench, round_no, test, one, log, pair=paired))
        finally:
            bench.close()
        notes.extend(bench.notes)
    machine["load_end"] = procs.loadavg()
    return Outcome(
        plan=plan,
        records=records,
        notes=notes,
        skipped=skipped,
        peers=peers,
        machine=machine,
        started=started_at,
        seconds=time.monotonic() - started,
    )


def _measure(
    bench: Bench,
    round_no: int,
    test: str,
    target: str,
    log: Callable[[str], None],
    *,
    pair: str | None = None,
) -> Record:
    record = Record(round_no, test, target, pair=pair)
    label = f"r{round_no}-{test}-{target}"
    try:
        if target == "direct":
            method = {"bulk": bench.bulk, "conn": bench.conn}[test]
            record.values = method(bench.backend.port, None)
        else:
            with bench.peer(target, label) as server:
                if test == "bulk":
                    record.values = bench.bulk(server.port, server)
                elif test == "conn":
                    record.values = bench.conn(server.port, server)
                else:
                    record.values = getattr(bench, test)(server)
    except Exception as e:  # one failing peer must not stop the others
        record.error = _one_line(f"{type(e).__name__}: {e}")
        log(f"round {round_no} {test} {target}: FAILED {record.error[:2000]}")
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
        return record
    foreign = record.values.get("foreign_cores", 0.0)
    warn = f" (other load: {foreign:.2f} cores)" if foreign > DISTURBED else ""
    paired = f" (paired with {pair})" if pair else ""
    log(f"round {round_no} {test} {target}{paired}: {_brief(test, record.values)}{warn}")
    return record


def _one_line(text: str, limit: int = 1500) -> str:
    """An error message on one line, fit for a Markdown table cell."""
    flat = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    flat = flat.replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit // 2] + " ... " + flat[-limit // 2 :]


def _brief(test: str, values: dict[str, float]) -> str:
    keys = {
        "bulk": ("mb_s", "cpu_s_per_gib", "client_cores", "backend_cores"),
        "conn": ("conn_s", "cpu_us_per_conn", "client_cores", "backend_cores", "socket_errors"),
        "ttfb": ("added_p50_ms", "added_p99_ms", "direct_p50_ms"),
        "slow": ("rss_growth_mib", "read_mb_s"),
        "idle": ("kib_per_conn", "opened", "open_seconds"),
    }[test]
    return ", ".join(f"{k}={values[k]:.3g}" for k in keys if k in values)


def load_json(path: Path) -> Outcome:
    """An outcome saved by :func:`save_json`, to render its report again."""
    data = json.loads(path.read_text())
    plan = data["plan"]
    plan["tests"], plan["peers"] = tuple(plan["tests"]), tuple(plan["peers"])
    return Outcome(
        plan=Plan(**plan),
        records=[Record(**r) for r in data["records"]],
        notes=data["notes"],
        skipped=data["skipped"],
        peers=data["peers"],
        machine=data["machine"],
        started=data["started"],
        seconds=data["seconds"],
    )


def save_json(outcome: Outcome, path: Path) -> None:
    data: dict[str, Any] = {
        "plan": asdict(outcome.plan),
        "machine": outcome.machine,
        "started": outcome.started,
        "seconds": outcome.seconds,
        "peers": outcome.peers,
        "skipped": outcome.skipped,
        "notes": outcome.notes,
        "records": [asdict(r) for r in outcome.records],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
