"""Public test helpers for acrrelay and for programs that embed it.

- :func:`client_hello_bytes` makes a *real* ClientHello with the local OpenSSL
  (through :mod:`ssl` memory BIOs), for any server name and ALPN list.
- :func:`reframe` re-splits one handshake message into several TLS records, as a
  client may legally do.
- :func:`records_of` splits a stream of records back into (type, fragment) pairs.
- :class:`RelayHarness` runs a relay in memory: a ``MemoryReactorClock``, in-memory
  transports (:class:`PipeEnd`) for clients and backends, and the access events it
  wrote (:class:`Events`). Programs that embed the relay can test against it, as
  ``treq.testing`` lets them test against a web server.

Nothing here opens a socket or needs a real reactor.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IProtocol, ITCPTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

__all__ = [
    "EXAMPLE_CONFIG",
    "Events",
    "PipeEnd",
    "RelayHarness",
    "alert_description",
    "client_hello_bytes",
    "records_of",
    "reframe",
    "run_now",
]


def client_hello_bytes(
    server_name: str | None,
    *,
    alpn: Sequence[str] = (),
    tls13_only: bool = False,
) -> bytes:
    """The first flight of a real OpenSSL client for ``server_name``: one ClientHello.

    ``server_name=None`` makes a hello without SNI. A long ``alpn`` list makes a
    large hello (each name may be up to 255 bytes), which is the portable way to
    get a multi-kilobyte hello from stock OpenSSL.
    """
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls13_only:
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records_of(stream: bytes) -> list[tuple[int, bytes]]:
    """Split a byte stream of complete TLS records into (content type, fragment)."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(stream):
        if len(stream) - pos < 5:
            raise ValueError("trailing bytes shorter than a record header")
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        fragment = stream[pos + 5 : pos + 5 + length]
        if len(fragment) != length:
            raise ValueError("truncated record")
        out.append((stream[pos], fragment))
        pos += 5 + length
    return out


def reframe(stream: bytes, pieces: int, *, version: bytes = b"\x03\x01") -> bytes:
    """Re-frame the handshake bytes of ``stream`` into ``pieces`` TLS records.

    The handshake message is cut into near-equal fragments; the bytes are the
    same, only the record boundaries move.
    """
    handshake = b"".join(fragment for kind, fragment in records_of(stream) if kind == 22)
    if not 1 <= pieces <= len(handshake):
        raise ValueError("pieces must be between 1 and the handshake length")
    size, extra = divmod(len(handshake), pieces)
    out = bytearray()
    pos = 0
    for i in range(pieces):
        n = size + (1 if i < extra else 0)
        out += b"\x16" + version + n.to_bytes(2, "big") + handshake[pos : pos + n]
        pos += n
    return bytes(out)


def alert_description(record: bytes) -> int | None:
    """The description code of a TLS alert record, or None if it is not one."""
    if len(record) >= 7 and record[0] == 21 and record[3:5] == b"\x00\x02":
        return record[6]
    return None


@implementer(ITCPTransport)
class PipeEnd(StringTransport):
    """A StringTransport that also half-closes and records TCP options.

    ``bufferSize`` is present, as on real transports, so the relay can set its
    high-water mark on it.
    """

    bufferSize = 65536
    #: The protocol this transport delivers to (set by whoever connects it).
    protocol: Any = None

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
        data = bytes(self.value())
        self.clear()
        return data


@implementer(ILogObserver)
class Events(list[LogEvent]):
    """Collects access events."""

    def __call__(self, event: LogEvent) -> None:
        self.append(event)


#: A small configuration: one listener named "front", a fixed and a resolved route.
EXAMPLE_CONFIG = """
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


class RelayHarness:
    """A relay on a ``MemoryReactorClock``: accept clients, complete backend connections,
    advance time, and read the access events, all in memory.

    ``toml`` is a configuration as :func:`acrrelay.parse_config` reads it; connections are
    accepted on its first listener. Password checks run at once (:func:`run_now`) unless
    ``auth_runner`` says otherwise.
    """

    def __init__(
        self,
        toml: str = EXAMPLE_CONFIG,
        source: str = "<test>",
        *,
        auth_runner: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        from acrrelay.config import parse_config
        from acrrelay.peek import RelayFactory
        from acrrelay.relay import Relay

        self.reactor = MemoryReactorClock()
        self.events = Events()
        self.config = parse_config(toml, source)
        self.relay = Relay(
            self.config,
            self.reactor,
            access_observer=self.events,
            auth_runner=auth_runner or run_now,
        )
        self.factory = RelayFactory(self.relay, self.config.listeners[0])

    def accept(self, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> tuple[Any, PipeEnd]:
        """Accept a client from ``peer``: its protocol and its transport (what the relay
        wrote to the client is ``transport.value()``)."""
        protocol = self.factory.buildProtocol(IPv4Address("TCP", *peer))
        assert protocol is not None, "the relay took no one new (draining or at its limit)"
        transport = PipeEnd(peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def connect_backend(self, index: int = -1) -> tuple[Any, PipeEnd]:
        """Complete the relay's pending backend connection; returns (protocol, transport)."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        transport = PipeEnd((host, port), port=50000)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return protocol, transport

    def backend_factory(self, index: int = -1) -> Any:
        return self.reactor.tcpClients[index][2]

    def close(self, transport: PipeEnd, reason: Any = None) -> None:
        """The client's connection is gone (a real transport reports it after closing)."""
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        protocol: IProtocol = transport.protocol
        protocol.connectionLost(reason or Failure(ConnectionDone()))


def run_now(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run a 'blocking' function at once: password checks without a thread pool."""
    return maybeDeferred(f, *args)
