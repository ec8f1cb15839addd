"""Layer 1: the HTTP request-head reader and the keep-alive follower, on the heads real
clients send, on request-smuggling shapes, and on hostile bytes."""

from __future__ import annotations

from collections.abc import Sequence

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from acrrelay.clienthello import NEED_MORE
from acrrelay.httphead import (
    HttpHeadError,
    HttpHeadReader,
    HttpRequest,
    RequestFollower,
    error_response,
    without_proxy_auth,
)

LIMIT = 16 * 1024

REGISTRY = "registry.cn-beijing.aliyuncs.com"
OSS = "oss-cn-hangzhou.aliyuncs.com"

# A request a naive parser would find inside a body: it must stay body.
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: evil.example\r\n\r\n"

# The first bytes of a TLS ClientHello, as a client sends them right after CONNECT.
TLS_START = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32


def feed_pieces(data: bytes, cuts: Sequence[int] = (), limit: int = LIMIT) -> object:
    """Feed ``data`` cut at ``cuts`` to a fresh reader; return the first decisive outcome."""
    reader = HttpHeadReader(limit)
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        piece = data[start:cut]
        start = max(start, cut)
        if not piece:
            continue
        outcome = reader.feed(piece)
        if outcome is not NEED_MORE:
            return outcome
    return NEED_MORE


def outcome_of(data: bytes, cuts: Sequence[int] = (), limit: int = LIMIT) -> object:
    """Like :func:`feed_pieces`, with an error turned into ``("error", reason, status)``."""
    try:
        return feed_pieces(data, cuts, limit)
    except HttpHeadError as e:
        return ("error", e.reason, e.status)


def bytewise(data: bytes, limit: int = LIMIT) -> object:
    """Feed ``data`` one byte per call."""
    return outcome_of(data, range(1, len(data)), limit)


def follow(
    data: bytes, cuts: Sequence[int] = (), limit: int = LIMIT
) -> tuple[HttpRequest, list[HttpRequest]]:
    """Read the first head from ``data`` cut at ``cuts``, then follow the rest of it.

    Returns the first request and every later one the follower reported.
    """
    reader = HttpHeadReader(limit)
    pieces = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        pieces.append(data[start:cut])
        start = max(start, cut)
    first: object = NEED_MORE
    while first is NEED_MORE:
        assert pieces, "the first head never completed"
        first = reader.feed(pieces.pop(0))
    assert isinstance(first, HttpRequest)
    follower = reader.follower()
    later = follower.feed(b"")
    for piece in pieces:
        later += follower.feed(piece)
    return first, later


