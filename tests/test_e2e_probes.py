"""End to end, the open-relay probe suite: every front door, every trick, real sockets.

One relay has a front listener with all three doors (TLS by SNI, plain HTTP by Host or
absolute URI, CONNECT) and a TLS-only listener whose target port is a loopback
backend's, for the ``resolve`` routes. Every loopback backend reports each connection
it accepts and each request head it reads (``tls_backend.py``), so a forbidden probe
that leaked anywhere shows up even if the client saw nothing unusual.

Each probe connects from its own loopback source address (127.1.x.y), so its access-log
entry is found by client address alone.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from acrrelay import zerocopy
from tests.e2e_support import (
    DOCKERAUTH,
    OPEN_LOOPBACK,
    REGISTRY,
    WILD_NAME,
    BackendServer,
    NoEOF,
    Relay,
    TestCA,
    hello_with_sni,
    read_all,
    read_response,
    recv_to_eof,
    split_http,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

#: ``resolve`` routes whose names map (in [resolver.hosts]) to addresses the guard denies.
LOOPBACK = "loopback.e2e.test"  # 127.0.0.1, without allow_addresses
METADATA = "metadata.e2e.test"  # 100.100.100.200, the Alibaba Cloud metadata service
#: Allowed names whose routes have explicit backends (WILD_NAME by *.wild.e2e.test).
EXPLICIT = (REGISTRY, DOCKERAUTH, WILD_NAME)
FRONT = "front"
TLS_RESOLVE = "tls-resolve"
ALERT_UNRECOGNIZED_NAME = 112
ALERT_INTERNAL_ERROR = 80


@pytest.fixture(scope="module")
def probe_relay(
    frontdoor_backend: BackendServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """The relay every probe is tried against (see the module docstring)."""
    resolve_port = frontdoor_backend.ports[OPEN_LOOPBACK]
    relay = Relay(
        tmp_path_factory.mktemp("probe-relay"),
        {
            REGISTRY: frontdoor_backend.backend(REGISTRY),
            DOCKERAUTH: frontdoor_backend.backend(DOCKERAUTH),
            "*.wild.e2e.test": frontdoor_backend.backend(WILD_NAME),
            OPEN_LOOPBACK: {
                "backend": "resolve",
                "ports": [resolve_port],
                "allow_addresses": ["127.0.0.0/8"],
            },
            LOOPBACK: {"backend": "resolve", "ports": [resolve_port]},
            METADATA: {"backend": "resolve", "ports": [resolve_port]},
        },
        listeners=[
            {
                "endpoint": "tcp:0:interface=127.0.0.1",
                "name": FRONT,
                "protocols": ["tls", "http", "connect"],
            },
            {
                "endpoint": "tcp:port=0:interface=127.0.0.1",
                "name": TLS_RESOLVE,
                "protocols": ["tls"],
                "target_port": resolve_port,
            },
        ],
        hosts={OPEN_LOOPBACK: "127.0.0.1", LOOPBACK: "127.0.0.1", METADATA: "100.100.100.200"},
    )
    try:
        yield relay
    finally:
        relay.stop()


# ---------------------------------------------------------------- probes and their answers


@attrs.define
class Answer:
    """What a probe's client got back, classified."""

    raw: bytes
    hung: bool = False

    @property
    def kind(self) -> str:
        raw = self.raw
        if self.hung:
            return f"hung after {raw[:40]!r}"
        if not raw:
            return "close"
        if raw[0] == 0x15 and len(raw) >= 7:
            return f"alert {raw[6]}"
        if raw.startswith(b"HTTP/1."):
            status = int(raw.split(b" ", 2)[1])
            relay_said = raw.partition(b"\r\n\r\n")[2].startswith(b"acrrelay: ")
            return f"http {status}" + ("" if relay_said else " from a backend")
        return f"other {raw[:12]!r}"

    @property
    def refused(self) -> bool:
        """A TLS alert, the relay's own HTTP error, or a bare close: nothing got through."""
        kind = self.kind
        if kind == "close" or kind.startswith("alert "):
            return True
        if kind.startswith("http ") and not kind.endswith("from a backend"):
            return int(kind.split()[1]) >= 400
        return False


@attrs.define
class Probe:
    """One forbidden thing tried on one front door."""

    door: str  # sni, host, uri, connect, or a smuggling trick
    target: str  # what was asked for, for the report
    listener: str
    payload: bytes
    #: The access log's close_reason it must get.
    reason: str
    source: str = ""
    answer: Answer | None = None
    accepts_during: int = 0

    def __str__(self) -> str:
        return f"{self.door} {self.target!r} on {self.listener}"


