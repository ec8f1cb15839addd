"""Layer 2: the plain-HTTP, CONNECT and PROXY-protocol front doors, ACLs and limits."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import bcrypt
import h11
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from acrrelay.backends import DENIED_NETWORKS, AddressGuard
from acrrelay.config import parse_config
from acrrelay.peek import RelayProtocol, State
from acrrelay.proxyproto import ProxyHeaderReader, encode_v1, encode_v2
from acrrelay.testing import client_hello_bytes
from tests.doubles import Harness, PipeEnd

REGISTRY = "registry.cn-beijing.aliyuncs.com"
HELLO = client_hello_bytes(REGISTRY)

FRONT = """
[[listen]]
endpoint = "tcp:443"
name = "front"
protocols = ["tls", "http", "connect"]
proxy_protocol_from = ["10.9.0.0/16"]
deny = ["203.0.113.0/24"]
[[route]]
name = "registry.cn-beijing.aliyuncs.com"
backend = "tcp:host=10.1.1.1:port=443"
[[route]]
name = "*.oss-cn-beijing.aliyuncs.com"
backend = "resolve"
[[route]]
name = "proxied.example.com"
backend = "tcp:host=10.3.3.3:port=443"
proxy_protocol = "v2"
[[route]]
name = "loopback.example.com"
backend = "resolve"
[[route]]
name = "allowed-loopback.example.com"
backend = "resolve"
allow_addresses = ["127.0.0.0/8"]
[resolver.hosts]
"bkt.oss-cn-beijing.aliyuncs.com" = "10.2.2.2"
"meta.oss-cn-beijing.aliyuncs.com" = "100.100.100.200"
"loopback.example.com" = ["127.0.0.1", "::1"]
"allowed-loopback.example.com" = "127.0.0.1"
"""


def response_of(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Parse an HTTP response the relay wrote, with h11 as a client would."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Response), event
    body = b""
    while True:
        part = conn.next_event()
        if isinstance(part, h11.Data):
            body += part.data
        else:
            break
    return event.status_code, dict(event.headers), body


def closed(transport: PipeEnd) -> None:
    transport.protocol.connectionLost(Failure(ConnectionLost()))


# -- plain HTTP


def test_http_routes_by_host_and_forwards_byte_exact() -> None:
    """A plain request goes to the Host's route, and the backend gets the exact bytes."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    request = b"GET /v2/ HTTP/1.1\r\nHost: Registry.CN-Beijing.aliyuncs.com:80\r\nX: y\r\n\r\n"
    protocol.dataReceived(request[:10])
    protocol.dataReceived(request[10:])
    assert [(host, port) for host, port, *_ in h.reactor.tcpClients] == [("10.1.1.1", 443)]
    _, backend = h.connect_backend()
    assert backend.value() == request
    assert client.value() == b""
    assert protocol.session.door is not None and protocol.session.door.protocol == "http"
    assert protocol.session.target == (REGISTRY, 80)


BUCKET = "bkt.oss-cn-beijing.aliyuncs.com"


@pytest.mark.parametrize(
    ("authority", "host_header"),
    [
        (BUCKET, BUCKET),
        (BUCKET, BUCKET.upper()),
        (BUCKET, BUCKET + "."),
        (BUCKET + ".", BUCKET),
        (BUCKET, BUCKET + ":80"),
        (BUCKET.upper() + ".:80", BUCKET),
        (BUCKET, None),
    ],
    ids=["same", "case", "dot-in-host", "dot-in-uri", "port-in-host", "port-in-uri", "http10"],
)
def test_absolute_uri_routes_by_the_uri_host(authority: str, host_header: str | None) -> None:
    """GET http://host/… is routed by the URI's host; a Host header that spells the same
    target (case, one trailing dot, an explicit :80) or none (HTTP/1.0) is fine, and the
    backend gets the request byte-exact."""
    h = Harness(FRONT)
    protocol, _ = h.accept()
    version, host_line = ("1.0", "") if host_header is None else ("1.1", f"Host: {host_header}\r\n")
    request = f"GET http://{authority}/blob HTTP/{version}\r\n{host_line}\r\n".encode()
    protocol.dataReceived(request)
    assert [(host, port) for host, port, *_ in h.reactor.tcpClients] == [("10.2.2.2", 80)]
    _, backend = h.connect_backend()
    assert backend.value() == request