def head(first_line: str, *headers: str) -> bytes:
    return (first_line + "\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def error_of(data: bytes, limit: int = LIMIT) -> HttpHeadError:
    with pytest.raises(HttpHeadError) as info:
        feed_pieces(data, limit=limit)
    return info.value


# ---------------------------------------------------------------------------
# Incremental reading

SAMPLES = {
    "origin": head("GET /v2/ HTTP/1.1", f"Host: {REGISTRY}", "User-Agent: docker/24.0.7"),
    "absolute": head(f"GET http://{OSS}:8080/b/l?Expires=1 HTTP/1.1", f"Host: {OSS}:8080"),
    "connect": head(f"CONNECT {REGISTRY}:443 HTTP/1.1", f"Host: {REGISTRY}:443"),
    "connect_v6": head("CONNECT [2001:db8::1]:443 HTTP/1.1", "Host: [2001:db8::1]:443"),
    "options": head("OPTIONS * HTTP/1.1", "Host: [::1]:8080"),
    "post": head("POST /token HTTP/1.1", f"Host: {REGISTRY}", "Content-Length: 11"),
    "auth": head(
        f"CONNECT {REGISTRY}:443 HTTP/1.1",
        f"Host: {REGISTRY}:443",
        "Proxy-Authorization: Basic dXNlcjpwYXNz",
    ),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_need_more_until_the_blank_line(name: str) -> None:
    """Every proper prefix of a head answers NEED_MORE; the whole head gives the request."""
    data = SAMPLES[name]
    for end in range(len(data)):
        assert outcome_of(data[:end]) is NEED_MORE, end
    request = feed_pieces(data)
    assert isinstance(request, HttpRequest)
    assert request.head_size == len(data)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_split_at_every_offset(name: str) -> None:
    """A head cut in two at any offset, or fed a byte at a time, reads the same."""
    data = SAMPLES[name] + b"hello world"
    whole = feed_pieces(data)
    assert isinstance(whole, HttpRequest)
    for offset in range(1, len(data)):
        assert feed_pieces(data, [offset]) == whole, offset
    for offset in range(1, len(data) - 1, 7):
        assert feed_pieces(data, [offset, offset + 1, offset + 13]) == whole, offset
    assert bytewise(data) == whole


def test_one_byte_at_a_time() -> None:
    """One byte per call answers NEED_MORE up to the last byte of the head."""
    data = SAMPLES["origin"]
    reader = HttpHeadReader(LIMIT)
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is NEED_MORE
    request = reader.feed(data[-1:])
    assert isinstance(request, HttpRequest) and request.host == REGISTRY
    assert reader.request == request


def test_empty_feed_is_not_end_of_stream() -> None:
    """An empty read answers NEED_MORE and the head still completes afterwards."""
    data = SAMPLES["origin"]
    reader = HttpHeadReader(LIMIT)
    assert reader.feed(b"") is NEED_MORE
    assert reader.feed(data[:10]) is NEED_MORE
    assert reader.feed(b"") is NEED_MORE
    assert reader.feed(b"") is NEED_MORE
    request = reader.feed(data[10:])
    assert isinstance(request, HttpRequest) and request.host == REGISTRY


@pytest.mark.parametrize(
    ("first", "after"),
    [
        (SAMPLES["post"], b"grant=token"),  # the body
        (SAMPLES["origin"], head("GET /v2/x HTTP/1.1", "Host: evil.example")),  # pipelined
        (SAMPLES["connect"], TLS_START),  # TLS after CONNECT
        (SAMPLES["origin"], b"\r\n\r\n\r\n"),  # stray blank lines
        (SAMPLES["post"], SMUGGLED),  # a body that looks like a request
    ],
    ids=["body", "pipelined", "tls", "blank-lines", "request-like-body"],
)
def test_head_size_is_the_head_alone(first: bytes, after: bytes) -> None:
    """head_size counts the request line through the blank line, never what follows it,
    in whatever pieces the bytes come."""
    data = first + after
    for offset in range(1, len(data)):
        request = feed_pieces(data, [offset])
        assert isinstance(request, HttpRequest), offset
        assert request.head_size == len(first), offset


def test_reader_refuses_to_be_fed_after_deciding() -> None:
    """A finished reader, by a request or by an error, is not silently reused."""
    reader = HttpHeadReader(LIMIT)
    reader.feed(SAMPLES["origin"])
    with pytest.raises(RuntimeError):
        reader.feed(b"GET")
    broken = HttpHeadReader(LIMIT)
    with pytest.raises(HttpHeadError):
        broken.feed(b"NOT HTTP\r\n\r\n")
    with pytest.raises(RuntimeError):
        broken.feed(b"GET")


def test_follower_needs_a_request_first() -> None:
    """Asking for a follower before a head was read is a programming error."""
    reader = HttpHeadReader(LIMIT)
    reader.feed(b"GET / HT")
    with pytest.raises(RuntimeError):
        reader.follower()


# ---------------------------------------------------------------------------
# Where a request goes

ROUTES = [
    # (request line, Host header or None, host, port, absolute)
    ("GET /v2/ HTTP/1.1", REGISTRY, REGISTRY, 80, False),
    ("GET /v2/ HTTP/1.1", f"{REGISTRY}:8080", REGISTRY, 8080, False),
    ("GET / HTTP/1.1", "[::1]:8080", "::1", 8080, False),
    ("GET / HTTP/1.1", "[::1]", "::1", 80, False),
    ("GET / HTTP/1.1", "10.0.0.1:65535", "10.0.0.1", 65535, False),
    ("GET / HTTP/1.1", "Registry.CN.Example", "Registry.CN.Example", 80, False),
    (f"GET http://{OSS}:8080/b HTTP/1.1", f"{OSS}:8080", OSS, 8080, True),
    (f"GET http://{OSS}/b?x=1 HTTP/1.1", f"{OSS.upper()}.:80", OSS, 80, True),
    ("GET http://[::1]:8080/ HTTP/1.1", "[::1]:8080", "::1", 8080, True),
    (f"GET HTTP://{OSS}/ HTTP/1.1", OSS, OSS, 80, True),
    (f"CONNECT {REGISTRY}:443 HTTP/1.1", "evil.example", REGISTRY, 443, False),
    ("CONNECT [2001:db8::1]:443 HTTP/1.1", "x", "2001:db8::1", 443, False),
    ("OPTIONS * HTTP/1.1", f"{REGISTRY}:8443", REGISTRY, 8443, False),
    ("GET / HTTP/1.0", REGISTRY, REGISTRY, 80, False),
    ("GET / HTTP/1.0", None, None, 80, False),
    (f"GET http://{OSS}/ HTTP/1.0", None, OSS, 80, True),
    ("CONNECT a.example:8443 HTTP/1.0", None, "a.example", 8443, False),
]


@pytest.mark.parametrize(
    ("line", "host_header", "host", "port", "absolute"),
    ROUTES,
    ids=[f"{r[0]} | Host: {r[1]}" for r in ROUTES],
)
def test_routing_target(
    line: str, host_header: str | None, host: str | None, port: int, absolute: bool
) -> None:
    """Each request form goes where HTTP says: Host for origin-form and ``*``, the URI
    for absolute-form, the target for CONNECT (which tunnels); host names come back as sent."""
    data = head(line, *([] if host_header is None else [f"Host: {host_header}"]))
    method, target, _ = line.split(" ")
    request = feed_pieces(data)
    assert isinstance(request, HttpRequest)
    assert (request.method, request.target, request.host, request.port) == (
        method,
        target,
        host,
        port,
    )
    assert request.absolute is absolute
    assert request.tunnels is (method == "CONNECT")
    assert request.is_connect is (method == "CONNECT")
    assert request.head_size == len(data)


@pytest.mark.parametrize(
    ("authority", "host_header", "host", "port"),
    [
        (OSS, OSS, OSS, 80),
        (OSS, OSS.upper(), OSS, 80),
        (OSS, f"{OSS}.", OSS, 80),
        (f"{OSS}.", OSS, f"{OSS}.", 80),
        (OSS, f"{OSS}:80", OSS, 80),
        (f"{OSS}:80", OSS, OSS, 80),
        (f"{OSS.upper()}.:80", OSS, OSS.upper() + ".", 80),
        (f"{OSS}:81", f"{OSS.title()}.:81", OSS, 81),
        ("[2001:DB8::1]", "[2001:db8::1]:80", "2001:DB8::1", 80),
    ],
    ids=["same", "case", "dot-in-host", "dot-in-uri", "port-in-host", "port-in-uri", "all",
         "port-81", "ipv6"],
)  # fmt: skip
def test_absolute_form_goes_to_the_uri_host(
    authority: str, host_header: str, host: str, port: int
) -> None:
    """A forward-proxy request goes to the URI's host and port; its Host header may spell
    the same target differently (case, one trailing dot, an explicit :80)."""
    request = feed_pieces(head(f"GET http://{authority}/x HTTP/1.1", f"Host: {host_header}"))
    assert isinstance(request, HttpRequest)
    assert (request.host, request.port, request.absolute) == (host, port, True)


@pytest.mark.parametrize(
    ("authority", "host_header"),
    [
        (OSS, REGISTRY),
        (OSS, "evil.example"),
        (OSS, f"{OSS}.evil.example"),
        (OSS, f"evil.{OSS}"),
        (OSS, f"{OSS}.."),
        (f"{OSS}:81", OSS),
        (OSS, f"{OSS}:81"),
        (f"{OSS}:8080", f"{OSS}:80"),
        (OSS, ""),
        ("[::1]:8080", "[::2]:8080"),
        ("[::1]", "localhost"),
        ("10.0.0.1", "10.0.0.2"),
    ],
    ids=["other-allowed", "evil", "suffix", "prefix", "two-dots", "port-in-uri",
         "port-in-host", "other-port", "empty", "ipv6", "ipv6-vs-name", "ipv4"],
)  # fmt: skip
@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_absolute_form_with_another_host_header_is_malformed(
    authority: str, host_header: str, version: str
) -> None:
    """An absolute URI whose Host header names another host or port is refused (400): the
    backend gets the bytes unchanged, and a virtual-hosting one would serve Host's site."""
    data = head(f"GET http://{authority}/x HTTP/{version}", f"Host: {host_header}")
    error = error_of(data)
    assert (error.reason, error.status) == ("malformed", 400)
    assert bytewise(data) == ("error", "malformed", 400)


def test_http10_without_host_has_no_host() -> None:
    """HTTP/1.0 may leave Host out: the request reads, with host None for the relay to refuse."""
    request = feed_pieces(b"GET /v2/ HTTP/1.0\r\nUser-Agent: old\r\n\r\n")
    assert isinstance(request, HttpRequest)
    assert request.host is None


@pytest.mark.parametrize(
    "data",
    [head("GET /v2/ HTTP/1.1"), head(f"CONNECT {REGISTRY}:443 HTTP/1.1")],
    ids=["origin", "connect"],
)
def test_http11_without_host_is_malformed(data: bytes) -> None:
    """HTTP/1.1 requires Host, CONNECT included (h11's rule)."""
    error = error_of(data)
    assert (error.reason, error.status) == ("malformed", 400)


def test_proxy_authorization_is_carried() -> None:
    """The Proxy-Authorization value comes back byte for byte; without it, None."""
    request = feed_pieces(SAMPLES["auth"])
    assert isinstance(request, HttpRequest)
    assert request.proxy_authorization == b"Basic dXNlcjpwYXNz"
    plain = feed_pieces(SAMPLES["connect"])
    assert isinstance(plain, HttpRequest)
    assert plain.proxy_authorization is None


@pytest.mark.parametrize(
    ("data", "tunnels"),
    [
        (head("CONNECT a.example:443 HTTP/1.1", "Host: a.example:443"), True),
        (head("CONNECT a.example:443 HTTP/1.1", "Host: a", "Upgrade: h2c"), True),
        (head("GET / HTTP/1.1", "Host: a.example", "Connection: keep-alive"), False),
        (head("GET / HTTP/1.1", "Host: a.example", "Connection: Upgrade"), False),
        (head("POST / HTTP/1.1", "Host: a.example", "Content-Length: 0"), False),
    ],
    ids=["connect", "connect-with-upgrade", "keep-alive", "connection-upgrade-alone", "post"],
)
def test_tunnels(data: bytes, tunnels: bool) -> None:
    """Only CONNECT tunnels (an Upgrade header changes nothing there); plain requests do not."""
    request = feed_pieces(data)
    assert isinstance(request, HttpRequest)
    assert request.tunnels is tunnels


UPGRADES = {
    "websocket": head("GET /ws HTTP/1.1", "Host: a", "Connection: Upgrade", "Upgrade: websocket"),
    "h2c": head(
        "GET / HTTP/1.1",
        f"Host: {REGISTRY}",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
    ),
    "no-connection-header": head("GET / HTTP/1.1", f"Host: {REGISTRY}", "Upgrade: h2c"),
    "empty-value": head("GET / HTTP/1.1", f"Host: {REGISTRY}", "Upgrade: "),
    "upper-case-name": head("GET / HTTP/1.1", f"Host: {REGISTRY}", "UPGRADE: tls/1.2"),
    "http10": head("GET / HTTP/1.0", f"Host: {REGISTRY}", "Upgrade: h2c"),
    "absolute": head(f"GET http://{REGISTRY}/ HTTP/1.1", f"Host: {REGISTRY}", "Upgrade: h2c"),
    "options": head("OPTIONS * HTTP/1.1", f"Host: {REGISTRY}", "Upgrade: h2c"),
    "post": head("POST / HTTP/1.1", f"Host: {REGISTRY}", "Content-Length: 2", "Upgrade: h2c"),
}


@pytest.mark.parametrize("name", sorted(UPGRADES))
def test_upgrade_is_refused(name: str) -> None:
    """A plain request that asks to switch protocols is refused (upgrade_refused, 403),
    fed whole or bytewise: after a switch, later requests could no longer be followed."""
    data = UPGRADES[name]
    error = error_of(data)
    assert (error.reason, error.status) == ("upgrade_refused", 403)
    assert bytewise(data) == ("error", "upgrade_refused", 403)


# ---------------------------------------------------------------------------
# Refused

POST = "POST / HTTP/1.1\r\nHost: a.example"

MALFORMED = {
    # https:// and other schemes in absolute-form
    "https-uri": head(f"GET https://{REGISTRY}/v2/ HTTP/1.1", f"Host: {REGISTRY}"),
    "ftp-uri": head("GET ftp://a.example/f HTTP/1.1", "Host: a.example"),
    "ws-uri": head("GET ws://a.example/ HTTP/1.1", "Host: a.example"),
    "authority-form-get": head("GET a.example:80 HTTP/1.1", "Host: a.example"),
    "no-host-in-uri": head("GET http:///x HTTP/1.1", "Host: a.example"),
    "empty-host-with-port": head("GET http://:80/ HTTP/1.1", "Host: a.example"),
    "broken-ipv6-uri": head("GET http://[::1/ HTTP/1.1", "Host: a.example"),
    # user info
    "userinfo": head("GET http://u@a.example/ HTTP/1.1", "Host: a.example"),
    "userinfo-password": head("GET http://u:p@a.example/ HTTP/1.1", "Host: a.example"),
    "userinfo-confusion": head("GET http://a.example:80@evil.example/ HTTP/1.1", "Host: a"),
    # ports, in Host, in the URI and in CONNECT
    "host-port-0": head("GET / HTTP/1.1", "Host: a.example:0"),
    "host-port-leading-zero": head("GET / HTTP/1.1", "Host: a.example:080"),
    "host-port-65536": head("GET / HTTP/1.1", "Host: a.example:65536"),
    "host-port-99999": head("GET / HTTP/1.1", "Host: a.example:99999"),
    "host-port-six-digits": head("GET / HTTP/1.1", "Host: a.example:100080"),
    "host-port-letters": head("GET / HTTP/1.1", "Host: a.example:8o"),
    "host-port-sign": head("GET / HTTP/1.1", "Host: a.example:+80"),
    "host-two-ports": head("GET / HTTP/1.1", "Host: a.example:80:81"),
    "host-bare-ipv6": head("GET / HTTP/1.1", "Host: ::1"),
    "host-with-space": head("GET / HTTP/1.1", "Host: a.example evil.example"),
    "uri-port-0": head("GET http://a.example:0/ HTTP/1.1", "Host: a.example"),
    "uri-port-65536": head("GET http://a.example:65536/ HTTP/1.1", "Host: a.example"),
    "uri-port-leading-zero": head("GET http://a.example:0080/ HTTP/1.1", "Host: a.example"),
    "connect-no-port": head("CONNECT a.example HTTP/1.1", "Host: a.example"),
    "connect-v6-no-port": head("CONNECT [::1] HTTP/1.1", "Host: [::1]"),
    "connect-port-0": head("CONNECT a.example:0 HTTP/1.1", "Host: a.example:0"),
    "connect-port-leading-zero": head("CONNECT a.example:0443 HTTP/1.1", "Host: a"),
    "connect-port-65536": head("CONNECT a.example:65536 HTTP/1.1", "Host: a"),
    "connect-port-letters": head("CONNECT a.example:https HTTP/1.1", "Host: a"),
    "connect-uri": head("CONNECT http://a.example:443/ HTTP/1.1", "Host: a"),
    "connect-userinfo": head("CONNECT u@a.example:443 HTTP/1.1", "Host: a"),
    # request smuggling: two framings, or one the backend may not share
    "cl-te": head(POST, "Content-Length: 4", "Transfer-Encoding: chunked"),
    "te-cl": head(POST, "Transfer-Encoding: chunked", "Content-Length: 4"),
    "cl-te-zero": head(POST, "Content-Length: 0", "Transfer-Encoding: chunked"),
    "cl-te-case": head(POST, "content-length: 4", "TRANSFER-ENCODING: Chunked"),
    "te-gzip": head(POST, "Transfer-Encoding: gzip"),
    "te-identity": head(POST, "Transfer-Encoding: identity"),
    "te-gzip-chunked": head(POST, "Transfer-Encoding: gzip, chunked"),
    "te-chunked-chunked": head(POST, "Transfer-Encoding: chunked, chunked"),
    "te-twice": head(POST, "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
    "te-space-before-colon": head(POST, "Transfer-Encoding : chunked"),
    "cl-conflicting": head(POST, "Content-Length: 4", "Content-Length: 5"),
    "cl-not-a-number": head(POST, "Content-Length: 4x"),
    "cl-negative": head(POST, "Content-Length: -1"),
    # duplicate Host
    "host-twice": head("GET / HTTP/1.1", "Host: a.example", "Host: evil.example"),
    "host-twice-same": head("GET / HTTP/1.1", "Host: a.example", "Host: a.example"),
    "host-twice-case": head("GET / HTTP/1.1", "Host: a.example", "HOST: evil.example"),
    # garbage
    "garbage": b"GARBAGE\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "extra-word": head("GET / HTTP/1.1 x", "Host: a"),
    "two-spaces": head("GET  / HTTP/1.1", "Host: a"),
    "no-version-slash": head("GET / HTTP1.1", "Host: a"),
    "leading-blank-line": b"\r\n" + head("GET / HTTP/1.1", "Host: a"),
    "header-without-colon": head("GET / HTTP/1.1", "Host: a", "NoColonHere"),
    "fold-at-start": b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",
    "ssh": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    # non-ASCII that h11 itself refuses
    "non-ascii-target": b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",
    "non-ascii-method": b"G\xc3\x89T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "non-ascii-header-name": b"GET / HTTP/1.1\r\nHost: a\r\nX-\xff: 1\r\n\r\n",
    "non-ascii-uri-host": b"GET http://caf\xc3\xa9.example/ HTTP/1.1\r\nHost: a\r\n\r\n",
    # an absolute URI with a Host header for somewhere else
    "uri-host-mismatch": head(f"GET http://{OSS}/ HTTP/1.1", "Host: evil.example"),
    "uri-port-mismatch": head(f"GET http://{OSS}:8080/ HTTP/1.1", f"Host: {OSS}"),
    # HTTP versions the relay does not follow (h2 prior knowledge, a future 1.x)
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "http2-preface-with-host": head("PRI * HTTP/2.0", f"Host: {REGISTRY}") + b"SM\r\n\r\n",
    "http12": head("GET / HTTP/1.2", f"Host: {REGISTRY}"),
    "http20-connect": head(f"CONNECT {REGISTRY}:443 HTTP/2.0", f"Host: {REGISTRY}:443"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_is_refused_with_400(name: str) -> None:
    """Heads the relay cannot route safely are malformed (400), fed whole or bytewise."""
    data = MALFORMED[name]
    error = error_of(data)
    assert (error.reason, error.status) == ("malformed", 400)
    assert bytewise(data) == ("error", "malformed", 400)


def test_https_uri_is_told_to_use_connect() -> None:
    """An https:// URI in a plain request is refused with a message pointing at CONNECT."""
    error = error_of(MALFORMED["https-uri"])
    assert "CONNECT" in str(error)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: caf\xc3\xa9.example\r\n\r\n",
    ],
    ids=["utf8-host", "ff-host", "connect-utf8-host"],
)
def test_non_ascii_host_is_malformed(data: bytes) -> None:
    """A Host header with bytes outside ASCII is refused, not decoded into U+FFFD."""
    error = error_of(data)
    assert (error.reason, error.status) == ("malformed", 400)


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a.example\r\nUser-Agent: caf\xc3\xa9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX: \x80\r\n\r\n",
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a\r\nProxy-Authorization: Basic \xff\r\n\r\n",
    ],
    ids=["utf8-user-agent", "obs-text", "proxy-authorization"],
)
def test_non_ascii_header_value_is_malformed(data: bytes) -> None:
    """Any byte outside ASCII in the head is refused (h11 alone lets obs-text through)."""
    error = error_of(data)
    assert (error.reason, error.status) == ("malformed", 400)


@pytest.mark.parametrize(
    "data",
    [
        # h11 reads one X header; a backend that takes the indented line as a header of its
        # own sees Transfer-Encoding and Content-Length (TE.CL).
        b"POST / HTTP/1.1\r\nHost: a\r\nX: y\r\n Transfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nX: y\r\n\tHost: evil.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example\r\n  evil.example\r\n\r\n",
    ],
    ids=["folded-te", "folded-host-tab", "host-continued"],
)
def test_folded_header_line_is_malformed(data: bytes) -> None:
    """obs-fold (a header line starting with space or tab) is refused: RFC 9112 5.2 lets a
    proxy only reject or rewrite it, and this relay never rewrites."""
    error = error_of(data)
    assert (error.reason, error.status) == ("malformed", 400)


# ---------------------------------------------------------------------------
# Size

SMALL_LIMIT = 512


def head_of_size(size: int) -> bytes:
    base = head("GET / HTTP/1.1", "Host: a.example", "X-Pad: ")
    pad = size - len(base)
    assert pad >= 1
    return head("GET / HTTP/1.1", "Host: a.example", "X-Pad: " + "p" * pad)


@pytest.mark.parametrize(
    "size", [SMALL_LIMIT - 1, SMALL_LIMIT, SMALL_LIMIT + 1, SMALL_LIMIT + 2, 4 * SMALL_LIMIT]
)
@pytest.mark.parametrize("mode", ["whole", "halves", "bytewise"])
def test_head_over_the_limit_is_too_large(size: int, mode: str) -> None:
    """A head of up to ``limit`` bytes reads; a longer one is too_large (431), however it
    is split."""
    data = head_of_size(size)
    assert len(data) == size
    cuts = {"whole": [], "halves": [size // 2], "bytewise": range(1, size)}[mode]
    outcome = outcome_of(data, cuts, limit=SMALL_LIMIT)
    if size <= SMALL_LIMIT:
        assert isinstance(outcome, HttpRequest)
        assert outcome.head_size == size
    else:
        assert outcome == ("error", "too_large", 431)


def test_incomplete_head_is_cut_off_near_the_limit() -> None:
    """A head that never ends is refused once the buffered bytes pass the cap."""
    reader = HttpHeadReader(SMALL_LIMIT)
    fed = 0
    with pytest.raises(HttpHeadError) as info:
        reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
        for _ in range(1000):
            reader.feed(b"x" * 64)
            fed += 64
    assert (info.value.reason, info.value.status) == ("too_large", 431)
    assert fed <= SMALL_LIMIT + 64


def test_body_does_not_count_against_the_limit() -> None:
    """A short head followed by a long body in the same read is fine."""
    first = head("PUT /v2/x/blobs/uploads/1 HTTP/1.1", "Host: a.example", "Content-Length: 4096")
    request = feed_pieces(first + b"b" * 4096, limit=SMALL_LIMIT)
    assert isinstance(request, HttpRequest)
    assert request.head_size == len(first)


# ---------------------------------------------------------------------------
# Following a keep-alive connection


def get(path: str, host: str, *extra: str) -> bytes:
    return head(f"GET {path} HTTP/1.1", f"Host: {host}", *extra)


def post_cl(path: str, host: str, body: bytes) -> bytes:
    return head(f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}") + body


def post_chunked(path: str, host: str, chunks: Sequence[bytes], trailer: bytes = b"") -> bytes:
    coded = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c)
    return (
        head(f"POST {path} HTTP/1.1", f"Host: {host}", "Transfer-Encoding: chunked")
        + coded
        + b"0\r\n"
        + trailer
        + b"\r\n"
    )


def where(requests: Sequence[HttpRequest]) -> list[tuple[str, str, str | None]]:
    return [(r.method, r.target, r.host) for r in requests]


def test_follower_returns_requests_already_buffered() -> None:
    """Pipelined requests that came with the first read are returned by feed(b"")."""
    data = get("/1", "a.example") + get("/2", "b.example") + get("/3", "c.example")
    reader = HttpHeadReader(LIMIT)
    first = reader.feed(data)
    assert isinstance(first, HttpRequest) and first.target == "/1"
    follower = reader.follower()
    assert isinstance(follower, RequestFollower)
    assert where(follower.feed(b"")) == [("GET", "/2", "b.example"), ("GET", "/3", "c.example")]
    assert follower.feed(b"") == []


def test_follower_returns_each_later_request() -> None:
    """Each later request head is returned by the feed that completes it, no sooner."""
    reader = HttpHeadReader(LIMIT)
    reader.feed(get("/1", "a.example"))
    follower = reader.follower()
    assert follower.feed(b"") == []
    second = get("/2", "b.example")
    assert follower.feed(second[:-1]) == []
    assert where(follower.feed(second[-1:])) == [("GET", "/2", "b.example")]
    later = follower.feed(get(f"http://{OSS}:8080/x", f"{OSS}:8080"))
    assert [(r.host, r.port, r.absolute) for r in later] == [(OSS, 8080, True)]


@pytest.mark.parametrize(
    "first",
    [
        post_cl("/1", "a.example", SMUGGLED),
        post_chunked("/1", "a.example", [SMUGGLED]),
        post_chunked("/1", "a.example", [SMUGGLED[:9], SMUGGLED[9:]], trailer=b"X-T: 1\r\n"),
        head("POST /1 HTTP/1.1", "Host: a.example", "Transfer-Encoding: chunked")
        + b"%x;ext=1\r\n%s\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED),
    ],
    ids=["content-length", "chunked", "chunked-trailer", "chunk-extension"],
)
def test_body_is_not_a_request(first: bytes) -> None:
    """A body that contains a request's text is body: only the real next request is seen,
    in any split."""
    data = first + get("/2", "b.example")
    expected = [("GET", "/2", "b.example")]
    assert where(follow(data)[1]) == expected
    for offset in range(1, len(data)):
        assert where(follow(data, [offset])[1]) == expected, offset
    assert where(follow(data, range(1, len(data)))[1]) == expected


def test_body_split_across_reads() -> None:
    """A body partly in the first read is finished from later reads before the next head."""
    reader = HttpHeadReader(LIMIT)
    first = reader.feed(post_cl("/1", "a.example", b"0123456789")[:-5])
    assert isinstance(first, HttpRequest)
    follower = reader.follower()
    assert follower.feed(b"") == []
    assert follower.feed(b"56") == []
    assert follower.feed(b"789GET /2 HT") == []
    assert where(follower.feed(b"TP/1.1\r\nHost: b.example\r\n\r\n")) == [
        ("GET", "/2", "b.example")
    ]


STREAM = (
    get("/1", "a.example")
    + post_cl("/2", "b.example", SMUGGLED)
    + post_chunked("/3", "c.example", [b"abc", SMUGGLED, b"0\r\n\r\n"])
    + head("GET /4 HTTP/1.0", "Host: d.example")
    + get("http://e.example:81/5", "E.Example.:81", "Connection: close")
    + get("/6", "f.example")
)
STREAM_WHERE = [
    ("POST", "/2", "b.example"),
    ("POST", "/3", "c.example"),
    ("GET", "/4", "d.example"),
    ("GET", "http://e.example:81/5", "e.example"),
    ("GET", "/6", "f.example"),
]


def test_pipelining_at_every_split() -> None:
    """A keep-alive stream of mixed requests reads the same cut anywhere or bytewise."""
    first, later = follow(STREAM)
    assert first.target == "/1"
    assert where(later) == STREAM_WHERE
    for offset in range(1, len(STREAM)):
        assert where(follow(STREAM, [offset])[1]) == STREAM_WHERE, offset
    assert where(follow(STREAM, range(1, len(STREAM)))[1]) == STREAM_WHERE


def test_empty_feed_is_never_end_of_stream_for_the_follower() -> None:
    """feed(b"") between, and in the middle of, requests never ends the connection."""
    reader = HttpHeadReader(LIMIT)
    reader.feed(post_cl("/1", "a.example", b"abcdef")[:-3])
    follower = reader.follower()
    found = []
    for piece in [b"", b"", b"d", b"", b"ef", b"", *[get("/2", "b.example")], b""]:
        found += follower.feed(piece)
        found += follower.feed(b"")
    found += follower.feed(get("/3", "c.example"))
    assert where(found) == [("GET", "/2", "b.example"), ("GET", "/3", "c.example")]


@pytest.mark.parametrize(
    "later",
    [
        head("CONNECT b.example:443 HTTP/1.1", "Host: b") + TLS_START,
        # The first request's own host and port: a backend that refuses the CONNECT and
        # keeps the connection would read the next request, unfollowed, as HTTP.
        head("CONNECT a.example:80 HTTP/1.1", "Host: a.example:80") + get("/x", "evil.example"),
    ],
    ids=["other-host", "same-host"],
)
def test_follower_refuses_a_later_connect(later: bytes) -> None:
    """A CONNECT after a plain request is refused (upgrade_refused, 403) in any split, and
    nothing after it is reported."""
    data = get("/1", "a.example") + later
    for cuts in ([], [len(data) - len(later)], range(1, len(data))):
        with pytest.raises(HttpHeadError) as info:
            follow(data, cuts)
        assert (info.value.reason, info.value.status) == ("upgrade_refused", 403)
    reader = HttpHeadReader(LIMIT)
    reader.feed(data)
    follower = reader.follower()
    with pytest.raises(HttpHeadError):
        follower.feed(b"")
    assert follower.feed(get("/y", "evil.example")) == []
    assert follower.feed(b"") == []


def test_a_first_upgrade_request_gets_no_follower() -> None:
    """An Upgrade first request is refused by the reader, so nothing is ever followed."""
    reader = HttpHeadReader(LIMIT)
    with pytest.raises(HttpHeadError) as info:
        reader.feed(get("/ws", "a.example", "Upgrade: websocket") + get("/2", "evil.example"))
    assert info.value.reason == "upgrade_refused"
    with pytest.raises(RuntimeError):
        reader.follower()


def test_follower_stops_after_a_connect_first_request() -> None:
    """When the first request is a CONNECT, what follows it is never read as HTTP."""
    first = head("CONNECT a.example:443 HTTP/1.1", "Host: a.example:443")
    after = get("/2", "evil.example") + TLS_START
    for offset in range(1, len(first) + len(after)):
        _, later = follow(first + after, [offset])
        assert later == [], offset
    reader = HttpHeadReader(LIMIT)
    reader.feed(first)
    follower = reader.follower()
    assert follower.feed(b"") == []
    assert follower.feed(after) == []
    assert follower.feed(get("/3", "evil.example")) == []


@pytest.mark.parametrize("name", sorted(UPGRADES))
def test_follower_refuses_a_later_upgrade(name: str) -> None:
    """A later request that asks to switch protocols, even for the first request's own
    host, is refused (upgrade_refused, 403) in any split, so the request smuggled after it
    (for another host) is never passed unseen."""
    upgrade = UPGRADES[name]
    data = get("/1", "a") + upgrade + get("/3", "evil.example")
    for cuts in ([], [len(data) - len(upgrade)], range(1, len(data))):
        with pytest.raises(HttpHeadError) as info:
            follow(data, cuts)
        assert (info.value.reason, info.value.status) == ("upgrade_refused", 403)


@pytest.mark.parametrize(
    "later",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        head("POST / HTTP/1.1", "Host: b", "Content-Length: 3", "Transfer-Encoding: chunked"),
        head("POST / HTTP/1.1", "Host: b", "Transfer-Encoding: gzip"),
        head(f"GET https://{REGISTRY}/ HTTP/1.1", f"Host: {REGISTRY}"),
        head("GET http://u@b.example/ HTTP/1.1", "Host: b"),
        head("GET / HTTP/1.1", "Host: b", "Host: evil.example"),
        head("GET / HTTP/1.1"),
        head("GET / HTTP/1.1", "Host: b:0"),
        head(f"GET http://{OSS}/ HTTP/1.1", "Host: evil.example"),
        head(f"GET http://{OSS}/ HTTP/1.1", f"Host: {OSS}:8080"),
        head("PRI * HTTP/2.0", "Host: a"),
    ],
    ids=["garbage", "cl-te", "te-gzip", "https", "userinfo", "two-hosts", "no-host", "port-0",
         "uri-host-mismatch", "uri-port-mismatch", "http2"],
)  # fmt: skip
def test_follower_raises_for_a_malformed_later_request(later: bytes) -> None:
    """A malformed later request raises HttpHeadError (malformed, 400), in any split."""
    data = get("/1", "a.example") + later
    for cuts in ([], [len(data) - len(later)], range(1, len(data))):
        with pytest.raises(HttpHeadError) as info:
            follow(data, cuts)
        assert (info.value.reason, info.value.status) == ("malformed", 400)


@pytest.mark.parametrize(
    "later",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        head(f"GET https://{REGISTRY}/ HTTP/1.1", f"Host: {REGISTRY}"),
        get("/2", "a.example", "Upgrade: h2c"),
        head("CONNECT a.example:80 HTTP/1.1", "Host: a.example:80"),
    ],
    ids=["h11-error", "routing-error", "upgrade", "connect"],
)
def test_follower_stays_stopped_after_an_error(later: bytes) -> None:
    """Once a later request was refused, the follower reports no further requests."""
    reader = HttpHeadReader(LIMIT)
    reader.feed(get("/1", "a.example"))
    follower = reader.follower()
    with pytest.raises(HttpHeadError):
        follower.feed(later)
    try:
        found = follower.feed(get("/3", "evil.example"))
    except HttpHeadError:
        found = []
    assert found == []


