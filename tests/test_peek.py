"""Layer 2: the peeking protocol with StringTransport and a fake clock."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure

from acrrelay.peek import ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME, State, tls_alert
from acrrelay.testing import alert_description, client_hello_bytes, reframe
from tests.doubles import Harness, is_half_closeable

REGISTRY = "registry.cn-beijing.aliyuncs.com"
HELLO = client_hello_bytes(REGISTRY, alpn=["h2", "http/1.1"])


def test_alert_bytes_are_a_fatal_unrecognized_name() -> None:
    """The refusal alert is a well-formed fatal alert record with description 112."""
    assert alert_description(tls_alert(ALERT_UNRECOGNIZED_NAME)) == 112
    assert tls_alert(ALERT_UNRECOGNIZED_NAME)[5] == 2  # level fatal


def test_peek_timeout_fires_on_a_silent_client() -> None:
    """A client that sends nothing is closed at the peek timeout, counted and logged."""
    h = Harness()
    protocol, transport = h.accept()
    h.reactor.advance(9.9)
    assert not transport.disconnecting
    h.reactor.advance(0.2)
    assert transport.disconnecting
    assert transport.value() == b""  # nothing was TLS, so no alert
    transport.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.relay.stats.refused["peek_timeout"] == 1
    assert h.events[-1]["close_reason"] == "refused:peek_timeout"
    assert protocol.session.id not in h.relay.connections


def test_peek_timeout_on_a_stalled_hello_sends_an_alert() -> None:
    """Half a ClientHello and then silence gets unrecognized_name at the timeout."""
    h = Harness()
    _, transport = h.accept()
    transport.protocol.dataReceived(HELLO[:100])
    h.reactor.advance(10)
    assert alert_description(transport.value()) == ALERT_UNRECOGNIZED_NAME
    assert transport.disconnecting


def test_unknown_name_is_refused_with_unrecognized_name() -> None:
    """A hello for a name with no route is refused with the alert, then closed."""
    h = Harness()
    protocol, transport = h.accept()
    protocol.dataReceived(client_hello_bytes("registry.cn-beijing.aliyuncs.com.evil.example"))
    assert alert_description(transport.value()) == ALERT_UNRECOGNIZED_NAME
    assert transport.disconnecting
    assert h.reactor.tcpClients == []
    assert protocol.state is State.CLOSING
    # Bytes arriving after the refusal are ignored.
    protocol.dataReceived(b"more")
    h.close(transport)
    assert h.relay.stats.refused["not_allowed"] == 1
    assert h.reactor.tcpClients == []


def test_each_refusal_reason() -> None:
    """Not TLS, malformed, no SNI and too large each close the client with their own reason."""
    h = Harness(RELAY_SMALL_LIMIT)
    cases = {
        "not_tls": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
        "malformed": (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", ALERT_UNRECOGNIZED_NAME),
        "no_sni": (client_hello_bytes(None), ALERT_UNRECOGNIZED_NAME),
        "too_large": (
            client_hello_bytes("a.example", alpn=[f"{'z' * 250}{i}" for i in range(10)]),
            ALERT_UNRECOGNIZED_NAME,
        ),
    }
    for reason, (data, alert) in cases.items():
        protocol, transport = h.accept()
        protocol.dataReceived(data)
        assert transport.disconnecting, reason
        if alert is None:
            assert transport.value() == b"", reason
        else:
            assert alert_description(transport.value()) == alert, reason
        transport.protocol.connectionLost(Failure(ConnectionLost()))
        assert h.relay.stats.refused[reason] == 1, reason
        assert h.events[-1]["close_reason"] == f"refused:{reason}"
    assert h.reactor.tcpClients == []


RELAY_SMALL_LIMIT = """
[relay]
peek_limit = "2KiB"
[[listen]]
endpoint = "tcp:443"
[[route]]
name = "a.example"
backend = "tcp:host=10.1.1.1:port=443"
"""


def test_routed_hello_pauses_client_and_connects_backend() -> None:
    """A routed hello pauses the client and connects the route's backend."""
    h = Harness()
    protocol, transport = h.accept()
    protocol.dataReceived(HELLO)
    assert protocol.state is State.CONNECTING
    assert transport.producerState == "paused"
    assert [(host, port) for host, port, *_ in h.reactor.tcpClients] == [("10.1.1.1", 443)]


