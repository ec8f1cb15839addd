"""The real docker engine (Debian's ``docker.io``) in a test network namespace.

``dockerd`` runs inside the world's client namespace, in a private mount namespace of its
own where:

- ``/etc/hosts`` is a hosts file of ours (the names point at the relay or the gateway);
- ``/etc/docker`` is a directory of ours, so ``/etc/docker/certs.d/<host>/ca.crt`` (the
  place dockerd reads a registry's CA from, fixed in its code) trusts exactly the CA the
  test names, and the machine's own ``/etc/docker`` is never read or written;
- ``/sys/fs/cgroup`` is mounted again as the host has it (``ip netns exec`` mounts a fresh
  sysfs, which hides the cgroup mounts dockerd checks at start): the cgroup v1
  hierarchies one by one, or cgroup2, read from the host's ``/proc/self/mountinfo``.

It has its own ``--data-root``, ``--exec-root``, ``--pidfile``, socket
(``-H unix:///tmp/acrd…/docker.sock``: a short path, as containerd's sockets under
the exec-root must be) and config file, no bridge, no iptables, the vfs storage
driver, and the containerd that dockerd starts and owns under its exec-root. It never
touches the machine's docker socket or network. The client is ``/usr/bin/docker`` with
``-H`` that socket and a ``DOCKER_CONFIG`` of ours (``/usr/local/bin/docker`` is another
client on this machine, left alone). ``stop()`` ends dockerd (and its containerd) by PID.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from tests.e2e_support import _Output, clean_env, stop_process
from tests.registry_world import ClientNamespace

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"
START_TIMEOUT = 60.0


def cgroup_mounts(mountinfo: str | None = None) -> list[tuple[str, str, str]]:
    """The host's cgroup mounts under /sys/fs/cgroup as (fstype, options, path), the
    tmpfs that holds v1 hierarchies first; from ``/proc/self/mountinfo``."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    mounts = []
    for line in text.splitlines():
        fields, _, rest = line.partition(" - ")
        path = fields.split()[4]
        fstype, _source, options = rest.split()[:3]
        if not (path == "/sys/fs/cgroup" or path.startswith("/sys/fs/cgroup/")):
            continue
        if fstype not in ("tmpfs", "cgroup", "cgroup2"):
            continue
        kept = ",".join(o for o in options.split(",") if o not in ("rw", "ro"))
        mounts.append((fstype, kept, path))
    return sorted(mounts, key=lambda m: m[2].count("/"))


def _mount_script(mounts: Sequence[tuple[str, str, str]]) -> str:
    lines = []
    for fstype, options, path in mounts:
        option = f"-o {shlex.quote(options)} " if options else ""
        lines.append(
            f"mkdir -p {shlex.quote(path)} && "
            f"mount -t {fstype} {option}{fstype} {shlex.quote(path)}"
        )
    return " && ".join(lines) if lines else "true"


def certs_d(root: Path, cas: Mapping[str, Path]) -> Path:
    """A directory to mount on /etc/docker: ``certs.d/<host>/ca.crt`` for each host."""
    for host, ca_file in cas.items():
        (root / "certs.d" / host).mkdir(parents=True, exist_ok=True)
        (root / "certs.d" / host / "ca.crt").write_bytes(ca_file.read_bytes())
    return root


class DockerEngine:
    """dockerd in ``netns`` with ``hosts`` as its /etc/hosts and ``etc_docker`` as its
    /etc/docker (see the module docstring). Running (``/_ping`` answers) once built."""

    def __init__(
        self,
        directory: Path,
        netns: ClientNamespace,
        *,
        hosts: Mapping[str, str],
        etc_docker: Path,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        # Unix socket paths are short (108 bytes), and containerd's live under exec-root.
        self.short = Path(tempfile.mkdtemp(prefix="acrd", dir="/tmp"))
        self.socket = self.short / "docker.sock"
        self.client_config = directory / "client"
        self.client_config.mkdir(exist_ok=True)
        hosts_file = directory / "hosts"
        hosts_file.write_text(netns.hosts_text(hosts))
        daemon_json = directory / "daemon.json"
        daemon_json.write_text("{}\n")
        home = directory / "home"
        home.mkdir(exist_ok=True)
        dockerd = [
            DOCKERD,
            f"--config-file={daemon_json}",
            f"--data-root={directory / 'data'}",
            f"--exec-root={self.short / 'x'}",
            f"--pidfile={directory / 'dockerd.pid'}",
            f"--host=unix://{self.socket}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--storage-driver=vfs",
            "--log-level=info",
        ]
        script = (
            'mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/docker && '
            f'{_mount_script(cgroup_mounts())} && shift 1 && exec "$@"'
        )
        command = [
            *netns.command(["unshare", "--mount", "--propagation", "private", "--"]),
            "sh", "-c", script, str(hosts_file), str(etc_docker), *dockerd,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**clean_env(home), "TMPDIR": str(directory)},
            cwd=directory,
        )
        self.output = _Output(self.proc)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.socket.exists():
                # The socket appears before the API answers: a ping may hang a while.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    args = ["version", "--format", "{{.Server.Version}}"]
                    result = self.docker(args, timeout=10)
                    if result.returncode == 0:
                        self.version = result.stdout.strip()
                        return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.output._thread.join(timeout=2)
                raise AssertionError(
                    f"dockerd did not start (exit {self.proc.poll()}):\n{self.output.text()}"
                )
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def docker(
        self, args: Sequence[str], *, timeout: float = 60.0, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """``/usr/bin/docker -H unix://<our socket> ARGS`` with our client config dir."""
        env = {**clean_env(self.directory / "home"), "DOCKER_CONFIG": str(self.client_config)}
        return subprocess.run(
            [DOCKER, "-H", f"unix://{self.socket}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    def inspect(self, reference: str) -> dict[str, Any]:
        result = self.docker(["image", "inspect", reference])
        assert result.returncode == 0, f"{result.stderr}\n{self.tail()}"
        return dict(json.loads(result.stdout)[0])

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.lines[-lines:])

    def stop(self) -> None:
        """dockerd by its PID (it stops its containerd); then any child left, by PID."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            children = []
        stop_process(self.proc, timeout=20.0)
        for child in children:
            try:
                child.terminate()
                child.wait(timeout=10)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                child.kill()
        shutil.rmtree(self.short, ignore_errors=True)


__all__ = ["DOCKER", "DOCKERD", "DockerEngine", "certs_d", "cgroup_mounts"]
