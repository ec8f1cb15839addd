"""A small fake of ACR's three services, for testing `acrrelay doctor` quickly.

One threaded TLS server on 127.0.0.1 picks its certificate by SNI (test CA) and answers
by Host as the registry (401 Bearer challenge, manifests, 307 blob redirects, the
Enterprise chart API), the token service (Basic auth -> JSON token; anonymous for
``PUBLIC_IMAGE``), OSS (the blob; AccessDenied XML at /) or a chart host.
The full-fidelity world (docker-registry, moto, skopeo) is in registry_world.py.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import random
import ssl
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.e2e_support import TestCA

REGISTRY = "registry-vpc.cn-beijing.aliyuncs.com"
AUTH = "dockerauth-vpc.cn-beijing.aliyuncs.com"
OSS = "oss-cn-beijing-internal.aliyuncs.com"
BUCKET = f"fake-bucket.{OSS}"
#: An Enterprise instance's chart host, in the form seen in real helm-acr configs.
CHART_HOST = "myco-chart.cn-beijing.cr.aliyuncs.com"
NAMES = (REGISTRY, AUTH, OSS, BUCKET, CHART_HOST)
USER, PASSWORD = "ci", "a long password"
SERVICE = "fake-registry"
TOKEN = "fake-token"
#: What the token service gives without credentials, for PUBLIC_IMAGE only.
ANONYMOUS_TOKEN = "fake-anonymous-token"
LAYER = gzip.compress(random.Random(7).randbytes(8000))
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
IMAGE = "team/app"
#: Anyone may pull this one (a public repository): the token service needs no password.
PUBLIC_IMAGE = "library/public"
#: The registry serves this image's blob itself (200), with no redirect to OSS.
DIRECT_IMAGE = "team/direct"
#: An image index whose first platform is IMAGE's manifest.
INDEX_IMAGE = "team/multi"
#: A ChartMuseum repository (Enterprise Edition's chart API, /api/<ns>/<repo>/charts).
CHARTS = "team/charts"
#: A chart repository the user may not read: 403 even with a token.
LOCKED_CHARTS = "team/locked"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "layers": [{"digest": LAYER_DIGEST, "size": len(LAYER)}],
    }
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


def _index(*digests: str) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"digest": d, "mediaType": OCI_MANIFEST} for d in digests],
        }
    ).encode()


#: Manifests that are not what a registry answers, each a way the doctor once crashed.
BROKEN: dict[str, tuple[str, bytes]] = {
    "broken/portal": ("text/html", b"<html><body>Log in to the guest Wi-Fi</body></html>"),
    "broken/latin1": (OCI_MANIFEST, b"\xff\xfe not utf-8"),
    "broken/list": (OCI_MANIFEST, b"[1, 2]"),
    "broken/empty-index": (OCI_INDEX, _index()),
    "broken/index-entry": (OCI_INDEX, json.dumps({"manifests": [{"size": 1}]}).encode()),
    "broken/missing-platform": (OCI_INDEX, _index("sha256:" + "0" * 64)),
    "broken/layer-digest": (OCI_MANIFEST, json.dumps({"layers": [{"size": 3}]}).encode()),
    "broken/layers": (OCI_MANIFEST, json.dumps({"layers": "none"}).encode()),
}

MANIFESTS: dict[str, tuple[str, bytes]] = {
    f"/v2/{IMAGE}/manifests/latest": (OCI_MANIFEST, MANIFEST),
    f"/v2/{PUBLIC_IMAGE}/manifests/latest": (OCI_MANIFEST, MANIFEST),
    f"/v2/{DIRECT_IMAGE}/manifests/latest": (OCI_MANIFEST, MANIFEST),
    f"/v2/{INDEX_IMAGE}/manifests/latest": (OCI_INDEX, _index(MANIFEST_DIGEST)),
    f"/v2/{INDEX_IMAGE}/manifests/{MANIFEST_DIGEST}": (OCI_MANIFEST, MANIFEST),
    **{f"/v2/{name}/manifests/latest": answer for name, answer in BROKEN.items()},
}


class _Handler(BaseHTTPRequestHandler):
    server: FakeACR  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        raw_host = self.headers.get("Host") or ""
        host = raw_host.split(":")[0]
        self.server.seen.append((host, self.path))
        if raw_host != host:
            # Like S3: "name:443" is not the signed host (nor, to path-style S3, a host at all).
            self._send(400, b"<Error><Code>InvalidHost</Code></Error>")
            return
        if host in (REGISTRY, CHART_HOST) and self.path.startswith("/api/"):
            self._charts()
        elif host == REGISTRY:
            self._registry()
        elif host == AUTH:
            self._auth()
        elif host in (OSS, BUCKET):
            self._oss(host)
        else:
            self._send(404)

    def _challenge(self, scope: str | None = None) -> None:
        realm = f"https://{AUTH}/auth" + (
            f"?{self.server.realm_query}" if self.server.realm_query else ""
        )
        challenge = f'Bearer realm="{realm}",service="{SERVICE}"'
        if scope is not None:
            challenge += f',scope="{scope}"'
        self._send(401, b'{"errors":[]}', {"WWW-Authenticate": challenge})

    def _registry(self) -> None:
        token = self.headers.get("Authorization")
        public = self.path == "/v2/" or self.path.startswith(f"/v2/{PUBLIC_IMAGE}/")
        if token != f"Bearer {TOKEN}" and not (public and token == f"Bearer {ANONYMOUS_TOKEN}"):
            self._challenge()
        elif self.path == "/v2/":
            self._send(200, b"{}")
        elif self.path in MANIFESTS:
            kind, body = MANIFESTS[self.path]
            self._send(200, body, {"Content-Type": kind})
        elif self.path == f"/v2/{DIRECT_IMAGE}/blobs/{LAYER_DIGEST}":
            self._send(200, LAYER, {"Content-Type": "application/octet-stream"})
        elif self.path.endswith(f"/blobs/{LAYER_DIGEST}"):
            where = f"https://{BUCKET}/docker/blob?Expires=1&Signature=x"
            if self.server.http_redirect:
                where = where.replace("https://", "http://")
            self._send(307, headers={"Location": where})
        else:
            self._send(404)

    def _charts(self) -> None:
        repository = self.path.removeprefix("/api/").removesuffix("/charts")
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._challenge(f"artifact-repository:{repository}:pull")
        elif repository == CHARTS:
            self._send(200, b'{"app": [{"name": "app", "version": "0.1.0"}]}')
        elif repository == LOCKED_CHARTS:
            self._send(403, b'{"error": "forbidden"}')
        else:
            self._send(404, b'{"error": "not found"}')

    def _auth(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        wanted = urllib.parse.parse_qs(self.server.realm_query)
        if (
            parts.path != "/auth"
            or query.get("service") != [SERVICE]
            or any(query.get(key) != value for key, value in wanted.items())
        ):
            self._send(400, b'{"errors": [{"code": "INVALID_REQUEST"}]}')
            return
        basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        authorization = self.headers.get("Authorization")
        if authorization == basic:
            self._send(200, json.dumps({"token": TOKEN, "expires_in": 600}).encode())
        elif authorization is None and query.get("scope") == [f"repository:{PUBLIC_IMAGE}:pull"]:
            self._send(200, json.dumps({"token": ANONYMOUS_TOKEN, "expires_in": 300}).encode())
        else:
            self._send(401)

    def _oss(self, host: str) -> None:
        if host == BUCKET and self.path.startswith("/docker/blob"):
            if self.server.slow_oss is None:
                self._send(206, LAYER[:1024])
                return
            # A slow link: the first KiB in four pieces, a pause before each.
            self.send_response(206)
            self.send_header("Content-Length", "1024")
            self.end_headers()
            for offset in range(0, 1024, 256):
                time.sleep(self.server.slow_oss)
                self.wfile.write(LAYER[offset : offset + 256])
        elif self.server.oss_root is not None:
            status, body = self.server.oss_root
            self._send(status, body, {"Content-Type": "application/xml"})
        else:
            error = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"
            self._send(403, error, {"Content-Type": "application/xml"})


class FakeACR(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ca: TestCA) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str]] = []
        self.http_redirect = False
        #: The realm's own query string ("" for none), which the token service checks.
        self.realm_query = ""
        #: What OSS answers at its root instead of 403 AccessDenied: (status, body).
        self.oss_root: tuple[int, bytes] | None = None
        #: Seconds before each quarter of the blob's first KiB (None: all at once).
        self.slow_oss: float | None = None
        contexts = {}
        for name in NAMES:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(ca.directory / f"{name}.pem", ca.directory / f"{name}.key")
            contexts[name] = context
        default = contexts[REGISTRY]

        def choose(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            sock.context = contexts.get(name or "", default)

        default.sni_callback = choose  # type: ignore[assignment]
        self.socket = default.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