def test_peeked_bytes_go_first_byte_exact() -> None:
    """The backend receives exactly the client's bytes, the peeked ones first, in order."""
    h = Harness()
    protocol, client = h.accept()
    stream = reframe(HELLO, 3)
    for i in range(0, len(stream), 7):  # arrives in 7-byte reads across 3 records
        protocol.dataReceived(stream[i : i + 7])
    _, backend = h.connect_backend()
    assert backend.value() == stream
    assert client.producerState == "producing"
    protocol.dataReceived(b"after")
    assert backend.value() == stream + b"after"
    assert protocol.state is State.SPLICING


def test_resolve_route_uses_static_hosts_and_the_port_reached() -> None:
    """A resolve route connects to the static address, on the port the client reached."""
    h = Harness()
    protocol, _ = h.accept()
    protocol.dataReceived(client_hello_bytes("BKT.oss-cn-beijing.aliyuncs.com."))
    assert protocol.state is State.CONNECTING
    assert [(host, port) for host, port, *_ in h.reactor.tcpClients] == [("10.2.2.2", 443)]


def test_connect_timeout_closes_the_client() -> None:
    """A backend that never answers is given up at the connect timeout, with an alert."""
    h = Harness()
    protocol, transport = h.accept()
    protocol.dataReceived(HELLO)
    h.reactor.advance(4.9)
    assert not transport.disconnecting
    h.reactor.advance(0.2)
    assert transport.disconnecting
    assert alert_description(transport.value()) == ALERT_INTERNAL_ERROR
    assert h.reactor.connectors[0].stoppedConnecting
    h.close(transport)
    assert h.relay.stats.backend_failures["connect_timeout"] == 1
    transport.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "connect_timeout"


def test_connect_timeout_bounds_a_resolve_route_too() -> None:
    """A resolve route's attempts (HostnameEndpoint) are cut at the same connect timeout,
    counted from the routing decision, not from the accept."""
    h = Harness()
    protocol, transport = h.accept()
    h.reactor.advance(3.0)  # a slow hello: the peek timer's time does not count
    protocol.dataReceived(client_hello_bytes("bkt.oss-cn-beijing.aliyuncs.com"))
    assert protocol.state is State.CONNECTING
    h.reactor.advance(4.9)
    assert not transport.disconnecting
    h.reactor.advance(0.2)
    assert transport.disconnecting
    assert all(c.stoppedConnecting for c in h.reactor.connectors)
    h.close(transport)
    assert h.relay.stats.backend_failures["connect_timeout"] == 1
    transport.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "connect_timeout"
    assert h.reactor.getDelayedCalls() == []


def test_a_connected_backend_leaves_no_connect_timer_behind() -> None:
    """Once the backend is connected the connection's only timer is the idle one."""
    h = Harness()
    protocol, _ = h.accept()
    protocol.dataReceived(HELLO)
    h.connect_backend()
    assert protocol.state is State.SPLICING
    h.reactor.advance(10)  # past the connect timeout: nothing fires
    assert protocol.state is State.SPLICING
    assert h.relay.stats.backend_failures == {}


def test_refused_backend_closes_the_client() -> None:
    """A backend that refuses the connection closes the client at once, with an alert."""
    h = Harness()
    protocol, transport = h.accept()
    protocol.dataReceived(HELLO)
    factory = h.backend_factory()
    factory.clientConnectionFailed(h.reactor.connectors[0], Failure(ConnectionRefusedError()))
    assert transport.disconnecting
    assert alert_description(transport.value()) == ALERT_INTERNAL_ERROR
    h.close(transport)
    assert h.relay.stats.backend_failures["connect_failed"] == 1


def test_client_leaving_while_connecting_cancels_the_attempt() -> None:
    """A client that goes away during connect stops the attempt and is logged once."""
    h = Harness()
    protocol, _ = h.accept()
    protocol.dataReceived(HELLO)
    protocol.connectionLost(Failure(ConnectionLost()))
    assert h.reactor.connectors[0].stoppedConnecting
    assert h.events[-1]["close_reason"] == "client_gone"
    assert len(h.events) == 1
    h.reactor.advance(30)  # no timer left behind fires into a dead connection
    assert len(h.events) == 1


def test_client_fin_before_a_complete_hello() -> None:
    """A client that half-closes mid-hello is closed and logged as gone, not routed."""
    h = Harness()
    protocol, transport = h.accept()
    protocol.dataReceived(HELLO[:50])
    protocol.readConnectionLost()
    assert transport.disconnecting
    protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "client_gone"
    assert h.events[-1]["closed_first"] == "client"