@pytest.mark.parametrize("mode", ["streamed", "whole"])
def test_follower_later_head_over_the_limit_is_too_large(mode: str) -> None:
    """A later head longer than the cap is refused as too_large (431), like the first,
    whether it trickles in or arrives complete in one read."""
    reader = HttpHeadReader(SMALL_LIMIT)
    reader.feed(get("/1", "a.example"))
    follower = reader.follower()
    with pytest.raises(HttpHeadError) as info:
        if mode == "whole":
            follower.feed(head_of_size(2 * SMALL_LIMIT))
        else:
            follower.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
            for _ in range(100):
                follower.feed(b"x" * 64)
    assert (info.value.reason, info.value.status) == ("too_large", 431)


# ---------------------------------------------------------------------------
# Error responses


def parse_response(data: bytes, method: str = "GET") -> tuple[h11.Response, bytes]:
    """Parse ``data`` as h11 does in a client that sent ``method``, to its end."""
    client = h11.Connection(h11.CLIENT)
    target = "a.example:443" if method == "CONNECT" else "/"
    client.send(h11.Request(method=method, target=target, headers=[("Host", "a.example")]))
    client.send(h11.EndOfMessage())
    client.receive_data(data)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    body = b""
    while True:
        event = client.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data), event
        body += event.data
    assert client.their_state is h11.MUST_CLOSE
    assert client.trailing_data == (b"", False)
    return response, body


