"""Test doubles for the protocol layer: in-memory transports and a relay on a fake reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

from acrrelay.config import parse_config
from acrrelay.peek import RelayFactory, RelayProtocol
from acrrelay.relay import Relay


@implementer(ITCPTransport)
class PipeEnd(StringTransport):
    """A StringTransport that also half-closes and records TCP options.

    ``bufferSize`` is present, as on real transports, so the relay can set its
    high-water mark on it.
    """

    bufferSize = 65536

    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 40000), port: int = 443) -> None:
        # A dual-stack (IPv6) socket shows IPv4 clients as ::ffff:a.b.c.d.
        family = IPv6Address if ":" in peer[0] else IPv4Address
        local = "::ffff:127.0.0.1" if family is IPv6Address else "127.0.0.1"
        super().__init__(
            hostAddress=family("TCP", local, port),
            peerAddress=family("TCP", *peer),
        )
        self.write_closed = False
        self.nodelay = False
        self.keepalive = False

    def loseWriteConnection(self) -> None:
        assert self.producer is None, "half-closed with a producer still registered"
        self.write_closed = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpNoDelay(self) -> bool:
        return self.nodelay

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepalive

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        return data


@implementer(ILogObserver)
class Events(list[LogEvent]):
    """Collects access events."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


RELAY_TOML = """
[relay]
peek_timeout = "10s"
connect_timeout = "5s"
idle_timeout = "60s"
buffer_size = "32KiB"
[[listen]]
endpoint = "tcp:443"
name = "front"
[[route]]
name = "registry.cn-beijing.aliyuncs.com"
backend = "tcp:host=10.1.1.1:port=443"
[[route]]
name = "*.oss-cn-beijing.aliyuncs.com"
backend = "resolve"
[resolver.hosts]
"bkt.oss-cn-beijing.aliyuncs.com" = "10.2.2.2"
"""


class Harness:
    """A Relay on a MemoryReactorClock, and helpers to accept and connect connections."""

    def __init__(self, toml: str = RELAY_TOML, source: str = "<test>") -> None:
        self.reactor = MemoryReactorClock()
        self.events = Events()
        self.config = parse_config(toml, source)
        self.relay = Relay(
            self.config, self.reactor, access_observer=self.events, auth_runner=run_now
        )
        self.factory = RelayFactory(self.relay, self.config.listeners[0])

    def accept(self, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> tuple[RelayProtocol, PipeEnd]:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", *peer))
        transport = PipeEnd(peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def connect_backend(self, index: int = -1) -> tuple[Any, PipeEnd]:
        """Complete the relay's pending backend connection; returns (protocol, transport)."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = PipeEnd((host, port), port=50000)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def backend_factory(self, index: int = -1) -> Any:
        return self.reactor.tcpClients[index][2]


def run_now(f: Any, *args: Any) -> Deferred[Any]:
    """Run a 'blocking' function at once: bcrypt checks without a thread pool."""
    return maybeDeferred(f, *args)


def is_half_closeable(protocol: object) -> bool:
    return IHalfCloseableProtocol.providedBy(protocol)
