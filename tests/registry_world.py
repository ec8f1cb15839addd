"""The real-registry world: ACR's three services on this machine, and a client namespace.

An image pull touches three services (README.md, "Why three services"), and here each
is a real server on loopback, with a certificate from a test CA:

- **the registry** ``registry-vpc.cn-beijing.aliyuncs.com``: Debian's ``docker-registry``
  (CNCF distribution 2.8) with ``auth: token`` and ``storage: s3`` whose
  ``regionendpoint`` is the OSS name, ``redirect`` on (blob GETs answer 307 to a
  presigned URL on the OSS name), TLS on ``127.0.0.1:<port>``. It runs in a private
  mount namespace whose ``/etc/hosts`` maps the OSS name to the S3 server's side address.
- **the token service** (the Bearer realm) ``dockerauth-vpc.cn-beijing.aliyuncs.com``:
  ``tests/token_service.py``, ES256 JWTs with ``x5c``, for the users of a file the
  test writes (``world.users``: add a user with per-repository rights, change its token
  lifetime, revoke it); ``USER`` may pull and push every ``acrrelay-e2e/*`` repository,
  among them ``IMAGE_REPOSITORY`` and ``OTHER_REPOSITORY``. ``world.token()`` asks the
  service for a token, ``world.mint_token()`` signs one here (expired, say), and
  ``world.registry_request()`` sends one request to the registry with a token.
- **OSS** ``oss-cn-beijing-internal.aliyuncs.com`` (and the bucket host under it): moto's
  S3 behind TLS (``tests/s3_server.py``), on ``127.0.0.1:<port>`` for the relay and on
  ``127.213.x.y:443`` for the registry, so redirect URLs carry the bare name.

Every server starts with a clean environment (this machine exports ``AWS_CA_BUNDLE``,
which makes docker-registry's S3 driver panic), plus only what it needs.

**The client namespace** (``ip netns``) has a veth pair to the root namespace, a /28
of 10.213.0.0/16 and nothing else (no default route), and its own
``/etc/netns/<name>/hosts`` that points the names at the relay. **The relay**
(``twist acrrelay``) listens on the root side of the veth, port 443, and routes the
names to the three loopback servers. Clients run inside: ``world.netns.run([...])``,
or ``world.skopeo([...])`` with the test CA trusted and a private HOME.

A later test reuses the running world through the session fixture ``registry_world``
of ``tests.e2e_fixtures`` (with ``registry_image``, the big image on disk):
``world.relay`` (``.address``, ``.port``, ``.access_entries()``), ``world.ca.ca_file``,
``USER``/``PASSWORD``, ``IMAGE``, ``world.netns.name``, ``world.netns.run()``,
``world.backends`` / ``world.routes``, ``world.start_relay(routes)`` for a second relay
(at another address of the veth; ``world.netns.run(..., hosts=relay.hosts())`` points a
command's names at it), ``world.diagnostics()`` for failure messages, and
``build_oci_image`` / the ``registry_image`` fixture for an image to push.

Clean-up: every process is stopped by its PID, and the namespace, its veth and
``/etc/netns/<name>`` are removed, in finalisers. Names carry the PID
(``acrw<pid>n<k>``); leftovers of a crashed run (whose PID is gone) are swept first.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e_support import (
    MiB,
    Relay,
    TestCA,
    _Output,
    clean_env,
    free_port,
    split_http,
    stop_process,
    wait_listening,
)
from tests.token_service import TokenSigner, Users, parse_scope

HERE = Path(__file__).resolve().parent
TOKEN_SCRIPT = HERE / "token_service.py"
S3_SCRIPT = HERE / "s3_server.py"

REGISTRY = "registry-vpc.cn-beijing.aliyuncs.com"
AUTH = "dockerauth-vpc.cn-beijing.aliyuncs.com"
OSS = "oss-cn-beijing-internal.aliyuncs.com"
OSS_WILDCARD = f"*.{OSS}"
BUCKET = "acrrelay-e2e-registry"
#: The virtual-hosted form of the bucket (ACR's redirects use it; distribution uses paths).
BUCKET_HOST = f"{BUCKET}.{OSS}"
#: Every name with a certificate, and every name the client namespace resolves to the relay.
NAMES = (REGISTRY, AUTH, OSS, BUCKET_HOST)
REALM = f"https://{AUTH}/auth"
#: ACR's service and issuer strings have these shapes (seen in its challenges and tokens).
SERVICE = "registry.aliyuncs.com:cn-beijing:26842"
ISSUER = "dockerauth.aliyuncs.com"
USER = "acrrelay-e2e"
PASSWORD = "a long e2e password"
#: ACR repositories are <namespace>/<name>.
IMAGE_REPOSITORY = "acrrelay-e2e/big-layer"
IMAGE = f"{REGISTRY}/{IMAGE_REPOSITORY}"
#: A second repository: a token for one must not reach the other's blobs.
OTHER_REPOSITORY = "acrrelay-e2e/other"
OTHER_IMAGE = f"{REGISTRY}/{OTHER_REPOSITORY}"

NETNS_PREFIX = "acrw"
_NETNS_NAME = re.compile(rf"^{NETNS_PREFIX}(\d+)n\d+$")
_HOST_LINK = re.compile(rf"^\d+: ({NETNS_PREFIX}(\d+)n\d+)h[@:]")
#: Client namespaces take a /28 of this; the relay is .1, the client .2, more relays .3 on.
SUBNET = ipaddress.ip_network("10.213.0.0/16")
#: The S3 server's registry-side listener is on <this>.x.y:443 (loopback).
S3_SIDE_NET = "127.213"

LAYER_MB_ENV = "ACRRELAY_E2E_LAYER_MB"
DEFAULT_LAYER_MB = 200
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
_READY = re.compile(r"^READY (.*)$")


def layer_bytes_from_env() -> int:
    """The layer size the big-image tests use: ``$ACRRELAY_E2E_LAYER_MB`` MiB (default 200)."""
    value = os.environ.get(LAYER_MB_ENV, str(DEFAULT_LAYER_MB))
    try:
        megabytes = float(value)
    except ValueError:
        raise AssertionError(f"{LAYER_MB_ENV}={value!r}: expected a number of MiB") from None
    assert megabytes > 0, f"{LAYER_MB_ENV}={value!r}: expected a positive number of MiB"
    return int(megabytes * MiB)


def _check(args: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Run an administrative command (ip, mount...) and return its output; fail loudly."""
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _quiet(args: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> None:
    """Run a clean-up command whose failure only means there was nothing to clean."""
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(list(args), capture_output=True, timeout=timeout, check=False)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` still runs a Python (a test run); a reused PID counts as gone."""
    try:
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# ---------------------------------------------------------------- processes


class ServerProcess:
    """One server process we started: its output kept on a thread, stopped by its PID.

    ``ready`` is a pattern its output prints once it serves (kept as ``ready_match``);
    ``ports`` are loopback ports it listens on once it serves. On a failed start it is
    stopped, and the error carries what it said.
    """

    def __init__(
        self,
        label: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        ready: re.Pattern[str] | None = None,
        ports: Sequence[int] = (),
        timeout: float = START_TIMEOUT,
    ) -> None:
        self.label = label
        self.proc = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env),
            cwd=cwd,
        )
        self.output = _Output(self.proc)
        self.ready_match: re.Match[str] | None = None
        try:
            if ready is not None:
                self.ready_match = self.output.wait_for(ready, timeout)
            if ports:
                wait_listening(ports, self.proc, timeout)
        except BaseException as e:
            self.stop()
            self.output._thread.join(timeout=2)  # all it said, up to its exit
            raise AssertionError(
                f"{label} did not start: {e}\n{label} said:\n{self.output.text()}"
            ) from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.lines[-lines:])

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        stop_process(self.proc)


def _signer(directory: Path) -> tuple[Path, Path]:
    """The token signer: an EC P-256 key and its self-signed certificate (the registry's
    ``rootcertbundle``). Returns (key file, certificate file)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acrrelay e2e token signer")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = directory / "signer.key", directory / "signer.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def https_request(
    ca: TestCA,
    port: int,
    name: str,
    method: str,
    path: str,
    body: bytes = b"",
    *,
    host: str = "127.0.0.1",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTPS request to ``host:port`` as ``name`` (SNI and Host), checked against the
    test CA: (status, lower-cased headers, body)."""
    context = ca.client_context()
    with (
        socket.create_connection((host, port), timeout=COMMAND_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        lines = [f"{method} {path} HTTP/1.1", f"Host: {name}", f"Content-Length: {len(body)}"]
        lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
        lines += ["Connection: close", "", ""]
        tls.sendall("\r\n".join(lines).encode() + body)
        response = bytearray()
        while data := tls.recv(65536):
            response += data
    return split_http(bytes(response))


def registry_config(*, port: int, ca: TestCA, signer_cert: Path, secret: str) -> dict[str, Any]:
    """docker-registry's configuration (as JSON, which is YAML)."""
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {
            "s3": {
                "accesskey": "AKIDACRRELAYE2E",
                "secretkey": "acrrelay-e2e-not-a-secret",
                # An AWS region name, as moto expects; OSS's region is in the endpoint name.
                "region": "us-east-1",
                "regionendpoint": f"https://{OSS}",
                "bucket": BUCKET,
                "secure": True,
                "v4auth": True,
            },
            "redirect": {"disable": False},
            "cache": {"blobdescriptor": "inmemory"},
            "delete": {"enabled": True},
            "maintenance": {"uploadpurging": {"enabled": False}},
        },
        "http": {
            "addr": f"127.0.0.1:{port}",
            "secret": secret,
            "tls": {
                "certificate": str(ca.directory / f"{REGISTRY}.pem"),
                "key": str(ca.directory / f"{REGISTRY}.key"),
            },
        },
        "auth": {
            "token": {
                "realm": REALM,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(signer_cert),
            }
        },
        "health": {"storagedriver": {"enabled": False}},
    }


# ---------------------------------------------------------------- the client namespace


def sweep_leftovers() -> list[str]:
    """Remove namespaces, veths and /etc/netns entries of ours whose test run is gone."""
    swept = []
    netns_list = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout
    for line in netns_list.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NETNS_NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _quiet(["ip", "link", "del", f"{name}h"])
            _quiet(["ip", "netns", "del", name])
            swept.append(name)
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    ).stdout
    for line in links.splitlines():
        m = _HOST_LINK.match(line)
        if m and not _pid_alive(int(m.group(2))):
            _quiet(["ip", "link", "del", f"{m.group(1)}h"])
            swept.append(f"{m.group(1)}h")
    netns_etc = Path("/etc/netns")
    if netns_etc.is_dir():
        for entry in netns_etc.iterdir():
            m = _NETNS_NAME.match(entry.name)
            if m and not _pid_alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                swept.append(str(entry))
    return swept


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _check(["ip", "-o", "-4", "addr", "show"])
    return [
        ipaddress.ip_interface(field).network
        for line in out.splitlines()
        for field in line.split()[3:4]
    ]


class ClientNamespace:
    """A network namespace with a veth pair to the root namespace and its own hosts file.

    ``host_address`` (.1 of the /28) is the root side (the relay's address),
    ``client_address`` (.2) the namespace side; ``hosts`` maps names to addresses in
    ``/etc/netns/<name>/hosts``. ``run()`` runs a command inside, with a timeout.
    """

    _serial = itertools.count()

    def __init__(self, directory: Path, hosts: Mapping[str, str] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.swept = sweep_leftovers()
        self.name = f"{NETNS_PREFIX}{os.getpid()}n{next(self._serial)}"
        self.host_link = f"{self.name}h"
        self.client_link = f"{self.name}c"
        self.etc = Path("/etc/netns") / self.name
        self.network = self._pick_network()
        hosts_list = list(self.network.hosts())
        self.host_address = str(hosts_list[0])
        self.client_address = str(hosts_list[1])
        self._spare = [str(a) for a in hosts_list[2:]]
        self._hosts_files = itertools.count()
        prefix = self.network.prefixlen
        self._created = True
        try:
            _check(["ip", "netns", "add", self.name])
            _check(
                [
                    "ip", "link", "add", self.host_link, "type", "veth",
                    "peer", "name", self.client_link, "netns", self.name,
                ]
            )  # fmt: skip
            _check(["ip", "addr", "add", f"{self.host_address}/{prefix}", "dev", self.host_link])
            _check(["ip", "link", "set", self.host_link, "up"])
            inside = ["ip", "-n", self.name]
            client = f"{self.client_address}/{prefix}"
            _check([*inside, "addr", "add", client, "dev", self.client_link])
            _check([*inside, "link", "set", self.client_link, "up"])
            _check([*inside, "link", "set", "lo", "up"])
            self.etc.mkdir(parents=True, exist_ok=True)
            names = hosts if hosts is not None else dict.fromkeys(NAMES, self.host_address)
            (self.etc / "hosts").write_text(self.hosts_text(names))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pick_network() -> ipaddress.IPv4Network:
        used = _used_networks()
        blocks = list(SUBNET.subnets(new_prefix=28))
        start = (os.getpid() * 7) % len(blocks)
        for block in itertools.chain(blocks[start:], blocks[:start]):
            if not any(block.overlaps(net) for net in used):
                return block
        raise AssertionError(f"no free /28 left in {SUBNET}")

    @staticmethod
    def hosts_text(names: Mapping[str, str]) -> str:
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{address} {name}" for name, address in names.items()]
        return "\n".join(lines) + "\n"

    def new_address(self) -> str:
        """Another address on the root side of the veth (for another relay)."""
        assert self._spare, f"no addresses left in {self.network}"
        address = self._spare.pop(0)
        _check(["ip", "addr", "add", f"{address}/{self.network.prefixlen}", "dev", self.host_link])
        return address

    def command(self, args: Sequence[str], hosts: Mapping[str, str] | None = None) -> list[str]:
        """``args`` run inside the namespace; with ``hosts``, under a hosts file of those
        names instead of the namespace's own (a private mount namespace, bind mount)."""
        base = ["ip", "netns", "exec", self.name]
        if hosts is None:
            return [*base, *args]
        path = self.directory / f"hosts.{next(self._hosts_files)}"
        path.write_text(self.hosts_text(hosts))
        return [
            *base, "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(path), *args,
        ]  # fmt: skip

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        timeout: float,
        stdin: str = "",
        cwd: Path | None = None,
        hosts: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``args`` inside the namespace with exactly ``env``; never raises on its status.
        ``ip netns exec`` and ``unshare`` exec the command, so the timeout kills it."""
        return subprocess.run(
            self.command(args, hosts),
            input=stdin,
            capture_output=True,
            text=True,
            env=dict(env),
            cwd=cwd or self.directory,
            timeout=timeout,
            check=False,
        )

    def close(self) -> None:
        if not self._created:
            return
        self._created = False
        # Deleting one end of a veth deletes both, at once; the namespace goes after.
        _quiet(["ip", "link", "del", self.host_link])
        _quiet(["ip", "netns", "del", self.name])
        shutil.rmtree(self.etc, ignore_errors=True)


# ---------------------------------------------------------------- the relay


class NamespaceRelay(Relay):
    """A :class:`Relay` whose one listener is ``address:port`` (an address of the
    namespace's veth), so clients in the namespace reach it; ``address`` is kept."""

    def __init__(
        self,
        directory: Path,
        routes: Mapping[str, str | Mapping[str, Any]],
        *,
        address: str,
        port: int = 443,
        **options: Any,
    ) -> None:
        self.address = address
        listener = {"endpoint": f"tcp:{port}:interface={address}", "name": "netns"}
        super().__init__(directory, routes, listeners=[listener], **options)

    def hosts(self, names: Sequence[str] = NAMES) -> dict[str, str]:
        """A hosts mapping that sends ``names`` to this relay (for ``ClientNamespace.run``)."""
        return dict.fromkeys(names, self.address)


# ---------------------------------------------------------------- the world


class RegistryWorld:
    """The three services, the client namespace and a relay between them; see the module
    docstring. ``close()`` stops everything it started."""

    def __init__(self, directory: Path) -> None:
        started = time.monotonic()
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._stack = contextlib.ExitStack()
        self._relays: list[Relay] = []
        self._servers: list[ServerProcess] = []
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        #: Seconds from nothing to a relay in front of three serving services.
        self.start_seconds = time.monotonic() - started

    def _server(self, label: str, command: Sequence[str], **options: Any) -> ServerProcess:
        server = ServerProcess(label, command, cwd=self.home, **options)
        self._stack.callback(server.stop)
        self._servers.append(server)
        return server

    def _start(self) -> None:
        directory = self.directory
        self.home = directory / "home"
        self.home.mkdir()
        self.ca = TestCA(directory / "ca", NAMES)
        self.signer_key, self.signer_cert = _signer(directory / "signer")
        #: Signs tokens here, as the token service does (``mint_token``).
        self.signer = TokenSigner.from_files(self.signer_key, self.signer_cert, ISSUER, SERVICE)
        #: The token service's users; it reads the file again on every request.
        self.users = Users(directory / "users.json")
        self.users.add(USER, PASSWORD, {f"{USER}/*": ["pull", "push"]})
        env = clean_env(self.home)

        self.token_service = self._server(
            "token service",
            [
                sys.executable, str(TOKEN_SCRIPT),
                str(self.ca.directory / f"{AUTH}.pem"), str(self.ca.directory / f"{AUTH}.key"),
                str(self.signer_key), str(self.signer_cert),
                ISSUER, SERVICE, str(self.users.path),
            ],
            env=env,
            ready=_READY,
        )  # fmt: skip
        assert self.token_service.ready_match is not None
        self.token_port = int(self.token_service.ready_match.group(1))

        self.s3 = self._server(
            "S3 (moto)",
            [sys.executable, str(S3_SCRIPT), str(self.ca.directory), S3_SIDE_NET, OSS, BUCKET_HOST],
            env={**env, "MOTO_S3_CUSTOM_ENDPOINTS": f"https://{OSS}"},
            ready=_READY,
        )
        assert self.s3.ready_match is not None
        s3_port, self.s3_side_address = self.s3.ready_match.group(1).split()
        self.s3_port = int(s3_port)
        status, _, body = https_request(self.ca, self.s3_port, OSS, "PUT", f"/{BUCKET}")
        assert status == 200, f"creating bucket {BUCKET}: {status} {body[:500]!r}"

        # docker-registry sees the OSS names at the S3 server's side address, port 443:
        # a private mount namespace with its own /etc/hosts (the machine's is never edited).
        registry_dir = directory / "registry"
        registry_dir.mkdir()
        hosts = registry_dir / "hosts"
        hosts.write_text(
            ClientNamespace.hosts_text(dict.fromkeys((OSS, BUCKET_HOST), self.s3_side_address))
        )
        self.registry_port = free_port()
        config = registry_dir / "config.yml"
        config.write_text(
            json.dumps(
                registry_config(
                    port=self.registry_port,
                    ca=self.ca,
                    signer_cert=self.signer_cert,
                    secret=os.urandom(16).hex(),
                ),
                indent=2,
            )
        )
        self.registry = self._server(
            "docker-registry",
            [
                "unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", 'mount --bind "$0" /etc/hosts && exec docker-registry serve "$1"',
                str(hosts), str(config),
            ],
            # Go trusts only the test CA (S3's certificate) through SSL_CERT_FILE.
            env={**env, "SSL_CERT_FILE": str(self.ca.ca_file)},
            ports=[self.registry_port],
        )  # fmt: skip

        #: The relay's backend for each name: the loopback servers.
        self.backends = {
            REGISTRY: f"tcp:host=127.0.0.1:port={self.registry_port}",
            AUTH: f"tcp:host=127.0.0.1:port={self.token_port}",
            OSS: f"tcp:host=127.0.0.1:port={self.s3_port}",
            OSS_WILDCARD: f"tcp:host=127.0.0.1:port={self.s3_port}",
        }
        #: The route table of the world's relay: the three services' names.
        self.routes: dict[str, str | Mapping[str, Any]] = dict(self.backends)

        self.user, self.password, self.image = USER, PASSWORD, IMAGE
        self.netns = ClientNamespace(directory / "netns")
        self._stack.callback(self.netns.close)
        self.relay = self.start_relay(address=self.netns.host_address)

        self.policy = directory / "policy.json"
        self.policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        self.registries_conf = directory / "registries.conf"
        self.registries_conf.write_text("unqualified-search-registries = []\n")
        self.registries_d = directory / "registries.d"
        self.registries_d.mkdir()

    def start_relay(
        self,
        routes: Mapping[str, str | Mapping[str, Any]] | None = None,
        *,
        address: str | None = None,
        port: int = 443,
        **options: Any,
    ) -> NamespaceRelay:
        """Another relay with ``routes`` (default: the world's) against the same servers,
        on a new address of the veth (or ``address``), port ``port``. ``options`` are
        :class:`Relay`'s. Stopped with the world, or earlier by ``stop()``."""
        settings: dict[str, Any] = {"idle_timeout": "5m", **options}
        relay = NamespaceRelay(
            self.directory / f"relay{len(self._relays)}",
            self.routes if routes is None else routes,
            address=address or self.netns.new_address(),
            port=port,
            **settings,
        )
        self._stack.callback(relay.stop)
        self._relays.append(relay)
        return relay

    def client_env(self, home: Path, **extra: str) -> dict[str, str]:
        """The environment of a client command in the namespace: clean, HOME and TMPDIR in
        ``home``, the test CA as Go's and OpenSSL's only trust (SSL_CERT_FILE)."""
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        return {
            **clean_env(home),
            "SSL_CERT_FILE": str(self.ca.ca_file),
            "TMPDIR": str(home / "tmp"),
            "REGISTRY_AUTH_FILE": str(home / "auth.json"),
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            **extra,
        }

    def skopeo(
        self,
        args: Sequence[str],
        *,
        home: Path,
        timeout: float = 60.0,
        stdin: str = "",
        hosts: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``skopeo ARGS`` in the namespace (through the relay its hosts file names), with
        our signature policy and ``client_env(home)``; never raises on its status."""
        home.mkdir(parents=True, exist_ok=True)
        command = [
            "skopeo", "--policy", str(self.policy), "--registries.d", str(self.registries_d),
            "--command-timeout", f"{int(timeout)}s", *args,
        ]  # fmt: skip
        return self.netns.run(
            command,
            env=self.client_env(home),
            timeout=timeout + 15,
            stdin=stdin,
            cwd=home,
            hosts=hosts,
        )

    def login(self, home: Path, *, hosts: Mapping[str, str] | None = None) -> None:
        """``skopeo login`` as USER into ``home``'s auth file; fails with diagnostics."""
        result = self.skopeo(
            ["login", "--username", USER, "--password-stdin", REGISTRY],
            home=home,
            stdin=PASSWORD,
            hosts=hosts,
        )
        if result.returncode != 0:
            raise AssertionError(self.failure("skopeo login", result))

    def push(
        self,
        image: LocalImage,
        tag: str,
        *,
        home: Path,
        hosts: Mapping[str, str] | None = None,
        timeout: float = 300.0,
        repository: str = IMAGE_REPOSITORY,
    ) -> str:
        """Log in and push ``image`` as ``REGISTRY/repository:tag`` through the relay (or the
        one ``hosts`` names); the image's name in the registry. Fails with diagnostics."""
        self.login(home, hosts=hosts)
        name = f"{REGISTRY}/{repository}:{tag}"
        result = self.skopeo(
            ["copy", image.reference, f"docker://{name}"], home=home, hosts=hosts, timeout=timeout
        )
        if result.returncode != 0:
            raise AssertionError(self.failure(f"skopeo copy (push {name})", result))
        return name

    def request_token(
        self, user: str, password: str, scopes: Sequence[str]
    ) -> tuple[int, dict[str, Any]]:
        """Ask the token service (directly, on loopback) for ``scopes`` as docker does:
        (status, JSON answer)."""
        query = urllib.parse.urlencode([("service", SERVICE), *(("scope", s) for s in scopes)])
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        status, _, body = https_request(
            self.ca, self.token_port, AUTH, "GET", f"/auth?{query}",
            headers={"Authorization": f"Basic {basic}"},
        )  # fmt: skip
        return status, json.loads(body)

    def token(self, user: str, password: str, scopes: Sequence[str]) -> str:
        """A token from the token service for ``scopes``; fails unless it grants one."""
        status, answer = self.request_token(user, password, scopes)
        assert status == 200, f"token for {user} {list(scopes)}: {status} {answer}"
        return str(answer["token"])

    def mint_token(self, user: str, scopes: Sequence[str], *, lifetime: int) -> str:
        """A token signed here with the service's key, granting ``scopes`` whole, valid
        ``lifetime`` seconds from now (negative: expired already)."""
        access = [a for a in map(parse_scope, scopes) if a is not None]
        return self.signer.token(user, access, lifetime=lifetime)

    def registry_request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        ca: TestCA | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to the registry (directly, or to ``host:port`` as the registry's
        name, trusting ``ca``) with ``Bearer token`` if given: (status, headers, body)."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return https_request(
            ca or self.ca, port or self.registry_port, REGISTRY, method, path,
            host=host, headers=sent,
        )  # fmt: skip

    def failure(self, what: str, result: subprocess.CompletedProcess[str]) -> str:
        """A failure message: the command's outcome and output, then ``diagnostics()``."""
        return (
            f"{what} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr}\n{self.diagnostics()}"
        )

    def diagnostics(self, lines: int = 60) -> str:
        """The last output lines of every server and relay, and the relays' access logs,
        for failure messages."""
        parts = []
        for server in self._servers:
            state = "running" if server.alive() else f"exited {server.proc.returncode}"
            parts.append(f"--- {server.label} (pid {server.pid}, {state}):\n{server.tail(lines)}")
        for relay in self._relays:
            state = "running" if relay.alive() else f"exited {relay.proc.returncode}"
            output = "\n".join(relay.output.lines[-lines:])
            access = "\n".join(json.dumps(e) for e in relay.access_entries()[-lines:])
            parts.append(f"--- relay {relay.directory.name} (pid {relay.pid}, {state}):\n{output}")
            parts.append(f"--- relay {relay.directory.name} access log:\n{access}")
        return "\n".join(parts)

    def close(self) -> None:
        self._stack.close()


# ---------------------------------------------------------------- an image on disk


@dataclass(frozen=True)
class LocalImage:
    """An OCI image layout on disk with one gzip'd layer: ``oci:{layout}:{tag}``."""

    layout: Path
    tag: str
    layer_digest: str
    layer_size: int
    diff_id: str
    manifest_digest: str

    @property
    def reference(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


class _HashingWriter(io.RawIOBase):
    """A file that hashes and counts what is written to it, then passes it on."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += len(view)
        self.target.write(view)
        return len(view)


class _RandomReader(io.RawIOBase):
    """``size`` pseudo-random bytes (seeded: fast, and the same image each time)."""

    def __init__(self, size: int, seed: int) -> None:
        self.left = size
        self.rng = random.Random(seed)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = self.rng.randbytes(n)
        self.left -= n
        return n


def build_oci_image(
    directory: Path, content_bytes: int, tag: str = "v1", seed: int = 0
) -> LocalImage:
    """An OCI layout whose one layer is a gzip'd tar of one file of ``content_bytes``
    random bytes: already compressed, so skopeo pushes it as it is (its digest stays)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    partial = blobs / "layer.partial"
    chunk = 4 * MiB
    with partial.open("wb") as raw:
        compressed = _HashingWriter(raw)
        # Random bytes do not compress: level 0 (stored blocks) is a valid gzip stream and
        # spares the CPU that deflate would spend finding that out.
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=0, mtime=0) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo("layer.bin")
                info.size = content_bytes
                info.mode = 0o644
                tar.addfile(info, io.BufferedReader(_RandomReader(content_bytes, seed), chunk))
    layer_digest = f"sha256:{compressed.digest.hexdigest()}"
    layer_size = compressed.size
    partial.rename(blobs / layer_digest.removeprefix("sha256:"))
    diff_id = f"sha256:{uncompressed.digest.hexdigest()}"
    config = {
        "created": "2026-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "acrrelay e2e"}],
    }
    config_digest, config_size = _write_blob(blobs, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": layer_size,
            }
        ],
    }
    manifest_digest, manifest_size = _write_blob(blobs, json.dumps(manifest).encode())
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return LocalImage(directory, tag, layer_digest, layer_size, diff_id, manifest_digest)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(4 * MiB):
            digest.update(data)
    return f"sha256:{digest.hexdigest()}"


__all__ = [
    "AUTH",
    "BUCKET",
    "BUCKET_HOST",
    "IMAGE",
    "IMAGE_REPOSITORY",
    "NAMES",
    "OSS",
    "OSS_WILDCARD",
    "OTHER_IMAGE",
    "OTHER_REPOSITORY",
    "PASSWORD",
    "REALM",
    "REGISTRY",
    "SERVICE",
    "USER",
    "ClientNamespace",
    "LocalImage",
    "NamespaceRelay",
    "RegistryWorld",
    "ServerProcess",
    "build_oci_image",
    "https_request",
    "layer_bytes_from_env",
    "sha256_file",
    "sweep_leftovers",
]
