"""The front doors, as pure objects: read a connection's first message, say where it goes.

A door is fed the client's bytes and answers, like Twisted's PROXY header parsers,
with one of:

- ``NEED_MORE``: not enough bytes yet;
- an :class:`Ask`: a question for the policy (this name and port, through this door);
- a :class:`Refused`: a reason token and a detail.

Each door also speaks its own language: :meth:`~FrontDoor.answer` renders a refusal
(a TLS alert, an HTTP error with the reason's status, a 407 that asks for
credentials), :meth:`~FrontDoor.greeting` what the client hears once the backend is
there (CONNECT's ``200``), and :meth:`~FrontDoor.replay` which of the peeked bytes the
backend gets. The plain-HTTP door follows the later requests of a keep-alive connection.

:func:`choose_door` picks a door from the first bytes: ``0x16`` is TLS, a capital
letter an HTTP request head, which is a CONNECT or a plain request. No Twisted here.
"""

from __future__ import annotations

from typing import Final, Protocol

import attrs

from acrrelay import reasons
from acrrelay.clienthello import (
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    NotTLS,
)
from acrrelay.clienthello import NeedMore as NeedMore
from acrrelay.httphead import (
    HttpHeadError,
    HttpHeadReader,
    HttpRequest,
    RequestFollower,
    error_response,
    without_proxy_auth,
)
from acrrelay.proxyproto import is_proxy_signature
from acrrelay.routing import normalize_name

__all__ = [
    "CONNECT_ESTABLISHED",
    "NEED_MORE",
    "Ask",
    "ConnectDoor",
    "FrontDoor",
    "HeadDoor",
    "HttpDoor",
    "NoDoor",
    "Refused",
    "TlsDoor",
    "choose_door",
    "tls_alert",
]

CONNECT_ESTABLISHED: Final = b"HTTP/1.1 200 Connection established\r\n\r\n"
HTTP_FIRST: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
TLS_FIRST: Final = 0x16
_PROXY_AUTHENTICATE: Final = b'Proxy-Authenticate: Basic realm="acrrelay"\r\n'


def tls_alert(description: int) -> bytes:
    """A fatal TLS alert record, as a server sends before its ServerHello."""
    return b"\x15\x03\x03\x00\x02\x02" + bytes([description])


def http_answer(reason: str, detail: str) -> bytes:
    """The HTTP error that answers ``reason``, with its status from the one table."""
    status = reasons.http_status(reason)
    extra = _PROXY_AUTHENTICATE if status == 407 else b""
    return error_response(status, reason, detail, extra=extra)


@attrs.frozen
class Refused:
    """No: ``reason`` (a token of :mod:`acrrelay.reasons`) and what was wrong."""

    reason: str
    detail: str
    #: The door that answers, if the refusal settled which one it is.
    door: FrontDoor | None = None


@attrs.frozen
class Ask:
    """A question for the policy: may ``name``:``port`` be reached through ``door``?"""

    door: FrontDoor
    name: str | None
    port: int
    hello: ClientHello | None = None
    request: HttpRequest | None = None


Outcome = NeedMore | Ask | Refused


class FrontDoor(Protocol):
    """What every door offers the connection that reads through it."""

    #: The front door's name in logs and labels: tls, http, connect, or None (not yet known).
    @property
    def protocol(self) -> str | None: ...

    #: Whether the door must see the client's bytes after its first message.
    follows: bool

    def feed(self, data: bytes) -> Outcome: ...
    def timed_out(self, detail: str) -> Refused: ...
    def answer(self, reason: str, detail: str) -> bytes: ...
    def greeting(self) -> bytes: ...
    def replay(self, peeked: bytes) -> bytes: ...
    def follow(self, data: bytes) -> Refused | None: ...


class _Settled:
    """What a door does once its first message is read, unless it says otherwise."""

    follows = False

    def feed(self, data: bytes) -> Outcome:
        return NEED_MORE

    def timed_out(self, detail: str) -> Refused:
        return Refused(reasons.PEEK_TIMEOUT, detail)

    def greeting(self) -> bytes:
        return b""

    def replay(self, peeked: bytes) -> bytes:
        return peeked

    def follow(self, data: bytes) -> Refused | None:
        return None


class NoDoor(_Settled):
    """Before a door is chosen: nothing to say, except an alert to what looks like TLS."""

    protocol = None

    def __init__(self, tls_like: bool = False) -> None:
        self._tls_like = tls_like

    def answer(self, reason: str, detail: str) -> bytes:
        return tls_alert(reasons.tls_alert_for(reason)) if self._tls_like else b""


class TlsDoor(_Settled):
    """Routes by the ClientHello's SNI, to the listener's TLS port."""

    protocol = "tls"

    def __init__(self, limit: int, port: int) -> None:
        self._reader = ClientHelloReader(limit)
        self._port = port

    def feed(self, data: bytes) -> Outcome:
        try:
            outcome = self._reader.feed(data)
        except ClientHelloError as e:
            return Refused(e.reason, str(e))
        if isinstance(outcome, ClientHello):
            return Ask(self, outcome.server_name, self._port, hello=outcome)
        if isinstance(outcome, NotTLS):  # cannot happen: 0x16 was checked
            return Refused(reasons.NOT_TLS, outcome.detail)
        return NEED_MORE

    def answer(self, reason: str, detail: str) -> bytes:
        return tls_alert(reasons.tls_alert_for(reason))


