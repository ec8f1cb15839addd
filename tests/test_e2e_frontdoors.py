"""End to end, the new front doors with real peers: curl through CONNECT and by Host,
HAProxy's PROXY protocol in front of the relay, PROXY headers sent to a backend,
and the connection limits and client ACLs, up to running out of file descriptors.

The open-relay probes are in ``test_e2e_probes``. Every address is on 127.0.0.0/8;
names are resolved only by curl's ``--resolve``/``--connect-to`` and proxy settings
or by the relay's static ``[resolver.hosts]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import select
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import bcrypt
import psutil
import pytest

from acrrelay.proxyproto import encode_v1, encode_v2
from tests.e2e_support import (
    DOCKERAUTH,
    PROXIED_V1,
    PROXIED_V2,
    REGISTRY,
    BackendServer,
    HAProxy,
    Relay,
    TestCA,
    free_port,
    hello_with_sni,
    read_all,
    recv_to_eof,
    run,
    split_http,
)
from tests.http_backend import HoldingBackend, ProxyCheckingBackend

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

StartRelay = Callable[..., Relay]
HOLD = "hold.e2e.test"


def _listener(name: str, index: int = 0, **keys: Any) -> dict[str, Any]:
    """A [[listen]] table on 127.0.0.1 port 0 (endpoint strings must differ, so vary them)."""
    endpoints = (
        "tcp:0:interface=127.0.0.1",
        "tcp:port=0:interface=127.0.0.1",
        "tcp:interface=127.0.0.1:port=0",
    )
    return {"endpoint": endpoints[index], "name": name, **keys}


def _all_doors(name: str = "front", index: int = 0, **keys: Any) -> dict[str, Any]:
    return _listener(name, index, protocols=["tls", "http", "connect"], **keys)


def _fields(entry: dict[str, Any], *names: str) -> tuple[Any, ...]:
    """The named access-log fields of ``entry``, failing clearly if the log lacks one."""
    missing = [name for name in names if name not in entry]
    assert not missing, f"the access log has no {missing} field(s) in {entry}"
    return tuple(entry[name] for name in names)


def _client(source: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the access entries of connections from ``source`` (an address)."""
    return lambda entry: str(entry.get("client", "")).startswith(source + ":")