@pytest.mark.parametrize(
    "host_header",
    ["evil.example", REGISTRY, f"{BUCKET}:8080", f"{BUCKET}.evil.example", f"x{BUCKET}", ""],
    ids=["evil", "another-allowed-host", "another-port", "suffix", "prefix", "empty"],
)
def test_absolute_uri_with_another_host_header_is_refused(host_header: str) -> None:
    """An absolute URI whose Host header names another host or port gets 400 malformed and
    nothing connects: the bytes go on unchanged, so the backend would see that Host."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    protocol.dataReceived(
        f"GET http://{BUCKET}/blob HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    )
    assert h.reactor.tcpClients == []
    status, _, body = response_of(client.value())
    assert (status, body.split(b":")[1].strip()) == (400, b"malformed")
    closed(client)
    assert h.events[-1]["close_reason"] == "refused:malformed"


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: unknown.example.com\r\n\r\n", 403, "not_allowed"),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 403, "ip_literal"),
        (b"GET / HTTP/1.1\r\nHost: 2130706433\r\n\r\n", 403, "ip_literal"),
        (b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost: " + REGISTRY.encode() + b":22\r\n\r\n", 403, "port_not_allowed"),
        (b"GET / HTTP/1.0\r\n\r\n", 400, "no_host"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "malformed"),
        (b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed"),
        (
            b"POST / HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
            "malformed",
        ),
        (b"GET https://" + REGISTRY.encode() + b"/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 20000, 431, "too_large"),
        (
            b"GET / HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\n\r\n",
            403,
            "upgrade_refused",
        ),
        (
            b"GET http://"
            + REGISTRY.encode()
            + b"/ HTTP/1.1\r\nHost: "
            + REGISTRY.encode()
            + b"\r\nUpgrade: websocket\r\n\r\n",
            403,
            "upgrade_refused",
        ),
        (
            b"GET http://" + REGISTRY.encode() + b"/ HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            400,
            "malformed",
        ),
    ],
)
def test_http_refusals_get_an_http_error(request_bytes: bytes, status: int, reason: str) -> None:
    """Refused or broken requests get a proper HTTP error naming the reason, then a close."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    protocol.dataReceived(request_bytes)
    assert client.disconnecting
    got_status, headers, body = response_of(client.value())
    assert got_status == status
    assert headers[b"connection"] == b"close"
    assert body.startswith(f"acrrelay: {reason}: ".encode())
    assert h.reactor.tcpClients == []
    closed(client)
    assert h.relay.stats.refused[reason] == 1
    assert h.events[-1]["close_reason"] == f"refused:{reason}"


def test_http_peek_timeout_gets_408() -> None:
    """A request head that never ends is answered 408 at the peek timeout."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a")
    h.reactor.advance(10)
    assert response_of(client.value())[0] == 408


def test_a_later_request_for_another_host_is_cut_off() -> None:
    """On keep-alive, a request for another host after an allowed one never reaches anyone."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    first = b"GET /a HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\n\r\n"
    protocol.dataReceived(first)
    _, backend = h.connect_backend()
    same = b"GET /b HTTP/1.1\r\nHost: " + REGISTRY.upper().encode() + b"\r\n\r\n"
    protocol.dataReceived(same)
    assert backend.value() == first + same
    protocol.dataReceived(b"GET /c HTTP/1.1\r\nHost: bkt.oss-cn-beijing.aliyuncs.com\r\n\r\n")
    assert backend.value() == first + same  # not forwarded
    assert client.disconnected and backend.disconnected
    assert len(h.reactor.tcpClients) == 1
    closed(client)
    backend.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "refused:host_switch"
    assert h.relay.stats.refused["host_switch"] == 1


#: A later request that must never reach a backend: for another allowed host.
OTHER_HOST = b"GET /c HTTP/1.1\r\nHost: " + BUCKET.encode() + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("switch", "reason", "status"),
    [
        (b"GET /b HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\nUpgrade: h2c\r\n\r\n",
         "upgrade_refused", 403),
        (b"GET /b HTTP/1.1\r\nHost: " + REGISTRY.encode()
         + b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "upgrade_refused", 403),
        (b"CONNECT " + REGISTRY.encode() + b":80 HTTP/1.1\r\nHost: " + REGISTRY.encode()
         + b":80\r\n\r\n", "upgrade_refused", 403),
        (b"GET http://" + REGISTRY.encode() + b"/b HTTP/1.1\r\nHost: " + BUCKET.encode()
         + b"\r\n\r\n", "malformed", 400),
    ],
    ids=["h2c", "websocket", "connect-same-host", "absolute-with-another-host"],
)  # fmt: skip
@pytest.mark.parametrize("when", ["first-read", "keep-alive"])
def test_a_later_request_cannot_switch_the_connection_or_its_host(
    switch: bytes, reason: str, status: int, when: str
) -> None:
    """After an allowed request, a request for the same host that would switch protocols
    (Upgrade, CONNECT) or carry another Host behind its absolute URI is refused, and the
    request for another host smuggled after it never reaches anyone."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    first = b"GET /a HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\n\r\n"
    if when == "first-read":
        protocol.dataReceived(first + switch + OTHER_HOST)
        assert h.reactor.tcpClients == []
        assert response_of(client.value())[0] == status
    else:
        protocol.dataReceived(first)
        _, backend = h.connect_backend()
        protocol.dataReceived(switch + OTHER_HOST)
        assert backend.value() == first  # neither is forwarded
        assert client.disconnected and backend.disconnected
        assert len(h.reactor.tcpClients) == 1
        backend.protocol.connectionLost(Failure(ConnectionLost()))
    closed(client)
    assert h.events[-1]["close_reason"] == f"refused:{reason}"


def test_a_smuggled_request_in_the_first_read_is_refused_before_connecting() -> None:
    """Two pipelined requests in one read, the second to another host: refused at once."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    protocol.dataReceived(
        b"GET / HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: bkt.oss-cn-beijing.aliyuncs.com\r\n\r\n"
    )
    assert h.reactor.tcpClients == []
    assert response_of(client.value())[0] == 403


