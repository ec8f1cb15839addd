"""Shared pieces of the gateway's HTTP-side tests: a test CA as a leaf issuer, a policy for a
few ``.test`` names, and a loopback TLS upstream served by Twisted with certificates for them."""

from __future__ import annotations

import http.client
import socket
import ssl
from pathlib import Path
from typing import Any

from twisted.internet import ssl as tssl
from twisted.internet.protocol import Protocol as Protocol_

from acrrelay.routing import (
    Door,
    ListenerPolicy,
    Policy,
    Refusal,
    Route,
    RouteTable,
    parse_pattern,
)
from tests.e2e_support import TestCA

REGISTRY = "registry.gw.test"
AUTH = "auth.gw.test"
OSS = "bucket.oss.gw.test"
UNROUTED = "elsewhere.example.test"
NAMES = (REGISTRY, AUTH, OSS, UNROUTED, "127.0.0.1")


class FilesIssuer:
    """The leaf issuer the TLS side asks, backed by a :class:`TestCA`'s files."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.issued: list[str] = []

    def leaf(self, name: str) -> tuple[bytes, bytes]:
        self.issued.append(name)
        directory = self.ca.directory
        return (directory / f"{name}.pem").read_bytes(), (directory / f"{name}.key").read_bytes()


def routes(backend: str = "resolve", names: tuple[str, ...] = (REGISTRY, AUTH)) -> list[Route]:
    """Routes for ``names``, plus ``*.oss.gw.test``, all to ``backend``."""
    out = [Route(parse_pattern(name), backend) for name in names]
    out.append(Route(parse_pattern("*.oss.gw.test"), backend, service="oss"))
    return out


def policy(backend: str = "resolve") -> Policy:
    return Policy(RouteTable(routes(backend)), {"main": ListenerPolicy(frozenset({"tls"}))})


def decider(p: Policy, listener: str = "main") -> Any:
    def decide(name: str | None, client: str) -> Route | Refusal:
        return p.decide(Door(listener, "tls"), name, 443, client)

    return decide


def make_ca(directory: Path) -> TestCA:
    return TestCA(directory, NAMES)


def upstream_tls_options(ca: TestCA, name: str) -> Any:
    """Twisted server TLS options for a loopback upstream presenting ``name``'s certificate."""
    pem = (ca.directory / f"{name}.pem").read_bytes() + (ca.directory / f"{name}.key").read_bytes()
    certificate = tssl.PrivateCertificate.loadPEM(pem)
    return certificate.options()


def listen_tls_site(ca: TestCA, name: str, resource: Any) -> Any:
    """A twisted.web site over TLS on 127.0.0.1 (random port) with ``name``'s certificate."""
    from twisted.internet import reactor
    from twisted.web.server import Site

    site = Site(resource)
    site.noisy = False
    return reactor.listenSSL(0, site, upstream_tls_options(ca, name), interface="127.0.0.1")


class ConnectProxy:
    """A minimal in-process CONNECT proxy that sends every tunnel to one loopback port, and
    remembers the targets it was asked for."""

    def __init__(self, port: int) -> None:
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        self.target_port = port
        self.asked: list[str] = []
        self.listening = reactor.listenTCP(
            0, Factory.forProtocol(lambda: _ProxyProtocol(self)), interface="127.0.0.1"
        )

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.listening.getHost().port}"


class _ProxyProtocol(Protocol_):  # type: ignore[misc,valid-type]
    def __init__(self, proxy: ConnectProxy) -> None:
        self.proxy = proxy
        self.buffer = b""
        self.peer: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.proxy.asked.append(head.split(b" ")[1].decode())
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.protocol import Factory

        self.transport.pauseProducing()
        d = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.target_port).connect(
            Factory.forProtocol(lambda: _Back(self))
        )

        def ready(back: Any) -> None:
            self.peer = back
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                back.transport.write(rest)
            self.transport.resumeProducing()

        d.addCallback(ready)

    def connectionLost(self, reason: Any = None) -> None:
        if self.peer is not None:
            self.peer.transport.loseConnection()


class _Back(Protocol_):  # type: ignore[misc,valid-type]
    def __init__(self, front: _ProxyProtocol) -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.front.transport.loseConnection()


def serve_gateway(ca: TestCA, handler: Any, *, p: Policy | None = None) -> tuple[Any, Any]:
    """The gateway's TLS + h11 front on 127.0.0.1 (random port) with ``handler``; returns the
    listening port and the HTTP factory (whose ``done`` hook tests may set)."""
    from twisted.internet import reactor

    from acrrelay.gateway.server import GatewayHTTPFactory
    from acrrelay.gateway.tls import SNIServerContexts, tls_factory

    contexts = SNIServerContexts(FilesIssuer(ca), decider(p or policy()))
    http = GatewayHTTPFactory(handler, reactor, idle_timeout=60)
    port = reactor.listenTCP(0, tls_factory(contexts, http), interface="127.0.0.1")
    return port, http


class HTTPSTo(http.client.HTTPSConnection):
    """http.client to a routed name, connecting to 127.0.0.1:port (SNI and Host = name)."""

    def __init__(self, name: str, port: int, ca: TestCA | Path, timeout: float = 60) -> None:
        """``ca``: a TestCA, or the path of a CA certificate to trust."""
        if isinstance(ca, Path):
            context = ssl.create_default_context(cafile=str(ca))
        else:
            context = ca.client_context()
        super().__init__(name, port, context=context, timeout=timeout)

    def connect(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)  # type: ignore[attr-defined]
