"""S3 on OSS's name for the end-to-end world: moto's server app behind TLS, two listeners.

- ``127.0.0.1:<port 0>`` is the relay's backend for the OSS names;
- ``<side address>:443`` is where docker-registry reaches it by name (its private hosts
  file maps the OSS name there), so the presigned redirect URLs it writes carry the bare
  name, port 443, as ACR's do. The side address is a free one in ``SIDE_NET`` (a
  ``127.a.b.0/16``-style prefix of the loopback network), picked here by binding.

Both listeners serve one moto state, and pick the certificate by SNI among ``NAME``s
(each ``CERT_DIR/NAME.pem`` and ``.key``, from ``TestCA``; the first is the default).
Set ``MOTO_S3_CUSTOM_ENDPOINTS`` to the OSS endpoint, or moto takes ``oss-…`` for a
bucket name.

Usage: ``s3_server.py CERT_DIR SIDE_NET NAME...``. Prints ``READY <port> <side address>``,
then serves until its standard input closes (or SIGTERM).
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import sys
import threading
from pathlib import Path
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import ThreadedWSGIServer


class TLSServer(ThreadedWSGIServer):
    """werkzeug's threaded server, with the TLS handshake on each connection's own thread
    (werkzeug's own TLS handshakes in the accept loop, where one stalled client stops all)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, app: Any, tls: ssl.SSLContext) -> None:
        super().__init__(host, port, app)
        self.tls = tls
        self.ssl_context = tls  # werkzeug reads it for wsgi.url_scheme

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(60)
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            print(f"HANDSHAKE-FAILED {client_address} {e}", flush=True)
            return
        wrapped.settimeout(None)
        try:
            super().finish_request(wrapped, client_address)
        finally:
            _close_after_peer(wrapped)


def _close_after_peer(conn: ssl.SSLSocket) -> None:
    """End our side with a FIN, read (raw, bounded) until the peer's, then close.

    werkzeug answers every request with ``Connection: close``; a socket closed at once
    answers the close_notify the client sends after our last byte with a RST, and the
    relay, depending on which it reads first, logs the finished transfer as done or as a
    backend_reset (issue 12: under load, test_e2e_registry's pull of the big layer)."""
    with contextlib.suppress(OSError):
        conn.settimeout(15)
        conn.shutdown(socket.SHUT_WR)  # also drops TLS: recv reads raw bytes from here
        while conn.recv(65536):
            pass
    conn.close()


def tls_context(cert_dir: Path, names: list[str]) -> ssl.SSLContext:
    contexts = {}
    for name in names:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_dir / f"{name}.pem", cert_dir / f"{name}.key")
        contexts[name] = context

    def pick(sock: ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext) -> None:
        chosen = contexts.get((server_name or "").lower())
        if chosen is not None:
            sock.context = chosen

    default = contexts[names[0]]
    default.sni_callback = pick
    return default


def bind_side(side_net: str, app: Any, tls: ssl.SSLContext) -> TLSServer:
    """A listener on a free ``SIDE_NET.x.y:443``."""
    rng = random.SystemRandom()
    prefix = side_net.split(".")
    for _ in range(64):
        octets = [*prefix, *(str(rng.randrange(1, 255)) for _ in range(4 - len(prefix)))]
        try:
            return TLSServer(".".join(octets), 443, app, tls)
        except OSError:
            continue
    raise SystemExit(f"no free address in {side_net} for port 443")


def main(argv: list[str]) -> None:
    cert_dir, side_net, *names = argv
    app = DomainDispatcherApplication(create_backend_app)
    tls = tls_context(Path(cert_dir), names)
    relay_side = TLSServer("127.0.0.1", 0, app, tls)
    registry_side = bind_side(side_net, app, tls)
    for server in (relay_side, registry_side):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {relay_side.server_port} {registry_side.server_address[0]}", flush=True)
    sys.stdin.read()
    for server in (relay_side, registry_side):
        server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