def test_a_body_that_looks_like_a_request_is_body() -> None:
    """Body bytes are not mistaken for a later request: framing is followed."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    body = b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"
    request = (
        b"POST /x HTTP/1.1\r\nHost: " + REGISTRY.encode()
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )  # fmt: skip
    protocol.dataReceived(request)
    _, backend = h.connect_backend()
    protocol.dataReceived(body)
    assert backend.value() == request + body
    assert not client.disconnecting


# -- CONNECT


def test_connect_is_answered_200_and_spliced_without_its_head() -> None:
    """CONNECT host:443 connects the route, answers 200, and forwards only what follows."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    head = f"CONNECT {REGISTRY}:443 HTTP/1.1\r\nHost: {REGISTRY}:443\r\n\r\n".encode()
    protocol.dataReceived(head + HELLO[:40])
    assert [(host, port) for host, port, *_ in h.reactor.tcpClients] == [("10.1.1.1", 443)]
    assert client.value() == b""  # nothing promised before the backend is there
    _, backend = h.connect_backend()
    assert client.value() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    protocol.dataReceived(HELLO[40:])
    assert backend.value() == HELLO  # the TLS after CONNECT is not peeked, only passed
    assert protocol.session.door is not None and protocol.session.door.protocol == "connect"


@pytest.mark.parametrize(
    ("target", "status", "reason"),
    [
        ("127.0.0.1:22", 403, "ip_literal"),
        ("[::1]:443", 400, "malformed"),
        (f"{REGISTRY}:22", 403, "port_not_allowed"),
        ("unknown.example.com:443", 403, "not_allowed"),
        (f"{REGISTRY}.evil.example:443", 403, "not_allowed"),
        ("xn--registry-vpc-xyz.cn-beijing.aliyuncs.com:443", 403, "not_allowed"),
        (REGISTRY, 400, "malformed"),
    ],
)
def test_connect_refusals(target: str, status: int, reason: str) -> None:
    """A refused CONNECT target gets an HTTP error with the reason, and nothing connects."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    protocol.dataReceived(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status_got, _, body = response_of(client.value())
    assert (status_got, body.split(b":")[1].strip()) == (status, reason.encode())
    assert h.reactor.tcpClients == []


USERS_TOML = """
[[listen]]
endpoint = "tcp:3128"
name = "proxy"
protocols = ["connect"]
connect_users = "{users}"
[[route]]
name = "registry.cn-beijing.aliyuncs.com"
backend = "tcp:host=10.1.1.1:port=443"
"""


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    digest = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()
    path.write_text(f"# docker clients\nci:{digest.replace('$2b$', '$2y$')}\n")
    return path


def connect_with(h: Harness, authorization: str | None) -> tuple[RelayProtocol, PipeEnd]:
    protocol, client = h.accept()
    header = f"Proxy-Authorization: {authorization}\r\n" if authorization else ""
    protocol.dataReceived(
        f"CONNECT {REGISTRY}:443 HTTP/1.1\r\nHost: {REGISTRY}:443\r\n{header}\r\n".encode()
    )
    return protocol, client


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_connect_with_users_needs_proxy_authorization(users_file: Path) -> None:
    """Without or with wrong credentials, CONNECT gets 407 and a Basic challenge."""
    h = Harness(USERS_TOML.format(users=users_file))
    for authorization in [None, basic("ci", "wrong"), basic("nobody", "s3cret"), "Bearer x"]:
        _, client = connect_with(h, authorization)
        status, headers, _ = response_of(client.value())
        assert status == 407, authorization
        assert headers[b"proxy-authenticate"] == b'Basic realm="acrrelay"'
        h.close(client)
    assert h.reactor.tcpClients == []
    assert h.relay.stats.refused["auth_required"] == 4


def test_connect_with_good_credentials_is_routed(users_file: Path) -> None:
    """The right user and password (htpasswd $2y$ bcrypt) let CONNECT through, logged by user."""
    h = Harness(USERS_TOML.format(users=users_file))
    protocol, client = connect_with(h, basic("ci", "s3cret"))
    assert protocol.state is State.CONNECTING
    backend_protocol, _ = h.connect_backend()
    assert client.value().startswith(b"HTTP/1.1 200 ")
    protocol.readConnectionLost()
    backend_protocol.readConnectionLost()
    protocol.connectionLost(Failure(ConnectionDone()))
    backend_protocol.connectionLost(Failure(ConnectionDone()))
    assert h.events[-1]["user"] == "ci"


HTTP_USERS_TOML = USERS_TOML.replace('protocols = ["connect"]', 'protocols = ["connect", "http"]')
PROXIED_GET = (
    f"GET http://{REGISTRY}/v2/ HTTP/1.1\r\nHost: {REGISTRY}\r\n"
    "User-Agent: docker/27\r\n{auth}Connection: keep-alive\r\nAccept: */*\r\n\r\n"
)


def test_plain_http_on_a_listener_with_users_needs_proxy_authorization(users_file: Path) -> None:
    """Users apply to every request on the listener: plain HTTP too, not just CONNECT."""
    h = Harness(HTTP_USERS_TOML.format(users=users_file))
    for authorization in [None, basic("ci", "wrong")]:
        protocol, client = h.accept()
        header = f"Proxy-Authorization: {authorization}\r\n" if authorization else ""
        protocol.dataReceived(PROXIED_GET.format(auth=header).encode())
        status, headers, _ = response_of(client.value())
        assert status == 407
        assert headers[b"proxy-authenticate"] == b'Basic realm="acrrelay"'
        h.close(client)
    assert h.reactor.tcpClients == []
    assert h.relay.stats.refused["auth_required"] == 2


def test_plain_http_with_users_consumes_the_credential_and_closes_after_one_request(
    users_file: Path,
) -> None:
    """The backend never sees the relay's credential: the head goes on without
    Proxy-Authorization and with Connection: close; the body is byte-exact; a later
    request on the connection is refused rather than forwarded with the credential."""
    h = Harness(HTTP_USERS_TOML.format(users=users_file))
    protocol, client = h.accept()
    header = f"Proxy-Authorization: {basic('ci', 's3cret')}\r\n"
    head = (
        f"PUT http://{REGISTRY}/v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: {REGISTRY}\r\n"
        f"{header}Proxy-Connection: keep-alive\r\nContent-Length: 10\r\n\r\n"
    ).encode()
    protocol.dataReceived(head + b"01234")
    _, backend = h.connect_backend()
    protocol.dataReceived(b"56789")
    forwarded = backend.value()
    assert (
        forwarded
        == (
            f"PUT http://{REGISTRY}/v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: {REGISTRY}\r\n"
            "Content-Length: 10\r\nConnection: close\r\n\r\n0123456789"
        ).encode()
    )
    assert b"s3cret" not in forwarded and b"Basic" not in forwarded
    protocol.dataReceived(PROXIED_GET.format(auth=header).encode())
    assert backend.value() == forwarded  # nothing more
    assert client.disconnected and backend.disconnected
    backend.protocol.connectionLost(Failure(ConnectionLost()))
    closed(client)
    assert h.events[-1]["close_reason"] == "refused:one_request_with_auth"
    assert h.events[-1]["user"] == "ci"


def test_without_users_plain_http_is_forwarded_byte_exact(users_file: Path) -> None:
    """Without users the relay asks for no credential and so consumes none."""
    h = Harness(FRONT)
    protocol, _ = h.accept()
    request = PROXIED_GET.format(auth=f"Proxy-Authorization: {basic('a', 'b')}\r\n").encode()
    protocol.dataReceived(request)
    _, backend = h.connect_backend()
    assert backend.value() == request


def test_a_request_that_arrives_while_connecting_meets_the_follower() -> None:
    """Bytes read while the backend connects are checked before they are kept for it."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    first = b"GET /a HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\n\r\n"
    protocol.dataReceived(first)
    assert protocol.state is State.CONNECTING
    protocol.dataReceived(OTHER_HOST)
    assert client.disconnecting
    assert response_of(client.value())[0] == 403
    h.close(client)
    assert h.relay.stats.refused["host_switch"] == 1


