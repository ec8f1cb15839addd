"""Layer 1: the internal CA: created safely, leaves per name, verified by openssl and Python ssl."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from acrrelay.gateway import ca as ca_module
from acrrelay.gateway.ca import CAError, init_ca, load_ca

NAME = "registry.cn-hangzhou.aliyuncs.com"


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca", days=30)
    return tmp_path / "ca"


def test_init_writes_the_key_0600_in_one_step(tmp_path: Path, monkeypatch: Any) -> None:
    """The key file is created by os.open with O_CREAT|O_EXCL and mode 0600, never chmod-ed."""
    calls: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        calls.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(ca_module.os, "open", spy)
    old = os.umask(0)
    try:
        cert_path = init_ca(tmp_path / "ca")
    finally:
        os.umask(old)
    key_path = tmp_path / "ca" / "ca.key"
    (_, flags, mode) = next(c for c in calls if c[0].endswith("ca.key"))
    assert flags & os.O_CREAT and flags & os.O_EXCL and flags & os.O_WRONLY
    assert mode == 0o600
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    assert cert_path == tmp_path / "ca" / "ca.crt"
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_init_refuses_to_overwrite(ca_dir: Path) -> None:
    """A second init on the same directory, or over a lone key, fails and changes nothing."""
    before = (ca_dir / "ca.key").read_bytes()
    with pytest.raises(CAError, match="already exists"):
        init_ca(ca_dir)
    (ca_dir / "ca.crt").unlink()
    with pytest.raises(CAError, match="already exists"):
        init_ca(ca_dir)
    assert (ca_dir / "ca.key").read_bytes() == before


def test_load_refuses_a_key_others_can_read(ca_dir: Path) -> None:
    """A CA key readable by group or others is refused, with the fix in the message."""
    (ca_dir / "ca.key").chmod(0o640)
    with pytest.raises(CAError, match="chmod 600"):
        load_ca(ca_dir)


def test_load_refuses_a_key_of_another_ca(tmp_path: Path) -> None:
    """A ca.key that does not match ca.crt is refused."""
    init_ca(tmp_path / "one")
    init_ca(tmp_path / "two")
    (tmp_path / "one" / "ca.key").unlink()
    os.rename(tmp_path / "two" / "ca.key", tmp_path / "one" / "ca.key")
    with pytest.raises(CAError, match="does not belong"):
        load_ca(tmp_path / "one")


def test_load_of_a_missing_ca_says_how_to_make_one(tmp_path: Path) -> None:
    """Loading an empty directory names the missing file and the init command."""
    with pytest.raises(CAError, match="acrrelay ca init"):
        load_ca(tmp_path)


def test_leaf_has_the_name_as_san_and_is_cached(ca_dir: Path) -> None:
    """A leaf's SAN is exactly its DNS name; the same name gets the same leaf, another a new one."""
    authority = load_ca(ca_dir)
    cert_pem, key_pem = authority.leaf(NAME.upper() + ".")
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert authority.leaf(NAME) == (cert_pem, key_pem)
    assert authority.leaf("dockerauth.cn-hangzhou.aliyuncs.com")[0] != cert_pem
    assert cert.not_valid_after_utc <= authority.cert.not_valid_after_utc


def test_leaf_is_made_afresh_before_it_expires(tmp_path: Path) -> None:
    """A cached leaf is replaced once it is within its renewal window."""
    init_ca(tmp_path)
    now = [1_900_000_000.0]
    authority = load_ca(tmp_path, clock=lambda: now[0])
    first = authority.leaf(NAME)
    now[0] += 59 * 86400
    assert authority.leaf(NAME) == first
    now[0] += 2 * 86400
    second = authority.leaf(NAME)
    assert second != first
    cert = x509.load_pem_x509_certificate(second[0])
    assert cert.not_valid_before_utc.timestamp() < now[0] < cert.not_valid_after_utc.timestamp()


@pytest.mark.parametrize(
    "bad",
    ["*.aliyuncs.com", "10.0.0.1", "10.0.0.1.", "::1", "[::1]", "", "a..b", "bad name.example"],
)
def test_wildcards_ips_and_non_names_are_refused(ca_dir: Path, bad: str) -> None:
    """No leaf for a wildcard, an IP address, or anything that is not a host name."""
    with pytest.raises(ValueError):
        load_ca(ca_dir).leaf(bad)


def test_the_key_is_not_in_repr(ca_dir: Path) -> None:
    """The CA's repr names its subject and path, never key material."""
    authority = load_ca(ca_dir)
    text = repr(authority)
    assert "PRIVATE" not in text and "gateway CA" in text


def test_openssl_verifies_a_leaf_against_the_ca(ca_dir: Path, tmp_path: Path) -> None:
    """`openssl verify -CAfile ca.crt` accepts the leaf for its name and rejects another name."""
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(load_ca(ca_dir).leaf(NAME)[0])
    ok = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(ca_dir / "ca.crt"),
            "-verify_hostname",
            NAME,
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(ca_dir / "ca.crt"),
            "-verify_hostname",
            "evil.example",
            str(leaf),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode != 0


def handshake(ca_dir: Path, tmp_path: Path, server_name: str) -> str:
    """A TLS handshake over a socket pair: server with the leaf, client trusting only the CA."""
    cert_pem, key_pem = load_ca(ca_dir).leaf(NAME)
    (tmp_path / "leaf.crt").write_bytes(cert_pem)
    (tmp_path / "leaf.key").write_bytes(key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "leaf.crt", tmp_path / "leaf.key")
    client_ctx = ssl.create_default_context(cafile=str(ca_dir / "ca.crt"))
    assert client_ctx.check_hostname
    a, b = socket.socketpair()
    a.settimeout(30)
    b.settimeout(30)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as s:
                s.sendall(b"hello")
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=server_name) as c:
            return c.recv(5).decode()
    finally:
        thread.join(30)


def test_python_ssl_trusts_the_leaf_through_the_ca(ca_dir: Path, tmp_path: Path) -> None:
    """A client trusting only ca.crt completes a handshake with the leaf, hostname checked."""
    assert handshake(ca_dir, tmp_path, NAME) == "hello"


def test_python_ssl_rejects_the_leaf_for_another_name(ca_dir: Path, tmp_path: Path) -> None:
    """The same leaf is refused by a client that asks for another host name."""
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca_dir, tmp_path, "other.example")