@pytest.mark.parametrize(
    ("status", "phrase"),
    [
        (400, b"Bad Request"),
        (403, b"Forbidden"),
        (405, b"Method Not Allowed"),
        (407, b"Proxy Authentication Required"),
        (431, b"Request Header Fields Too Large"),
        (502, b"Bad Gateway"),
        (504, b"Gateway Timeout"),
        (418, b"Error"),
    ],
)
def test_error_response_is_complete_http(status: int, phrase: bytes) -> None:
    """Each error answer parses as one whole HTTP/1.1 response that closes the connection."""
    data = error_response(status, "refused", "not on the list")
    response, body = parse_response(data)
    headers = dict(response.headers)
    assert (response.status_code, response.reason, response.http_version) == (
        status,
        phrase,
        b"1.1",
    )
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body)
    assert body == b"acrrelay: refused: not on the list\n"
    assert data.endswith(body)


def test_error_response_carries_extra_headers() -> None:
    """Extra header lines (Proxy-Authenticate on 407) arrive intact, answering a CONNECT."""
    data = error_response(
        407, "auth", "credentials required", extra=b'Proxy-Authenticate: Basic realm="acrrelay"\r\n'
    )
    response, body = parse_response(data, method="CONNECT")
    headers = dict(response.headers)
    assert response.status_code == 407
    assert headers[b"proxy-authenticate"] == b'Basic realm="acrrelay"'
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body)