class Sources:
    """A fresh loopback source address per connection: 127.1.0.1, 127.1.0.2, ..."""

    def __init__(self) -> None:
        self._n = 0
        self.given: list[str] = []

    def next(self) -> str:
        self._n += 1
        source = f"127.1.{self._n // 250}.{self._n % 250 + 1}"
        self.given.append(source)
        return source


class Accepts:
    """The backend's accepts, counted again after each step of the test, so each accept
    falls in exactly one step, however late it came: a step that should have made one
    connection and sees two, or a refusal that sees any, is caught, and a late accept
    fails the step it shows up in (at the latest the final one) instead of going unseen.

    Each count is exact as of the moment it is taken (``BackendServer.sync``): the
    backend has reported every connection made before it."""

    def __init__(self, backend: BackendServer) -> None:
        self.backend = backend
        self._counts = backend.accept_counts()

    def step(self) -> dict[str, int]:
        """The accepts since the last step, by backend name (names with none left out)."""
        now = self.backend.accept_counts()
        new = {name: now[name] - self._counts[name] for name in now}
        self._counts = now
        return {name: n for name, n in new.items() if n}


def expected_answers(probe: Probe) -> tuple[str, ...]:
    """How each door says no: TLS with an alert, HTTP and CONNECT with the relay's own error
    (4xx for a refusal, 502 for a denied address), a listener without the door by closing."""
    if probe.reason == "refused:not_tls":
        return ("close",)
    tls = probe.door == "sni"
    if probe.reason == "address_denied":
        return (f"alert {ALERT_INTERNAL_ERROR}",) if tls else ("http 502",)
    if tls:
        return (f"alert {ALERT_UNRECOGNIZED_NAME}",)
    return ("http 400",) if probe.reason == "refused:malformed" else ("http 403",)


def _exchange(relay: Relay, listener: str, source: str, payload: bytes) -> Answer:
    with relay.connect(listener=listener, source=source, timeout=5) as sock:
        sock.sendall(payload)
        try:
            return Answer(recv_to_eof(sock, timeout=5))
        except NoEOF as e:
            return Answer(e.data, hung=True)


def _host_head(host: bytes, target: bytes = b"/name") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"


def _uri_head(authority: bytes) -> bytes:
    return (
        b"GET http://" + authority + b"/name HTTP/1.1\r\nHost: " + authority
        + b"\r\nConnection: close\r\n\r\n"
    )  # fmt: skip


def _connect_head(authority: bytes) -> bytes:
    return b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority + b"\r\n\r\n"


def _hello_with_empty_sni() -> bytes:
    """A real OpenSSL ClientHello whose server_name extension lists one host_name of zero
    length (not a hello without the extension), with every length field made right."""
    hello = hello_with_sni(b"x")
    assert hello[0] == 0x16 and hello[5] == 1, hello[:6]
    body = hello[9 : 9 + int.from_bytes(hello[6:9], "big")]
    pos = 2 + 32
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression methods
    head, end = body[:pos], pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    extensions = b""
    found = False
    while pos < end:
        kind, size = struct.unpack("!HH", body[pos : pos + 4])
        data = body[pos + 4 : pos + 4 + size]
        pos += 4 + size
        if kind == 0:
            data, found = b"\x00\x03" + b"\x00" + b"\x00\x00", True  # list: host_name, ""
        extensions += struct.pack("!HH", kind, len(data)) + data
    assert found and pos == end == len(body)
    body = head + struct.pack("!H", len(extensions)) + extensions
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return hello[:3] + struct.pack("!H", len(handshake)) + handshake


NOT_ALLOWED = "refused:not_allowed"
IP_LITERAL = "refused:ip_literal"
MALFORMED = "refused:malformed"
PORT_NOT_ALLOWED = "refused:port_not_allowed"
UPGRADE_REFUSED = "refused:upgrade_refused"
#: What the relay logs for a refused *later* request that would switch protocols.
LATER_REFUSED = (UPGRADE_REFUSED,)

