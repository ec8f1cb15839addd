"""Layer 1 and the command line: ca init, cache verify, and the trust instructions."""

from __future__ import annotations

import hashlib
import io
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from acrrelay.gateway.commands import cache_verify_main, trust_instructions
from acrrelay.gateway.store import BlobStore

NAME = "registry.cn-hangzhou.aliyuncs.com"
AUTH = "dockerauth.cn-hangzhou.aliyuncs.com"


def run(main: str, *args: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys; from acrrelay.gateway.commands import {main}; sys.exit({main}(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_docker_instructions() -> None:
    """Docker gets /etc/docker/certs.d/<host>/ca.crt for each name, and nothing else."""
    text = trust_instructions([NAME, AUTH], "/srv/ca/ca.crt", "docker")
    assert f"cp /srv/ca/ca.crt /etc/docker/certs.d/{NAME}/ca.crt" in text
    assert f"/etc/docker/certs.d/{AUTH}/ca.crt" in text
    assert "containerd" not in text and "containers/certs.d" not in text


def test_containerd_instructions_write_a_valid_hosts_toml() -> None:
    """containerd gets certs.d/<host>/hosts.toml, valid TOML with server and ca for that host."""
    text = trust_instructions([NAME], "/srv/ca/ca.crt", "containerd")
    body = re.search(r"<<'EOF'\n(.*?)\nEOF", text, re.S)
    assert body is not None
    assert tomllib.loads(body.group(1)) == {
        "server": f"https://{NAME}",
        "ca": f"/etc/containerd/certs.d/{NAME}/ca.crt",
    }
    assert f"cat > /etc/containerd/certs.d/{NAME}/hosts.toml" in text
    assert 'config_path = "/etc/containerd/certs.d"' in text


def test_podman_instructions() -> None:
    """podman and skopeo get /etc/containers/certs.d/<host>/ca.crt."""
    text = trust_instructions([NAME], "/srv/ca/ca.crt", "podman")
    assert f"cp /srv/ca/ca.crt /etc/containers/certs.d/{NAME}/ca.crt" in text
    assert "skopeo" in text


def test_all_kinds_and_patterns() -> None:
    """'all' covers the three kinds; pattern names are listed as having no entry."""
    text = trust_instructions([NAME, "*.oss-cn-hangzhou.aliyuncs.com"], "ca.crt", "all")
    for directory in ("/etc/docker/certs.d", "/etc/containerd/certs.d", "/etc/containers/certs.d"):
        assert f"{directory}/{NAME}" in text
    assert "certs.d/*" not in text
    assert "No entry for pattern names: *.oss-cn-hangzhou.aliyuncs.com" in text


def test_paths_are_shell_quoted_and_bad_input_refused() -> None:
    """A CA path with a space is quoted; unknown kinds and path-like names raise ValueError."""
    assert "cp '/srv/my ca/ca.crt' " in trust_instructions([NAME], "/srv/my ca/ca.crt", "docker")
    with pytest.raises(ValueError, match="unknown client kind"):
        trust_instructions([NAME], "ca.crt", "rkt")
    for bad in ("../etc", "a/b", "a b", ""):
        with pytest.raises(ValueError, match="not a host name"):
            trust_instructions([bad], "ca.crt", "docker")


def test_ca_init_command(tmp_path: Path) -> None:
    """ca init makes the CA, prints its path and trust steps, never the key; refuses a rerun."""
    first = run("ca_init_main", str(tmp_path / "ca"), "--days", "30", "--name", "Test CA")
    assert first.returncode == 0, first.stderr
    assert f"created {tmp_path / 'ca' / 'ca.crt'}" in first.stdout
    for directory in ("/etc/docker/certs.d", "/etc/containerd/certs.d", "/etc/containers/certs.d"):
        assert f"{directory}/<host>" in first.stdout
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600
    key = (tmp_path / "ca" / "ca.key").read_text()
    assert "PRIVATE KEY" not in first.stdout + first.stderr
    second = run("ca_init_main", str(tmp_path / "ca"))
    assert second.returncode == 1
    assert "already exists" in second.stderr
    assert (tmp_path / "ca" / "ca.key").read_text() == key


def test_ca_init_rejects_bad_arguments(tmp_path: Path) -> None:
    """A non-numeric --days is a usage error (exit 2); zero days is refused (exit 1)."""
    assert run("ca_init_main", str(tmp_path / "a"), "--days", "ten").returncode == 2
    zero = run("ca_init_main", str(tmp_path / "b"), "--days", "0")
    assert zero.returncode == 1 and "at least a day" in zero.stderr


def make_cache(root: Path) -> tuple[str, str]:
    store = BlobStore(root, 1 << 30)
    digests = []
    for data in (b"good blob" * 1000, b"soon bad" * 1000):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        spool = store.begin(digest, len(data))
        assert spool is not None
        spool.write(data)
        spool.publish()
        digests.append(digest)
    return digests[0], digests[1]


def test_cache_verify_command_finds_and_drops_a_corrupt_blob(tmp_path: Path) -> None:
    """cache verify exits 1 naming a flipped blob and drops it; the next run is clean (0)."""
    good, bad = make_cache(tmp_path)
    path = BlobStore(tmp_path, 1 << 30).path_of(bad)
    raw = bytearray(path.read_bytes())
    raw[7] ^= 0xFF
    path.write_bytes(bytes(raw))
    first = run("cache_verify_main", str(tmp_path))
    assert first.returncode == 1, first.stderr
    assert f"corrupt {bad}" in first.stdout and good not in first.stdout
    assert "checked 2 blob(s)" in first.stdout
    assert not path.exists()
    again = run("cache_verify_main", str(tmp_path))
    assert again.returncode == 0, again.stdout
    assert "checked 1 blob(s), 9000 bytes: 0 bad" in again.stdout


def test_cache_verify_named_digests(tmp_path: Path) -> None:
    """Named digests are checked alone; one not in the cache exits 1; a malformed one exits 2."""
    good, _ = make_cache(tmp_path)
    assert run("cache_verify_main", str(tmp_path), good).returncode == 0
    absent = "sha256:" + "0" * 64
    missing = run("cache_verify_main", str(tmp_path), absent)
    assert missing.returncode == 1 and f"missing {absent}" in missing.stdout
    assert run("cache_verify_main", str(tmp_path), "sha256:XYZ").returncode == 2
    assert run("cache_verify_main", str(tmp_path / "nothing")).returncode == 2


def test_cache_verify_leaves_downloads_in_progress_alone(tmp_path: Path) -> None:
    """Run beside a gateway, verify does not empty tmp/ (a live download's file stays)."""
    make_cache(tmp_path)
    part = tmp_path / "tmp" / "abc.part"
    part.write_bytes(b"in flight")
    assert run("cache_verify_main", str(tmp_path)).returncode == 0
    assert part.exists()


def test_cache_verify_shows_progress_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Long runs report progress on stderr (here forced with a zero interval), results on stdout."""
    make_cache(tmp_path)
    out = io.StringIO()
    assert cache_verify_main([str(tmp_path)], out, progress_every=0) == 0
    err = capsys.readouterr().err
    assert "verifying:" in err
    assert "verifying:" not in out.getvalue()
    assert "checked 2 blob(s)" in out.getvalue()
