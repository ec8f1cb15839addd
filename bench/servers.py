"""The servers the bench runs: the TLS backend (nginx) and the relays under test.

Each server is its own foreground process with its own configuration in a temporary
directory, its output going to a log file there (never a pipe that could fill and stall
it), and is stopped by its PID. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from tests.e2e_support import clean_env, free_port, listening_ports, stop_process

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 15.0
#: Every server may hold this many descriptors (10 000 idle connections need 20 000+): the
#: hard limit we have (we cannot raise it without CAP_SYS_RESOURCE), at most 65536.
NOFILE = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
#: HAProxy wants two descriptors per connection plus two per splice pipe, and refuses to
#: start unless the limit covers them all.
HAPROXY_MAXPIPES = 200
HAPROXY_MAXCONN = (NOFILE - 2 * HAPROXY_MAXPIPES - 200) // 2
#: The most idle connections every relay can hold under NOFILE.
MAX_IDLE = min((NOFILE - 200) // 2, HAPROXY_MAXCONN) - 100


class StartFailed(RuntimeError):
    pass


@dataclass
class Server:
    """One running server process (and its children), listening on ``port``."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return procs.tree_cpu(self.pid)

    def rss(self) -> int:
        return procs.tree_rss(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""

    def stop(self) -> None:
        stop_process(self.proc, timeout=10.0)


def launch(
    name: str,
    command: list[str],
    directory: Path,
    port: int,
    *,
    env: dict[str, str] | None = None,
) -> Server:
    """Start ``command`` (under a raised descriptor limit) and wait until ``port`` listens."""
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "output.log"
    # prlimit sets the limit on itself, then execs the command: the PID stays the server's.
    full = ["/usr/bin/prlimit", f"--nofile={NOFILE}:{NOFILE}", "--", *command]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**clean_env(directory), **(env or {})},
            cwd=directory,
        )
    server = Server(name, proc, port, directory, log_path)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while port not in listening_ports():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise StartFailed(
                f"{name} did not listen on 127.0.0.1:{port} "
                f"(exit status {proc.returncode}); its output:\n{server.log_tail()}"
            )
        time.sleep(0.02)
    return server


def settle(
    server: Server, *, interval: float = 0.2, quiet: float = 0.02, limit: float = 15.0
) -> None:
    """Wait until ``server`` (and its children: workers still importing, say) stops using
    CPU, so start-up costs stay out of the figures."""
    deadline = time.monotonic() + limit
    last = server.cpu()
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = server.cpu()
        if now - last <= quiet:
            return
        last = now


# ---------------------------------------------------------------- the TLS backend


@dataclass(frozen=True)
class BackendFiles:
    """What the backend serves: its certificate, and the big file."""

    name: str
    cert: Path
    key: Path
    ca: Path
    root: Path  # document root: /big is the big file
    big_size: int


NGINX = "/usr/sbin/nginx"