def _exactly(client: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the access entry of the connection from ``client`` (address:port)."""
    return lambda entry: entry.get("client") == client


# ---------------------------------------------------------------- curl through CONNECT


def _curl(ca: TestCA, *args: str) -> list[str]:
    return ["curl", "-q", "-sS", "--max-time", "15", "--cacert", str(ca.ca_file), *args]


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    """An htpasswd-style users file: ci / s3cret, bcrypt with the $2y$ prefix htpasswd writes."""
    digest = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(5)).decode()
    assert digest.startswith("$2b$05$")
    path = tmp_path / "users"
    path.write_text(f"# CONNECT users\nci:{'$2y$' + digest[4:]}\n")
    return path


def test_curl_through_connect_verifies_the_backend_end_to_end(
    frontdoor_ca: TestCA,
    frontdoor_backend: BackendServer,
    start_relay: StartRelay,
    users_file: Path,
    home: Path,
) -> None:
    """curl tunnels through CONNECT (by --proxy, by HTTPS_PROXY, and with --proxy-user where
    the listener has users) to the TLS backend, whose certificate it verifies end to end."""
    backend = frontdoor_backend
    relay = start_relay(
        {REGISTRY: backend.backend(REGISTRY), DOCKERAUTH: backend.backend(DOCKERAUTH)},
        listeners=[
            _all_doors(),
            _listener("auth", 1, protocols=["connect"], connect_users=str(users_file)),
        ],
    )
    proxy = f"http://127.0.0.1:{relay.ports['front']}"
    auth_proxy = f"http://127.0.0.1:{relay.ports['auth']}"
    # If curl ever skipped the proxy, it would go to 127.0.0.1:443 (nothing), not to DNS.
    pin = ["--resolve", f"{REGISTRY}:443:127.0.0.1", "--resolve", f"{DOCKERAUTH}:443:127.0.0.1"]

    by_flag = run(_curl(frontdoor_ca, *pin, "--proxy", proxy, f"https://{REGISTRY}/name"), home)
    assert (by_flag.returncode, by_flag.stdout) == (0, f"backend={REGISTRY}\n"), by_flag.stderr

    by_env = run(
        _curl(frontdoor_ca, *pin, f"https://{DOCKERAUTH}/name"),
        home,
        env={"HTTPS_PROXY": proxy},
    )
    assert (by_env.returncode, by_env.stdout) == (0, f"backend={DOCKERAUTH}\n"), by_env.stderr

    refused = run(
        _curl(frontdoor_ca, "--proxy", proxy, "https://unknown.e2e.test/name"),
        home,
    )
    assert refused.returncode == 56, (refused.returncode, refused.stderr)
    assert "CONNECT tunnel failed, response 403" in refused.stderr, refused.stderr

    with_user = run(
        _curl(
            frontdoor_ca,
            *pin,
            "--proxy",
            auth_proxy,
            "--proxy-user",
            "ci:s3cret",
            f"https://{REGISTRY}/name",
        ),
        home,
    )
    assert (with_user.returncode, with_user.stdout) == (0, f"backend={REGISTRY}\n"), (
        with_user.stderr
    )
    user_in_env = run(
        _curl(frontdoor_ca, *pin, f"https://{REGISTRY}/name"),
        home,
        env={"HTTPS_PROXY": f"http://ci:s3cret@127.0.0.1:{relay.ports['auth']}"},
    )
    assert user_in_env.stdout == f"backend={REGISTRY}\n", user_in_env.stderr
    for credentials in ([], ["--proxy-user", "ci:wrong"], ["--proxy-user", "nobody:s3cret"]):
        denied = run(
            _curl(frontdoor_ca, *pin, "--proxy", auth_proxy, *credentials, f"https://{REGISTRY}/"),
            home,
        )
        assert denied.returncode == 56, (credentials, denied.returncode, denied.stderr)
        assert "CONNECT tunnel failed, response 407" in denied.stderr, denied.stderr
        assert "backend=" not in denied.stdout

    entries = relay.wait_access(lambda e: True, count=8)
    tunnels = [e for e in entries if e.get("close_reason") == "done"]
    assert [(*_fields(e, "listener", "target"), e.get("user")) for e in tunnels] == [
        ("front", f"{REGISTRY}:443", None),
        ("front", f"{DOCKERAUTH}:443", None),
        ("auth", f"{REGISTRY}:443", "ci"),
        ("auth", f"{REGISTRY}:443", "ci"),
    ], tunnels
    for entry in tunnels:
        assert entry["front_door"] == "connect" and entry["method"] == "CONNECT", entry
        assert entry["backend_address"].startswith("127.0.0.1:"), entry
        assert "sni" not in entry, entry  # the TLS inside the tunnel is not peeked
    reasons = sorted(e["close_reason"] for e in entries if e not in tunnels)
    assert reasons == ["refused:auth_required"] * 3 + ["refused:not_allowed"], entries


# ---------------------------------------------------------------- curl by Host


def test_curl_over_plain_http_by_host_and_absolute_uri(
    frontdoor_backend: BackendServer, start_relay: StartRelay, home: Path
) -> None:
    """Plain-HTTP curl reaches the Host's backend (and, as a forward proxy, the absolute
    URI's); a Host or URI without a route gets the relay's 403."""
    backend = frontdoor_backend
    relay = start_relay(
        {REGISTRY: backend.backend(REGISTRY), DOCKERAUTH: backend.backend(DOCKERAUTH)},
        listeners=[_all_doors()],
    )
    port = relay.port
    base = ["curl", "-q", "-sS", "--max-time", "15"]

    def by_host(name: str, *extra: str) -> list[str]:
        # --resolve too, so that a mistake in --connect-to still never leaves loopback.
        return [
            *base,
            *extra,
            "--connect-to",
            f"{name}:80:127.0.0.1:{port}",
            "--resolve",
            f"{name}:80:127.0.0.1",
            f"http://{name}/name",
        ]

    ok = run(by_host(REGISTRY), home)
    assert (ok.returncode, ok.stdout) == (0, f"backend={REGISTRY}\n"), ok.stderr
    forbidden = run(by_host("unknown.e2e.test", "-o", "/dev/null", "-w", "%{http_code}"), home)
    assert forbidden.stdout == "403", (forbidden.stdout, forbidden.stderr)

    proxy = ["--proxy", f"http://127.0.0.1:{port}"]
    forward = run([*base, *proxy, f"http://{DOCKERAUTH}/name"], home)
    assert (forward.returncode, forward.stdout) == (0, f"backend={DOCKERAUTH}\n"), forward.stderr
    for url in ("http://unknown.e2e.test/", f"http://127.0.0.1:{port}/"):
        status = run([*base, *proxy, "-o", "/dev/null", "-w", "%{http_code}", url], home)
        assert status.stdout == "403", (url, status.stdout, status.stderr)

    entries = relay.wait_access(lambda e: True, count=5)
    served = [_fields(e, "target", "method", "close_reason") for e in entries if "route" in e]
    assert sorted(served) == [
        (f"{DOCKERAUTH}:80", "GET", "done"),
        (f"{REGISTRY}:80", "GET", "done"),
    ], entries
    refused = sorted(e["close_reason"] for e in entries if "route" not in e)
    assert refused == ["refused:ip_literal", "refused:not_allowed", "refused:not_allowed"]
    assert all(e["front_door"] == "http" for e in entries), entries
    # The absolute-form target is passed on as it was sent (the relay rewrites nothing).
    targets = ("/name", f"http://{DOCKERAUTH}/name")
    assert [r[:4] for r in backend.requests() if r[3] in targets][-2:] == [
        (REGISTRY, "plain", "GET", "/name"),
        (DOCKERAUTH, "plain", "GET", f"http://{DOCKERAUTH}/name"),
    ]


# ---------------------------------------------------------------- HAProxy in front


HAPROXY_SOURCE = "127.0.0.90"  # HAProxy connects to the relay from here

HAPROXY_CONFIG = """\
global
    maxconn 200

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend via_v1
    bind 127.0.0.1:{port_v1}
    default_backend relay_v1

backend relay_v1
    server relay 127.0.0.1:{relay} send-proxy source {source}

frontend via_v2
    bind 127.0.0.1:{port_v2}
    default_backend relay_v2

backend relay_v2
    server relay 127.0.0.1:{relay} send-proxy-v2 source {source}
"""


def _connect_from(source: str, port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _tls_name(sock: socket.socket, ca: TestCA, name: str) -> bytes:
    """GET /name over TLS for ``name``, the certificate checked; the whole response."""
    with ca.client_context().wrap_socket(sock, server_hostname=name) as tls:
        tls.sendall(f"GET /name HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        return read_all(tls)


@pytest.fixture
def proxy_checkers(frontdoor_ca: TestCA) -> Iterator[dict[str, ProxyCheckingBackend]]:
    """A PROXY-checking backend for each proxied name, with that name's certificate."""
    checkers = {
        name: ProxyCheckingBackend(
            (frontdoor_ca.directory / f"{name}.pem", frontdoor_ca.directory / f"{name}.key")
        )
        for name in (PROXIED_V1, PROXIED_V2)
    }
    try:
        yield checkers
    finally:
        for checker in checkers.values():
            checker.close()


def test_haproxy_in_front_names_the_real_client(
    frontdoor_ca: TestCA,
    frontdoor_backend: BackendServer,
    proxy_checkers: dict[str, ProxyCheckingBackend],
    start_relay: StartRelay,
    start_haproxy: Callable[[str, list[int]], HAProxy],
) -> None:
    """Through HAProxy's send-proxy and send-proxy-v2 the relay logs the real client and
    HAProxy as the peer, and passes the real client on; PROXY headers from anyone else,
    and a trusted peer without one, are refused."""
    backend = frontdoor_backend
    relay = start_relay(
        {
            REGISTRY: backend.backend(REGISTRY),
            PROXIED_V2: {"backend": proxy_checkers[PROXIED_V2].endpoint, "proxy_protocol": "v2"},
        },
        listeners=[
            _listener("lb", 0, protocols=["tls", "http"], proxy_protocol_from=["127.0.0.0/8"]),
            _listener("direct", 1, protocols=["tls"]),
            _listener("lb-narrow", 2, protocols=["tls"], proxy_protocol_from=["127.0.0.90/32"]),
        ],
    )
    port_v1, port_v2 = free_port(), free_port()
    config = HAPROXY_CONFIG.format(
        port_v1=port_v1, port_v2=port_v2, relay=relay.ports["lb"], source=HAPROXY_SOURCE
    )
    start_haproxy(config, [port_v1, port_v2])

    seen: dict[str, tuple[str, str]] = {}
    for source, port, version in (("127.0.0.77", port_v1, "v1"), ("127.0.0.78", port_v2, "v2")):
        sock = _connect_from(source, port)
        client = "{}:{}".format(*sock.getsockname())
        status, _, body = split_http(_tls_name(sock, frontdoor_ca, REGISTRY))
        assert (status, body) == (200, f"backend={REGISTRY}\n".encode()), version
        (entry,) = relay.wait_access(_exactly(client))
        assert entry["listener"] == "lb" and entry["close_reason"] == "done", entry
        (peer,) = _fields(entry, "peer")
        assert peer.startswith(HAPROXY_SOURCE + ":"), entry
        seen[version] = (entry["client"], peer)

    # Plain HTTP by Host through HAProxy, v2.
    with _connect_from("127.0.0.79", port_v2) as sock:
        client = "{}:{}".format(*sock.getsockname())
        sock.sendall(
            f"GET /name HTTP/1.1\r\nHost: {REGISTRY}\r\nConnection: close\r\n\r\n".encode()
        )
        assert split_http(recv_to_eof(sock, 10))[2] == f"backend={REGISTRY}\n".encode()
    (entry,) = relay.wait_access(_exactly(client))
    assert _fields(entry, "front_door", "peer")[0] == "http", entry
    assert entry["peer"].startswith(HAPROXY_SOURCE + ":"), entry

    # The real client, not HAProxy, is what the relay passes on to a PROXY-protocol backend.
    sock = _connect_from("127.0.0.80", port_v1)
    client = "{}:{}".format(*sock.getsockname())
    status, _, body = split_http(_tls_name(sock, frontdoor_ca, PROXIED_V2))
    assert status == 200 and body.startswith(f"proxy=v2 proxy source={client} ".encode()), body

    # A client behind HAProxy cannot smuggle its own PROXY header: it is not the first.
    accepted = backend.accepted()
    spoof = encode_v1(("6.6.6.6", 1111), ("127.0.0.1", 443)) + hello_with_sni(REGISTRY.encode())
    with _connect_from("127.0.0.81", port_v1) as sock:
        client = "{}:{}".format(*sock.getsockname())
        sock.sendall(spoof)
        answer = recv_to_eof(sock, 10)
    assert not answer.startswith(b"\x16"), answer[:20]
    (entry,) = relay.wait_access(_exactly(client))
    assert entry["close_reason"].startswith("refused:"), entry

    # Direct, untrusted peers that send a PROXY header are refused; so is a trusted peer
    # that sends none.
    hello = hello_with_sni(REGISTRY.encode())
    untrusted = [
        ("direct", "127.0.0.1", encode_v1(("6.6.6.6", 1111), ("127.0.0.1", 443)) + hello),
        ("direct", "127.0.0.1", encode_v2(("6.6.6.6", 1111), ("127.0.0.1", 443)) + hello),
        ("lb-narrow", "127.0.0.82", encode_v2(("6.6.6.6", 1111), ("127.0.0.1", 443)) + hello),
        ("lb", "127.0.0.83", hello),
    ]
    for listener, source, payload in untrusted:
        with relay.connect(listener=listener, source=source, timeout=10) as sock:
            client = "{}:{}".format(*sock.getsockname())
            sock.sendall(payload)
            answer = recv_to_eof(sock, 10)
        assert not answer.startswith(b"\x16"), (listener, answer[:20])
        (entry,) = relay.wait_access(_exactly(client))
        expected = "refused:proxy_missing" if listener == "lb" else "refused:proxy_untrusted"
        assert entry["close_reason"] == expected, entry
        assert "peer" not in entry, entry  # the header named no one: client is the peer
    assert backend.accepted() == accepted, "a refused PROXY connection reached a backend"

    # lb-narrow trusts only 127.0.0.90: a plain TLS connection from elsewhere is served.
    with relay.connect(listener="lb-narrow", source="127.0.0.84") as sock:
        # The TLS-only listener's route ports are 443, its target: REGISTRY is allowed.
        assert split_http(_tls_name(sock, frontdoor_ca, REGISTRY))[0] == 200
    print(f"\nhaproxy: v1 client={seen['v1'][0]} peer={seen['v1'][1]}; v2 client={seen['v2'][0]}")


# ---------------------------------------------------------------- PROXY to a backend


def test_relay_sends_proxy_headers_that_name_the_client(
    frontdoor_ca: TestCA,
    proxy_checkers: dict[str, ProxyCheckingBackend],
    start_relay: StartRelay,
) -> None:
    """A route with proxy_protocol v1 or v2 sends a header naming the client's real address
    and the relay's own, then the client's bytes unchanged, on every front door."""
    relay = start_relay(
        {
            PROXIED_V1: {"backend": proxy_checkers[PROXIED_V1].endpoint, "proxy_protocol": "v1"},
            PROXIED_V2: {"backend": proxy_checkers[PROXIED_V2].endpoint, "proxy_protocol": "v2"},
            "noproxy.e2e.test": proxy_checkers[PROXIED_V1].endpoint,
        },
        listeners=[_all_doors()],
    )
    destination = f"127.0.0.1:{relay.port}"
    cases = [
        ("127.0.0.55", "tls", PROXIED_V2, "v2"),
        ("127.0.0.56", "tls", PROXIED_V1, "v1"),
        ("127.0.0.57", "http", PROXIED_V1, "v1"),
        ("127.0.0.58", "http", PROXIED_V2, "v2"),
        ("127.0.0.59", "connect", PROXIED_V2, "v2"),
    ]
    for source, door, name, version in cases:
        head = f"GET /name HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()
        with relay.connect(source=source) as sock:
            client = "{}:{}".format(*sock.getsockname())
            if door == "tls":
                response = _tls_name(sock, frontdoor_ca, name)
            elif door == "http":
                sock.sendall(head)
                response = recv_to_eof(sock, 10)
            else:
                sock.sendall(f"CONNECT {name}:443 HTTP/1.1\r\nHost: {name}:443\r\n\r\n".encode())
                established = b"HTTP/1.1 200 Connection established\r\n\r\n"
                got = b""
                while len(got) < len(established):
                    data = sock.recv(len(established) - len(got))
                    assert data, got
                    got += data
                assert got == established
                response = _tls_name(sock, frontdoor_ca, name)
        status, _, body = split_http(response)
        tls = "no" if door == "http" else "yes"
        expected = (
            f"proxy={version} proxy source={client} destination={destination}\n"
            f"tls={tls} head-sha256={hashlib.sha256(head).hexdigest()}\n"
        )
        assert (status, body.decode()) == (200, expected), (door, name)

    # Without proxy_protocol on the route, no header: this backend refuses the stream.
    with relay.connect(source="127.0.0.60") as sock:
        sock.sendall(b"GET /name HTTP/1.1\r\nHost: noproxy.e2e.test\r\n\r\n")
        assert recv_to_eof(sock, 10) == b""
    seen = proxy_checkers[PROXIED_V1].seen
    assert seen[-1].header is None and seen[-1].error is not None, seen[-1]
    assert len(proxy_checkers[PROXIED_V1].seen) + len(proxy_checkers[PROXIED_V2].seen) == 6


# ---------------------------------------------------------------- limits and ACLs


@attrs.define
class Outcome:
    """What one burst connection got."""

    sock: socket.socket
    payload: bytes
    sent: int = 0
    received: bytes = b""
    eof: bool = False
    error: str | None = None
    connected_at: float | None = None
    closed_at: float | None = None


def burst(
    port: int,
    count: int,
    payload: bytes | Callable[[int], bytes],
    *,
    duration: float,
    source: str = "127.0.0.1",
    until_all_done: bool = False,
) -> list[Outcome]:
    """Open ``count`` non-blocking connections at once, send ``payload`` on each (or
    ``payload(i)`` on the i-th; nothing for an empty one), and collect
    what comes back for ``duration`` seconds (or until every one has ended). A socket is
    closed when the peer ends it; the others are left open for the caller to close."""
    selector = selectors.DefaultSelector()
    outcomes = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex(("127.0.0.1", port))
        outcome = Outcome(sock, payload if isinstance(payload, bytes) else payload(i))
        outcomes.append(outcome)
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, outcome)
    started = time.monotonic()
    deadline = started + duration
    live = count
    while live and time.monotonic() < deadline:
        for key, events in selector.select(timeout=0.05):
            outcome = key.data
            sock = outcome.sock
            ended = False
            try:
                if events & selectors.EVENT_WRITE:
                    if outcome.connected_at is None:
                        outcome.connected_at = time.monotonic() - started
                    outcome.sent += sock.send(outcome.payload[outcome.sent :])
                    if outcome.sent == len(outcome.payload):
                        selector.modify(sock, selectors.EVENT_READ, outcome)
                if events & selectors.EVENT_READ:
                    data = sock.recv(65536)
                    outcome.received += data
                    ended = outcome.eof = not data
            except OSError as e:
                outcome.error = type(e).__name__
                ended = True
            if ended:  # done, as a real client is: close our side too
                outcome.closed_at = time.monotonic() - started
                selector.unregister(sock)
                sock.close()
                live -= 1
        if not until_all_done and time.monotonic() >= deadline:
            break
    selector.close()
    return outcomes


