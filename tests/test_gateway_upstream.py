"""The gateway's upstream client: routed hosts only, verified for the real name, on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.error import ConnectionClosed
from twisted.web.client import ResponseFailed, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from acrrelay.backends import AddressDenied, BackendConnector
from acrrelay.gateway.upstream import NotRouted, Upstream, UpstreamEndpoints, trust_root
from acrrelay.routing import Route, RouteTable
from tests import gateway_support as gs


class _Echo(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"host=" + (request.getHeader(b"host") or b"") + b" path=" + request.path


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def world(tmp_path: Path) -> Iterator[Any]:
    ca = gs.make_ca(tmp_path / "ca")
    port = gs.listen_tls_site(ca, gs.REGISTRY, _Echo())
    backend = f"tcp:host=127.0.0.1:port={port.getHost().port}"
    yield ca, port.getHost().port, backend
    port.stopListening()


def _upstream(
    ca: Any, routes: list[Route], *, proxy: str | None = None, hosts: Any = None
) -> Upstream:
    reactor = _reactor()
    connector = BackendConnector(reactor, hosts=hosts or {}, connect_timeout=5)
    table = RouteTable(routes)
    endpoints = UpstreamEndpoints(
        reactor, lambda: table, lambda: connector, trust=trust_root(str(ca.ca_file)), proxy=proxy
    )
    return Upstream(reactor, endpoints, timeout=10)


@pytest_twisted.inlineCallbacks
def test_a_routed_name_is_fetched_through_its_backend_and_verified(world: Any) -> Any:
    """The backend's certificate is for the name (not 127.0.0.1) and it verifies."""
    ca, _, backend = world
    upstream = _upstream(ca, gs.routes(backend))
    try:
        response = yield upstream.request(b"GET", b"https://registry.gw.test/v2/", Headers())
        body = yield readBody(response)
        assert response.code == 200
        assert body == b"host=registry.gw.test path=/v2/"
    finally:
        yield upstream.close()


@pytest_twisted.inlineCallbacks
def test_a_certificate_for_another_name_fails_verification(world: Any) -> Any:
    """The same backend reached as auth.gw.test presents registry's cert: refused."""
    ca, _, backend = world
    upstream = _upstream(ca, gs.routes(backend))
    try:
        with pytest.raises((ResponseFailed, ConnectionClosed)) as info:
            yield upstream.request(b"GET", b"https://auth.gw.test/v2/", Headers())
        assert "certificate" in repr(info.value).lower() or "verif" in repr(info.value).lower()
    finally:
        yield upstream.close()


@pytest_twisted.inlineCallbacks
def test_an_unrouted_host_is_never_fetched(world: Any) -> Any:
    """A host no route covers, an IP literal, or plain http fails with NotRouted."""
    ca, _, backend = world
    upstream = _upstream(ca, gs.routes(backend))
    for url in (
        b"https://elsewhere.example.test/v2/",
        b"https://127.0.0.1/v2/",
        b"http://registry.gw.test/v2/",
        b"https://registry.gw.test:8443/v2/",
    ):
        with pytest.raises(NotRouted):
            yield upstream.request(b"GET", url, Headers())


@pytest_twisted.inlineCallbacks
def test_resolve_keeps_the_deny_list(world: Any) -> Any:
    """A ``resolve`` route whose name resolves to loopback is refused by the guard."""
    ca, _, _ = world
    upstream = _upstream(ca, gs.routes("resolve"), hosts={gs.REGISTRY: ("127.0.0.1",)})
    with pytest.raises((AddressDenied, ResponseFailed)) as info:
        yield upstream.request(b"GET", b"https://registry.gw.test/v2/", Headers())
    assert "denied" in repr(info.value)


@pytest_twisted.inlineCallbacks
def test_upstream_proxy_tunnels_with_connect_and_still_verifies(world: Any) -> Any:
    """With upstream_proxy, the request goes through CONNECT name:443, verified for the name."""
    ca, port, _ = world
    proxy = gs.ConnectProxy(port)
    upstream = _upstream(ca, gs.routes("resolve"), proxy=proxy.endpoint)
    try:
        response = yield upstream.request(b"GET", b"https://registry.gw.test/x", Headers())
        body = yield readBody(response)
        assert body == b"host=registry.gw.test path=/x"
        assert proxy.asked == ["registry.gw.test:443"]
        with pytest.raises((ResponseFailed, ConnectionClosed)):
            yield upstream.request(b"GET", b"https://auth.gw.test/x", Headers())
    finally:
        yield upstream.close()
        proxy.listening.stopListening()