#: Forbidden host names, each with the refusal it must get (before any port is checked).
FORBIDDEN_HOSTS: list[tuple[bytes, str]] = [
    # unknown names
    (b"unknown.e2e.test", NOT_ALLOWED),
    (b"registry.cn-shanghai.aliyuncs.com", NOT_ALLOWED),
    # IPv4 literals in every inet_aton form: refused as such, whatever the routes say
    (b"127.0.0.1", IP_LITERAL),
    (b"2130706433", IP_LITERAL),
    (b"0177.0.0.1", IP_LITERAL),
    (b"0x7f000001", IP_LITERAL),
    (b"127.1", IP_LITERAL),
    (b"0x7f.1", IP_LITERAL),
    # IPv6 literals are not host names at all
    (b"[::1]", MALFORMED),
    (b"::1", MALFORMED),
    (b"[::ffff:127.0.0.1]", MALFORMED),
    # look-alikes of allowed names
    (REGISTRY.encode() + b".evil.example", NOT_ALLOWED),
    (b"evil" + REGISTRY.encode(), NOT_ALLOWED),
    (REGISTRY.encode()[:-1], NOT_ALLOWED),
    (b"wild.e2e.test", NOT_ALLOWED),  # the bare suffix of *.wild.e2e.test
    (b"a.evilwild.e2e.test", NOT_ALLOWED),
    (WILD_NAME.encode() + b".evil.example", NOT_ALLOWED),
    (b"*.wild.e2e.test", MALFORMED),
    # forbidden names dressed up
    (b"unknown.e2e.test.", NOT_ALLOWED),
    (b"UnKnown.E2E.Test", NOT_ALLOWED),
    (b"UNKNOWN.E2E.TEST.", NOT_ALLOWED),
    (b"unknown.e2e.test..", MALFORMED),
    (b"xn--rgistry-fya.cn-beijing.aliyuncs.com", NOT_ALLOWED),  # punycode of r\u00e9gistry
    ("r\u00e9gistry.cn-beijing.aliyuncs.com".encode(), MALFORMED),  # raw UTF-8
    ("registry\u3002cn-beijing.aliyuncs.com".encode(), MALFORMED),  # ideographic full stop
    (REGISTRY.encode() + b"\x00.evil.example", MALFORMED),
    (REGISTRY.encode() + b"%2eevil.example", MALFORMED),
    # blanks inside the target (a Host value's surrounding blanks are not part of it, so
    # these go only where they are part of the target: the SNI is skipped for them too)
    (REGISTRY.encode() + b" ", MALFORMED),
    (b" " + REGISTRY.encode(), MALFORMED),
]