def test_error_response_counts_bytes_not_characters() -> None:
    """A detail outside ASCII still gives a Content-Length that matches the body bytes."""
    response, body = parse_response(error_response(403, "refused", "h\u00f4te \u4e0d\u660e"))
    assert int(dict(response.headers)[b"content-length"]) == len(body)
    assert body.decode("utf-8") == "acrrelay: refused: h\u00f4te \u4e0d\u660e\n"


@pytest.mark.parametrize("name", ["https-uri", "cl-te", "garbage"])
def test_reader_errors_become_responses(name: str) -> None:
    """The status a refusal carries makes a valid error response."""
    error = error_of(MALFORMED[name])
    response, _ = parse_response(error_response(error.status, error.reason, str(error)))
    assert response.status_code == error.status


# ---------------------------------------------------------------------------
# Hostile bytes


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=1200), st.lists(st.integers(min_value=0, max_value=1200), max_size=6))
def test_arbitrary_bytes_raise_only_the_module_error(data: bytes, cuts: list[int]) -> None:
    """Any bytes, in any split, give an outcome or HttpHeadError, the same whatever the split."""
    assert outcome_of(data, limit=SMALL_LIMIT) == outcome_of(data, cuts, limit=SMALL_LIMIT)


REQUEST_LINES = [
    b"GET / HTTP/1.1\r\n",
    b"GET http://a.example:8080/ HTTP/1.1\r\n",
    b"CONNECT a.example:443 HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"POST /x HTTP/1.0\r\n",
]
HEADER_LINES = [
    b"Host: a.example\r\n",
    b"Host: [::1]:80\r\n",
    b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Upgrade: h2c\r\n",
    b"Proxy-Authorization: Basic eA==\r\n",
    b"X-Pad: " + b"p" * 300 + b"\r\n",
    b"User-Agent: containerd/1.7\r\n",
    b" folded\r\n",
    b"\r\n",
    b"\n",
    b":",
    b" ",
    b"\xff",
]

