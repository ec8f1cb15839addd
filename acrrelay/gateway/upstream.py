"""The gateway's HTTP client upstream: routed names only, certificates always verified.

Every upstream request goes through one :class:`twisted.web.client.Agent` with a persistent
connection pool. Its endpoint factory turns (scheme, host, port) into a connection the way the
route for ``host`` says: ``resolve`` connects to the name itself through
:class:`acrrelay.backends.BackendConnector` (static hosts first, then DNS, with the deny-list
guard); an endpoint string (a region-side acrrelay) connects there and sends the real name as
SNI. ``upstream_proxy`` sends every connection through an HTTP CONNECT proxy instead. TLS is
always verified for the real name (service_identity), against ``upstream_ca`` or the system
roots. A host no route covers is never fetched (:class:`NotRouted`): the gateway is no open
proxy, whatever a redirect says.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import h11
from twisted.internet import defer, ssl
from twisted.internet.address import HostnameAddress
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from acrrelay.backends import BackendConnector
from acrrelay.routing import InvalidName, Route, RouteTable, is_ip_literal, normalize_name

__all__ = ["NotRouted", "ProxyRefused", "Upstream", "UpstreamEndpoints", "trust_root"]

#: The largest CONNECT answer head we read from a proxy.
PROXY_HEAD_LIMIT: Final = 16 * 1024
#: Idle persistent connections kept per (scheme, host, port).
POOL_PER_HOST: Final = 8


class NotRouted(Exception):
    """An upstream URL whose host no route covers (or a scheme or port it does not allow)."""


class ProxyRefused(Exception):
    """The CONNECT proxy did not open the tunnel."""


def trust_root(upstream_ca: str | None) -> Any:
    """The roots upstream certificates must chain to: a PEM bundle, or the system's."""
    if upstream_ca is None:
        return ssl.platformTrust()
    text = Path(upstream_ca).read_bytes()
    marker = b"-----END CERTIFICATE-----"
    pems = [part + marker for part in text.split(marker) if b"-----BEGIN" in part]
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in pems])


@implementer(IStreamClientEndpoint)
class _RouteEndpoint:
    """Connect as a route says: its endpoint string, or ``resolve`` with the deny-list."""

    def __init__(self, connector: BackendConnector, route: Route, host: str, port: int) -> None:
        self._connector = connector
        self._route = route
        self._host = host
        self._port = port

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        return self._connector.connect(self._route, self._host, self._port, protocolFactory)


class _Tunnel(Protocol):
    """Asks a CONNECT proxy for host:port, then hands the connection to the real protocol."""

    transport: Any

    def __init__(self, target: str, inner: IProtocol, ready: defer.Deferred[IProtocol]) -> None:
        self._target = target
        self._inner = inner
        self._ready = ready
        self._head: h11.Connection | None = h11.Connection(h11.CLIENT)
        self._seen = 0

    def connectionMade(self) -> None:
        assert self._head is not None
        request = h11.Request(
            method="CONNECT", target=self._target, headers=[("Host", self._target)]
        )
        self.transport.write(self._head.send(request))

    def dataReceived(self, data: bytes) -> None:
        if self._head is None:
            self._inner.dataReceived(data)
            return
        self._seen += len(data)
        self._head.receive_data(data)
        try:
            event = self._head.next_event()
        except h11.RemoteProtocolError as e:
            return self._fail(f"bad answer from the proxy: {e}")
        if event is h11.NEED_DATA:
            if self._seen > PROXY_HEAD_LIMIT:
                self._fail("the proxy's answer head is too long")
            return
        if not isinstance(event, h11.Response) or not 200 <= event.status_code < 300:
            status = getattr(event, "status_code", "?")
            return self._fail(f"the proxy refused CONNECT {self._target}: {status}")
        rest, _ = self._head.trailing_data
        self._head = None
        self._inner.makeConnection(self.transport)
        self._ready.callback(self._inner)
        if rest:
            self._inner.dataReceived(bytes(rest))

    def _fail(self, why: str) -> None:
        self._head = None
        self.transport.abortConnection()
        if not self._ready.called:
            self._ready.errback(ProxyRefused(why))

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        if self._head is None and self._ready.called:
            self._inner.connectionLost(reason)
        elif not self._ready.called:
            self._ready.errback(ProxyRefused(f"the proxy closed: {reason.getErrorMessage()}"))