@pytest.mark.parametrize(
    ("stream", "spliced_up"),
    [(HELLO, True), (b"GET /a HTTP/1.1\r\nHost: " + REGISTRY.encode() + b"\r\n\r\n", False)],
    ids=["tls", "http"],
)
def test_plain_http_never_moves_the_clients_bytes_past_the_follower(
    stream: bytes, spliced_up: bool
) -> None:
    """On plain HTTP the client's direction stays off splice(2), where the follower could
    not see later requests; TLS and the backend's direction may use it."""
    h = Harness(FRONT)
    protocol, _ = h.accept()
    protocol.dataReceived(stream)
    h.connect_backend()
    assert protocol.pump is not None
    assert protocol.pump._zero_copy_up is (spliced_up and protocol.pump._zero_copy)
    assert protocol.pump._zero_copy is h.relay.config.zero_copy


def test_ipv4_clients_on_dual_stack_sockets_are_logged_and_counted_as_ipv4() -> None:
    """::ffff:198.51.100.9 is 198.51.100.9 in logs, ACLs and per-client counts."""
    h = Harness(FRONT)
    protocol = h.factory.buildProtocol(None)
    assert protocol is not None
    transport = PipeEnd(("::ffff:198.51.100.9", 40000))
    protocol.makeConnection(transport)
    assert protocol.session.client == "198.51.100.9:40000"
    assert protocol.session.client_host == "198.51.100.9"
    assert h.relay.per_client["198.51.100.9"] == 1