# Mostly a request line, header lines and a blank line, with noise mixed in.
head_like = st.tuples(
    st.one_of(st.sampled_from(REQUEST_LINES), st.binary(max_size=20)),
    st.lists(st.sampled_from(HEADER_LINES), max_size=8),
    st.sampled_from([b"\r\n", b"\n", b""]),
    st.binary(max_size=30),
).map(lambda t: t[0] + b"".join(t[1]) + t[2] + t[3])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(head_like, st.lists(st.integers(min_value=0, max_value=3000), max_size=6))
@example(head_of_size(2 * SMALL_LIMIT), [SMALL_LIMIT + 10])
@example(head_of_size(2 * SMALL_LIMIT).replace(b"Host", b"Hast"), [SMALL_LIMIT + 10])
def test_head_like_bytes_read_the_same_in_any_split(data: bytes, cuts: list[int]) -> None:
    """Near-HTTP bytes give the same outcome whatever the split, and a head that reads
    ends at a blank line and fits the limit."""
    whole = outcome_of(data, limit=SMALL_LIMIT)
    assert whole == outcome_of(data, cuts, limit=SMALL_LIMIT)
    if isinstance(whole, HttpRequest):
        assert whole.head_size <= SMALL_LIMIT
        assert data[: whole.head_size].endswith((b"\n\n", b"\n\r\n"))


