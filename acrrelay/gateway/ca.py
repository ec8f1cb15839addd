"""The gateway's internal certificate authority, and a leaf certificate per routed name.

The gateway terminates TLS for the registry's own names (clients keep their image names), so
clients trust an operator's CA for exactly those names (certs.d, hosts.toml). ``acrrelay ca
init DIR`` writes ``DIR/ca.crt`` and ``DIR/ca.key``; the key is created with mode 0600 in the
same system call that creates the file, so it is never readable by others, not even for an
instant, and an existing CA is never overwritten. Nothing here logs anything, least of all the
key.

Leaves are ECDSA P-256, one per DNS name (never a wildcard, never an IP address), 90 days,
made on first use, kept in memory and made afresh 30 days before they expire.

Pure: no reactor; ``cryptography`` does the work.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from acrrelay.routing import InvalidName, normalize_name

__all__ = ["CA_CERT", "CA_KEY", "CAError", "CertificateAuthority", "init_ca", "load_ca"]

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
LEAF_DAYS: Final = 90
RENEW_DAYS: Final = 30
LEAF_CACHE: Final = 1024
_DAY: Final = 86400.0


class CAError(Exception):
    """The CA cannot be created or loaded; the text says which file and why."""


def init_ca(
    directory: str | os.PathLike[str], *, days: int = 3650, name: str = "acrrelay gateway CA"
) -> Path:
    """Create a CA in ``directory`` (made 0700 if missing); returns the ``ca.crt`` path.

    Refuses (CAError) if ``ca.crt`` or ``ca.key`` already exists there.
    """
    if days < 1:
        raise CAError(f"the CA must be valid for at least a day, got {days}")
    if not name.strip():
        raise CAError("the CA needs a name")
    root = Path(directory)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = root / CA_CERT, root / CA_KEY
    for path in (cert_path, key_path):
        if path.exists():
            raise CAError(f"{path} already exists; refusing to overwrite a CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create(key_path, key_pem, 0o600)
    _create(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path


def load_ca(
    directory: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
) -> CertificateAuthority:
    """Read the CA made by :func:`init_ca`; refuses a key others can read or a mismatched pair."""
    root = Path(directory)
    cert_path, key_path = root / CA_CERT, root / CA_KEY
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
        if mode & 0o077:
            raise CAError(f"{key_path} is readable by others (mode {mode:04o}); chmod 600 it")
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError as e:
        raise CAError(
            f"{e.filename}: no such file; create a CA with: acrrelay ca init DIR"
        ) from None
    except OSError as e:
        raise CAError(f"{e.filename}: cannot read: {e.strerror}") from None
    except ValueError:
        # Never echo the parser's text: it may quote the key file.
        raise CAError(f"{root}: ca.crt or ca.key is not valid PEM") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{key_path}: expected an ECDSA key, as acrrelay ca init makes")
    if key.public_key() != cert.public_key():
        raise CAError(f"{key_path} does not belong to {cert_path}")
    return CertificateAuthority(cert, key, cert_path, clock=clock)


@attrs.frozen
class _Leaf:
    cert_pem: bytes
    key_pem: bytes
    renew_at: float


class CertificateAuthority:
    """Issues and remembers one leaf per DNS name. Build it with :func:`load_ca`."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        cert_path: Path,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cert = cert
        self.cert_path = cert_path
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._key = key
        self._clock = clock
        self._leaves: OrderedDict[str, _Leaf] = OrderedDict()

    def __repr__(self) -> str:
        return f"<CertificateAuthority {self.cert.subject.rfc4514_string()} at {self.cert_path}>"

    def leaf(self, name: str) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for ``name``, made on first use and cached.

        Raises ValueError for a wildcard, an IP address or anything that is not a host name.
        """
        host = _leaf_name(name)
        now = self._clock()
        cached = self._leaves.get(host)
        if cached is not None and now < cached.renew_at:
            self._leaves.move_to_end(host)
            return cached.cert_pem, cached.key_pem
        made = self._issue(host, now)
        self._leaves[host] = made
        self._leaves.move_to_end(host)
        while len(self._leaves) > LEAF_CACHE:
            self._leaves.popitem(last=False)
        return made.cert_pem, made.key_pem

    def _issue(self, host: str, now: float) -> _Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        start = datetime.datetime.fromtimestamp(now, datetime.UTC)
        end = min(start + datetime.timedelta(days=LEAF_DAYS), self.cert.not_valid_after_utc)
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - datetime.timedelta(hours=1))
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(aki, critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        renew_at = min(now + (LEAF_DAYS - RENEW_DAYS) * _DAY, end.timestamp() - _DAY)
        return _Leaf(cert.public_bytes(serialization.Encoding.PEM), key_pem, renew_at)


def _leaf_name(name: str) -> str:
    if "*" in name:
        raise ValueError(f"refusing a wildcard certificate for {name!r}: one leaf per name")
    try:
        host = normalize_name(name.strip("[]")) if ":" not in name else None
    except InvalidName as e:
        raise ValueError(f"not a host name: {name!r} ({e})") from None
    if host is None or _is_ip(host):
        raise ValueError(f"refusing a certificate for the IP address {name!r}: names only")
    return host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file created with ``mode`` in one step; never replaces an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise CAError(f"{path} already exists; refusing to overwrite a CA") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
