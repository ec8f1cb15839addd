"""HTTP request heads for the plain-HTTP and CONNECT front doors, parsed with h11.

The relay forwards HTTP byte-exact; it parses only to learn where a request goes:

- origin-form (``GET /path``) goes to the ``Host`` header;
- absolute-form (``GET http://host:port/path``, forward-proxy style) goes to the URI's
  host, whatever ``Host`` says;
- authority-form (``CONNECT host:port``) goes to that host and port.

Because bytes pass unchanged, anything two servers could read differently is refused
rather than forwarded: ``Content-Length`` together with ``Transfer-Encoding``, a
transfer coding other than ``chunked``, user info in a URI.
:class:`RequestFollower` then follows the later requests of a keep-alive connection,
so that none of them can switch to another host behind the first one's back.

This module is pure: no reactor, no sockets.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

import attrs
import h11

from acrrelay.clienthello import NEED_MORE, NeedMore

__all__ = ["HttpHeadError", "HttpHeadReader", "HttpRequest", "RequestFollower", "error_response"]

_HOST = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\[\]:@/\s]+))(?::([0-9]{1,5}))?\Z")


class HttpHeadError(ValueError):
    """A request head the relay will not route. ``status`` is the HTTP answer to give."""

    def __init__(self, reason: str, status: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


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
    #: Whether the request asks to switch protocols (Upgrade) or is a CONNECT.
    tunnels: bool = False

    @property
    def is_connect(self) -> bool:
        return self.method == "CONNECT"


def _split_host(text: str, default_port: int | None) -> tuple[str, int]:
    m = _HOST.match(text)
    if m is None:
        raise HttpHeadError("malformed", 400, f"bad host {text!r}")
    host = m.group(1) or m.group(2)
    port_text = m.group(3)
    if port_text is None:
        if default_port is None:
            raise HttpHeadError("malformed", 400, f"{text!r} names no port")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536 or port_text.startswith("0"):
        raise HttpHeadError("malformed", 400, f"bad port in {text!r}")
    return host, port


def _request_from(event: h11.Request, head_size: int) -> HttpRequest:
    method = event.method.decode("ascii")
    target = event.target.decode("ascii", "replace")
    hosts = [value for name, value in event.headers if name == b"host"]
    header_host = hosts[0].decode("ascii", "replace") if hosts else None
    lengths = [value for name, value in event.headers if name == b"content-length"]
    codings = [value for name, value in event.headers if name == b"transfer-encoding"]
    if lengths and codings:
        raise HttpHeadError("malformed", 400, "Content-Length and Transfer-Encoding together")
    if codings and (len(codings) > 1 or codings[0].lower() != b"chunked"):
        raise HttpHeadError("malformed", 400, "a transfer coding other than chunked")
    authorization = next(
        (value for name, value in event.headers if name == b"proxy-authorization"), None
    )
    upgrade = any(name == b"upgrade" for name, _ in event.headers)

    if method == "CONNECT":
        host, port = _split_host(target, None)
        return HttpRequest(method, target, host, port, False, head_size, authorization, True)
    if target.startswith("/") or target == "*":
        if header_host is None or not header_host:
            return HttpRequest(method, target, None, 80, False, head_size, authorization, upgrade)
        host, port = _split_host(header_host, 80)
        return HttpRequest(method, target, host, port, False, head_size, authorization, upgrade)
    # absolute-form
    try:
        url = urlsplit(target)
    except ValueError:
        raise HttpHeadError("malformed", 400, "bad absolute URI") from None
    scheme = url.scheme.lower()
    if scheme == "https":
        raise HttpHeadError("malformed", 400, "an https:// URI needs CONNECT, not a plain request")
    if scheme != "http" or not url.netloc:
        raise HttpHeadError("malformed", 400, f"unsupported request target {target[:80]!r}")
    if "@" in url.netloc:
        raise HttpHeadError("malformed", 400, "user info in the request URI")
    host, port = _split_host(url.netloc, 80)
    return HttpRequest(method, target, host, port, True, head_size, authorization, upgrade)


class HttpHeadReader:
    """Reads one request head from bytes fed in any pieces, within ``limit`` bytes.

    ``feed`` returns ``NEED_MORE`` or the :class:`HttpRequest`; it raises only
    :class:`HttpHeadError` (reasons: ``malformed``, ``too_large``).
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        self._fed = 0
        self._done = False
        self.request: HttpRequest | None = None

    def feed(self, data: bytes) -> NeedMore | HttpRequest:
        if self._done:
            raise RuntimeError("HttpHeadReader was already finished")
        if not data:
            return NEED_MORE
        self._fed += len(data)
        self._conn.receive_data(data)
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as e:
            self._done = True
            status = e.error_status_hint
            if status == 431:
                raise HttpHeadError(
                    "too_large", 431, f"request head over {self._limit} bytes"
                ) from None
            raise HttpHeadError("malformed", 400, str(e) or "malformed request") from None
        if event is h11.NEED_DATA:
            return NEED_MORE
        self._done = True
        if not isinstance(event, h11.Request):
            raise HttpHeadError("malformed", 400, "not a request")
        unread = len(self._conn.trailing_data[0])
        self.request = _request_from(event, self._fed - unread)
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
    ends, and starts a fresh one after each request. ``feed`` returns the request heads
    it completes. After a request that tunnels (Upgrade or CONNECT) it stops and returns
    nothing more: what follows is not HTTP. Raises :class:`HttpHeadError` for a
    malformed later request.
    """

    def __init__(self, parser: h11.Connection, first: HttpRequest, limit: int) -> None:
        self._conn = parser
        self._limit = limit
        self._stop_at_end = first.tunnels
        self._stopped = False

    def feed(self, data: bytes) -> list[HttpRequest]:
        if self._stopped:
            return []
        if data:  # h11 reads an empty feed as the end of the stream
            self._conn.receive_data(data)
        found: list[HttpRequest] = []
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as e:
                self._stopped = True
                raise HttpHeadError("malformed", 400, f"later request: {e}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return found
            if isinstance(event, h11.ConnectionClosed):
                self._stopped = True
                return found
            if isinstance(event, h11.EndOfMessage):
                if self._stop_at_end:
                    self._stopped = True
                    return found
                leftover = bytes(self._conn.trailing_data[0])
                self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limit)
                if leftover:
                    self._conn.receive_data(leftover)
            elif isinstance(event, h11.Request):
                request = _request_from(event, 0)
                self._stop_at_end = request.tunnels
                found.append(request)


_ERROR_TEXT: Final = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
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