def follow_outcome(data: bytes, cuts: Sequence[int]) -> object:
    try:
        return where(follow(data, cuts, limit=SMALL_LIMIT)[1])
    except HttpHeadError as e:
        return ("error", e.reason, e.status)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(head_like, st.binary(max_size=600)),
    st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
)
@example(head_of_size(2 * SMALL_LIMIT), [len(get("/1", "a.example")) + SMALL_LIMIT + 10])
def test_follower_on_hostile_bytes_raises_only_the_module_error(
    rest: bytes, cuts: list[int]
) -> None:
    """Whatever follows a good first head, the follower returns requests or raises
    HttpHeadError, and whether it refuses does not depend on the split."""
    data = get("/1", "a.example") + rest
    whole = follow_outcome(data, [])
    split = follow_outcome(data, cuts)
    if isinstance(whole, tuple) or isinstance(split, tuple):
        # Requests completed before the refusal may come out in earlier feeds; the
        # refusal itself must come either way.
        assert isinstance(whole, tuple) and isinstance(split, tuple)
    else:
        assert whole == split


requests_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a.example", "b.example", "[::1]:8080", "c.example:81"]),
        st.sampled_from(["none", "length", "chunked"]),
        st.lists(
            st.one_of(st.sampled_from([SMUGGLED, b"0\r\n\r\n", b"\r\n"]), st.binary(max_size=20)),
            max_size=3,
        ),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(requests_strategy, st.lists(st.integers(min_value=0, max_value=2000), max_size=8))
