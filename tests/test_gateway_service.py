"""The gateway service in-process: listeners from the config, access events, reload, stop."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from acrrelay.gateway.ca import init_ca
from acrrelay.gateway.config import parse_gateway
from acrrelay.gateway.service import make_gateway_service
from tests import gateway_support as gs
from tests.test_gateway_passthrough import CHALLENGE, _Registry


def _text(tmp: Path, backend: str, names: tuple[str, ...], endpoint: str) -> str:
    routes = "".join(f'[[route]]\nname = "{n}"\nbackend = "{backend}"\n\n' for n in names)
    return f"""
[gateway]
ca = "{tmp / "gwca"}"
cache_dir = "{tmp / "cache"}"
upstream_ca = "{tmp / "up" / "ca.pem"}"

[[listen]]
endpoint = "{endpoint}"
name = "gateway"
protocols = ["tls"]

{routes}
"""


def _ping(port: int, ca_file: Path, name: str) -> tuple[int, str | None]:
    conn = gs.HTTPSTo(name, port, ca_file)
    conn.request("GET", "/v2/")
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, response.getheader("www-authenticate")


def _handshake(port: int, ca_file: Path, name: str) -> None:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        context.wrap_socket(raw, server_hostname=name).close()


@pytest_twisted.inlineCallbacks
def test_the_service_serves_logs_reloads_and_stops(tmp_path: Path) -> Any:
    """Routed names only; one access event per request with status and cache; a reload adds
    a name without a restart and refuses a listener change; stop closes the listener."""
    from twisted.internet import reactor

    upstream_ca = gs.make_ca(tmp_path / "up")
    init_ca(tmp_path / "gwca")
    root = Resource()
    root.putChild(b"v2", _Registry())
    up = gs.listen_tls_site(upstream_ca, gs.REGISTRY, root)
    backend = f"tcp:host=127.0.0.1:port={up.getHost().port}"
    listen = "tcp:0:interface=127.0.0.1"
    relay, gateway = parse_gateway(_text(tmp_path, backend, (gs.REGISTRY,), listen))
    assert gateway is not None
    events: list[dict[str, Any]] = []
    service = make_gateway_service(relay, gateway, reactor, access_observer=events.append)
    service.startService()
    ca_file = tmp_path / "gwca" / "ca.crt"
    try:
        port = service.addresses()[0].port
        status, challenge = yield deferToThread(_ping, port, ca_file, gs.REGISTRY)
        assert (status, challenge) == (401, CHALLENGE.decode())
        assert [(e["method"], e["status"], e["cache"], e["sni"]) for e in events] == [
            ("GET", 401, None, gs.REGISTRY)
        ]
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            yield deferToThread(_handshake, port, ca_file, gs.AUTH)
        relay2, gateway2 = parse_gateway(_text(tmp_path, backend, (gs.REGISTRY, gs.AUTH), listen))
        assert gateway2 is not None
        assert service.apply(relay2, gateway2).startswith("reloaded")
        yield deferToThread(_handshake, port, ca_file, gs.AUTH)
        relay3, gateway3 = parse_gateway(_text(tmp_path, backend, (gs.REGISTRY,), "tcp:0"))
        assert gateway3 is not None
        assert "needs a restart" in service.apply(relay3, gateway3)
    finally:
        yield service.stopService()
        up.stopListening()
    with pytest.raises(ConnectionRefusedError):
        yield deferToThread(_handshake, port, ca_file, gs.REGISTRY)


def test_the_admin_shell_sees_and_evicts_stored_blobs(tmp_path: Path) -> None:
    """cache.stats() counts a stored blob, cache.list() names it, cache.evict() removes it."""
    import hashlib

    from twisted.internet.testing import MemoryReactorClock

    from acrrelay.gateway.shell import gateway_namespace

    gs.make_ca(tmp_path / "up")
    init_ca(tmp_path / "gwca")
    relay, gateway = parse_gateway(_text(tmp_path, "resolve", (gs.REGISTRY,), "tcp:0"))
    assert gateway is not None
    service = make_gateway_service(relay, gateway, MemoryReactorClock())
    cache = gateway_namespace(service)["cache"]
    data = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    spool = service.store.begin(digest, len(data))
    assert spool is not None
    spool.write(data)
    spool.publish()
    assert cache.stats()["count"] == 1 and cache.stats()["size"] == len(data)
    assert [entry[:2] for entry in cache.list()] == [(digest, len(data))]
    assert cache.evict(digest) is True
    assert cache.stats()["count"] == 0 and cache.list() == []
