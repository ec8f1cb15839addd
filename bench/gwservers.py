"""The gateway bench's world: a fake registry on nginx, the image, the relay, the shaper, the
gateway, nginx ``proxy_cache`` and two minimal Python TLS file servers.

Every server is its own process on 127.0.0.1 (:func:`bench.servers.launch`), stopped by PID.
The names are ``.test`` names (never resolvable): clients and relays reach them by address.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.servers import NGINX, REPO, Server, launch
from tests.e2e_support import TestCA, free_port

REGISTRY = "registry.acrbench.test"
AUTH = "auth.acrbench.test"
OSS = "bucket.oss-bench.acrbench.test"
NAMES = (REGISTRY, AUTH, OSS)
REPOSITORY = "bench/image"


def bearer_token(lifetime: float = 6 * 3600) -> str:
    """A JWT-shaped token (unsigned: the fake registry only checks that one is sent) with an
    ``exp``, so the gateway may remember its proof."""

    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    claims = {"sub": "bench", "exp": int(time.time() + lifetime)}
    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int


@dataclass(frozen=True)
class Image:
    """A one-layer image on disk: ``root/<digest>`` files, as the fake OSS serves them."""

    root: Path
    layer: Blob
    config: Blob

    @property
    def size(self) -> int:
        return self.layer.size + self.config.size

    def blob_args(self) -> list[str]:
        return [a for b in (self.config, self.layer) for a in ("--blob", f"{b.digest}:{b.size}")]


def _write_blob(root: Path, data_chunks: list[bytes] | None, size: int) -> Blob:
    hasher = hashlib.sha256()
    temp = root / "incoming"
    with temp.open("wb") as f:
        left = size
        for chunk in data_chunks or []:
            f.write(chunk)
            hasher.update(chunk)
        while data_chunks is None and left > 0:
            chunk = os.urandom(min(left, 4 << 20))
            f.write(chunk)
            hasher.update(chunk)
            left -= len(chunk)
    digest = "sha256:" + hasher.hexdigest()
    temp.rename(root / digest)
    return Blob(digest, size)


def make_image(root: Path, layer_size: int) -> Image:
    """One random layer of ``layer_size`` bytes and a small config blob."""
    root.mkdir(parents=True, exist_ok=True)
    layer = _write_blob(root, None, layer_size)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [layer.digest]}}).encode()  # fmt: skip
    return Image(root, layer, _write_blob(root, [config], len(config)))


def _nginx_head(directory: Path) -> str:
    temp = directory / "temp"
    temp.mkdir(parents=True, exist_ok=True)
    # Workers as root: the bench's files are in private temporary directories.
    return f"""daemon off;
user root;
master_process on;
worker_processes 2;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_timeout 600s;
    ssl_session_cache off;
"""


def _tls(ca: TestCA, name: str) -> str:
    return (
        f"ssl_certificate {ca.directory / (name + '.pem')};\n"
        f"        ssl_certificate_key {ca.directory / (name + '.key')};"
    )


def start_registry(ca: TestCA, image: Image, directory: Path) -> Server:
    """nginx as the registry, its token service and OSS, all over TLS on one port (by SNI).

    ``/v2/`` challenges without a credential; a blob GET without Authorization is 403, with
    one a 307 to the blob on the OSS name; OSS serves the file and refuses (403) any request
    that carries an Authorization header, so a client or gateway that leaks it fails."""
    port = free_port()
    realm = f"https://{AUTH}/token"
    conf = directory / "nginx.conf"
    directory.mkdir(parents=True, exist_ok=True)
    challenge = f'Bearer realm="{realm}",service="{REGISTRY}"'
    conf.write_text(
        _nginx_head(directory)
        + f"""    server {{
        listen 127.0.0.1:{port} ssl backlog=1024;
        server_name {REGISTRY};
        {_tls(ca, REGISTRY)}
        location = /v2/ {{
            if ($http_authorization = "") {{
                add_header WWW-Authenticate '{challenge}' always;
                return 401 '{{"errors":[{{"code":"UNAUTHORIZED"}}]}}';
            }}
            return 200 '{{}}';
        }}
        location ~ "^/v2/.+/blobs/(?<digest>sha256:[0-9a-f]{{64}})$" {{
            if ($http_authorization = "") {{ return 403; }}
            return 307 https://{OSS}/$digest;
        }}
        location / {{ return 404; }}
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {AUTH};
        {_tls(ca, AUTH)}
        location = /token {{
            default_type application/json;
            return 200 '{{"token":"{bearer_token()}","expires_in":21600}}';
        }}
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {OSS};
        {_tls(ca, OSS)}
        root {image.root};
        location / {{
            if ($http_authorization != "") {{ return 403; }}
        }}
    }}
}}
"""
    )
    command = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return launch("registry", command, directory, port)


def start_proxy_cache(ca: TestCA, registry_port: int, directory: Path) -> Server:
    """nginx ``proxy_cache`` in front of the registry, the recipe users pick today: blob
    requests go upstream, a 307 is followed by nginx itself (``error_page 307 = @oss``, no
    Authorization sent on), and the blob is cached under its URI. Note what it does on a hit:
    serves anyone, proving nothing."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    upstream_tls = f"""proxy_ssl_server_name on;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca.ca_file};
            proxy_http_version 1.1;
            proxy_set_header Connection "";"""
    conf = directory / "nginx.conf"
    conf.write_text(
        _nginx_head(directory)
        + f"""    proxy_cache_path {directory}/cache levels=1:2 keys_zone=blobs:10m max_size=8g
                     inactive=1d use_temp_path=off;
    upstream {REGISTRY} {{ server 127.0.0.1:{registry_port}; keepalive 8; }}
    upstream {OSS} {{ server 127.0.0.1:{registry_port}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port} ssl backlog=1024;
        server_name {REGISTRY};
        {_tls(ca, REGISTRY)}
        add_header X-Cache $upstream_cache_status always;
        location / {{
            proxy_pass https://{REGISTRY};
            {upstream_tls}
        }}
        location ~ "^/v2/.+/blobs/sha256:" {{
            proxy_pass https://{REGISTRY};
            {upstream_tls}
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1y;
            proxy_intercept_errors on;
            error_page 307 = @oss;
        }}
        location @oss {{
            set $oss $upstream_http_location;
            proxy_pass $oss;
            {upstream_tls}
            proxy_set_header Authorization "";
            proxy_cache blobs;
            proxy_cache_key $uri;
            proxy_cache_valid 200 1y;
        }}
    }}
}}
"""
    )
    command = [NGINX, "-p", str(directory), "-e", str(directory / "error.log"), "-c", str(conf)]
    return launch("nginx-proxy-cache", command, directory, port)


def _twist(name: str, conf: Path, directory: Path, port: int) -> Server:
    command = [sys.executable, "-m", "twisted", "--log-format=text", "acrrelay", "--config",
               str(conf)]  # fmt: skip
    return launch(name, command, directory, port, env={"PYTHONPATH": str(REPO)})


def _routes(backend_port: int) -> str:
    return "".join(
        f'[[route]]\nname = "{name}"\nbackend = "tcp:host=127.0.0.1:port={backend_port}"\n\n'
        for name in NAMES
    )


def start_relay(directory: Path, backend_port: int) -> Server:
    """``twist acrrelay``, the region-side SNI relay, routing the three names to nginx."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "relay.toml"
    conf.write_text(
        '[relay]\naccess_log = "off"\n\n[[listen]]\n'
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\nname = "relay"\nprotocols = ["tls"]\n\n'
        + _routes(backend_port)
    )
    return _twist("relay", conf, directory, port)


