"""The relay as users run it: the installed `twist` command and the example config."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from acrrelay.testing import alert_description, client_hello_bytes
from tests.e2e_support import clean_env, stop_process

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = clean_env(Path(os.environ.get("HOME", "/tmp")))


def twist(*args: str, cwd: Path = REPO) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "twist"), "--log-format=text", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_listening(proc: subprocess.Popen[str], timeout: float = 20) -> int:
    """Read the log until "listening on HOST:PORT"; return PORT."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"listening on [^ ]*:(\d+) ", line)
        if match:
            return int(match.group(1))
    proc.kill()
    raise AssertionError("relay did not start:\n" + "".join(seen))


def refused_with_alert(port: int, name: str) -> int | None:
    """Send a real hello for ``name``; return the alert description the relay answers with."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(client_hello_bytes(name))
        data = b""
        while len(data) < 7:
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
        return alert_description(data)


def test_plugin_appears_in_twist_help() -> None:
    """`twist --help` lists the acrrelay plugin (so a regular pip install works)."""
    result = subprocess.run(
        [str(BIN / "twist"), "--help"], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert re.search(r"^\s+acrrelay\s+SNI relay", result.stdout, re.M), result.stdout


def test_example_config_starts_and_accepts() -> None:
    """`twist acrrelay --config etc/acrrelay.toml` starts on 8443, refuses an unknown name,
    and writes the access line as JSON to stdout."""
    proc = twist("acrrelay", "--config", "etc/acrrelay.toml")
    try:
        port = wait_listening(proc)
        assert port == 8443
        assert refused_with_alert(port, "not-routed.example.com") == 112
    finally:
        stop_process(proc)
    assert proc.stdout is not None
    access = [json.loads(line) for line in proc.stdout.read().splitlines() if line.startswith("{")]
    assert len(access) == 1
    assert access[0]["sni"] == "not-routed.example.com"
    assert access[0]["close_reason"] == "refused:not_allowed"
    assert access[0]["listener"] == "tls"


def test_quick_start_flags_without_a_file(tmp_path: Path) -> None:
    """The goproxy-style quick start runs with flags only and routes by them."""
    log = tmp_path / "access.jsonl"
    proc = twist(
        "acrrelay",
        "--listen", "tcp:0:interface=127.0.0.1",
        "--acr", "cn-beijing",
        "--route", "a.example.com=tcp:host=127.0.0.1:port=9",
        "--access-log", str(log),
    )  # fmt: skip
    try:
        port = wait_listening(proc)
        assert refused_with_alert(port, "registry.cn-beijing.aliyuncs.com.evil.example") == 112
        # a routed name reaches its (closed) loopback backend, which refuses: internal_error
        assert refused_with_alert(port, "a.example.com") == 80
    finally:
        stop_process(proc)
    lines = log.read_text().splitlines()
    assert '"close_reason":"refused:not_allowed"' in lines[0]
    assert '"close_reason":"connect_failed"' in lines[1]


def test_a_busy_port_fails_start_with_one_line() -> None:
    """A port that cannot be bound makes twist exit non-zero with one clear line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                str(BIN / "twist"),
                "acrrelay",
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--route", "a.example.com=resolve",
            ],
            env=ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr == (
        f"acrrelay: cannot listen on tcp:{port}:interface=127.0.0.1: address already in use\n"
    )


def test_a_bad_config_fails_start_with_one_line(tmp_path: Path) -> None:
    """A config mistake under twist is one line naming the file and key, and exit 1."""
    path = tmp_path / "bad.toml"
    path.write_text('[[listen]]\nendpoint = "tcp:0"\n[relay]\npeek_timeout = "soon"\n')
    result = subprocess.run(
        [str(BIN / "twist"), "acrrelay", "--config", str(path)],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'acrrelay: {path}: relay.peek_timeout: expected a duration such as "90s", '
        '"15m" or "1h30m", got "soon"'
    ]


def readme_block(heading: str) -> str:
    """The first ```python block after a README heading."""
    text = (REPO / "README.md").read_text()
    section = text.split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading}"
    return match.group(1)


def test_readme_embedding_example_runs() -> None:
    """The README's embedding example runs as shown and refuses an unknown name."""
    example = readme_block("## Embedding it as a library")
    probe = textwrap.dedent(
        """
        import socket
        from twisted.internet import reactor as _reactor, threads as _threads
        from acrrelay.testing import alert_description as _alert, client_hello_bytes as _hello

        def _probe():
            port = globals()["service"].addresses()[0].port
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(_hello("unknown.example.com"))
                print("alert", _alert(s.recv(64)), flush=True)

        def _check():
            d = _threads.deferToThread(_probe)
            d.addBoth(lambda _: _reactor.callLater(0.2, _reactor.stop))

        _reactor.callLater(0.2, _check)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe + example],
        env=ENV, capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "alert 112" in result.stdout
    assert "access: unknown.example.com refused:not_allowed" in result.stdout
    assert re.search(r"relay listening on port \d+", result.stdout)


@pytest.mark.parametrize("command", [["acrrelay", "--version"], ["acrrelay", "--help"]])
def test_console_script_is_installed(command: list[str]) -> None:
    """The acrrelay console script is on PATH after a regular install."""
    result = subprocess.run(
        [str(BIN / command[0]), *command[1:]], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "acrrelay" in result.stdout
