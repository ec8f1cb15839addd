"""End to end: `workers = N` processes on the same listening socket."""

from __future__ import annotations

import collections
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from acrrelay.testing import alert_description, client_hello_bytes
from tests.e2e_support import Relay

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

KNOWN = "known.example.com"


def refusal(port: int, name: str) -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(client_hello_bytes(name))
        return alert_description(sock.recv(64))


def workers_of(relay: Relay) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(relay.pid).children()
        if "acrrelay.worker_main" in " ".join(p.cmdline())
    ]


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_workers_share_the_port_reload_together_restart_and_drain(
    start_relay: Callable[..., Relay], tmp_path: Path
) -> None:
    """Three processes serve one port; a reload reaches each; a killed worker comes back;
    SIGTERM drains them all and the main process exits 0 with no worker left."""
    relay = start_relay({KNOWN: "tcp:host=127.0.0.1:port=9"}, workers=3, drain_timeout="2s")
    wait_for(lambda: len(workers_of(relay)) == 2)
    wait_for(lambda: sum("serving" in line for line in relay.output.lines) == 2)
    for _ in range(90):
        assert refusal(relay.port, "unknown.example.com") == 112
    served = collections.Counter(
        entry.get("worker") for entry in relay.wait_access(lambda e: True, count=90)
    )
    print(f"\nworkers: connections per worker {dict(sorted(served.items()))}")
    assert set(served) == {1, 2, 3}, served

    # A reload removes the route in every worker: the known name is refused everywhere.
    assert refusal(relay.port, KNOWN) == 80  # routed: its backend (port 9) refuses
    relay.write_config({"other.example.com": "tcp:host=127.0.0.1:port=9"}, workers=3)
    os.kill(relay.pid, signal.SIGHUP)
    wait_for(lambda: sum("reloaded" in line for line in relay.output.lines) == 3)
    assert all(refusal(relay.port, KNOWN) == 112 for _ in range(30))

    # A worker that dies is started again.
    victim = workers_of(relay)[0]
    victim.kill()
    wait_for(
        lambda: len(workers_of(relay)) == 2 and victim.pid not in [p.pid for p in workers_of(relay)]
    )

    children = workers_of(relay)
    relay.proc.terminate()
    assert relay.proc.wait(timeout=30) == 0
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, child


def test_workers_are_a_config_setting(tmp_path: Path) -> None:
    """workers is checked like every other setting."""
    from acrrelay.config import ConfigError, parse_config

    base = '[[listen]]\nendpoint = "tcp:1"\n[[route]]\nname = "a.b.c"\nbackend = "resolve"\n'
    assert parse_config(base + "[relay]\nworkers = 4\n").workers == 4
    with pytest.raises(ConfigError, match="expected a number of processes from 1 to 64"):
        parse_config(base + "[relay]\nworkers = 0\n")