def _close_all(outcomes: list[Outcome]) -> None:
    for outcome in outcomes:
        outcome.sock.close()


def _get(host: str, target: str = "/name") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def _describe(outcomes: list[Outcome]) -> str:
    """How the connections ended, counted: "200 x25, closed unanswered x5"."""
    kinds: dict[str, int] = {}
    for o in outcomes:
        status = _status(o.received)
        if status is not None:
            kind = str(status)
        elif o.error is not None:
            kind = f"{o.error} unanswered"
        elif o.eof:
            kind = "closed unanswered"
        else:
            kind = "still waiting"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))


def _status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 "):
        return None
    return int(data.split(b" ", 2)[1])


def test_per_client_limit_closes_the_excess_at_once(
    frontdoor_backend: BackendServer, start_relay: StartRelay
) -> None:
    """With max_connections_per_client = 3, ten idle connections from one address leave three
    open and seven closed at once; another address still gets in, and a freed slot is reused."""
    backend = frontdoor_backend
    relay = start_relay(
        {REGISTRY: backend.backend(REGISTRY)},
        listeners=[_all_doors()],
        max_connections_per_client=3,
        peek_timeout="30s",
    )
    held = [relay.connect(source="127.0.0.30", timeout=5) for _ in range(10)]
    try:
        closed: dict[socket.socket, float] = {}
        started = time.monotonic()
        while time.monotonic() - started < 1.5:
            waiting = [sock for sock in held if sock not in closed]
            for sock in select.select(waiting, [], [], 0.05)[0]:
                try:
                    data = sock.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", data
                closed[sock] = time.monotonic() - started
        elapsed = max(closed.values(), default=0.0)
        open_ = [sock for sock in held if sock not in closed]
        assert (len(open_), len(closed)) == (3, 7), (len(open_), len(closed))
        assert elapsed < 1.0, closed.values()  # at once, not at the peek timeout

        # Another client is not affected; the three held ones are real, working connections.
        with relay.connect(source="127.0.0.31") as other:
            other.sendall(_get(REGISTRY))
            assert split_http(recv_to_eof(other))[2] == f"backend={REGISTRY}\n".encode()
        for sock in open_:
            sock.settimeout(10)
            sock.sendall(_get(REGISTRY))
            assert split_http(recv_to_eof(sock))[2] == f"backend={REGISTRY}\n".encode()
    finally:
        for sock in held:
            sock.close()
    relay.wait_access(_client("127.0.0.30"), count=10)
    with relay.connect(source="127.0.0.30") as again:  # the slots are free again
        again.sendall(_get(REGISTRY))
        assert split_http(recv_to_eof(again))[0] == 200
    entries = relay.wait_access(_client("127.0.0.30"), count=11)
    limited = [e for e in entries if e["close_reason"] == "refused:client_limit"]
    assert len(limited) == 7, entries
    assert all(e["total_ms"] < 1000 for e in limited), limited
    print(
        f"\nper-client limit 3: 3 of 10 connections from 127.0.0.30 held for 1.5 s, 7 closed "
        f"(the last EOF {elapsed * 1000:.0f} ms after connecting, refused in "
        f"<= {max(e['total_ms'] for e in limited):.1f} ms); 127.0.0.31 served"
    )


