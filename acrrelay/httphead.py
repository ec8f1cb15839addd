"""HTTP request heads for the plain-HTTP and CONNECT front doors, parsed with h11.

The relay forwards HTTP byte-exact; it parses only to learn where a request goes:

- origin-form (``GET /path``) goes to the ``Host`` header;
- absolute-form (``GET http://host:port/path``, forward-proxy style) goes to the URI's
  host, and a ``Host`` header, if any, must name the same host and port;
- authority-form (``CONNECT host:port``) goes to that host and port.

Because bytes pass unchanged, anything two servers could read differently is refused
rather than forwarded: ``Content-Length`` together with ``Transfer-Encoding``, a
transfer coding other than ``chunked``, user info in a URI, an absolute URI whose
``Host`` header names another host, an HTTP version other than 1.0 and 1.1.
:class:`RequestFollower` then follows the later requests of a keep-alive connection,
so that none of them can switch to another host behind the first one's back. For the
same reason a plain request may never switch the connection to another protocol: a
head with ``Upgrade`` is refused (``upgrade_refused``), and so is a ``CONNECT`` after a
plain request. Registries, token services and OSS never need either over plain HTTP.

This module is pure: no reactor, no sockets.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

import attrs
import h11

from acrrelay import reasons
from acrrelay.clienthello import NEED_MORE, NeedMore

__all__ = [
    "HttpHeadError",
    "HttpHeadReader",
    "HttpRequest",
    "RequestFollower",
    "error_response",
    "without_proxy_auth",
]

_HOST = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:@/\s]+))(?::([0-9]{1,5}))?\Z")


class HttpHeadError(ValueError):
    """A request head the relay will not route, for ``reason`` (see :mod:`acrrelay.reasons`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def status(self) -> int:
        """The HTTP answer to give, from the one reason table."""
        return reasons.http_status(self.reason)


@attrs.frozen
class HttpRequest:
    """What the relay learns from a request head."""

    method: str
    #: The request target as sent (never changed on the way).
    target: str
    #: The host the request goes to (URI host for absolute-form), without port; None if none.
    host: str | None
    #: The target port: from the URI, the Host header, or 80 (CONNECT: from its target).
    port: int
    #: Whether the target is absolute-form (forward-proxy style).
    absolute: bool
    #: Bytes of the head, request line to the blank line included.
    head_size: int
    #: The Proxy-Authorization header value, if any.
    proxy_authorization: bytes | None = None
    #: Whether the request opens a tunnel: only CONNECT does, as a plain request that asks
    #: to switch protocols (``Upgrade``) is refused.
    tunnels: bool = False

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"


def _split_host(text: str, default_port: int | None) -> tuple[str, int]:
    m = _HOST.match(text)
    if m is None:
        raise HttpHeadError("malformed", f"bad host {text!r}")
    host = m.group(1) or m.group(2)
    port_text = m.group(3)
    if port_text is None:
        if default_port is None:
            raise HttpHeadError("malformed", f"{text!r} names no port")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536 or port_text.startswith("0"):
        raise HttpHeadError("malformed", f"bad port in {text!r}")
    return host, port


def _host_key(host: str) -> str:
    """``host`` as compared between a URI and a Host header: lower case, one trailing dot off."""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def _request_from(event: h11.Request, head_size: int) -> HttpRequest:
    if event.http_version not in (b"1.0", b"1.1"):
        # Only HTTP/1.x is followed here; "PRI * HTTP/2.0" would start h2 behind our back.
        raise HttpHeadError("malformed", "an HTTP version other than 1.0 and 1.1")
    method = event.method.decode("ascii")
    target = event.target.decode("ascii", "replace")
    hosts = [value for name, value in event.headers if name == b"host"]
    header_host = hosts[0].decode("ascii", "replace") if hosts else None
    lengths = [value for name, value in event.headers if name == b"content-length"]
    codings = [value for name, value in event.headers if name == b"transfer-encoding"]
    if lengths and codings:
        raise HttpHeadError("malformed", "Content-Length and Transfer-Encoding together")
    if codings and (len(codings) > 1 or codings[0].lower() != b"chunked"):
        raise HttpHeadError("malformed", "a transfer coding other than chunked")
    authorization = next(
        (value for name, value in event.headers if name == b"proxy-authorization"), None
    )
    upgrade = any(name == b"upgrade" for name, _ in event.headers)

    if method == "CONNECT":
        host, port = _split_host(target, None)
        return HttpRequest(method, target, host, port, False, head_size, authorization, True)
    if upgrade:
        # After a switch the relay could no longer follow the requests, so a later one
        # could name any host; nothing the relay serves needs it over plain HTTP.
        raise HttpHeadError("upgrade_refused", "Upgrade is not relayed over plain HTTP")
    if target.startswith("/") or target == "*":
        if header_host is None or not header_host:
            return HttpRequest(method, target, None, 80, False, head_size, authorization)
        host, port = _split_host(header_host, 80)
        return HttpRequest(method, target, host, port, False, head_size, authorization)
    # absolute-form
    try:
        url = urlsplit(target)
    except ValueError:
        raise HttpHeadError("malformed", "bad absolute URI") from None
    scheme = url.scheme.lower()
    if scheme == "https":
        raise HttpHeadError("malformed", "an https:// URI needs CONNECT, not a plain request")
    if scheme != "http" or not url.netloc:
        raise HttpHeadError("malformed", f"unsupported request target {target[:80]!r}")
    if "@" in url.netloc:
        raise HttpHeadError("malformed", "user info in the request URI")
    host, port = _split_host(url.netloc, 80)
    if header_host is not None:
        # The bytes go on unchanged, so a virtual-hosting backend would serve the Host
        # header's site, not the URI's one that the policy checked (RFC 9112 3.2.2).
        header = _split_host(header_host, 80) if header_host else ("", 80)
        if (_host_key(header[0]), header[1]) != (_host_key(host), port):
            raise HttpHeadError(
                "malformed", f"Host {header_host[:80]!r} is not the URI's {url.netloc!r}"
            )
    return HttpRequest(method, target, host, port, True, head_size, authorization)


# The end of a head: the first empty line (h11 also takes bare LF endings, refused below).
_BLANK_LINE = re.compile(rb"\n\r?\n")


def _check_raw_head(head: bytes | bytearray) -> None:
    """Refuse what h11 tolerates but a backend might read differently, since bytes pass as-is."""
    if not head.isascii():
        raise HttpHeadError("malformed", "non-ASCII bytes in the request head")
    if head.count(b"\n") != head.count(b"\r\n"):
        raise HttpHeadError("malformed", "a line ending without CR")
    if b"\n " in head or b"\n\t" in head:
        raise HttpHeadError("malformed", "a folded header line (obs-fold)")


class HttpHeadReader:
    """Reads one request head from bytes fed in any pieces, within ``limit`` bytes.

    ``feed`` returns ``NEED_MORE`` or the :class:`HttpRequest`; it raises only
    :class:`HttpHeadError` (reasons: ``malformed``, ``too_large``, ``upgrade_refused``),
    and the same outcome whatever the split. It keeps the raw head (at most ``limit``
    bytes plus the last read) to check what h11 lets through.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        self._raw = bytearray()
        self._end: int | None = None
        self._given = 0  # bytes of _raw passed to h11
        self._done = False
        self.request: HttpRequest | None = None

    def _too_large(self) -> HttpHeadError:
        return HttpHeadError("too_large", f"request head over {self._limit} bytes")

    def feed(self, data: bytes) -> NeedMore | HttpRequest:
        if self._done:
            raise RuntimeError("HttpHeadReader was already finished")
        if not data:
            return NEED_MORE
        try:
            return self._feed(data)
        except HttpHeadError:
            self._done = True
            self._raw = bytearray()
            raise

    def _feed(self, data: bytes) -> NeedMore | HttpRequest:
        # h11 sees only the first `limit` bytes until the head has ended within them, so
        # an error inside the limit is "malformed" and one beyond it "too_large", however
        # the bytes were split.
        scan_from = max(0, len(self._raw) - 2)
        self._raw += data
        if self._end is None:
            blank = _BLANK_LINE.search(self._raw, scan_from)
            if blank is not None:
                self._end = blank.end()
        fits = self._end is not None and self._end <= self._limit
        visible = len(self._raw) if fits else min(len(self._raw), self._limit)
        if visible > self._given:
            self._conn.receive_data(bytes(self._raw[self._given : visible]))
            self._given = visible
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:
                raise self._too_large() from None
            raise HttpHeadError("malformed", str(e) or "malformed request") from None
        if event is h11.NEED_DATA:
            if not fits and len(self._raw) > self._limit:
                raise self._too_large()
            return NEED_MORE
        self._done = True
        if not isinstance(event, h11.Request) or self._end is None:
            raise HttpHeadError("malformed", "not a request")
        _check_raw_head(self._raw[: self._end])
        self._raw = bytearray()
        self.request = _request_from(event, self._end)
        return self.request

    def follower(self) -> RequestFollower:
        """Follow the rest of the connection. The parser still holds what was read after
        this head, so call ``feed(b"")`` first for any requests already there, then feed
        only new bytes."""
        if self.request is None:
            raise RuntimeError("no request head was read yet")
        return RequestFollower(self._conn, self.request, self._limit)


class RequestFollower:
    """Follows the later requests of one keep-alive connection, from the client's bytes alone.

    It continues the h11 parser that read the first head, so it knows where each body
    ends, and reads each later head with a fresh :class:`HttpHeadReader`, so every
    head meets the same checks. ``feed`` returns the request heads it completes.
    A later head that would switch the connection away from HTTP (``Upgrade``, or a
    ``CONNECT``) raises :class:`HttpHeadError` (``upgrade_refused``), as does a malformed
    one (``malformed``, ``too_large``); either way the follower stays stopped. Only when
    the *first* request was a CONNECT does it stop quietly: what follows is tunnel bytes.
    """

    def __init__(self, parser: h11.Connection, first: HttpRequest, limit: int) -> None:
        self._conn = parser  # inside a request: its body, then its end
        self._head: HttpHeadReader | None = None  # reading a later head
        self._limit = limit
        self._stop_at_end = first.tunnels
        self._stopped = False

    def feed(self, data: bytes) -> list[HttpRequest]:
        if self._stopped:
            return []
        try:
            return self._feed(data)
        except HttpHeadError:
            self._stopped = True
            raise

    def _feed(self, data: bytes) -> list[HttpRequest]:
        found: list[HttpRequest] = []
        pending = data
        while not self._stopped:
            if self._head is not None:
                if not pending:
                    break
                outcome = self._head.feed(pending)
                pending = b""
                if outcome is NEED_MORE:
                    break
                assert isinstance(outcome, HttpRequest)
                if outcome.is_connect:
                    # Were it followed by a tunnel, the relay would stop seeing requests;
                    # were it not, a backend that refused it would read the next as HTTP.
                    raise HttpHeadError(
                        "upgrade_refused", "a CONNECT after a plain request on one connection"
                    )
                found.append(outcome)
                self._conn, self._head = self._head._conn, None
                continue
            if pending:  # h11 reads an empty feed as the end of the stream
                self._conn.receive_data(pending)
                pending = b""
            after = self._to_end_of_message()
            if after is None:
                break
            if self._stop_at_end:
                self._stopped = True
                break
            self._head = HttpHeadReader(self._limit)
            pending = after
        return found

    def _to_end_of_message(self) -> bytes | None:
        """Skip the current body; the bytes after its end, or None if it has not ended."""
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                raise HttpHeadError("malformed", f"request body: {e}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.ConnectionClosed):
                self._stopped = True
                return None
            if isinstance(event, h11.EndOfMessage):
                return bytes(self._conn.trailing_data[0])


#: Header fields dropped from a head whose Proxy-Authorization the relay consumed: the
#: credential itself, and the connection's own hop-by-hop fields, replaced below.
_CONSUMED_FIELDS: Final = frozenset(
    (b"proxy-authorization", b"connection", b"proxy-connection", b"keep-alive")
)


def without_proxy_auth(head: bytes) -> bytes:
    """``head`` (a complete, checked request head) as the relay forwards it after checking
    its ``Proxy-Authorization``: without that field, and with ``Connection: close``.

    RFC 9110 11.7.2: the proxy that asked for the credential consumes it. ``Connection:
    close`` makes the backend end the connection after its answer, so the client opens a
    new one for its next request instead of sending it, credential and all, on this one.
    """
    lines = head.split(b"\r\n")
    # lines: the request line, the fields, then "" "" from the blank line that ends it.
    kept = [lines[0]]
    for line in lines[1:-2]:
        name = line.split(b":", 1)[0].strip().lower()
        if name not in _CONSUMED_FIELDS:
            kept.append(line)
    kept.append(b"Connection: close")
    return b"\r\n".join(kept) + b"\r\n\r\n"


_ERROR_TEXT: Final = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def error_response(status: int, reason: str, detail: str, *, extra: bytes = b"") -> bytes:
    """A short, complete HTTP/1.1 error response that closes the connection."""
    body = f"acrrelay: {reason}: {detail}\n".encode("utf-8", "replace")
    return (
        f"HTTP/1.1 {status} {_ERROR_TEXT.get(status, 'Error')}\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n"
        + extra
        + b"\r\n"
        + body
    )
