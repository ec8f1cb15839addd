"""A small fake of ACR's three services, for testing `acrrelay doctor` quickly.

One threaded TLS server on 127.0.0.1 picks its certificate by SNI (test CA) and answers
by Host as the registry (401 Bearer challenge, manifests, 307 blob redirects), the
token service (Basic auth -> JSON token) or OSS (the blob; AccessDenied XML at /).
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.e2e_support import TestCA

REGISTRY = "registry-vpc.cn-beijing.aliyuncs.com"
AUTH = "dockerauth-vpc.cn-beijing.aliyuncs.com"
OSS = "oss-cn-beijing-internal.aliyuncs.com"
BUCKET = f"fake-bucket.{OSS}"
NAMES = (REGISTRY, AUTH, OSS, BUCKET)
USER, PASSWORD = "ci", "a long password"
TOKEN = "fake-token"
LAYER = gzip.compress(random.Random(7).randbytes(8000))
LAYER_DIGEST = "sha256:" + hashlib.sha256(LAYER).hexdigest()
IMAGE = "team/app"
#: A ChartMuseum repository (Enterprise Edition's chart API, /api/<ns>/<repo>/charts).
CHARTS = "team/charts"


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
        if host == REGISTRY:
            self._registry()
        elif host == AUTH:
            self._auth()
        elif host in (OSS, BUCKET):
            self._oss(host)
        else:
            self._send(404)

    def _registry(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            challenge = f'Bearer realm="https://{AUTH}/auth",service="fake-registry"'
            self._send(401, b'{"errors":[]}', {"WWW-Authenticate": challenge})
        elif self.path == "/v2/":
            self._send(200, b"{}")
        elif self.path == f"/api/{CHARTS}/charts":
            self._send(200, b'{"app": []}')
        elif self.path == f"/v2/{IMAGE}/manifests/latest":
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "layers": [{"digest": LAYER_DIGEST, "size": len(LAYER)}],
            }
            self._send(200, json.dumps(manifest).encode())
        elif self.path == f"/v2/{IMAGE}/blobs/{LAYER_DIGEST}":
            where = f"https://{BUCKET}/docker/blob?Expires=1&Signature=x"
            if self.server.http_redirect:
                where = where.replace("https://", "http://")
            self._send(307, headers={"Location": where})
        else:
            self._send(404)

    def _auth(self) -> None:
        expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {expected}":
            self._send(401)
        else:
            self._send(200, json.dumps({"token": TOKEN, "expires_in": 600}).encode())

    def _oss(self, host: str) -> None:
        if host == BUCKET and self.path.startswith("/docker/blob"):
            self._send(206, LAYER[:1024])
        else:
            error = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"
            self._send(403, error, {"Content-Type": "application/xml"})


class FakeACR(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ca: TestCA) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[tuple[str, str]] = []
        self.http_redirect = False
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