@pytest.fixture
def holding_backend() -> Iterator[HoldingBackend]:
    server = HoldingBackend(hold=0.3)
    try:
        yield server
    finally:
        server.close()


def test_global_limit_queues_a_burst_instead_of_refusing_it(
    holding_backend: HoldingBackend, start_relay: StartRelay
) -> None:
    """With max_connections = 5, a burst of 30 connections is served at most 5 at a time,
    the rest waiting in the backlog, and every one completes its request."""
    relay = start_relay(
        {HOLD: holding_backend.endpoint}, listeners=[_all_doors()], max_connections=5
    )
    started = time.monotonic()
    outcomes = burst(relay.port, 30, _get(HOLD), duration=30, until_all_done=True)
    elapsed = time.monotonic() - started
    _close_all(outcomes)
    statuses = [_status(o.received) for o in outcomes]
    served = statuses.count(200)
    print(
        f"\nglobal limit 5: {served} of 30 served in {elapsed:.2f} s, at most "
        f"{holding_backend.max_active} at once at the backend ({_describe(outcomes)})"
    )
    assert holding_backend.max_active <= 5
    assert served == 30, _describe(outcomes)
    assert holding_backend.max_active == 5  # the limit was reached, so it was tested
    # Six rounds of a 0.3 s hold: queued, not all at once.
    assert elapsed >= 5 * 0.3, elapsed
    entries = relay.wait_access(lambda e: True, count=30)
    assert [e["close_reason"] for e in entries] == ["done"] * 30, entries


