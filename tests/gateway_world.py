"""The gateway's test world: client (netns) -> gateway -> region relay -> registry world.

It reuses a running :class:`RegistryWorld` (docker-registry with token auth and S3
redirects, the token service, moto on OSS's names) as the region side, and adds:

- **a region relay** of its own (``region``): ``twist acrrelay`` on another address of the
  namespace's veth, routing every name to the world's servers, with its metrics page on,
  so :meth:`GatewayWorld.upstream_bytes` counts the bytes that crossed the line **at the
  upstream side**: the relay's ``acrrelay_bytes{route, direction="down"}`` counter, which
  includes connections still open (the gateway keeps its upstream connections pooled, so
  an access-log line would come only when one closes). Only the gateway uses this relay.
- **the gateway** (:class:`GatewayProcess`, ``start_gateway()``): ``twist acrrelay
  --config gateway.toml`` with a ``[gateway]`` table, listening on ``address:443`` (a veth
  address), serving the world's names with leaves from an internal CA made by
  ``acrrelay.gateway.ca.init_ca``, every route's backend the region relay, upstream
  certificates checked against the world's test CA (``upstream_ca``). Each start is a
  fresh process with an empty cache (unless told to keep it), on the same address.
- **clients** in the namespace: ``via="gateway"`` runs a command under a hosts file that
  points the registry and token names (only those: the OSS names resolve nowhere, since
  the gateway follows blob redirects itself) at the gateway, and in a private mount
  namespace whose ``/etc/containers`` and ``/etc/docker`` are directories of ours holding
  ``certs.d/<host>/ca.crt`` = the gateway CA (the machine's own are never written);
  ``via="relay"`` points every name at the region relay, trusting the test CA.
  ``skopeo()`` and ``skopeo_popen()`` (for concurrent pulls), and :func:`fetch` for a
  byte-exact Python client (it counts and hashes every body byte it got, and says whether
  the connection ended cleanly).

- **faults and disks**: ``fault_proxy()`` puts a :class:`tests.fault_proxy.FaultProxy`
  on the gateway's upstream hop (``start_gateway(proxy=...)``: slow it, reset it at a
  byte, refuse it); ``start_gateway(cache_tmpfs=N)`` puts the store on a tmpfs of N bytes
  in the gateway's own mount namespace (``GatewayProcess.seen()`` looks inside).
- **reloads**: ``GatewayProcess.reload(cache_size=..., listen=...)`` rewrites the config
  file and sends SIGHUP to the gateway's PID.

Fixtures (``tests.e2e_fixtures``): ``gateway_world`` (session), ``gateway`` (a fresh
gateway per test), ``gateway_image`` (the big image as ``IMAGE:gateway``),
``small_images`` (a 1 MiB layer in each of two repositories, tag ``small``).

Clean-up: processes are stopped by PID in finalisers (``close()``); the namespace and the
region relay belong to the registry world, which removes them.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.e2e_support import VENV_BIN, _Output, _toml_string, _toml_value, clean_env, stop_process
from tests.fault_proxy import FaultProxy
from tests.https_fetch import Fetch, fetch
from tests.registry_world import (
    AUTH,
    NAMES,
    OSS,
    OSS_WILDCARD,
    REGISTRY,
    NamespaceRelay,
    RegistryWorld,
)

#: The names clients resolve to the gateway: registry and token service, never OSS.
CLIENT_NAMES = (REGISTRY, AUTH)
#: The names the gateway serves and reaches upstream (OSS for the redirects it follows).
GATEWAY_ROUTES = (REGISTRY, AUTH, OSS, OSS_WILDCARD)
#: The region relay's routes per service, for counting bytes.
SERVICE_ROUTES = {"oss": (OSS, OSS_WILDCARD), "registry": (REGISTRY,), "auth": (AUTH,)}
START_TIMEOUT = 30.0
_SAMPLE = re.compile(r"^(\w+)(?:\{([^}]*)\})? (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')
_METRICS_ON = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``, from the
    Prometheus page on 127.0.0.1:``port``; 0 if there is none."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    total = 0.0
    for got, label_text, value in _SAMPLE.findall(text):
        found = dict(_LABEL.findall(label_text or ""))
        if got == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def listening(address: str, port: int) -> bool:
    """Whether a TCP socket listens on ``address:port`` (IPv4), from /proc/net/tcp."""
    want = f"{struct.unpack('<I', socket.inet_aton(address))[0]:08X}:{port:04X}"
    wildcard = f"00000000:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[1] in (want, wildcard):
            return True
    return False


def relay_bytes(relay: NamespaceRelay, routes: Sequence[str], direction: str = "down") -> int:
    """The relay's live byte counter for ``routes`` in ``direction`` (its metrics page)."""
    assert relay.metrics_port is not None, "the relay has no metrics page"
    port = relay.metrics_port
    return sum(
        int(metric(port, "acrrelay_bytes_total", route=route, direction=direction))
        for route in routes
    )


