"""Finding and installing the peers and the load generator (Debian packages).

A tool is installed with ``apt-get`` only when its binary is missing, under a temporary
``/usr/sbin/policy-rc.d`` that exits 101, so installing a server package never starts its
daemon. Nothing else on the system is touched: every server the bench runs is started in
the foreground with its own configuration in a temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")


@dataclass(frozen=True)
class Tool:
    """A program the bench runs, and the Debian packages that bring it."""

    name: str
    binary: str
    packages: tuple[str, ...]
    #: Extra files that must exist (a dynamic module, say).
    files: tuple[Path, ...] = ()

    def present(self) -> bool:
        return Path(self.binary).exists() and all(path.exists() for path in self.files)


TOOLS = {
    "nginx": Tool(
        "nginx", "/usr/sbin/nginx", ("nginx", "libnginx-mod-stream"), (NGINX_STREAM_MODULE,)
    ),
    "haproxy": Tool("haproxy", "/usr/sbin/haproxy", ("haproxy",)),
    "sniproxy": Tool("sniproxy", "/usr/sbin/sniproxy", ("sniproxy",)),
    "wrk": Tool("wrk", "/usr/bin/wrk", ("wrk",)),
    "curl": Tool("curl", "/usr/bin/curl", ("curl",)),
    "prlimit": Tool("prlimit", "/usr/bin/prlimit", ("util-linux",)),
}

#: Every Debian package the bench may need (mirrored in scripts/test).
DEBIAN_PACKAGES = tuple(sorted({p for tool in TOOLS.values() for p in tool.packages}))


class ToolMissing(RuntimeError):
    """A tool is missing and could not be installed."""


def ensure(names: list[str], *, log: object = print) -> None:
    """Make sure every named tool is there; install the missing ones with apt-get."""
    missing = [TOOLS[name] for name in names if not TOOLS[name].present()]
    if not missing:
        return
    packages = sorted({p for tool in missing for p in tool.packages})
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolMissing(
            f"missing {', '.join(t.name for t in missing)}; as root on Debian the bench "
            f"installs them itself (apt-get install {' '.join(packages)})"
        )
    assert callable(log)
    log(f"installing {' '.join(packages)} (apt-get; policy-rc.d keeps their daemons stopped)")
    made_policy = False
    if not POLICY_RC_D.exists():
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
        made_policy = True
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise ToolMissing(
                f"apt-get install {' '.join(packages)} failed:\n{done.stderr[-2000:]}"
            )
    finally:
        if made_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    still = [t.name for t in missing if not t.present()]
    if still:
        raise ToolMissing(f"still missing after apt-get: {', '.join(still)}")


def version(name: str) -> str:
    """One line naming the tool's version (for the report)."""
    tool = TOOLS[name]
    commands = {
        "nginx": [tool.binary, "-v"],
        "haproxy": [tool.binary, "-v"],
        "sniproxy": [tool.binary, "-V"],
        "wrk": [tool.binary, "-v"],
        "curl": [tool.binary, "-V"],
        "prlimit": [tool.binary, "--version"],
    }
    try:
        done = subprocess.run(commands[name], capture_output=True, text=True, timeout=10)
    except OSError as e:
        return f"{name}: {e}"
    text = (done.stdout + done.stderr).strip().splitlines()
    first = text[0] if text else name
    return re.sub(r"\s+", " ", first)[:120]