def test_follower_finds_exactly_the_requests_sent(
    requests: list[tuple[str, str, list[bytes]]], cuts: list[int]
) -> None:
    """Any keep-alive stream of requests with Content-Length or chunked bodies (bodies that
    may look like requests) gives back exactly its requests, in any split."""
    data = b""
    expected = []
    for i, (host, framing, chunks) in enumerate(requests):
        path = f"/{i}"
        if framing == "none":
            data += get(path, host)
            method = "GET"
        elif framing == "length":
            data += post_cl(path, host, b"".join(chunks))
            method = "POST"
        else:
            data += post_chunked(path, host, chunks)
            method = "POST"
        expected.append((method, path, host.rsplit(":", 1)[0].strip("[]") if ":" in host else host))
    first, later = follow(data, cuts)
    assert where([first, *later]) == expected


@pytest.mark.parametrize(
    "fields",
    [
        b"Proxy-Authorization: Basic Y2k6czNjcmV0\r\n",
        b"proxy-authorization:Basic Y2k6czNjcmV0\r\nConnection: keep-alive\r\n",
        b"PROXY-AUTHORIZATION: Basic Y2k6czNjcmV0\r\nProxy-Connection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\n",
    ],
)
def test_without_proxy_auth_drops_the_credential_and_closes(fields: bytes) -> None:
    """The consumed head keeps every other field, in order, and asks to close."""
    head = (
        b"GET http://h.example/x HTTP/1.1\r\nHost: h.example\r\n" + fields + b"Accept: */*\r\n\r\n"
    )
    assert without_proxy_auth(head) == (
        b"GET http://h.example/x HTTP/1.1\r\nHost: h.example\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n"
    )