def test_denied_client_is_closed_without_an_answer(
    frontdoor_backend: BackendServer, start_relay: StartRelay
) -> None:
    """A client in the listener's deny list is closed at once, unanswered and unrouted;
    its neighbour address is served."""
    backend = frontdoor_backend
    relay = start_relay(
        {REGISTRY: backend.backend(REGISTRY)},
        listeners=[_all_doors(deny=["127.0.0.66/32"])],
    )
    accepted = backend.accepted()
    with relay.connect(source="127.0.0.66", timeout=5) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # already closed by the relay: that is the point
            sock.sendall(_get(REGISTRY))
        answer = recv_to_eof(sock, 5)
        elapsed = time.monotonic() - started
    assert answer == b"", answer
    assert elapsed < 1.0, elapsed
    with relay.connect(source="127.0.0.67") as sock:
        sock.sendall(_get(REGISTRY))
        assert split_http(recv_to_eof(sock))[2] == f"backend={REGISTRY}\n".encode()
    assert backend.accepted() == accepted + 1
    (denied,) = relay.wait_access(_client("127.0.0.66"))
    assert denied["close_reason"] == "refused:client_denied", denied
    assert denied["bytes_up"] == 0 and "front_door" not in denied, denied
    (served,) = relay.wait_access(_client("127.0.0.67"))
    assert served["close_reason"] == "done", served


