"""The gateway's commands: ``acrrelay ca init``, ``acrrelay cache verify``, and trust help.

``acrrelay/cli.py`` registers these: ``ca_init_main`` and ``cache_verify_main`` take the
arguments after their subcommand (``["./gateway-ca", "--days", "365"]``) and return the exit
status; :func:`trust_instructions` is the text ``acrrelay hosts`` prints for gateway clients.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final, Literal, TextIO

from acrrelay.gateway.ca import CA_KEY, CAError, init_ca
from acrrelay.gateway.registryapi import parse_digest
from acrrelay.gateway.store import BlobStore

__all__ = ["TRUST_KINDS", "ca_init_main", "cache_verify_main", "trust_instructions"]

TrustKind = Literal["docker", "containerd", "podman", "all"]
TRUST_KINDS: Final[tuple[TrustKind, ...]] = ("docker", "containerd", "podman", "all")
_NO_CAP: Final = 1 << 62


def trust_instructions(names: Iterable[str], ca_path: str, kind: str) -> str:
    """Shell lines that make one client kind trust the gateway's CA for exactly ``names``.

    ``kind`` is "docker", "containerd", "podman" (skopeo and buildah read the same
    directory) or "all". Wildcard names get no entry (certs.d has none; clients reach the
    OSS names only through the gateway, which follows redirects itself). Raises ValueError
    for an unknown kind or a name that cannot be a directory name.
    """
    if kind not in TRUST_KINDS:
        raise ValueError(f"unknown client kind {kind!r}; expected one of {', '.join(TRUST_KINDS)}")
    concrete: list[str] = []
    skipped: list[str] = []
    for name in names:
        if not name or "/" in name or any(c.isspace() for c in name) or name.startswith("."):
            raise ValueError(f"not a host name: {name!r}")
        (skipped if "*" in name else concrete).append(name)
    ca = shlex.quote(ca_path)
    parts: list[str] = []
    for each in ("docker", "containerd", "podman") if kind == "all" else (kind,):
        parts.append(_KIND_TEXT[each](concrete, ca))
    if skipped:
        parts.append("# No entry for pattern names: " + " ".join(skipped) + "\n")
    return "\n".join(parts)


def _docker(names: Sequence[str], ca: str) -> str:
    lines = ["# docker: the engine reads /etc/docker/certs.d/<host>/ca.crt (no restart needed)"]
    for name in names:
        directory = shlex.quote(f"/etc/docker/certs.d/{name}")
        lines.append(f"mkdir -p {directory} && cp {ca} {directory}/ca.crt")
    return "\n".join(lines) + "\n"


def _containerd(names: Sequence[str], ca: str) -> str:
    lines = [
        '# containerd: needs config_path = "/etc/containerd/certs.d" in its registry config',
        '# (CRI: [plugins."io.containerd.cri.v1.images".registry]); hosts.toml is re-read live.',
    ]
    for name in names:
        directory = f"/etc/containerd/certs.d/{name}"
        q = shlex.quote(directory)
        lines += [
            f"mkdir -p {q} && cp {ca} {q}/ca.crt",
            f"cat > {q}/hosts.toml <<'EOF'",
            f'server = "https://{name}"',
            f'ca = "{directory}/ca.crt"',
            "EOF",
        ]
    return "\n".join(lines) + "\n"


def _podman(names: Sequence[str], ca: str) -> str:
    lines = ["# podman, skopeo, buildah (containers/image): /etc/containers/certs.d/<host>/ca.crt"]
    for name in names:
        directory = shlex.quote(f"/etc/containers/certs.d/{name}")
        lines.append(f"mkdir -p {directory} && cp {ca} {directory}/ca.crt")
    return "\n".join(lines) + "\n"


_KIND_TEXT: Final = {"docker": _docker, "containerd": _containerd, "podman": _podman}


def ca_init_main(argv: Sequence[str], out: TextIO | None = None) -> int:
    """``acrrelay ca init DIR [--days N] [--name NAME]``: create the gateway's CA."""
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="acrrelay ca init",
        description="Create the gateway's internal CA in DIR: ca.crt for the clients, ca.key "
        "(mode 0600) for the gateway. An existing CA is never overwritten.",
    )
    parser.add_argument("directory", metavar="DIR")
    parser.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    parser.add_argument("--name", default="acrrelay gateway CA", help="the CA's common name")
    args = parser.parse_args(argv)
    try:
        cert_path = init_ca(args.directory, days=args.days, name=args.name)
    except CAError as e:
        print(f"acrrelay: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"acrrelay: {args.directory}: {e.strerror or e}", file=sys.stderr)
        return 1
    out.write(
        f"created {cert_path} (give it to the clients)\n"
        f"    and {cert_path.parent / CA_KEY} (mode 0600: only the gateway reads it)\n"
        f"\nPoint [gateway] ca at {cert_path.parent} and trust {cert_path} on each client,\n"
        "for each name the gateway serves (`acrrelay hosts` prints them), with <host> below\n"
        "being such a name:\n\n"
    )
    out.write(trust_instructions(["<host>"], str(cert_path), "all"))
    return 0


def cache_verify_main(
    argv: Sequence[str], out: TextIO | None = None, *, progress_every: float = 2.0
) -> int:
    """``acrrelay cache verify DIR [DIGEST...]``: re-hash stored blobs, drop corrupt ones.

    Exits 1 if a blob was corrupt (it is dropped, so it is fetched again) or a named digest
    is not in the store, 2 on bad arguments.
    """
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="acrrelay cache verify",
        description="Re-check the sha256 of stored blobs (all, or the digests given). A "
        "corrupt blob is deleted, so the gateway fetches it again. Safe beside a running "
        "gateway.",
    )
    parser.add_argument("directory", metavar="DIR", help="the gateway's cache_dir")
    parser.add_argument("digests", metavar="DIGEST", nargs="*", help="sha256:<64 hex>")
    args = parser.parse_args(argv)
    root = Path(args.directory)
    if not (root / "blobs" / "sha256").is_dir():
        print(f"acrrelay: {root}: not a gateway cache (no blobs/sha256)", file=sys.stderr)
        return 2
    for digest in args.digests:
        if parse_digest(digest) is None:
            print(f"acrrelay: {digest}: expected sha256:<64 lowercase hex>", file=sys.stderr)
            return 2
    store = BlobStore(root, _NO_CAP, reset_tmp=False)
    targets = args.digests or [e.digest for e in store.entries()]
    total = sum(e.size for e in store.entries() if e.digest in set(targets))
    meter = _Progress(total, progress_every)
    bad = checked = 0
    for digest in targets:
        [result] = store.verify(digest, progress=meter.update)
        meter.finish(result.size)
        if result.status == "ok":
            checked += 1
            continue
        bad += 1
        if result.status == "missing":
            out.write(f"missing {digest}: not in the cache\n")
        else:
            checked += 1
            out.write(f"corrupt {digest}: the bytes hash to {result.actual}; dropped\n")
    out.write(f"checked {checked} blob(s), {meter.done} bytes: {bad} bad\n")
    return 1 if bad else 0


class _Progress:
    """Progress on stderr, at most once every ``every`` seconds, so long runs show life."""

    def __init__(self, total: int, every: float) -> None:
        self.total = total
        self.every = every
        self.done = 0
        self._base = 0
        self._last = time.monotonic()

    def update(self, digest: str, done: int, size: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        at = self._base + done
        share = f" ({100 * at // self.total}%)" if self.total else ""
        mib = 1 << 20
        print(f"verifying: {at / mib:.1f} of {self.total / mib:.1f} MiB{share}", file=sys.stderr)

    def finish(self, size: int) -> None:
        self._base += size
        self.done = self._base