# ---------------------------------------------------------------- the gateway process


class GatewayProcess:
    """One ``twist acrrelay`` with a ``[gateway]`` table, listening on ``address:443``.

    ``gateway`` adds or overrides ``[gateway]`` keys (``proof_ttl = "2s"``...); ``relay``
    adds ``[relay]`` keys. Running once it listens; ``stop()`` ends it by its PID.
    """

    def __init__(
        self,
        directory: Path,
        *,
        address: str,
        backend: str,
        ca_dir: Path,
        cache_dir: Path,
        upstream_ca: Path,
        gateway: Mapping[str, str | int] | None = None,
        relay: Mapping[str, str | int] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.address = address
        self.cache_dir = cache_dir
        self.access_log_path = directory / "access.log"
        self.config_path = directory / "gateway.toml"
        settings: dict[str, str | int] = {
            "ca": str(ca_dir),
            "cache_dir": str(cache_dir),
            "upstream_ca": str(upstream_ca),
            **(gateway or {}),
        }
        lines = ["[relay]", f"access_log = {_toml_string(str(self.access_log_path))}"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in (relay or {}).items()]
        lines += ["", "[[listen]]", f'endpoint = "tcp:443:interface={address}"']
        lines += ['name = "netns"', 'protocols = ["tls"]']
        for name in GATEWAY_ROUTES:
            lines += ["", "[[route]]", f"name = {_toml_string(name)}"]
            lines += [f"backend = {_toml_string(backend)}"]
        lines += ["", "[admin]", 'metrics = "tcp:0"']
        lines += ["", "[gateway]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n")
        command = [str(VENV_BIN / "twist"), "--log-format=text", "acrrelay"]
        self.proc = subprocess.Popen(
            [*wrap, *command, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(directory),
            cwd=directory,
        )
        self.output = _Output(self.proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not listening(address, 443):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                self.output._thread.join(timeout=2)
                raise AssertionError(
                    f"the gateway did not listen on {address}:443 "
                    f"(exit {self.proc.returncode}); it said:\n{self.output.text()}"
                )
            time.sleep(0.05)
        # Its output so far is still queued: this finds the line however the two raced.
        self.metrics_port = int(self.output.wait_for(_METRICS_ON, START_TIMEOUT).group(1))

    def metric(self, name: str, **labels: str) -> float:
        """A counter or gauge of the gateway's metrics page (see :func:`metric`)."""
        return metric(self.metrics_port, name, **labels)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)

    def access_entries(self) -> list[dict[str, Any]]:
        if not self.access_log_path.exists():
            return []
        text = self.access_log_path.read_text()
        text = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def seen(self, path: Path) -> Path:
        """``path`` as the gateway sees it (through its own mount namespace, if wrapped)."""
        return Path(f"/proc/{self.pid}/root{path}")

    def blob_path(self, digest: str) -> Path:
        """Where the store keeps a complete blob (GATEWAY.md's layout), as it sees it."""
        hexdigest = digest.removeprefix("sha256:")
        return self.seen(self.cache_dir / "blobs" / "sha256" / hexdigest[:2] / hexdigest)

    def partial_files(self) -> list[Path]:
        """The store's downloads in progress (``tmp/``), as it sees them."""
        tmp = self.seen(self.cache_dir / "tmp")
        return sorted(tmp.iterdir()) if tmp.is_dir() else []

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def reload(self, *, listen: str | None = None, **gateway: str | int) -> int:
        """Rewrite the config file with these ``[gateway]`` keys added or changed (and the
        listener's endpoint, if ``listen``), then send SIGHUP to the gateway's PID. Returns
        the output line to wait for the answer from (``output.wait_line(..., start=it)``)."""
        text = self.config_path.read_text()
        if listen is not None:
            line = f"endpoint = {_toml_string(listen)}"
            text = re.sub(r'(?m)^endpoint = "tcp:443:[^"]*"$', lambda _: line, text)
        head, _, table = text.partition("\n[gateway]\n")
        settings = dict(line.split(" = ", 1) for line in table.splitlines() if line)
        settings.update({key: _toml_value(value) for key, value in gateway.items()})
        lines = [head, "", "[gateway]", *(f"{k} = {v}" for k, v in settings.items())]
        # Atomically: a reload never reads half a file.
        new = self.config_path.with_suffix(".new")
        new.write_text("\n".join(lines) + "\n")
        new.replace(self.config_path)
        start = len(self.output.lines)
        os.kill(self.pid, signal.SIGHUP)
        return start


# ---------------------------------------------------------------- the world


class GatewayWorld:
    """The gateway chain on top of ``world``; see the module docstring. ``close()`` stops
    the gateway (the region relay goes with the registry world)."""

    def __init__(self, world: RegistryWorld, directory: Path) -> None:
        from acrrelay.gateway.ca import init_ca

        directory.mkdir(parents=True, exist_ok=True)
        self.world = world
        self.directory = directory
        #: The region relay: only the gateway (and ``via="relay"`` clients) use it.
        self.region = world.start_relay(admin={"metrics": "tcp:0"})
        self.ca_file = init_ca(directory / "gateway-ca")
        self.ca_dir = self.ca_file.parent
        #: The client side's private /etc/containers and /etc/docker: certs.d only.
        self.etc_containers = self._certs_d(directory / "etc-containers")
        self.etc_docker = self._certs_d(directory / "etc-docker")
        self.address = world.netns.new_address()
        self.gateway: GatewayProcess | None = None
        self._starts = itertools.count()
        self._proxies: list[FaultProxy] = []
        self._commands = itertools.count()

    def _certs_d(self, root: Path) -> Path:
        for host in CLIENT_NAMES:
            (root / "certs.d" / host).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.ca_file, root / "certs.d" / host / "ca.crt")
        return root

    def start_gateway(
        self,
        *,
        keep_cache: bool = False,
        proxy: FaultProxy | None = None,
        cache_tmpfs: int | None = None,
        **gateway: str | int,
    ) -> GatewayProcess:
        """A gateway (the running one is stopped first) with these ``[gateway]`` keys, on
        a fresh cache directory unless ``keep_cache``; reaching the region relay through
        ``proxy`` if given; with its cache on a tmpfs of ``cache_tmpfs`` bytes if given
        (mounted in a private mount namespace of the gateway's: see ``seen()``)."""
        serial = next(self._starts)
        old = self.gateway
        if old is not None:
            old.stop()
        cache_dir = old.cache_dir if keep_cache and old else self.directory / f"cache{serial}"
        cache_dir.mkdir(exist_ok=True)
        wrap: list[str] = []
        if cache_tmpfs is not None:
            wrap = [
                "unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                f'mount -t tmpfs -o size={cache_tmpfs} tmpfs "$0" && exec "$@"', str(cache_dir),
            ]  # fmt: skip
        self.gateway = GatewayProcess(
            self.directory / f"gateway{serial}",
            address=self.address,
            backend=proxy.endpoint if proxy else f"tcp:host={self.region.address}:port=443",
            ca_dir=self.ca_dir,
            cache_dir=cache_dir,
            upstream_ca=self.world.ca.ca_file,
            gateway=gateway,
            wrap=wrap,
        )
        return self.gateway

    def fault_proxy(self, *, rate: float | None = None) -> FaultProxy:
        """A :class:`FaultProxy` to the region relay (for ``start_gateway(proxy=...)``)."""
        proxy = FaultProxy((self.region.address, 443), rate=rate)
        self._proxies.append(proxy)
        return proxy

    def upstream_bytes(self, service: str = "oss", direction: str = "down") -> int:
        """Bytes that crossed the region relay for ``service`` (oss, registry, auth) so
        far, counted at the relay (connections still open included)."""
        return relay_bytes(self.region, SERVICE_ROUTES[service], direction)

    # -- clients

    def hosts(self, via: str) -> dict[str, str]:
        if via == "gateway":
            return dict.fromkeys(CLIENT_NAMES, self.address)
        assert via == "relay", via
        return dict.fromkeys(NAMES, self.region.address)

    def command(self, args: Sequence[str], *, via: str) -> list[str]:
        """``args`` in the client namespace under ``via``'s hosts file; for the gateway, in a
        private mount namespace whose /etc/containers and /etc/docker are ours."""
        hosts = self.directory / f"hosts.{next(self._commands)}"
        hosts.write_text(self.world.netns.hosts_text(self.hosts(via)))
        mounts = 'mount --bind "$0" /etc/hosts'
        if via == "gateway":
            mounts += ' && mount --bind "$1" /etc/containers && mount --bind "$2" /etc/docker'
        return [
            "ip", "netns", "exec", self.world.netns.name,
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", f'{mounts} && shift 2 && exec "$@"',
            str(hosts), str(self.etc_containers), str(self.etc_docker), *args,
        ]  # fmt: skip

    def skopeo_command(self, args: Sequence[str], *, timeout: float) -> list[str]:
        world = self.world
        return [
            "skopeo", "--policy", str(world.policy), "--registries.d", str(world.registries_d),
            "--command-timeout", f"{int(timeout)}s", *args,
        ]  # fmt: skip

    def skopeo_popen(
        self, args: Sequence[str], *, home: Path, via: str = "gateway", timeout: float = 300.0
    ) -> subprocess.Popen[str]:
        """``skopeo ARGS`` started in the namespace (see :meth:`command`); the caller waits."""
        home.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(
            self.command(self.skopeo_command(args, timeout=timeout), via=via),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.world.client_env(home),
            cwd=home,
        )

    def skopeo(
        self,
        args: Sequence[str],
        *,
        home: Path,
        via: str = "gateway",
        timeout: float = 300.0,
        stdin: str = "",
    ) -> subprocess.CompletedProcess[str]:
        """``skopeo ARGS`` in the namespace through ``via``; never raises on its status."""
        proc = self.skopeo_popen(args, home=home, via=via, timeout=timeout)
        try:
            out, err = proc.communicate(stdin, timeout=timeout + 15)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def login(self, home: Path, user: str, password: str, *, via: str = "gateway") -> None:
        result = self.skopeo(
            ["login", "--username", user, "--password-stdin", REGISTRY],
            home=home, via=via, stdin=password, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, self.failure("skopeo login", result)

    def fetch(
        self, method: str, path: str, *, token: str | None = None, via: str = "gateway",
        headers: Mapping[str, str] | None = None, name: str = REGISTRY, **options: Any,
    ) -> Fetch:  # fmt: skip
        """:func:`fetch` from the root namespace to the gateway (trusting its CA) or the
        region relay (trusting the test CA), with ``Bearer token`` if given."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if via == "gateway":
            address, ca_file = self.address, self.ca_file
        else:
            address, ca_file = self.region.address, self.world.ca.ca_file
        return fetch(address, ca_file, method, path, name=name, headers=sent, **options)

    def failure(self, what: str, result: subprocess.CompletedProcess[str]) -> str:
        return (
            f"{what} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}\n{self.diagnostics()}"
        )

    def diagnostics(self, lines: int = 40) -> str:
        """The gateway's output and access log (without metrics scrapes) first, then the
        registry world's."""
        parts = []
        if self.gateway is not None:
            state = "running" if self.gateway.alive() else f"exited {self.gateway.proc.returncode}"
            said = [line for line in self.gateway.output.lines if "GET /metrics" not in line]
            access = [json.dumps(e) for e in self.gateway.access_entries()]
            parts.append(f"--- gateway (pid {self.gateway.pid}, {state}):")
            parts += said[-lines:]
            parts.append("--- gateway access log:")
            parts += access[-lines:]
        parts.append(self.world.diagnostics(lines // 2))
        return "\n".join(parts)

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for proxy in self._proxies:
            proxy.close()


__all__ = [
    "CLIENT_NAMES",
    "GATEWAY_ROUTES",
    "GatewayProcess",
    "GatewayWorld",
    "listening",
    "relay_bytes",
]