def test_access_event_fields() -> None:
    """One access event per connection, with the hello, route, backend and byte counts."""
    h = Harness()
    protocol, _ = h.accept(("198.51.100.9", 51000))
    protocol.dataReceived(HELLO)
    h.reactor.advance(0.25)
    backend_protocol, _ = h.connect_backend()
    backend_protocol.dataReceived(b"x" * 1000)
    protocol.readConnectionLost()
    backend_protocol.readConnectionLost()
    protocol.connectionLost(Failure(ConnectionLost()))
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert len(h.events) == 1
    event = h.events[0]
    assert event["client"] == "198.51.100.9:51000"
    assert event["listener"] == "front"
    assert event["front_door"] == "tls"
    assert event["sni"] == REGISTRY
    assert event["alpn"] == ["h2", "http/1.1"]
    assert event["hello_bytes"] == len(HELLO) - 5
    assert event["hello_records"] == 1
    assert event["route"] == REGISTRY
    assert event["backend"] == "tcp:host=10.1.1.1:port=443"
    assert event["backend_address"] == "10.1.1.1:443"
    assert event["bytes_up"] == len(HELLO)
    assert event["bytes_down"] == 1000
    assert event["connect_ms"] == 250.0
    assert event["close_reason"] == "done"
    assert event["closed_first"] == "client"
    assert h.relay.stats.bytes_down == 1000


def test_a_bad_backend_endpoint_costs_one_connection_only() -> None:
    """An endpoint that fails to build refuses that connection; the relay goes on."""
    h = Harness()

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    h.relay.connector.connect = broken  # type: ignore[method-assign]
    protocol, transport = h.accept()
    protocol.dataReceived(HELLO)
    assert transport.disconnecting
    h.close(transport)
    assert h.relay.stats.backend_failures["connect_failed"] == 1


def test_protocols_are_half_closeable() -> None:
    """Both sides declare half-close support, or Twisted would close on the first FIN."""
    h = Harness()
    protocol, _ = h.accept()
    protocol.dataReceived(HELLO)
    backend_protocol, _ = h.connect_backend()
    assert is_half_closeable(protocol)
    assert is_half_closeable(backend_protocol)


def test_kill_cuts_a_spliced_connection() -> None:
    """kill() aborts both sides of a live connection and logs it as killed."""
    h = Harness()
    protocol, client = h.accept()
    protocol.dataReceived(HELLO)
    backend_protocol, backend = h.connect_backend()
    protocol.session.kill()
    assert client.disconnected and backend.disconnected
    protocol.connectionLost(Failure(ConnectionLost()))
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "killed"
    assert h.events[-1]["closed_first"] == "relay"


def test_unix_peer_addresses_are_described() -> None:
    """Access logs name UNIX peers by path and IPv6 peers in brackets."""
    from twisted.internet.address import IPv6Address, UNIXAddress

    from acrrelay.peek import describe

    assert describe(UNIXAddress(b"/run/x.sock")) == "/run/x.sock"
    assert describe(IPv6Address("TCP", "::1", 443)) == "[::1]:443"
    assert describe(IPv4Address("TCP", "10.0.0.1", 443)) == "10.0.0.1:443"


def test_an_internal_error_costs_one_connection_only() -> None:
    """A bug while peeking is logged, counted, and closes that connection alone."""
    h = Harness()

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    h.relay.policy.decide = broken  # type: ignore[method-assign]
    protocol, transport = h.accept()
    protocol.dataReceived(HELLO)  # must not raise
    assert transport.disconnecting
    assert alert_description(transport.value()) == ALERT_INTERNAL_ERROR
    h.close(transport)
    assert h.relay.stats.refused["internal_error"] == 1
    transport.protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "refused:internal_error"


def test_a_refusal_flood_is_summarised_in_the_main_log() -> None:
    """Past 10 refusals of a reason per minute the main log summarises; every access line stays."""
    from twisted.logger import globalLogPublisher

    seen: list[dict[str, object]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        h = Harness()
        for _ in range(25):
            protocol, transport = h.accept()
            protocol.dataReceived(client_hello_bytes("unknown.example.com"))
            transport.protocol.connectionLost(Failure(ConnectionLost()))
        h.reactor.advance(61)
        protocol, transport = h.accept()
        protocol.dataReceived(client_hello_bytes("unknown.example.com"))
        h.close(transport)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    one_by_one = [e for e in seen if e.get("log_format", "").startswith("refused ")]
    summaries = [e for e in seen if "more" in e and e.get("reason") == "not_allowed"]
    assert len(one_by_one) == 11  # 10 in the first minute, then the first of the next
    assert [s["more"] for s in summaries] == [15]
    assert h.relay.stats.refused["not_allowed"] == 26
    assert len(h.events) == 26  # each closed connection has its access line