def test_no_connection_is_taken_while_draining() -> None:
    """A listener that has not closed yet when a drain starts takes no one new."""
    h = Harness(FRONT)
    h.relay.draining = True
    assert h.factory.buildProtocol(None) is None
    assert h.relay.stats.refused["draining"] == 1


def test_a_listener_without_connect_refuses_it() -> None:
    """CONNECT on a listener that does not list it is refused, not tunnelled."""
    h = Harness(FRONT.replace('["tls", "http", "connect"]', '["tls", "http"]'))
    protocol, client = h.accept()
    protocol.dataReceived(f"CONNECT {REGISTRY}:443 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert response_of(client.value())[0] == 403
    h.close(client)
    assert h.relay.stats.refused["protocol_not_allowed"] == 1


def test_a_tls_only_listener_refuses_http_without_answering() -> None:
    """A TLS-only listener closes on HTTP bytes, as in issue 2 (not_tls, no answer)."""
    h = Harness()
    protocol, client = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: registry.cn-beijing.aliyuncs.com\r\n\r\n")
    assert client.disconnecting and client.value() == b""
    h.close(client)
    assert h.relay.stats.refused["not_tls"] == 1


# -- PROXY protocol


def test_proxy_header_from_a_trusted_peer_names_the_client() -> None:
    """A PROXY v2 header in three reads makes its source the client; the peer is logged too."""
    h = Harness(FRONT)
    protocol, _ = h.accept(("10.9.1.1", 55000))
    header = encode_v2(("198.51.100.20", 41000), ("10.9.0.1", 443))
    stream = header + HELLO
    for piece in (stream[:3], stream[3:15], stream[15:]):
        protocol.dataReceived(piece)
    assert protocol.session.client == "198.51.100.20:41000"
    assert protocol.session.peer == "10.9.1.1:55000"
    backend_protocol, backend = h.connect_backend()
    assert backend.value() == HELLO  # the header is not passed on
    protocol.session.kill()
    protocol.connectionLost(Failure(ConnectionLost()))
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["client"] == "198.51.100.20:41000"
    assert h.events[-1]["peer"] == "10.9.1.1:55000"


def test_proxy_header_from_anyone_else_is_refused() -> None:
    """An untrusted peer that sends a PROXY header is refused, v1 or v2."""
    for header in (encode_v1(("1.2.3.4", 1), ("5.6.7.8", 443)), encode_v2(("1.2.3.4", 1), None)):
        h = Harness(FRONT)
        protocol, client = h.accept(("192.0.2.50", 40000))
        for i in range(len(header)):
            protocol.dataReceived(header[i : i + 1])
            if client.disconnecting:
                break
        assert client.disconnecting
        h.close(client)
        assert h.relay.stats.refused["proxy_untrusted"] == 1
        assert h.reactor.tcpClients == []


def test_a_trusted_peer_must_send_a_header() -> None:
    """From a trusted network, a connection that starts with TLS instead is refused."""
    h = Harness(FRONT)
    protocol, client = h.accept(("10.9.1.1", 55000))
    protocol.dataReceived(HELLO)
    assert client.disconnecting
    h.close(client)
    assert h.relay.stats.refused["proxy_missing"] == 1


def test_acl_applies_to_the_client_in_the_proxy_header() -> None:
    """The header's client, not the load balancer, meets the ACL."""
    h = Harness(FRONT)
    protocol, client = h.accept(("10.9.1.1", 55000))
    protocol.dataReceived(encode_v1(("203.0.113.9", 1234), ("10.9.0.1", 443)) + HELLO)
    assert client.disconnecting
    h.close(client)
    assert h.relay.stats.refused["client_denied"] == 1
    assert h.reactor.tcpClients == []


def test_outbound_proxy_v2_names_the_client() -> None:
    """A route with proxy_protocol = "v2" sends the client's address first, then the bytes."""
    h = Harness(FRONT)
    protocol, _ = h.accept(("192.0.2.7", 40001))
    hello = client_hello_bytes("proxied.example.com")
    protocol.dataReceived(hello)
    _, backend = h.connect_backend()
    header, rest = ProxyHeaderReader().feed(backend.value())  # type: ignore[misc]
    assert header.version == 2 and header.command == "proxy"
    assert header.source == ("192.0.2.7", 40001)
    assert header.destination == ("127.0.0.1", 443)
    assert rest == hello


# -- ACL and limits


def test_denied_clients_are_refused_before_reading() -> None:
    """A client in a denied network is closed at once, with nothing read or answered."""
    h = Harness(FRONT)
    _, client = h.accept(("203.0.113.77", 40000))
    assert client.disconnecting and client.value() == b""
    h.close(client)
    assert h.relay.stats.refused["client_denied"] == 1


def test_allow_list_admits_only_its_networks() -> None:
    """With an allow list, other clients are refused; IPv4-mapped addresses count as IPv4."""
    h = Harness(FRONT.replace('deny = ["203.0.113.0/24"]', 'allow = ["192.0.2.0/24"]'))
    assert not h.accept(("192.0.2.1", 1))[1].disconnecting
    assert not h.accept(("::ffff:192.0.2.1", 1))[1].disconnecting
    assert h.accept(("198.51.100.1", 1))[1].disconnecting


LIMITS = """
[relay]
max_connections = 3
max_connections_per_client = 2
[[listen]]
endpoint = "tcp:443"
[[route]]
name = "registry.cn-beijing.aliyuncs.com"
backend = "tcp:host=10.1.1.1:port=443"
"""


def test_per_client_limit() -> None:
    """A third connection from one client is refused; others are not; a close frees a slot."""
    h = Harness(LIMITS)
    first, _ = h.accept(("192.0.2.1", 1))
    h.accept(("192.0.2.1", 2))
    _, third = h.accept(("192.0.2.1", 3))
    assert third.disconnecting
    h.close(third)
    assert h.relay.stats.refused["client_limit"] == 1
    closed(third)
    first.connectionLost(Failure(ConnectionLost()))
    _, again = h.accept(("192.0.2.1", 4))
    assert not again.disconnecting


class FakePort:
    reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


def test_global_limit_pauses_accepting() -> None:
    """At max_connections the listening ports stop reading, and start again below it."""
    h = Harness(LIMITS)
    port = FakePort()
    h.relay.watch_ports([port])
    connections = [h.accept((f"192.0.2.{i}", 1))[0] for i in range(3)]
    assert not port.reading
    assert h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 1)) is None
    assert h.relay.stats.refused["over_limit"] == 1
    connections[0].connectionLost(Failure(ConnectionLost()))
    assert port.reading
    assert h.relay.stats.limit_pauses == 1