@implementer(IStreamClientEndpoint)
class _ConnectTunnelEndpoint:
    """host:port through an HTTP CONNECT proxy reached at ``proxy``."""

    def __init__(self, proxy: IStreamClientEndpoint, host: str, port: int) -> None:
        self._proxy = proxy
        self._target = f"{host}:{port}"
        self._address = HostnameAddress(host.encode("ascii"), port)

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        ready: defer.Deferred[IProtocol] = defer.Deferred()
        inner = protocolFactory.buildProtocol(self._address)
        if inner is None:
            return defer.fail(ProxyRefused("the protocol factory built nothing"))
        target = self._target
        d = self._proxy.connect(Factory.forProtocol(lambda: _Tunnel(target, inner, ready)))

        def failed(failure: Failure) -> None:
            if not ready.called:
                ready.errback(failure)

        d.addErrback(failed)
        return ready


@implementer(IAgentEndpointFactory)
class UpstreamEndpoints:
    """(scheme, host, port) -> a verified TLS connection as the host's route says."""

    def __init__(
        self,
        reactor: Any,
        table: Callable[[], RouteTable],
        connector: Callable[[], BackendConnector],
        *,
        trust: Any,
        proxy: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._table = table
        self._connector = connector
        self._trust = trust
        self._proxy = clientFromString(reactor, proxy) if proxy else None

    def route(self, scheme: bytes, host: bytes | str, port: int) -> tuple[str, Route]:
        """The normalised host and its route, or :class:`NotRouted` saying why not."""
        text = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        if scheme != b"https":
            raise NotRouted(f"{text}: only https is fetched upstream, not {scheme!r}")
        try:
            name = normalize_name(text)
        except InvalidName as e:
            raise NotRouted(f"{text!r}: {e}") from None
        route = None if is_ip_literal(name) else self._table().lookup(name)
        if route is None:
            raise NotRouted(f"no route for {name}")
        if port not in route.ports:
            raise NotRouted(f"port {port} is not allowed for {route.name}")
        return name, route

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        name, route = self.route(uri.scheme, uri.host, uri.port)
        inner: IStreamClientEndpoint
        if self._proxy is not None:
            inner = _ConnectTunnelEndpoint(self._proxy, name, uri.port)
        else:
            inner = _RouteEndpoint(self._connector(), route, name, uri.port)
        return wrapClientTLS(ssl.optionsForClientTLS(name, self._trust), inner)


class Upstream:
    """Requests upstream, over pooled connections, each bounded by ``timeout`` until its
    response head arrives (connecting included)."""

    def __init__(self, reactor: Any, endpoints: UpstreamEndpoints, *, timeout: float) -> None:
        self._reactor = reactor
        self.endpoints = endpoints
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = POOL_PER_HOST
        # Left on: a pooled connection the far end closed while idle is retried once, and
        # Twisted retries only idempotent methods without a body (never an upload).
        self.pool.retryAutomatically = True
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None = None,
        *,
        head_timeout: bool = True,
    ) -> defer.Deferred[IResponse]:
        """Send a request; fails with :class:`NotRouted` at once for a host no route covers.

        ``head_timeout=False`` for a streamed upload: its answer comes only after the whole
        body, which may take far longer than the timeout; idle timeouts bound it instead."""
        try:
            uri = URI.fromBytes(url)
            self.endpoints.route(uri.scheme, uri.host, uri.port)
        except NotRouted:
            return defer.fail()
        d = self.agent.request(method, url, headers, body)
        if head_timeout:
            d.addTimeout(self.timeout, self._reactor)
        return d  # type: ignore[no-any-return]

    def close(self) -> defer.Deferred[None]:
        """Close the idle pooled connections (at stop)."""
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]
