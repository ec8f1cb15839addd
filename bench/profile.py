"""``python -m bench profile``: where acrrelay's CPU goes per new connection.

It sets up the bench's TLS backend, starts acrrelay as the bench does, attaches py-spy
to it, drives the connection-rate test (wrk, a full TLS handshake per connection) and
writes ``profile-conn.md``: the relay's CPU per connection split into user and kernel
time (from ``/proc``), and py-spy's samples by frame, inclusive and self, idle time left
out. py-spy samples wall time on the CPU, so the shares are of the time the relay was
busy; the kernel's share shows up in the frames that make system calls.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.run import NAME, Bench, Plan

#: Frames of the reactor waiting for events: idle, not cost.
_IDLE = re.compile(r"\(epoll|doPoll \(twisted/internet/epollreactor\.py:2[0-9]{2}\)$")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if Path(found).exists():
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return str(Path(sys.executable).parent / "py-spy")


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    user = system = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / tick, system / tick


def _short(frame: str) -> str:
    """``func (file:line)`` with the site-packages or project prefix taken off."""
    return re.sub(
        r"\((?:/[^()]*?/(?:site-packages|lib/python3\.\d+)/|/[^()]*?/acrrelay/)", "(", frame
    )


def summarise(
    raw: str, top: int = 30
) -> tuple[int, list[tuple[float, str]], list[tuple[float, str]]]:
    """(busy samples, inclusive shares, self shares) from py-spy's raw (collapsed) output."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    busy = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_short(f) for f in stack.split(";")[1:]]  # the first is the thread
        if not frames or _IDLE.search(frames[-1]):
            continue
        n = int(count)
        busy += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    if not busy:
        return 0, [], []
    # Frames under which everything ran (the reactor's run loop) say nothing: left out.
    below_root = [(n / busy, f) for f, n in inclusive.most_common() if n < busy * 0.995]
    return busy, below_root[:top], [(n / busy, f) for f, n in own.most_common(top)]


def profile(out: Path, seconds: int, *, log: object = print) -> Path:
    assert callable(log)
    plan = Plan.make(
        quick=True, rounds=1, tests=("conn",), peers=("acrrelay",), acrrelay_src=Path.cwd()
    )
    object.__setattr__(plan, "conn_seconds", seconds)
    spy = _py_spy()
    with tempfile.TemporaryDirectory(prefix="acrrelay-profile-") as work:
        directory = Path(work)
        directory.chmod(0o755)  # nginx's workers read the document root
        bench = Bench(plan, directory, Path(__file__).resolve().parent.parent)
        try:
            with bench.peer("acrrelay", "acrrelay") as relay:
                raw_path = directory / "raw.txt"
                recorder = subprocess.Popen(
                    [spy, "record", "--pid", str(relay.pid), "--format", "raw", "--rate", "250",
                     "--duration", str(seconds + 1), "--output", str(raw_path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                time.sleep(0.5)  # py-spy attaches
                before = _user_system(relay.pid)
                values = bench.conn(relay.port, relay)
                after = _user_system(relay.pid)
                recorder.wait(timeout=seconds + 60)
                raw = raw_path.read_text() if raw_path.exists() else ""
        finally:
            bench.close()
    count = values["connections"]
    user = (after[0] - before[0]) / count * 1e6
    system = (after[1] - before[1]) / count * 1e6
    busy, inclusive, own = summarise(raw)
    lines = [
        "# Where acrrelay's CPU goes per new connection",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; `python -m bench profile --seconds "
        f"{seconds}`: wrk through acrrelay to the bench's TLS backend (`{NAME}`), a full "
        f"TLS handshake per connection, {values['conn_s']:.0f} connections/s, "
        f"{count} in all. Load average at the end: {procs.loadavg()}.",
        "",
        f"Relay CPU per connection: **{user + system:.0f} µs** ({user:.0f} µs user, "
        f"{system:.0f} µs kernel), while py-spy sampled it (which costs the relay a little).",
        "",
        f"py-spy: {busy} samples of the relay busy (waiting in epoll left out).",
        "",
        "## Inclusive (a frame and everything it called)",
        "",
        "| share | frame |",
        "|---:|---|",
        *[f"| {share:.1%} | `{frame}` |" for share, frame in inclusive],
        "",
        "## Self (the frame itself; system calls show up here)",
        "",
        "| share | frame |",
        "|---:|---|",
        *[f"| {share:.1%} | `{frame}` |" for share, frame in own],
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "profile-conn.md"
    path.write_text("\n".join(lines))
    log(f"written: {path}")
    return path
