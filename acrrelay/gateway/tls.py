"""TLS termination for the routed names only.

The gateway answers for the registry's own host names, so it must hold a certificate for each
of them; it takes a leaf from the operator's internal CA for exactly the names its routes cover.
One pyOpenSSL server context has no certificate at all; its SNI callback asks the routing
policy (door ``tls``, as the relay's front door does) about the name the client sent and swaps
in that name's leaf context. A name no route covers, an IP literal, or no SNI at all aborts the
handshake with an ``unrecognized_name`` alert before any certificate is sent: the gateway never
shows a certificate for a name it does not serve, and it never serves a default.

No ALPN is offered, so clients speak HTTP/1.1 (the gateway's server is h11).
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocolFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from acrrelay.routing import Refusal, Route

__all__ = [
    "LeafIssuer",
    "SNIServerContexts",
    "UnrecognizedName",
    "tls_factory",
]

#: Leaf contexts kept in memory: a ``*.`` route covers any number of names.
MAX_LEAVES: Final = 1024

_log = Logger(namespace="acrrelay.gateway.tls")

#: Decides a TLS server name for a client address: a route, or why not.
Decide = Callable[[str | None, str], Route | Refusal]

_OPTIONS: Final = (
    SSL.OP_NO_SSLv2 | SSL.OP_NO_SSLv3 | SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
)


class LeafIssuer(Protocol):
    """What the TLS side needs of the CA: a PEM certificate (chain) and key for a name."""

    def leaf(self, name: str) -> tuple[bytes, bytes]: ...


class UnrecognizedName(Exception):
    """The SNI callback refuses a name: OpenSSL then sends the ``unrecognized_name`` alert."""


def _install_quiet_hook() -> None:
    """pyOpenSSL reports an exception in the SNI callback through ``sys.excepthook`` before
    it turns it into the fatal alert we want; a refused name is routine, not a crash, so our
    own refusal type is kept out of stderr and everything else goes to the previous hook."""
    previous = sys.excepthook
    if getattr(previous, "_acrrelay_quiet", False):
        return

    def hook(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        if not issubclass(kind, UnrecognizedName):
            previous(kind, value, traceback)

    hook._acrrelay_quiet = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _base_context() -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_options(_OPTIONS)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    return context


def _leaf_context(cert_pem: bytes, key_pem: bytes) -> SSL.Context:
    context = _base_context()
    chain = x509.load_pem_x509_certificates(cert_pem)
    context.use_certificate(chain[0])
    for extra in chain[1:]:
        context.add_extra_chain_cert(extra)
    context.use_privatekey(load_pem_private_key(key_pem, password=None))  # type: ignore[arg-type]
    context.check_privatekey()
    return context


@implementer(IOpenSSLServerConnectionCreator)
class SNIServerContexts:
    """Server connections whose certificate is chosen by SNI, for routed names only.

    ``decide(name, client)`` is asked at every handshake, so a reload of the routes applies to
    the next handshake. Leaf contexts are cached per name and rebuilt when the issuer hands out
    a new certificate (renewal before expiry).
    """

    def __init__(
        self,
        issuer: LeafIssuer,
        decide: Decide,
        *,
        refused: Callable[[Refusal], None] | None = None,
    ) -> None:
        _install_quiet_hook()
        self._issuer = issuer
        self._decide = decide
        self._refused = refused
        self._leaves: OrderedDict[str, tuple[bytes, SSL.Context]] = OrderedDict()
        self._lock = threading.Lock()  # pyOpenSSL may call back from any thread using SSL
        self._base = _base_context()
        self._base.set_tlsext_servername_callback(self._choose)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._base, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def _client(self, connection: SSL.Connection) -> str:
        protocol = connection.get_app_data()
        peer = getattr(getattr(protocol, "transport", None), "getPeer", lambda: None)()
        return str(getattr(peer, "host", ""))

    def _choose(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        client = self._client(connection)
        decision = self._decide(name, client)
        if isinstance(decision, Refusal):
            _log.info(
                "TLS refused for {name} from {client}: {reason}",
                name=name or "(no SNI)",
                client=client,
                reason=decision.reason,
            )
            if self._refused is not None:
                self._refused(decision)
            raise UnrecognizedName(decision.reason)
        assert name is not None
        connection.set_context(self.context_for(name.lower().rstrip(".")))

    def context_for(self, name: str) -> SSL.Context:
        """The leaf context for a (routed, normalised) name, issued on first use."""
        cert_pem, key_pem = self._issuer.leaf(name)
        with self._lock:
            cached = self._leaves.get(name)
            if cached is not None and cached[0] == cert_pem:
                self._leaves.move_to_end(name)
                return cached[1]
        context = _leaf_context(cert_pem, key_pem)
        with self._lock:
            self._leaves[name] = (cert_pem, context)
            while len(self._leaves) > MAX_LEAVES:
                self._leaves.popitem(last=False)
        return context

    def forget(self) -> None:
        """Drop every cached leaf context (after the routes changed)."""
        with self._lock:
            self._leaves.clear()


def tls_factory(contexts: SNIServerContexts, wrapped: IProtocolFactory) -> TLSMemoryBIOFactory:
    """``wrapped`` behind TLS terminated with ``contexts``."""
    factory = TLSMemoryBIOFactory(contexts, False, wrapped)
    factory.noisy = False
    return factory
