"""The gateway bench (issue 11): its line (``bench/shaper.py``) limits and counts exactly, and
``python -m bench gateway --quick`` runs both paths end to end and reports them."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.shaper import CHUNK, Bucket, read_counts
from tests.e2e_support import clean_env, free_port, listening_ports, stop_process

REPO = Path(__file__).resolve().parent.parent


def test_bucket_books_each_byte_at_the_rate_after_one_burst() -> None:
    """An idle bucket lets one burst through at once; after it, n bytes wait n / rate."""
    bucket = Bucket(1e6, burst=CHUNK)
    assert bucket.delay(CHUNK, now=100.0) == 0.0
    assert bucket.delay(500_000, now=100.0) == pytest.approx(0.5)
    assert bucket.delay(500_000, now=100.0) == pytest.approx(1.0)
    # Idle time earns at most one burst of credit, however long the line was idle.
    assert bucket.delay(2 * CHUNK, now=1000.0) == pytest.approx(CHUNK / 1e6)


def _target(up: int, down: int, received: list[int]) -> tuple[socket.socket, threading.Thread]:
    """A one-connection server: reads ``up`` bytes, then sends ``down`` bytes and closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            got = 0
            while got < up and (data := conn.recv(1 << 16)):
                got += len(data)
            received.append(got)
            conn.sendall(b"d" * down)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.e2e
def test_shaper_takes_at_least_size_over_rate_and_counts_every_byte(tmp_path: Path) -> None:
    """1 MB up and 1.5 MB down through a 2 MB/s shaper: the download takes at least
    (size - one burst) / rate, both sides get every byte, and the counts are exact."""
    up, down, rate = 1_000_000, 1_500_000, 2e6
    received: list[int] = []
    listener, thread = _target(up, down, received)
    port, control = free_port(), free_port()
    shaper = subprocess.Popen(
        [sys.executable, "-m", "bench.shaper", "--listen", str(port), "--control",
         str(control), "--target", f"127.0.0.1:{listener.getsockname()[1]}", "--rate",
         str(rate)],
        cwd=REPO, env={**clean_env(tmp_path), "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not {port, control} <= listening_ports():
            assert shaper.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(b"u" * up)
            got = 0
            while data := sock.recv(1 << 16):
                got += len(data)
            elapsed = time.monotonic() - started
        thread.join(30)
        assert received == [up] and got == down
        assert elapsed >= (down - CHUNK) / rate
        deadline = time.monotonic() + 10
        while (counts := read_counts(control))["down"] < down and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counts == {"up": up, "down": down, "connections": 1}
    finally:
        stop_process(shaper)
        listener.close()


def _rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """The first table's rows, keyed by (N, path)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not cells[0].isdigit():
            break
        rows[(cells[0], cells[1])] = cells
    return rows


@pytest.mark.e2e
def test_quick_gateway_bench_pulls_both_ways_and_the_gateway_uses_the_line_once(
    tmp_path: Path,
) -> None:
    """``python -m bench gateway --quick`` reports N = 1 and 4 for the relay alone and the
    gateway, every pull verified, and through the gateway 4 clients move about 1x the image
    over the limited hop (the relay alone: about 4x)."""
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "gateway", "--quick", "--out", str(out)],
        cwd=REPO, env={**clean_env(tmp_path), "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=400, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = _rows((out / "gateway-latest.md").read_text())
    for (n, path), cells in sorted(rows.items()):
        print(f"gateway bench quick: N={n} {path}: {cells[2]} s, {cells[4]}x the image")
    assert set(rows) == {(n, p) for n in ("1", "4") for p in ("relay alone", "gateway")}
    assert 0.99 <= float(rows[("4", "gateway")][4]) <= 1.05
    assert 3.9 <= float(rows[("4", "relay alone")][4]) <= 4.2
    raw = json.loads((out / "gateway-latest.json").read_text())
    assert all(p["ok"] for p in raw["pulls"])
    assert {h["name"] for h in raw["hits"] if h["ok"]} >= {
        "gateway (warm store)",
        "nginx proxy_cache (warm)",
    }