NOFILE = 48


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _fresh_request(relay: Relay) -> bytes:
    with relay.connect(timeout=10) as sock:
        sock.sendall(_get(HOLD))
        return recv_to_eof(sock, 10)


def test_relay_survives_running_out_of_file_descriptors(
    holding_backend: HoldingBackend, start_relay: StartRelay
) -> None:
    """Under a 48-descriptor limit with max_connections = 1000, a burst of 100 connections
    (half idle, half asking for a backend) exhausts the descriptors without the relay
    spinning; once they close it is alive, idle, back to its descriptors, and serving."""
    relay = start_relay(
        {HOLD: holding_backend.endpoint},
        listeners=[_all_doors()],
        nofile=NOFILE,
        max_connections=1000,
        peek_timeout="30s",
    )
    process = psutil.Process(relay.pid)
    assert process.rlimit(psutil.RLIMIT_NOFILE) == (NOFILE, NOFILE)
    assert split_http(_fresh_request(relay))[0] == 200  # warm up: lazily opened descriptors
    time.sleep(0.3)
    baseline_fds = process.num_fds()
    outcomes = burst(relay.port, 100, lambda i: _get(HOLD) if i % 2 else b"", duration=1.5)
    # Top up with idle connections so the relay sits at its limit with more waiting.
    more = burst(relay.port, 30, b"", duration=0.5)
    fds_exhausted = process.num_fds()
    cpu_start = _cpu_seconds(relay.pid)
    time.sleep(1.0)
    exhausted_cpu = _cpu_seconds(relay.pid) - cpu_start
    _close_all(outcomes + more)
    time.sleep(1.0)  # the relay notices the closes and settles
    assert relay.alive(), relay.output.text()
    cpu_start = _cpu_seconds(relay.pid)
    time.sleep(2.0)
    idle_cpu = _cpu_seconds(relay.pid) - cpu_start
    fresh = _fresh_request(relay)
    time.sleep(0.3)  # the relay closes both ends of that one
    fds_after = process.num_fds()
    emfile_lines = [line for line in relay.output.lines if "EMFILE" in line]
    print(
        f"\nEMFILE at {NOFILE} fds: 100 connections (50 idle, 50 requests): "
        f"{_describe(outcomes)}; then 30 idle: {_describe(more)}; "
        f"{len(emfile_lines)} EMFILE log lines; fds {baseline_fds} -> "
        f"{fds_exhausted} -> {fds_after}; CPU {exhausted_cpu:.3f} s in 1 s exhausted, "
        f"{idle_cpu:.3f} s in 2 s idle after; fresh request {_status(fresh)}"
    )
    assert fds_exhausted >= NOFILE - 2, "the relay never ran out of descriptors"
    assert emfile_lines, "the relay never hit EMFILE: the test proved nothing"
    assert relay.alive()
    assert exhausted_cpu < 0.5, exhausted_cpu  # out of descriptors, but not spinning
    assert idle_cpu < 0.3, idle_cpu
    assert split_http(fresh)[2].startswith(b"ok "), fresh
    assert fds_after <= baseline_fds + 1, (baseline_fds, fds_after)  # nothing leaked


