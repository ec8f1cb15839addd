"""``python -m bench gateway``: issue 11's benchmark of the caching gateway.

N clients pull one image at once, two ways, over a line limited by ``bench/shaper.py``:

- relay alone: clients -> shaper -> ``twist acrrelay`` (SNI relay) -> nginx (the registry);
- gateway + relay: clients -> ``twist acrrelay --config gateway.toml`` (a cold store for each
  N) -> shaper -> relay -> nginx.

Then one client reads the cached layer from the warm gateway, from nginx ``proxy_cache``, from
nginx serving the file, and from the two minimal Python TLS servers of ``bench/tlsserve.py``.
Everything is on 127.0.0.1; every process is ours and is stopped by its PID.
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import gwservers as g
from bench import procs
from bench.servers import REPO, Server, settle
from tests.e2e_support import TestCA, clean_env, stop_process

MIB = 1 << 20
GIB = 1 << 30


@dataclass(frozen=True)
class GatewayPlan:
    quick: bool
    layer_size: int
    clients: tuple[int, ...]
    rate: float
    hit_rounds: int

    @staticmethod
    def make(quick: bool, rate: float = 50e6) -> GatewayPlan:
        if quick:
            return GatewayPlan(True, 32 * MIB, (1, 4), rate, 1)
        return GatewayPlan(False, 512 * MIB, (1, 4, 16), rate, 4)


@dataclass
class GatewayOutcome:
    plan: dict[str, Any]
    facts: dict[str, str]
    image_size: int
    pulls: list[dict[str, Any]] = field(default_factory=list)
    hits: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    took: float = 0.0


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ktls_status() -> str:
    """Whether kernel TLS could be used here, read without loading anything."""
    ulp = Path("/proc/sys/net/ipv4/tcp_available_ulp")
    available = ulp.read_text().split() if ulp.exists() else []
    if "tls" in available:
        return f"available (tcp_available_ulp: {' '.join(available)})"
    config = ""
    try:
        import gzip

        with gzip.open("/proc/config.gz", "rt") as f:
            config = next((line.strip() for line in f if line.startswith(("CONFIG_TLS=",
                           "# CONFIG_TLS "))), "")  # fmt: skip
    except OSError:
        pass
    return (
        f"not available: tcp_available_ulp lists {' '.join(available) or 'nothing'}"
        + (f"; /proc/config.gz says `{config}`" if config else "")
        + "; no /lib/modules for this kernel, so no module to load"
    )


def pull(
    n: int,
    port: int,
    cafile: Path,
    image: g.Image,
    watched: dict[str, Server],
    shaper: g.Shaper,
    home: Path,
) -> dict[str, Any]:
    """N pull clients at once; the time until the last is done, line bytes and CPU."""
    command = [sys.executable, "-m", "bench.pullclient", "--port", str(port), "--ca",
               str(cafile), "--registry", g.REGISTRY, "--repo", g.REPOSITORY,
               *image.blob_args()]  # fmt: skip
    env = {**clean_env(home), "PYTHONPATH": str(REPO)}
    clients = [
        subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=home
        )
        for _ in range(n)
    ]
    try:
        for c in clients:
            assert c.stdout is not None and c.stdout.readline().strip() == "ready"
        before = {name: s.cpu() for name, s in watched.items()}
        counts, machine = shaper.counts(), procs.MachineCPU.now()
        start = time.time()
        for c in clients:
            assert c.stdin is not None
            c.stdin.write("go\n")
            c.stdin.flush()
        results = []
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline()
            results.append(json.loads(line) if line else {"ok": False, "error": "no answer"})
            c.wait(timeout=60)
        machine = procs.MachineCPU.now() - machine
        after_counts = shaper.counts()
        cpu = {name: s.cpu() - before[name] for name, s in watched.items()}
    finally:
        for c in clients:
            stop_process(c)
    ends = [float(r["end"]) for r in results if "end" in r]
    elapsed = max(ends) - start if ends else float("nan")
    down = after_counts["down"] - counts["down"]
    errors = sorted({str(r.get("error")) for r in results if not r.get("ok")})
    return {
        "n": n,
        "ok": not errors,
        "errors": errors,
        "seconds": elapsed,
        "line_down": down,
        "line_up": after_counts["up"] - counts["up"],
        "line_connections": after_counts["connections"] - counts["connections"],
        "x_image": down / image.size,
        "cpu": {**cpu, "clients": sum(float(r.get("cpu", 0)) for r in results)},
        "machine_busy_cores": machine.busy / machine.total * procs_cores() if machine.total else 0,
        "softirq_cores": machine.softirq / machine.total * procs_cores() if machine.total else 0,
    }


def log_problems(server: Server, limit: int = 8) -> str:
    """The last warnings and errors in a server's log (not Twisted's factory chatter)."""
    lines = server.log_tail(200_000).splitlines()
    keys = ("#warn", "#error", "#crit", "Error", "failed")
    bad = [ln for ln in lines if any(k in ln for k in keys)]
    return " / ".join(bad[-limit:]) or "(nothing logged)"


def procs_cores() -> int:
    import os

    return os.cpu_count() or 1


def curl_get(
    port: int, cafile: Path, url: str, headers: list[str]
) -> tuple[str, int, float, str, float]:
    """One download with curl to /dev/null: status, bytes, seconds, X-Cache, client CPU."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "--cacert", str(cafile), "--connect-to",
         f"::127.0.0.1:{port}", *[a for h in headers for a in ("-H", h)], "-w",
         "%{http_code} %{size_download} %{time_total} %header{x-cache}", url],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    status, size, seconds, *cache = [*done.stdout.split(), "", "0", "0"][:4]
    return status, int(size), float(seconds), (cache[0] if cache else ""), cpu