def test_a_reload_that_raises_the_limit_resumes_accepting_at_once() -> None:
    """Paused at max_connections, a reload with a higher limit starts accepting again
    without waiting for a connection to close."""
    h = Harness(LIMITS)
    port = FakePort()
    h.relay.watch_ports([port])
    for i in range(3):
        h.accept((f"192.0.2.{i}", 1))
    assert not port.reading
    h.relay.apply(parse_config(LIMITS.replace("max_connections = 3", "max_connections = 10")))
    assert port.reading and h.relay.accepting


class FakeTCPPort(FakePort):
    """What the accept cap wraps: a TCP port's accept pass and its batch size."""

    def __init__(self) -> None:
        self.numberAccepts = 100
        self.passes = 0

    def doRead(self) -> None:
        self.passes += 1


def test_reloads_never_stack_the_accept_cap() -> None:
    """Every reload watches the ports again; the accept pass is wrapped once, however
    many reloads (nested wrappers hit the recursion limit after about a thousand)."""
    h = Harness(LIMITS)
    port = FakeTCPPort()
    for _ in range(2000):
        h.relay.watch_ports([port])
    port.doRead()
    assert port.passes == 1
    assert port.numberAccepts <= h.relay.max_connections


# -- resolved-address safety


@pytest.mark.parametrize(
    ("name", "denied"),
    [
        ("loopback.example.com", "127.0.0.1 (in 127.0.0.0/8), ::1 (in ::1/128)"),
        ("meta.oss-cn-beijing.aliyuncs.com", "100.100.100.200 (in 100.100.100.200/32)"),
    ],
)
def test_resolve_never_connects_to_denied_addresses(name: str, denied: str) -> None:
    """A name resolving to loopback or the metadata service is refused, with what was denied."""
    h = Harness(FRONT)
    protocol, client = h.accept()
    protocol.dataReceived(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
    assert h.reactor.tcpClients == []
    status, _, body = response_of(client.value())
    assert status == 502
    assert denied in body.decode()
    h.close(client)
    assert h.relay.stats.backend_failures["address_denied"] == 1


def test_a_route_may_allow_a_denied_address() -> None:
    """allow_addresses on a route lets resolve reach what the deny-list would refuse."""
    h = Harness(FRONT)
    protocol, _ = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: allowed-loopback.example.com\r\n\r\n")
    assert [(host, port) for host, port, *_ in h.reactor.tcpClients] == [("127.0.0.1", 80)]


#: One address in each default network, IPv4 and IPv6 (IPv4-mapped included), with the
#: network that must deny it.
DENIED_EXAMPLES = [
    ("127.0.0.1", "127.0.0.0/8"),
    ("127.255.255.254", "127.0.0.0/8"),
    ("::ffff:127.0.0.1", "127.0.0.0/8"),
    ("::1", "::1/128"),
    ("0.0.0.0", "0.0.0.0/8"),
    ("0.1.2.3", "0.0.0.0/8"),
    ("::", "::/128"),
    ("169.254.169.254", "169.254.0.0/16"),
    ("169.254.0.1", "169.254.0.0/16"),
    ("::ffff:169.254.169.254", "169.254.0.0/16"),
    ("fe80::1", "fe80::/10"),
    ("febf:ffff::1", "fe80::/10"),
    ("224.0.0.1", "224.0.0.0/4"),
    ("239.255.255.250", "224.0.0.0/4"),
    ("::ffff:224.0.0.251", "224.0.0.0/4"),
    ("ff02::1", "ff00::/8"),
    ("ff0e::fb", "ff00::/8"),
    ("255.255.255.255", "255.255.255.255/32"),
    ("100.100.100.200", "100.100.100.200/32"),
    ("::ffff:100.100.100.200", "100.100.100.200/32"),
]


def test_every_default_network_has_a_denied_example() -> None:
    """The examples below cover every network of DENIED_NETWORKS, and only those."""
    assert {network for _, network in DENIED_EXAMPLES} == {str(n) for n in DENIED_NETWORKS}


def _resolving_to(*addresses: str) -> str:
    """FRONT, with probe.oss-cn-beijing.aliyuncs.com (a resolve route) resolving there."""
    listed = ", ".join(f'"{address}"' for address in addresses)
    return FRONT + f'"probe.oss-cn-beijing.aliyuncs.com" = [{listed}]\n'


@pytest.mark.parametrize(("address", "network"), DENIED_EXAMPLES)
def test_resolve_never_connects_into_a_default_denied_network(address: str, network: str) -> None:
    """A resolve route whose name resolves into any default network is refused (502,
    address_denied) before connecting, and the answer names that network."""
    h = Harness(_resolving_to(address))
    protocol, client = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: probe.oss-cn-beijing.aliyuncs.com\r\n\r\n")
    assert h.reactor.tcpClients == []
    status, _, body = response_of(client.value())
    assert status == 502
    shown = str(ipaddress.ip_address(address))  # as the resolver writes it
    assert f"{shown} (in {network})" in body.decode()
    h.close(client)
    assert h.relay.stats.backend_failures["address_denied"] == 1


@pytest.mark.parametrize(
    "address",
    ["100.100.100.201", "169.253.255.255", "169.255.0.1", "223.255.255.255", "1.0.0.0",
     "255.255.255.254", "fec0::1", "fe7f::1", "2001:db8::1"],
)  # fmt: skip
def test_resolve_connects_just_outside_the_deny_list(address: str) -> None:
    """Addresses next to the denied networks are not denied: the list is no wider than it says."""
    h = Harness(_resolving_to(address))
    protocol, _ = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: probe.oss-cn-beijing.aliyuncs.com\r\n\r\n")
    assert [host for host, *_ in h.reactor.tcpClients] == [address]


def test_resolve_skips_denied_addresses_and_uses_the_rest() -> None:
    """A name with a denied and an allowed address connects to the allowed one only."""
    h = Harness(_resolving_to("169.254.169.254", "10.2.2.3"))
    protocol, _ = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: probe.oss-cn-beijing.aliyuncs.com\r\n\r\n")
    h.reactor.advance(1)  # HostnameEndpoint staggers its attempts
    assert [host for host, *_ in h.reactor.tcpClients] == ["10.2.2.3"]


def test_resolve_never_connects_to_the_relay_itself() -> None:
    """The relay's own listening address is denied: a self-loop."""
    h = Harness(FRONT)
    h.relay.connector.guard.set_own({(ipaddress.ip_address("10.2.2.2"), 80)})
    protocol, client = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: bkt.oss-cn-beijing.aliyuncs.com\r\n\r\n")
    assert h.reactor.tcpClients == []
    assert b"the relay itself" in client.value()


def test_allow_addresses_never_allows_the_relay_itself() -> None:
    """A route's allow_addresses opens the deny-list, not a loop: the relay's own address
    stays refused on a route that allows its network."""
    h = Harness(FRONT)
    h.relay.connector.guard.set_own({(ipaddress.ip_address("127.0.0.1"), 80)})
    protocol, client = h.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: allowed-loopback.example.com\r\n\r\n")
    assert h.reactor.tcpClients == []
    status, _, body = response_of(client.value())
    assert status == 502 and b"127.0.0.1 (the relay itself)" in body
    h.close(client)
    assert h.relay.stats.backend_failures["address_denied"] == 1


@pytest.mark.parametrize(
    ("own", "host", "port", "why"),
    [
        ("127.0.0.1", "127.0.0.1", 8443, "the relay itself"),
        ("127.0.0.1", "127.0.0.2", 8443, "the relay itself"),  # any 127/8 reaches 0.0.0.0
        ("127.0.0.1", "0.0.0.0", 8443, "the relay itself"),  # Linux connects it to loopback
        ("127.0.0.1", "::ffff:127.0.0.1", 8443, "the relay itself"),
        ("::1", "::", 8443, "the relay itself"),
        ("::ffff:10.0.0.5", "10.0.0.5", 8443, "the relay itself"),
        ("10.0.0.5", "::ffff:10.0.0.5", 8443, "the relay itself"),
        ("10.0.0.5", "10.0.0.5", 8444, None),
        ("10.0.0.5", "10.0.0.6", 8443, None),
        ("127.0.0.1", "::1", 8443, None),
    ],
)
def test_address_guard_own_check_comes_before_allow_addresses(
    own: str, host: str, port: int, why: str | None
) -> None:
    """Every spelling of the relay's own address:port is refused on a route that allows
    every address; other ports and addresses are not."""
    from acrrelay.routing import Route, parse_pattern

    guard = AddressGuard()
    guard.set_own({(ipaddress.ip_address(own), 8443)})
    everything = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    route = Route(parse_pattern("a.example.com"), "resolve", allow_addresses=everything)
    assert guard.refuse(route, host, port) == why


@pytest.mark.parametrize("encode", ["v1", "v2"])
def test_ipv4_clients_on_dual_stack_sockets_go_out_as_tcp4(encode: str) -> None:
    """A client seen as ::ffff:192.0.2.7 on an IPv6 socket is sent on as TCP4 192.0.2.7."""
    h = Harness(FRONT.replace('proxy_protocol = "v2"', f'proxy_protocol = "{encode}"'))
    protocol, _ = h.accept(("::ffff:192.0.2.7", 40002))
    protocol.dataReceived(client_hello_bytes("proxied.example.com"))
    _, backend = h.connect_backend()
    sent = backend.value()
    if encode == "v1":
        assert sent.startswith(b"PROXY TCP4 192.0.2.7 127.0.0.1 40002 443\r\n")
    else:
        assert sent[12:14] == b"\x21\x11"  # PROXY command, AF_INET over STREAM
    header, _ = ProxyHeaderReader().feed(sent)  # type: ignore[misc]
    assert header.source == ("192.0.2.7", 40002)


def test_authorizing_times_out_when_the_password_check_never_answers(users_file: Path) -> None:
    """A password check that never answers (a stuck thread pool) does not hold the
    connection: within the peek timeout it is refused (auth_timeout, 503) and closed, no
    timer is left behind, and a late answer connects nothing."""
    held: list[Deferred[bool]] = []

    def hold(f: object, *args: object) -> Deferred[bool]:
        held.append(Deferred())
        return held[-1]

    h = Harness(USERS_TOML.format(users=users_file), auth_runner=hold)
    _, client = connect_with(h, basic("ci", "s3cret"))
    assert len(held) == 1 and client.producerState == "paused"
    h.reactor.advance(3600)
    assert client.disconnecting
    assert response_of(client.value())[0] == 503
    h.close(client)
    assert h.events[-1]["close_reason"] == "refused:auth_timeout"
    assert h.relay.connections == {}
    assert h.reactor.getDelayedCalls() == []
    held[0].callback(True)  # the check answers after all: nothing happens
    assert h.reactor.tcpClients == []
