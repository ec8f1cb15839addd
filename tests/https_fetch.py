"""A byte-exact HTTPS client for the gateway tests: what a client got, byte for byte.

http.client alone would hide a cut: its ``read(amt)`` ends quietly at an early EOF, and
Python's ssl reads a FIN without close_notify as an end. :func:`fetch` compares the body
with Content-Length and raises on ragged EOFs, so a cut never looks like a clean end, and a
TCP reset (ConnectionResetError) is told from a FIN (SSLEOFError).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.registry_world import REGISTRY


@dataclass(frozen=True)
class Fetch:
    """What one HTTPS request got: the status and headers, and of the body how many bytes,
    their sha256, the first 4 KiB, and whether it ended cleanly (else ``error``)."""

    status: int
    headers: dict[str, str]
    size: int
    sha256: str
    head: bytes
    complete: bool
    error: str | None = None

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


def tls_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def fetch(
    address: str,
    ca_file: Path,
    method: str,
    path: str,
    *,
    name: str = REGISTRY,
    port: int = 443,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    rate: float | None = None,
    stop: threading.Event | None = None,
    started: threading.Event | None = None,
) -> Fetch:
    """One request to ``address:port`` as ``name`` (SNI, Host), trusting ``ca_file`` only;
    reads the whole body (at ``rate`` bytes/s at most, if given; until ``stop`` is set, if
    given: then the result is not complete), never raising on a cut. ``started`` is set
    once the response head arrived (or the request failed)."""
    context = tls_context(ca_file)
    raw = socket.create_connection((address, port), timeout=timeout)
    connection = http.client.HTTPSConnection(name, port, timeout=timeout, context=context)
    # Ragged EOFs raise: a cut (FIN without close_notify, or RST) never looks like an end.
    tls = connection.sock = context.wrap_socket(
        raw, server_hostname=name, suppress_ragged_eofs=False
    )
    digest, size, head = hashlib.sha256(), 0, bytearray()
    status, got, complete, error = 0, {}, False, None
    began = time.monotonic()
    try:
        connection.request(method, path, headers=dict(headers or {}))
        response = connection.getresponse()
        status = response.status
        if started is not None:
            started.set()
        got = {k.lower(): v for k, v in response.getheaders()}
        while data := response.read(256 * 1024 if rate is None else 16 * 1024):
            if stop is not None and stop.is_set():
                error = "stopped by the test"
                break
            digest.update(data)
            size += len(data)
            if len(head) < 4096:
                head += data[: 4096 - len(head)]
            if rate is not None:
                time.sleep(max(0.0, began + size / rate - time.monotonic()))
        # http.client's read(amt) ends quietly on an early EOF: compare with the length.
        length = got.get("content-length")
        if error is None and method != "HEAD" and length is not None and size != int(length):
            error = f"short body: {size} of {length} bytes, then EOF"
        elif error is None:
            complete = True
    except (OSError, http.client.HTTPException) as e:
        error = f"{type(e).__name__}: {e}"
    finally:
        if started is not None:
            started.set()
        # http.client's close leaves the socket open while a response refers to it.
        with contextlib.suppress(OSError):
            tls.shutdown(socket.SHUT_RDWR)
        connection.close()
    return Fetch(status, got, size, digest.hexdigest(), bytes(head), complete, error)


__all__ = ["Fetch", "fetch", "tls_context"]
