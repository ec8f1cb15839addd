"""The floor: the least a Twisted relay can do per connection, measured beside acrrelay.

``python -m bench.floor PORT BACKEND_PORT`` listens on 127.0.0.1:PORT and relays every
connection to 127.0.0.1:BACKEND_PORT the way any Twisted TCP relay must: wait for the
first bytes (an SNI relay reads the ClientHello before it knows where to go), connect the
backend with ``connectTCP``, replay those bytes, then register each transport as the
other's streaming producer (``twisted.protocols.portforward``'s pattern). It parses
nothing, checks nothing, logs nothing and keeps no timers of its own: what it costs is
what Twisted's reactor, transports and connector cost on this machine, which no relay
built on them can go below. The bench reports acrrelay's figures against it.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import protocol


class _Backend(protocol.Protocol):
    def __init__(self, front: _Front) -> None:
        self.front = front

    def connectionMade(self) -> None:
        front = self.front
        front.backend = self
        self.transport.registerProducer(front.transport, True)  # type: ignore[union-attr]
        front.transport.registerProducer(self.transport, True)  # type: ignore[union-attr]
        self.transport.write(bytes(front.pending))  # type: ignore[union-attr]
        front.pending = bytearray()
        front.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.front.transport.loseConnection()  # type: ignore[union-attr]


class _BackendFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, front: _Front) -> None:
        self.front = front

    def buildProtocol(self, addr: Any) -> _Backend:
        return _Backend(self.front)

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.front.transport.loseConnection()  # type: ignore[union-attr]


class _Front(protocol.Protocol):
    def __init__(self, reactor: Any, backend_port: int) -> None:
        self.reactor = reactor
        self.backend_port = backend_port
        self.backend: _Backend | None = None
        self.pending = bytearray()
        self.connecting = False

    def dataReceived(self, data: bytes) -> None:
        if self.backend is not None:
            self.backend.transport.write(data)  # type: ignore[union-attr]
            return
        self.pending += data
        if not self.connecting:
            self.connecting = True
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self.reactor.connectTCP("127.0.0.1", self.backend_port, _BackendFactory(self))

    def connectionLost(self, reason: Any = None) -> None:
        if self.backend is not None:
            self.backend.transport.loseConnection()  # type: ignore[union-attr]


class _FrontFactory(protocol.Factory):
    noisy = False

    def __init__(self, reactor: Any, backend_port: int) -> None:
        self.reactor = reactor
        self.backend_port = backend_port

    def buildProtocol(self, addr: Any) -> _Front:
        return _Front(self.reactor, self.backend_port)


def main(argv: list[str]) -> int:
    from twisted.internet import reactor

    port, backend_port = int(argv[0]), int(argv[1])
    reactor.listenTCP(port, _FrontFactory(reactor, backend_port), interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