def forbidden_probes(resolve_port: int) -> list[Probe]:
    """The table: each forbidden target on every front door that can express it."""
    port = str(resolve_port).encode()
    probes: list[Probe] = []
    for name, reason in FORBIDDEN_HOSTS:
        bare = name[1:-1] if name.startswith(b"[") else name
        blanks = name.strip(b" ") != name
        if not blanks:
            probes.append(Probe("sni", repr(bare), FRONT, hello_with_sni(bare), reason))
            probes.append(Probe("host", repr(name), FRONT, _host_head(name), reason))
        probes.append(Probe("uri", repr(name), FRONT, _uri_head(name), reason))
        probes.append(Probe("connect", repr(name), FRONT, _connect_head(name + b":443"), reason))
        # The same at a port where a loopback backend really listens: a leak of an IP
        # literal or of an unknown name would be caught there by the backend's report.
        with_port = name + b":" + port
        if not blanks:
            probes.append(Probe("host", repr(with_port), FRONT, _host_head(with_port), reason))
            probes.append(Probe("sni", repr(bare), TLS_RESOLVE, hello_with_sni(bare), reason))
        probes.append(Probe("connect", repr(with_port), FRONT, _connect_head(with_port), reason))

    # Allowed names at ports their routes do not allow (or at no valid port at all).
    registry = REGISTRY.encode()
    bad_ports = [(b":22", PORT_NOT_ALLOWED), (b":8080", PORT_NOT_ALLOWED)]
    bad_ports += [(b":" + port, PORT_NOT_ALLOWED), (b":0", MALFORMED), (b":65536", MALFORMED)]
    bad_ports += [(b":0443", MALFORMED), (b":+80", MALFORMED)]
    for suffix, reason in bad_ports:
        authority = registry + suffix
        what = repr(authority)
        probes.append(Probe("host", what, FRONT, _host_head(authority), reason))
        probes.append(Probe("uri", what, FRONT, _uri_head(authority), reason))
        probes.append(Probe("connect", what, FRONT, _connect_head(authority), reason))
    probes.append(
        Probe("connect", "127.0.0.1:22", FRONT, _connect_head(b"127.0.0.1:22"), IP_LITERAL)
    )
    probes.append(Probe("connect", "[::1]:22", FRONT, _connect_head(b"[::1]:22"), MALFORMED))
    # An allowed name on a TLS-only listener whose target port its route does not allow.
    probes.append(Probe("sni", REGISTRY, TLS_RESOLVE, hello_with_sni(registry), PORT_NOT_ALLOWED))
    # Allowed names through doors that listener does not open: closed unanswered.
    not_tls = "refused:not_tls"
    probes.append(Probe("host", REGISTRY, TLS_RESOLVE, _host_head(registry), not_tls))
    probes.append(
        Probe("connect", REGISTRY, TLS_RESOLVE, _connect_head(registry + b":443"), not_tls)
    )

    # Names that resolve to loopback (no allow_addresses) or to the metadata service:
    # routed, then refused by the address guard before any connection is tried.
    for resolved in (LOOPBACK, METADATA):
        for variant in (resolved, resolved + ".", resolved.upper()):
            raw = variant.encode()
            with_port = raw + b":" + port
            denied = "address_denied"
            probes.append(Probe("sni", variant, TLS_RESOLVE, hello_with_sni(raw), denied))
            probes.append(Probe("host", variant, FRONT, _host_head(with_port), denied))
            probes.append(Probe("uri", variant, FRONT, _uri_head(with_port), denied))
            probes.append(Probe("connect", variant, FRONT, _connect_head(with_port), denied))
        # At a port the route does not allow: refused by policy, before resolving.
        probes.append(
            Probe("host", resolved + ":80", FRONT, _host_head(resolved.encode()), PORT_NOT_ALLOWED)
        )

    # A hello without SNI, then a valid Host: the TLS door does not fall back to HTTP.
    no_sni = hello_with_sni(None)
    probes.append(
        Probe("sni", "(no SNI) + Host", FRONT, no_sni + _host_head(registry), "refused:no_sni")
    )
    probes.append(Probe("sni", "(no SNI)", TLS_RESOLVE, no_sni, "refused:no_sni"))
    # The same with an SNI extension whose host_name is empty: refused as malformed.
    empty_sni = _hello_with_empty_sni()
    probes.append(
        Probe("sni", "(empty SNI) + Host", FRONT, empty_sni + _host_head(registry), MALFORMED)
    )
    probes.append(Probe("sni", "(empty SNI)", TLS_RESOLVE, empty_sni, MALFORMED))

    # Request smuggling in one write: the second request asks for another host.
    dockerauth = DOCKERAUTH.encode()
    switch = "refused:host_switch"
    pipelined = (
        b"GET /name?first HTTP/1.1\r\nHost: " + registry + b"\r\n\r\n"
        + b"GET /name?second HTTP/1.1\r\nHost: " + dockerauth + b"\r\n\r\n"
    )  # fmt: skip
    probes.append(Probe("pipelined", DOCKERAUTH, FRONT, pipelined, switch))
    absolute_pipelined = _uri_head(registry).replace(b"close", b"keep-alive") + _uri_head(
        dockerauth
    )
    probes.append(Probe("pipelined", "absolute URI", FRONT, absolute_pipelined, switch))
    # A later absolute URI for the first host, whose Host header names another one.
    uri_and_other_host = (
        b"GET http://" + registry + b"/name HTTP/1.1\r\nHost: " + registry + b"\r\n\r\n"
        + b"GET http://" + registry + b"/name HTTP/1.1\r\nHost: " + dockerauth + b"\r\n\r\n"
    )  # fmt: skip
    probes.append(
        Probe("pipelined", "absolute URI + other Host", FRONT, uri_and_other_host, MALFORMED)
    )
    # A CONNECT after a plain request, to another host or to the first one's own host and
    # port (which, unfollowed, would let the request after it through): refused either way.
    first_get = b"GET /name HTTP/1.1\r\nHost: " + registry + b"\r\n\r\n"
    connect_pipelined = first_get + _connect_head(dockerauth + b":443")
    probes.append(Probe("pipelined", "CONNECT", FRONT, connect_pipelined, UPGRADE_REFUSED))
    connect_same = first_get + _connect_head(registry + b":80") + _host_head(b"unknown.e2e.test")
    probes.append(Probe("pipelined", "CONNECT same host", FRONT, connect_same, UPGRADE_REFUSED))

    # Upgrade: refused on the Host and absolute-URI doors, alone, with a request for a
    # forbidden host smuggled after it, and as a later request after an allowed one.
    for upgrade in (b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__", b"Upgrade: websocket"):
        what = upgrade.split(b"\r\n")[0].decode()
        extra = b"\r\nConnection: Upgrade\r\n" + upgrade + b"\r\n\r\n"
        for door, allowed, forbidden in (
            ("host", _host_head(registry), _host_head(b"unknown.e2e.test")),
            ("uri", _uri_head(registry), _uri_head(b"unknown.e2e.test")),
        ):
            with_upgrade = allowed.replace(b"\r\nConnection: close\r\n\r\n", extra)
            assert with_upgrade != allowed
            kept = allowed.replace(b"close", b"keep-alive")
            probes += [
                Probe(door, f"{what} alone", FRONT, with_upgrade, UPGRADE_REFUSED),
                Probe(door, f"{what}, then another host", FRONT, with_upgrade + forbidden,
                      UPGRADE_REFUSED),
                Probe("pipelined", f"{door}: allowed, {what}, then another host", FRONT,
                      kept + with_upgrade + forbidden, UPGRADE_REFUSED),
            ]  # fmt: skip
    smuggled = b"GET /name HTTP/1.1\r\nHost: " + dockerauth + b"\r\n\r\n"
    for framing in (
        # CL.TE and TE.CL: two servers could end the body in different places.
        b"Content-Length: " + str(5 + len(smuggled)).encode() + b"\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 4",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
        b"Transfer-Encoding: xchunked",
        b"Content-Length: 5\r\nContent-Length: 44",
        b"Transfer-Encoding : chunked",
    ):
        payload = (
            b"POST /name HTTP/1.1\r\nHost: " + registry + b"\r\n" + framing + b"\r\n\r\n"
            + b"0\r\n\r\n" + smuggled
        )  # fmt: skip
        probes.append(Probe("smuggle", framing.decode(), FRONT, payload, MALFORMED))
    two_hosts = b"GET /name HTTP/1.1\r\nHost: " + registry + b"\r\nHost: " + dockerauth
    probes.append(Probe("host", "two Host headers", FRONT, two_hosts + b"\r\n\r\n", MALFORMED))
    user_info = _uri_head(registry + b"@" + dockerauth).replace(b"Host: " + registry, b"Host: x")
    probes.append(Probe("uri", "user info in the URI", FRONT, user_info, MALFORMED))
    https_uri = _host_head(registry, b"https://" + registry + b"/")
    probes.append(Probe("uri", "https:// URI", FRONT, https_uri, MALFORMED))
    # An absolute URI for an allowed host whose Host header names another host or port:
    # the bytes go on unchanged, so a virtual-hosting backend would serve Host's site.
    for host in (dockerauth, b"unknown.e2e.test", registry + b":8080", registry + b".evil.example"):
        mismatch = _host_head(host, b"http://" + registry + b"/name")
        probes.append(
            Probe("uri", f"{REGISTRY} with Host {host.decode()}", FRONT, mismatch, MALFORMED)
        )
    return probes


# ---------------------------------------------------------------- allowed controls


def _verified_context(ca: TestCA) -> ssl.SSLContext:
    """The CA's context, minus the host-name check (Python refuses a trailing dot there):
    the chain is still verified and the test checks the leaf's SAN itself."""
    context = ca.client_context()
    context.check_hostname = False
    assert context.verify_mode == ssl.CERT_REQUIRED
    return context


def _tls_get(sock: socket.socket, ca: TestCA, server_name: str, name: str) -> bytes:
    with _verified_context(ca).wrap_socket(sock, server_hostname=server_name) as tls:
        peer = tls.getpeercert()
        assert peer is not None and peer["subjectAltName"] == (("DNS", name),), peer
        tls.sendall(f"GET /name HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        return read_all(tls)


def run_control(
    relay: Relay, ca: TestCA, door: str, variant: str, name: str, port: int | None, source: str
) -> str | None:
    """One allowed request; None if ``name``'s own backend answered it, else what went wrong."""
    authority = variant if port is None else f"{variant}:{port}"
    listener = FRONT
    if door == "sni" and port is not None:
        listener = TLS_RESOLVE
    with relay.connect(listener=listener, source=source, timeout=10) as sock:
        if door == "sni":
            response = _tls_get(sock, ca, variant, name)
        elif door == "connect":
            tunnel = authority if port is not None else f"{variant}:443"
            sock.sendall(_connect_head(tunnel.encode()))
            established = b"HTTP/1.1 200 Connection established\r\n\r\n"
            got = b""
            while len(got) < len(established):
                data = sock.recv(len(established) - len(got))
                if not data:
                    break
                got += data
            if got != established:
                return f"CONNECT answered {got[:80]!r}"
            response = _tls_get(sock, ca, name, name)
        else:
            head = (
                _host_head(authority.encode()) if door == "host" else _uri_head(authority.encode())
            )
            sock.sendall(head)
            response = recv_to_eof(sock, timeout=10)
    try:
        status, _, body = split_http(response)
    except AssertionError:
        return f"no HTTP response: {response[:80]!r}"
    if (status, body) != (200, f"backend={name}\n".encode()):
        return f"got {status} {body[:80]!r}"
    return None


# ---------------------------------------------------------------- the suite


def _entries_by_source(relay: Relay, sources: list[str], timeout: float = 30.0) -> dict[str, Any]:
    """The first access entry from each of ``sources``, once there is one for each of them
    (or after ``timeout``, with whatever there is)."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, dict[str, Any]] = {}
        for entry in relay.access_entries():
            host = entry.get("client", "").rpartition(":")[0]
            found.setdefault(host, entry)
        if all(s in found for s in sources) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_no_front_door_reaches_a_forbidden_target(
    probe_relay: Relay, frontdoor_backend: BackendServer, frontdoor_ca: TestCA
) -> None:
    """Every forbidden target, on every front door, is refused without a byte reaching any
    backend, while every allowed name, in any case and with a trailing dot, works on each."""
    relay, backend = probe_relay, frontdoor_backend
    resolve_port = backend.ports[OPEN_LOOPBACK]
    sources = Sources()
    accepts = Accepts(backend)
    leaks: list[str] = []  # anything that reached a backend it should not have
    failures: list[str] = []  # forbidden probes refused, but not in the expected way
    control_failures: list[str] = []

    # 1. Forbidden probes: nothing may reach any backend.
    probes = forbidden_probes(resolve_port)
    for probe in probes:
        probe.source = sources.next()
        probe.answer = _exchange(relay, probe.listener, probe.source, probe.payload)
        probe.accepts_during = sum(accepts.step().values())
    entries = _entries_by_source(relay, [p.source for p in probes])
    for probe in probes:
        answer = probe.answer
        assert answer is not None
        entry = entries.get(probe.source)
        if probe.accepts_during or not (answer.refused or answer.hung):
            leaks.append(f"{probe}: answered {answer.kind}, backend accepts {probe.accepts_during}")
            continue
        if entry is None:
            failures.append(f"{probe}: answered {answer.kind}, no access-log entry")
            continue
        reason = entry.get("close_reason", "")
        if "backend_address" in entry:
            leaks.append(f"{probe}: access log shows a backend connection: {entry}")
        elif reason != probe.reason:
            failures.append(
                f"{probe}: close_reason {reason!r} ({entry.get('detail')}), "
                f"expected {probe.reason!r}; answered {answer.kind}"
            )
        elif answer.kind not in expected_answers(probe):
            failures.append(f"{probe}: answered {answer.kind}, not {expected_answers(probe)}")
    # The relay has logged, so finished with, every probe's connection: any backend
    # connection it made for one was made before this count.
    late = accepts.step()
    if late:
        leaks.append(f"backends accepted more connections, late: {late}")

    # 2. Smuggling after an allowed request on a live connection: only the first request,
    # and only to the first request's backend.
    smuggled = 0
    for trick in (
        "keep-alive",
        "keep-alive absolute URI",
        "pipelined late",
        "keep-alive port",
        "keep-alive upgrade",
        "keep-alive upgrade absolute URI",
        "keep-alive absolute URI, other Host",
        "keep-alive CONNECT same host",
        "keep-alive after an upload past the splice threshold",
    ):
        source = sources.next()
        problem = _smuggle_after_allowed(relay, accepts, source, trick)
        smuggled += 1
        if problem is not None:
            leaks.append(f"{trick}: {problem}")

    # 3. Allowed controls: each allowed name, on each door, as is, with a trailing dot and
    # in upper case, reaches its own backend exactly once.
    controls = 0
    targets: list[tuple[str, int | None]] = [(name, None) for name in EXPLICIT]
    targets.append((OPEN_LOOPBACK, resolve_port))
    for name, port in targets:
        for variant in (name, name + ".", name.upper()):
            for door in ("sni", "host", "uri", "connect"):
                problem = run_control(
                    relay, frontdoor_ca, door, variant, name, port, sources.next()
                )
                controls += 1
                made = accepts.step()
                if problem is None and made != {name: 1}:
                    problem = f"not exactly one connection, to its own backend: {made}"
                if problem is not None:
                    control_failures.append(f"{door} {variant!r}: {problem}")
    for control in (
        _body_that_looks_like_a_request,
        _uri_and_host_spelled_apart,
        _explicit_port_80,
    ):
        problem = control(relay, accepts, sources)
        controls += 1
        if problem is not None:
            control_failures.append(f"{control.__name__}: {problem}")
    # Every connection of the test is over and logged: nothing may reach a backend after.
    _entries_by_source(relay, sources.given)
    late = accepts.step()
    if late:
        leaks.append(f"backends accepted more connections after the last step: {late}")

    refused = len(probes) + smuggled - len(leaks) - len(failures)
    print(
        f"\nprobes: {refused} refused as expected, {len(leaks)} leaked "
        f"({controls - len(control_failures)} allowed controls passed)"
    )
    reasons: dict[str, int] = {}
    for entry in entries.values():
        reason = entry.get("close_reason", "?")
        reasons[reason] = reasons.get(reason, 0) + 1
    print("refusal reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())))
    assert not leaks, "leaked:\n" + "\n".join(leaks)
    assert not failures, "refused, but not as expected:\n" + "\n".join(failures)
    assert not control_failures, "allowed controls that failed:\n" + "\n".join(control_failures)


def _smuggle_after_allowed(relay: Relay, accepts: Accepts, source: str, trick: str) -> str | None:
    """An allowed request, then one for another host (or port) on the same connection, or
    one for the same host that would hide a third for another host (Upgrade, CONNECT, an
    absolute URI with another Host): None if nothing after the first request reached any
    backend and the connection was cut, else why not."""
    first_host = REGISTRY
    marker = f"/name?{source}"
    method = "GET"
    reasons: tuple[str, ...] = ("refused:host_switch",)
    other = f"GET {marker}-3 HTTP/1.1\r\nHost: {DOCKERAUTH}\r\n\r\n"
    absolute = f"GET http://{REGISTRY}{marker} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n"
    if trick == "keep-alive absolute URI":
        first = absolute
        second = f"GET http://{DOCKERAUTH}{marker}-2 HTTP/1.1\r\nHost: {DOCKERAUTH}\r\n\r\n"
    elif trick == "keep-alive port":
        first = f"GET {marker} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n"
        second = f"GET {marker}-2 HTTP/1.1\r\nHost: {REGISTRY}:443\r\n\r\n"
    elif trick == "keep-alive upgrade":
        first = f"GET {marker} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n"
        second = (
            f"GET {marker}-2 HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: Upgrade\r\n"
            f"Upgrade: h2c\r\n\r\n{other}"
        )
        reasons = LATER_REFUSED
    elif trick == "keep-alive upgrade absolute URI":
        first = absolute
        second = (
            f"GET http://{REGISTRY}{marker}-2 HTTP/1.1\r\nHost: {REGISTRY}\r\n"
            f"Upgrade: websocket\r\n\r\n{other}"
        )
        reasons = LATER_REFUSED
    elif trick == "keep-alive absolute URI, other Host":
        first = absolute
        second = f"GET http://{REGISTRY}{marker}-2 HTTP/1.1\r\nHost: {DOCKERAUTH}\r\n\r\n"
        reasons = (MALFORMED,)
    elif trick == "keep-alive CONNECT same host":
        first = f"GET {marker} HTTP/1.1\r\nHost: {REGISTRY}\r\n\r\n"
        second = f"CONNECT {REGISTRY}:80 HTTP/1.1\r\nHost: {REGISTRY}:80\r\n\r\n{other}"
        reasons = LATER_REFUSED
    elif trick == "keep-alive after an upload past the splice threshold":
        # Once a direction has carried 512 KiB the relay may move it by splice(2), where no
        # Python code sees the bytes: the client's direction on plain HTTP must never.
        size = 2 * zerocopy.PROMOTE_AFTER + 12345
        method = "POST"
        first = (
            f"POST {marker} HTTP/1.1\r\nHost: {REGISTRY}\r\nContent-Length: {size}\r\n\r\n"
            + "x" * size
        )
        second = f"GET {marker}-2 HTTP/1.1\r\nHost: {DOCKERAUTH}\r\n\r\n"
    else:
        first = f"GET {marker} HTTP/1.1\r\nHost: {first_host}\r\n\r\n"
        second = f"GET {marker}-2 HTTP/1.1\r\nHost: {DOCKERAUTH}\r\n\r\n"
    backend = accepts.backend
    with relay.connect(source=source, listener=FRONT, timeout=5) as sock:
        sock.sendall(first.encode())
        try:
            if trick == "pipelined late":
                # Once the backend has read the first, the relay is relaying: the second
                # comes as a later write on a live connection.
                backend.wait_request(marker)
                sock.sendall(second.encode())
                rest = recv_to_eof(sock)
                statuses = rest.count(b"HTTP/1.1 ")
                if b"backend=" + DOCKERAUTH.encode() in rest or statuses > 1:
                    return f"second request answered: {rest[:200]!r}"
            else:
                response = read_response(sock)
                if split_http(response)[2] != f"backend={REGISTRY}\n".encode():
                    return f"first request not served: {response[:120]!r}"
                sock.sendall(second.encode())
                rest = recv_to_eof(sock)
                if rest:
                    return f"second request answered: {rest[:200]!r}"
        except NoEOF as e:
            return f"the connection stayed open after the second request; got {e.data[:200]!r}"
    seen = backend.requests_with(marker)
    target = f"http://{REGISTRY}{marker}" if "absolute" in trick else marker
    if seen != [(REGISTRY, "plain", method, target, REGISTRY)]:
        return f"backends saw {seen}"
    made = accepts.step()
    if made != {REGISTRY: 1}:
        return f"not exactly one backend connection: {made}"
    entry = relay.wait_access(lambda e: e.get("client", "").startswith(source + ":"))[0]
    if entry.get("close_reason") not in reasons:
        return f"close_reason {entry.get('close_reason')!r}, not one of {reasons}"
    return None


def _served_once(
    relay: Relay,
    accepts: Accepts,
    source: str,
    payload: bytes,
    name: str,
    target: str,
) -> str | None:
    """Send one request from ``source``; None if ``name``'s backend alone answered it, over
    one connection, having seen ``target`` (whose query is ``source``) and nothing else."""
    with relay.connect(source=source, listener=FRONT, timeout=5) as sock:
        sock.sendall(payload)
        try:
            response = recv_to_eof(sock)
        except NoEOF as e:
            return str(e)
    if split_http(response)[:3:2] != (200, f"backend={name}\n".encode()):
        return f"got {response[:120]!r}"
    seen = [r[:4] for r in accepts.backend.requests_with(source)]
    if seen != [(name, "plain", payload.split(b" ")[0].decode(), target)]:
        return f"backends saw {seen}"
    made = accepts.step()
    if made != {name: 1}:
        return f"not exactly one backend connection: {made}"
    return None


def _body_that_looks_like_a_request(relay: Relay, accepts: Accepts, sources: Sources) -> str | None:
    """A request body that looks like a request for another host is body, not a request."""
    source = sources.next()
    body = f"GET /name?{source}-body HTTP/1.1\r\nHost: {DOCKERAUTH}\r\n\r\n".encode()
    head = (
        f"POST /name?{source} HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return _served_once(relay, accepts, source, head + body, REGISTRY, f"/name?{source}")


def _uri_and_host_spelled_apart(relay: Relay, accepts: Accepts, sources: Sources) -> str | None:
    """An absolute URI whose Host header names the same target in another spelling (case,
    one trailing dot, an explicit :80) is served by the URI's host. (Another host or port
    in Host is refused: see the probes.)"""
    spellings = [
        (REGISTRY, f"{REGISTRY.upper()}."),
        (f"{REGISTRY}.", REGISTRY),
        (REGISTRY, f"{REGISTRY}:80"),
        (f"{REGISTRY.upper()}:80", f"{REGISTRY}."),
    ]
    for authority, host in spellings:
        source = sources.next()
        target = f"http://{authority}/name?{source}"
        payload = f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        problem = _served_once(relay, accepts, source, payload.encode(), REGISTRY, target)
        if problem is not None:
            return f"{authority} with Host {host}: {problem}"
    return None


def _explicit_port_80(relay: Relay, accepts: Accepts, sources: Sources) -> str | None:
    """Host with the default port written out is the same allowed target."""
    source = sources.next()
    payload = f"GET /name?{source} HTTP/1.1\r\nHost: {DOCKERAUTH}:80\r\nConnection: close\r\n\r\n"
    return _served_once(relay, accepts, source, payload.encode(), DOCKERAUTH, f"/name?{source}")
