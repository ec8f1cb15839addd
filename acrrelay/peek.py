"""The relay's protocol: transport events in, state-machine inputs out.

Each accepted connection is one :class:`RelayProtocol`. It holds a
:class:`~acrrelay.session.Session` driven by the machine of :mod:`acrrelay.connection`
and does nothing else: bytes, end of stream and loss become inputs, and once a
connection splices and no door must see its bytes any more they go straight to the
:class:`~acrrelay.splice.Pump`.

On a listener with ``proxy_protocol_from``, a peer in those networks meets a
:class:`ProxyHeaderProtocol` first, as ``twisted.protocols.haproxy`` puts its wrapper in
front of a factory: it reads the PROXY header and hands the real client to the
connection, then every byte after it. From anyone else a PROXY header is refused
(``proxy_untrusted``) by the door chooser.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from twisted.internet import error
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from acrrelay import reasons
from acrrelay.clienthello import NEED_MORE
from acrrelay.connection import IClientTransport, State, describe, unmapped
from acrrelay.doors import CONNECT_ESTABLISHED, Refused, tls_alert
from acrrelay.proxyproto import ProxyHeader, ProxyHeaderReader, ProxyProtocolError
from acrrelay.session import Session
from acrrelay.splice import Pump, reset_not_eof

if TYPE_CHECKING:
    from acrrelay.config import ListenerConfig
    from acrrelay.relay import Relay

__all__ = [
    "ALERT_INTERNAL_ERROR",
    "ALERT_UNRECOGNIZED_NAME",
    "CONNECT_ESTABLISHED",
    "ProxyHeaderProtocol",
    "RelayFactory",
    "RelayProtocol",
    "State",
    "describe",
    "tls_alert",
    "unmapped",
]

ALERT_UNRECOGNIZED_NAME = reasons.ALERT_UNRECOGNIZED_NAME
ALERT_INTERNAL_ERROR = reasons.ALERT_INTERNAL_ERROR


@implementer(IHalfCloseableProtocol)
class RelayProtocol(Protocol):
    """One client connection: turns what its transport reports into machine inputs."""

    _log = Logger()
    session: Session

    def __init__(self, relay: Relay, listener: ListenerConfig, *, awaits_header: bool = False):
        self.relay = relay
        self.listener = listener
        self._awaits_header = awaits_header

    def connectionMade(self) -> None:
        transport = cast(IClientTransport, self.transport)
        self.session = Session(
            self.relay, self.listener, transport, check_signature=not self._awaits_header
        )
        self._inputs = self.session.inputs
        if not self._awaits_header:
            self._inputs.client_known(None)

    def header_received(self, header: ProxyHeader) -> None:
        """A trusted PROXY header (from :class:`ProxyHeaderProtocol`) named the client."""
        self._inputs.client_known(header)

    def header_refused(self, reason: str, detail: str) -> None:
        self._inputs.refuse(Refused(reason, detail))

    def dataReceived(self, data: bytes) -> None:
        sink = self.session.sink
        if sink is not None:
            sink(data)
            return
        try:
            self._inputs.data(data)
        except Exception:
            # A bug must cost this connection only, and be seen.
            self._log.failure("{client}: internal error", client=self.session.client)
            self._inputs.refuse(Refused(reasons.INTERNAL_ERROR, "internal error"))

    def readConnectionLost(self) -> None:
        if not reset_not_eof(self.transport):
            self._inputs.eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self._inputs.lost(reason)

    # -- read-only, for tests and embedders that hold the protocol

    @property
    def pump(self) -> Pump | None:
        return self.session.pump

    @property
    def state(self) -> State:
        return self.session.state


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(Protocol):
    """Reads a PROXY protocol v1/v2 header in front of a :class:`RelayProtocol`, which
    then knows the header's source as its client and sees only the bytes after it."""

    def __init__(self, wrapped: RelayProtocol) -> None:
        self.wrapped = wrapped
        self._reader: ProxyHeaderReader | None = ProxyHeaderReader()

    def connectionMade(self) -> None:
        self.wrapped.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        reader = self._reader
        if reader is None:
            self.wrapped.dataReceived(data)
            return
        try:
            outcome = reader.feed(data)
        except ProxyProtocolError as e:
            self._reader = None
            malformed = e.reason == "malformed"
            reason = reasons.PROXY_MALFORMED if malformed else reasons.PROXY_MISSING
            self.wrapped.header_refused(reason, str(e))
            return
        if outcome is NEED_MORE:
            return
        header, rest = cast("tuple[ProxyHeader, bytes]", outcome)
        self._reader = None
        self.wrapped.header_received(header)
        if rest:
            self.wrapped.dataReceived(rest)

    def readConnectionLost(self) -> None:
        self.wrapped.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.wrapped.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        self.wrapped.connectionLost(reason)

    @property
    def session(self) -> Session:
        return self.wrapped.session


class RelayFactory(ServerFactory):
    """Builds the protocol for each connection accepted on ``listener``: a
    :class:`RelayProtocol`, behind a :class:`ProxyHeaderProtocol` for trusted peers."""

    noisy = False

    def __init__(self, relay: Relay, listener: ListenerConfig) -> None:
        self.relay = relay
        self.listener = listener

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if not self.relay.accepts(self.listener, addr):
            return None
        host = getattr(addr, "host", None)
        trusted = self.relay.trusts_proxy_header(
            self.listener, unmapped(host) if host is not None else None
        )
        protocol = RelayProtocol(self.relay, self.listener, awaits_header=trusted)
        protocol.factory = self
        return ProxyHeaderProtocol(protocol) if trusted else protocol