class HeadDoor(_Settled):
    """An HTTP request head; once read, it hands over to an :class:`HttpDoor` or a
    :class:`ConnectDoor`."""

    def __init__(self, limit: int, protocols: tuple[str, ...], consume_auth: bool) -> None:
        self._reader = HttpHeadReader(limit)
        self._protocols = protocols
        self._consume_auth = consume_auth
        self.protocol: str | None = None  # known once the head is, or it is refused

    def feed(self, data: bytes) -> Outcome:
        try:
            request = self._reader.feed(data)
        except HttpHeadError as e:
            self.protocol = "http"
            return Refused(e.reason, str(e))
        if not isinstance(request, HttpRequest):
            return NEED_MORE
        door: HttpDoor | ConnectDoor
        if request.is_connect:
            door = ConnectDoor(request)
        else:
            door = HttpDoor(request, self._reader.follower(), self._consume_auth)
        if door.protocol not in self._protocols:
            detail = f"{door.protocol} is not enabled on this listener"
            return Refused(reasons.PROTOCOL_NOT_ALLOWED, detail, door)
        refusal = door.follow(b"")  # requests pipelined behind the first
        if refusal is not None:
            return refusal
        return Ask(door, request.host, request.port, request=request)

    def timed_out(self, detail: str) -> Refused:
        self.protocol = "http"
        return Refused(reasons.PEEK_TIMEOUT, detail)

    def answer(self, reason: str, detail: str) -> bytes:
        return http_answer(reason, detail)


class ConnectDoor(_Settled):
    """``CONNECT host:port``: the head is the relay's; the backend gets what follows."""

    protocol = "connect"

    def __init__(self, request: HttpRequest) -> None:
        self.request = request

    def answer(self, reason: str, detail: str) -> bytes:
        return http_answer(reason, detail)

    def greeting(self) -> bytes:
        return CONNECT_ESTABLISHED

    def replay(self, peeked: bytes) -> bytes:
        return peeked[self.request.head_size :]


class HttpDoor(_Settled):
    """A plain request, by its absolute URI or Host; later requests are followed, and one
    for another host is cut off. With ``consume_auth`` (a listener with users) the head goes
    on without the relay's Proxy-Authorization, and no later request is allowed."""

    protocol = "http"
    follows = True

    def __init__(self, request: HttpRequest, follower: RequestFollower, consume_auth: bool):
        self.request = request
        self._follower = follower
        self._consume_auth = consume_auth

    def answer(self, reason: str, detail: str) -> bytes:
        return http_answer(reason, detail)

    def replay(self, peeked: bytes) -> bytes:
        if not self._consume_auth:
            return peeked
        size = self.request.head_size
        return without_proxy_auth(peeked[:size]) + peeked[size:]

    def follow(self, data: bytes) -> Refused | None:
        try:
            later = self._follower.feed(data)
        except HttpHeadError as e:
            return Refused(e.reason, f"later request: {e}", self)
        if later and self._consume_auth:
            # Its head would carry the relay's credential on to the backend.
            detail = "a later request on a connection whose Proxy-Authorization the relay consumed"
            return Refused(reasons.ONE_REQUEST_WITH_AUTH, detail, self)
        first = self.request
        for request in later:
            if request.port != first.port or not _same_name(request.host, first.host):
                detail = (
                    f"a later request on this connection asks for {request.host}:{request.port}"
                )
                return Refused(reasons.HOST_SWITCH, detail, self)
        return None


def choose_door(
    peeked: bytes,
    *,
    listener: str,
    protocols: tuple[str, ...],
    limit: int,
    tls_port: int,
    consume_auth: bool,
) -> FrontDoor | Refused:
    """The door for a connection whose first bytes are ``peeked`` (at least one)."""
    first = peeked[0]
    if first == TLS_FIRST and "tls" in protocols:
        return TlsDoor(limit, tls_port)
    if first in HTTP_FIRST and ("http" in protocols or "connect" in protocols):
        return HeadDoor(limit, protocols, consume_auth)
    if first == TLS_FIRST:
        detail = f"TLS is not enabled on {listener}"
        return Refused(reasons.PROTOCOL_NOT_ALLOWED, detail, NoDoor(tls_like=True))
    detail = "sslv2" if first & 0x80 else "not a TLS handshake record"
    if "http" in protocols or "connect" in protocols:
        detail = "neither TLS nor HTTP"
    reason = reasons.NOT_TLS if protocols == ("tls",) else reasons.NOT_RECOGNIZED
    return Refused(reason, detail)


def proxy_signature(peeked: bytes, peer: str) -> Refused | NeedMore | bool:
    """From a peer that may not send a PROXY header: refused if ``peeked`` starts one;
    NEED_MORE while too short to tell and no door can start on it; else whether that is
    settled (False: look again at the next bytes)."""
    verdict = is_proxy_signature(peeked[:16])
    if verdict:
        return Refused(reasons.PROXY_UNTRUSTED, f"a PROXY header from untrusted {peer}")
    if verdict is None and peeked[0] not in HTTP_FIRST:
        return NEED_MORE  # too few bytes to tell a v2 signature from anything else
    return verdict is False


def _same_name(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a == b
    try:
        return normalize_name(a) == normalize_name(b)
    except ValueError:
        return False