@dataclass
class Shaper:
    server: Server
    control: int

    def counts(self) -> dict[str, int]:
        from bench.shaper import read_counts

        return read_counts(self.control)


def start_shaper(directory: Path, target_port: int, rate: float) -> Shaper:
    port, control = free_port(), free_port()
    target = f"127.0.0.1:{target_port}"
    command = [sys.executable, "-m", "bench.shaper", "--listen", str(port), "--control",
               str(control), "--target", target, "--rate", str(rate)]  # fmt: skip
    server = launch("shaper", command, directory, port, env={"PYTHONPATH": str(REPO)})
    return Shaper(server, control)


@dataclass(frozen=True)
class GatewayFiles:
    ca_file: Path  # the gateway CA: what clients trust
    config: Path
    cache_dir: Path


def gateway_files(directory: Path, ca: TestCA, upstream_port: int, cache_size: str) -> GatewayFiles:
    """The gateway's CA (``acrrelay ca init``), an empty store and its configuration: every
    name routed to ``upstream_port`` (the shaper in front of the relay), verified against the
    bench's test CA."""
    sys.path.insert(0, str(REPO))
    from acrrelay.gateway.ca import init_ca

    directory.mkdir(parents=True, exist_ok=True)
    ca_dir = directory / "gateway-ca"
    if not ca_dir.exists():
        init_ca(ca_dir)
    cache = directory / "cache"
    port = free_port()
    conf = directory / "gateway.toml"
    conf.write_text(
        f'[gateway]\nca = "{ca_dir}"\ncache_dir = "{cache}"\ncache_size = "{cache_size}"\n'
        f'upstream_ca = "{ca.ca_file}"\nproof_ttl = "60s"\n\n'
        '[relay]\naccess_log = "off"\n\n[[listen]]\n'
        f'endpoint = "tcp:{port}:interface=127.0.0.1"\nname = "gateway"\nprotocols = ["tls"]\n\n'
        + _routes(upstream_port)
    )
    return GatewayFiles(ca_dir / "ca.crt", conf, cache)


def start_gateway(files: GatewayFiles, directory: Path) -> Server:
    """``twist acrrelay --config gateway.toml``: the gateway role, chosen by its table."""
    text = files.config.read_text()
    port = int(text.split('endpoint = "tcp:', 1)[1].split(":", 1)[0])
    return _twist("gateway", files.config, directory, port)


def start_tls_file_server(kind: str, ca: TestCA, path: Path, directory: Path) -> Server:
    """``bench/tlsserve.py``: the registry name's certificate, ``path`` for every request."""
    port = free_port()
    command = [sys.executable, "-m", "bench.tlsserve", kind, str(port),
               str(ca.directory / f"{REGISTRY}.pem"), str(ca.directory / f"{REGISTRY}.key"),
               str(path)]  # fmt: skip
    return launch(f"tls-{kind}", command, directory, port, env={"PYTHONPATH": str(REPO)})