def start_backend(
    files: BackendFiles, directory: Path, workers: int = 2, extra: str = ""
) -> Server:
    """nginx serving TLS for the bench name: ``/big`` (a sparse file: zeros that cost no
    disk reads) and ``/small`` (a 3-byte answer). No session cache and no tickets, so
    every new connection is a full handshake. Long header and keep-alive timeouts, so an
    idle TLS connection stays open for the idle-connection test."""
    port = free_port()
    temp = directory / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {NOFILE};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    sendfile off;
    output_buffers 2 256k;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    client_header_timeout 600s;
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
        server_name {files.name};
        ssl_certificate {files.cert};
        ssl_certificate_key {files.key};
        ssl_session_cache off;
        ssl_session_tickets off;
        root {files.root};
        location = /small {{ return 200 "ok\\n"; }}
        {extra}
    }}
}}
"""
    )
    command = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return launch("backend", command, directory, port)


# ---------------------------------------------------------------- relays


@dataclass(frozen=True)
class Peer:
    """A relay under test: a kind of server plus a configuration fragment.

    For acrrelay the fragment is ``[relay]`` keys (``zero_copy = false``); for HAProxy it is
    lines for its ``defaults`` section (``option splice-auto``).
    """

    name: str
    kind: str  # acrrelay | nginx | haproxy | sniproxy | twisted-floor
    fragment: str = ""
    about: str = ""
    #: For acrrelay variants: the [relay] keys the fragment needs.
    keys: tuple[str, ...] = field(default=())
    #: The tests this peer takes part in (None: all of them).
    tests: tuple[str, ...] | None = None


PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("acrrelay", "acrrelay", "", "defaults (access log off)"),
        Peer(
            "acrrelay-splice-off", "acrrelay", "zero_copy = false", "no splice(2)", ("zero_copy",)
        ),
        Peer("acrrelay-2-workers", "acrrelay", "workers = 2", "two processes", ("workers",)),
        Peer("nginx", "nginx", "", "stream ssl_preread, map, worker_processes auto"),
        Peer("haproxy", "haproxy", "", "mode tcp, req.ssl_sni, nbthread default"),
        # splice-auto alone moved almost nothing by splice here (HAProxy 2.6: the same CPU per
        # GiB as without, its pipe pool barely used); forcing it both ways does splice.
        Peer(
            "haproxy-splice",
            "haproxy",
            "option splice-request\n    option splice-response",
            "as haproxy, splicing both ways",
        ),
        Peer("haproxy-splice-auto", "haproxy", "option splice-auto", "as haproxy, splice-auto"),
        Peer("sniproxy", "sniproxy", "", "listener + table"),
        Peer(
            "twisted-floor",
            "twisted-floor",
            "",
            "the least a Twisted relay does: read, connect, splice (bench/floor.py)",
            # What it costs is the point; its memory is no one's concern.
            tests=("bulk", "conn", "ttfb"),
        ),
    )
}
TOOL_OF_KIND = {"nginx": "nginx", "haproxy": "haproxy", "sniproxy": "sniproxy"}


def acrrelay_env(src: Path) -> dict[str, str]:
    """acrrelay from the source tree ``src`` (by default this one), not whatever copy is
    installed in the venv: the bench measures the code in front of you."""
    return {"PYTHONPATH": str(src)}


def acrrelay_config(peer: Peer, name: str, backend_port: int, port: int) -> str:
    relay_keys = ['access_log = "off"']
    if peer.fragment:
        relay_keys.append(peer.fragment)
    return "\n".join(
        [
            "[relay]",
            *relay_keys,
            "",
            "[[listen]]",
            f'endpoint = "tcp:{port}:interface=127.0.0.1"',
            'name = "bench"',
            'protocols = ["tls"]',
            "",
            "[[route]]",
            f"name = {json.dumps(name)}",
            f'backend = "tcp:host=127.0.0.1:port={backend_port}"',
            "",
        ]
    )


def check_acrrelay(peer: Peer, directory: Path, name: str, src: Path = REPO) -> str | None:
    """None if this variant's configuration is accepted by ``acrrelay check-config``, else
    why not (an unknown key while the feature has not landed, or another error)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"check-{peer.name}.toml"
    path.write_text(acrrelay_config(peer, name, 9, 9))
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from acrrelay.cli import main; sys.exit(main())",
            "check-config",
            str(path),
        ],
        capture_output=True,
        text=True,
        env={**clean_env(directory), **acrrelay_env(src)},
        cwd=directory,
        timeout=60,
        check=False,
    )
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    message = lines[-1] if lines else f"exit status {done.returncode}"
    message = message.replace(str(path), "CONFIG")
    if "unknown key" in message:
        return f"skipped: acrrelay does not know {', '.join(peer.keys)} yet ({message})"
    return f"skipped: check-config rejects `{peer.fragment}` ({message})"


def start_peer(
    peer: Peer, directory: Path, name: str, backend_port: int, *, acrrelay_src: Path = REPO
) -> Server:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    if peer.kind == "acrrelay":
        conf = directory / "acrrelay.toml"
        conf.write_text(acrrelay_config(peer, name, backend_port, port))
        # python -m twisted is twist; in the foreground, as the README runs it.
        command = [
            sys.executable, "-m", "twisted", "--log-format=text", "acrrelay", "--config", str(conf)
        ]  # fmt: skip
        return launch(peer.name, command, directory, port, env=acrrelay_env(acrrelay_src))
    if peer.kind == "nginx":
        conf = directory / "nginx.conf"
        conf.write_text(
            f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {NOFILE};
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 30000; }}
stream {{
    map $ssl_preread_server_name $bench_backend {{
        {name} 127.0.0.1:{backend_port};
        default 127.0.0.1:1;
    }}
    server {{
        listen 127.0.0.1:{port};
        ssl_preread on;
        proxy_pass $bench_backend;
        proxy_timeout 1h;
    }}
}}
"""
        )
        command = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
        return launch(peer.name, command, directory, port)
    if peer.kind == "haproxy":
        conf = directory / "haproxy.cfg"
        conf.write_text(
            f"""global
    maxconn {HAPROXY_MAXCONN}
    maxpipes {HAPROXY_MAXPIPES}

defaults
    mode tcp
    maxconn {HAPROXY_MAXCONN}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    {peer.fragment}

frontend bench
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req.ssl_hello_type 1 }}
    use_backend bench_backend if {{ req.ssl_sni -i {name} }}

backend bench_backend
    server backend 127.0.0.1:{backend_port}
"""
        )
        return launch(peer.name, ["/usr/sbin/haproxy", "-db", "-f", str(conf)], directory, port)
    if peer.kind == "sniproxy":
        conf = directory / "sniproxy.conf"
        pattern = "^" + name.replace(".", "\\\\.") + "$"
        conf.write_text(
            f"""user root
pidfile {directory}/sniproxy.pid
error_log {{
    filename {directory}/error.log
    priority notice
}}
listener 127.0.0.1:{port} {{
    protocol tls
    table bench
}}
table bench {{
    {pattern} 127.0.0.1:{backend_port}
}}
"""
        )
        return launch(peer.name, ["/usr/sbin/sniproxy", "-f", "-c", str(conf)], directory, port)
    if peer.kind == "twisted-floor":
        command = [sys.executable, "-m", "bench.floor", str(port), str(backend_port)]
        return launch(peer.name, command, directory, port, env={"PYTHONPATH": str(REPO)})
    raise ValueError(f"unknown kind of peer: {peer.kind}")