@dataclass(frozen=True)
class HitTarget:
    name: str
    server: Server
    cafile: Path
    url: str
    headers: tuple[str, ...] = ()


def hit_sample(target: HitTarget, image: g.Image) -> dict[str, Any]:
    """One client reads the layer once: MB/s and CPU per GiB, or why it failed."""
    before = target.server.cpu()
    status, size, seconds, cache, client_cpu = curl_get(
        target.server.port, target.cafile, target.url, list(target.headers)
    )
    used = target.server.cpu() - before
    if status != "200" or size != image.layer.size:
        return {"error": f"status {status}, {size} bytes"}
    gib = size / GIB
    return {"mb_s": size / seconds / 1e6, "server": used / gib, "client": client_cpu / gib,
            "cache": cache}  # fmt: skip


def hit_summary(name: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds; a target that failed once is reported as failed."""
    failed = [s["error"] for s in samples if "error" in s]
    if failed or not samples:
        return {"name": name, "ok": False, "error": failed[0] if failed else "not measured"}
    return {
        "name": name,
        "ok": True,
        "rounds": len(samples),
        "mb_s": statistics.median(s["mb_s"] for s in samples),
        "server_cpu_s_per_gib": statistics.median(s["server"] for s in samples),
        "client_cpu_s_per_gib": statistics.median(s["client"] for s in samples),
        "x_cache": ",".join(sorted({s["cache"] for s in samples if s["cache"]})),
    }


class _World:
    """The servers that live for the whole run, and the ones we start on the way."""

    def __init__(self, top: Path, plan: GatewayPlan, log: Callable[[str], None]) -> None:
        self.top, self.plan, self.log = top, plan, log
        self.running: list[Server] = []
        self.ca = TestCA(top / "ca", g.NAMES)
        started = time.monotonic()
        self.image = g.make_image(top / "image", plan.layer_size)
        log(f"image: {plan.layer_size / MIB:.0f} MiB layer made in "
            f"{time.monotonic() - started:.1f} s")  # fmt: skip
        self.registry = self.keep(g.start_registry(self.ca, self.image, top / "registry"))
        self.relay = self.keep(g.start_relay(top / "relay", self.registry.port))
        self.shaper = g.start_shaper(top / "shaper", self.relay.port, plan.rate)
        self.keep(self.shaper.server)
        for s in self.running:
            settle(s)

    def keep(self, server: Server) -> Server:
        self.running.append(server)
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        if server in self.running:
            self.running.remove(server)

    def stop_all(self) -> None:
        for s in reversed(self.running):
            s.stop()
        self.running.clear()

    def watched(self, gateway: Server | None) -> dict[str, Server]:
        out = {"relay": self.relay, "shaper": self.shaper.server, "registry": self.registry}
        return {"gateway": gateway, **out} if gateway else out


def _pulls(world: _World, outcome: GatewayOutcome) -> Server | None:
    """Every N, relay alone then gateway (cold). Returns the last gateway, still running."""
    plan, log, top = world.plan, world.log, world.top
    gateway: Server | None = None
    for n in plan.clients:
        alone = pull(n, world.shaper.server.port, world.ca.ca_file, world.image,
                     world.watched(None), world.shaper, top)  # fmt: skip
        outcome.pulls.append({"path": "relay alone", **alone})
        log(f"N={n} relay alone: {alone['seconds']:.1f} s, {alone['x_image']:.2f}x image, "
            f"ok={alone['ok']} {' '.join(alone['errors'])}")  # fmt: skip
        if gateway is not None:
            world.stop(gateway)
        directory = top / f"gateway-{n}"
        files = g.gateway_files(directory, world.ca, world.shaper.server.port, "8GiB")
        try:
            gateway = world.keep(g.start_gateway(files, directory))
        except Exception as e:  # start-up failures become a reported row
            outcome.pulls.append({"path": "gateway", "n": n, "ok": False, "errors": [str(e)]})
            log(f"N={n} gateway did not start: {e}")
            gateway = None
            continue
        settle(gateway)
        through = pull(n, gateway.port, files.ca_file, world.image, world.watched(gateway),
                       world.shaper, top)  # fmt: skip
        if not through["ok"]:
            through["errors"].append("gateway log: " + log_problems(gateway))
        outcome.pulls.append({"path": "gateway", **through})
        log(f"N={n} gateway: {through['seconds']:.1f} s, {through['x_image']:.2f}x image, "
            f"ok={through['ok']} {' '.join(through['errors'])[:300]}")  # fmt: skip
    return gateway


def _hit_targets(world: _World, gateway: Server | None) -> list[HitTarget]:
    """Every server a hit is measured on, started (nginx proxy_cache warmed)."""
    top, layer = world.top, world.image.layer
    blob_url = f"https://{g.REGISTRY}/v2/{g.REPOSITORY}/blobs/{layer.digest}"
    auth = (f"Authorization: Bearer {g.bearer_token()}",)
    targets = []
    if gateway is not None:
        gw_ca = gateway.directory / "gateway-ca" / "ca.crt"
        targets.append(HitTarget("gateway (warm store)", gateway, gw_ca, blob_url, auth))
    cache = world.keep(g.start_proxy_cache(world.ca, world.registry.port, top / "proxy-cache"))
    settle(cache)
    curl_get(cache.port, world.ca.ca_file, blob_url, list(auth))  # warm it
    targets.append(HitTarget("nginx proxy_cache (warm)", cache, world.ca.ca_file, blob_url, auth))
    oss_url = f"https://{g.OSS}/{layer.digest}"
    targets.append(HitTarget("nginx serving the file", world.registry, world.ca.ca_file, oss_url))
    for kind, name in (("twisted", "Twisted + pyOpenSSL (TLSMemoryBIO, FileSender)"),
                       ("stdlib", "Python ssl, readinto + sendall")):  # fmt: skip
        path = world.image.root / layer.digest
        server = world.keep(g.start_tls_file_server(kind, world.ca, path, top / f"tls-{kind}"))
        settle(server)
        targets.append(HitTarget(name, server, world.ca.ca_file, blob_url))
    return targets


def _hits(world: _World, gateway: Server | None, outcome: GatewayOutcome) -> None:
    """Round by round, every server once per round in a rotating order, so the shared
    machine's load falls on all of them alike; medians over the rounds."""
    targets = _hit_targets(world, gateway)
    samples: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    line = world.shaper.counts()["down"]
    for r in range(world.plan.hit_rounds):
        for target in targets[r % len(targets) :] + targets[: r % len(targets)]:
            samples[target.name].append(hit_sample(target, world.image))
    for target in targets:
        outcome.hits.append(hit_summary(target.name, samples[target.name]))
    if gateway is not None:
        # Bytes over the line while the gateway served hits: its proofs, never the layer
        # (nothing else measured here goes over the line).
        outcome.hits[0]["line_down"] = world.shaper.counts()["down"] - line
    for h in outcome.hits:
        world.log(f"hit {h['name']}: {h.get('mb_s', 0):.0f} MB/s, "
                  f"{h.get('server_cpu_s_per_gib', 0):.2f} s/GiB {h.get('error', '')}")  # fmt: skip


def run_gateway(plan: GatewayPlan, *, log: Callable[[str], None] = _log) -> GatewayOutcome:
    began = time.monotonic()
    top = Path(tempfile.mkdtemp(prefix="acrrelay-gwbench-"))
    outcome = GatewayOutcome(
        plan=asdict(plan),
        facts={
            "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": f"{procs.cpu_model()}, {procs_cores()} cores",
            "load_start": procs.loadavg(),
            "python": platform.python_version(),
            "ktls": ktls_status(),
        },
        image_size=0,
    )
    world: _World | None = None
    try:
        world = _World(top, plan, log)
        outcome.image_size = world.image.size
        gateway = _pulls(world, outcome)
        _hits(world, gateway, outcome)
    finally:
        if world is not None:
            world.stop_all()
        outcome.facts["load_end"] = procs.loadavg()
        outcome.took = time.monotonic() - began
        shutil.rmtree(top, ignore_errors=True)
    return outcome


def save(outcome: GatewayOutcome, path: Path) -> None:
    path.write_text(json.dumps(asdict(outcome), indent=1, sort_keys=True) + "\n")