def test_default_limit_pauses_accepting_under_a_low_descriptor_limit(
    holding_backend: HoldingBackend, start_relay: StartRelay
) -> None:
    """With max_connections unset under the same 48-descriptor limit, the relay derives its
    limit from it and pauses accepting: no EMFILE, and every connection is served."""
    holding_backend.hold = 0.1
    relay = start_relay({HOLD: holding_backend.endpoint}, listeners=[_all_doors()], nofile=NOFILE)
    limit_line = [line for line in relay.output.lines if "connections at once" in line]
    assert limit_line and f"({NOFILE} file descriptors)" in limit_line[0], relay.output.text()
    started = time.monotonic()
    outcomes = burst(relay.port, 60, _get(HOLD), duration=30, until_all_done=True)
    elapsed = time.monotonic() - started
    _close_all(outcomes)
    statuses = [_status(o.received) for o in outcomes]
    emfile_lines = [line for line in relay.output.lines if "EMFILE" in line or "Too many" in line]
    print(
        f"\ndefault limit at {NOFILE} fds ({limit_line[0].split('] ')[-1]}): "
        f"{statuses.count(200)} of 60 served in {elapsed:.2f} s, at most "
        f"{holding_backend.max_active} at once, {len(emfile_lines)} EMFILE lines "
        f"({_describe(outcomes)})"
    )
    limit = int(re.search(r"at most (\d+) connections", limit_line[0]).group(1))  # type: ignore[union-attr]
    assert not emfile_lines, emfile_lines[:5]
    assert statuses.count(200) == 60, _describe(outcomes)
    assert holding_backend.max_active <= limit, (holding_backend.max_active, limit)
