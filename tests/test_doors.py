"""Layer 1: the front doors as pure objects, fed bytes without a transport, and the one
reason table their refusals are answered from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from acrrelay import doors, reasons
from acrrelay.doors import (
    CONNECT_ESTABLISHED,
    NEED_MORE,
    Ask,
    ConnectDoor,
    HeadDoor,
    HttpDoor,
    NoDoor,
    Refused,
    TlsDoor,
    choose_door,
    proxy_signature,
    tls_alert,
)
from acrrelay.testing import alert_description, client_hello_bytes

REGISTRY = "registry.cn-beijing.aliyuncs.com"
ALL = ("tls", "http", "connect")
README = Path(__file__).resolve().parent.parent / "README.md"


def door_for(first: bytes, protocols: tuple[str, ...] = ALL, consume_auth: bool = False) -> Any:
    return choose_door(
        first,
        listener="front",
        protocols=protocols,
        limit=16384,
        tls_port=443,
        consume_auth=consume_auth,
    )


def feed_bytewise(door: doors.FrontDoor, data: bytes) -> object:
    """Feed one byte at a time; return the first outcome that is not NEED_MORE."""
    for i in range(len(data)):
        outcome = door.feed(data[i : i + 1])
        if outcome is not NEED_MORE:
            return outcome
    return NEED_MORE


def test_tls_door_asks_for_the_sni_on_the_tls_port() -> None:
    """A real ClientHello, fed byte by byte, becomes one question: its SNI on port 443."""
    door = door_for(b"\x16")
    assert isinstance(door, TlsDoor)
    outcome = feed_bytewise(door, client_hello_bytes(REGISTRY))
    assert isinstance(outcome, Ask)
    assert (outcome.name, outcome.port, outcome.door) == (REGISTRY, 443, door)
    assert outcome.hello is not None and outcome.hello.server_name == REGISTRY


def test_tls_door_refuses_a_broken_hello_and_answers_with_an_alert() -> None:
    """A handshake record with a bad version is malformed, answered by unrecognized_name,
    while a backend failure is answered by internal_error."""
    door = TlsDoor(16384, 443)
    outcome = door.feed(b"\x16\x09\x09\x00\x05hello")
    assert isinstance(outcome, Refused) and outcome.reason == "malformed"
    assert alert_description(door.answer("malformed", "x")) == reasons.ALERT_UNRECOGNIZED_NAME
    assert alert_description(door.answer("connect_failed", "x")) == reasons.ALERT_INTERNAL_ERROR


def test_head_door_hands_a_connect_to_the_connect_door() -> None:
    """A CONNECT head asks for its target; its door greets with 200 and replays only
    what follows the head."""
    head = b"CONNECT registry.cn-beijing.aliyuncs.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    door = door_for(b"C")
    assert isinstance(door, HeadDoor) and door.protocol is None
    outcome = door.feed(head)
    assert isinstance(outcome, Ask) and isinstance(outcome.door, ConnectDoor)
    assert (outcome.name, outcome.port, outcome.door.protocol) == (REGISTRY, 443, "connect")
    assert outcome.door.greeting() == CONNECT_ESTABLISHED
    assert outcome.door.replay(head + b"\x16tls") == b"\x16tls"


def test_http_door_follows_later_requests_and_cuts_off_a_host_switch() -> None:
    """A plain request asks for its Host on port 80; a later request on the same
    connection for another host is refused as host_switch, in HTTP."""
    first = b"GET /v2/ HTTP/1.1\r\nHost: registry.cn-beijing.aliyuncs.com\r\n\r\n"
    outcome = door_for(b"G").feed(first)
    assert isinstance(outcome, Ask) and isinstance(outcome.door, HttpDoor)
    assert (outcome.name, outcome.port) == (REGISTRY, 80)
    door = outcome.door
    assert door.follows and door.follow(first) is None
    refusal = door.follow(b"GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert isinstance(refusal, Refused) and refusal.reason == "host_switch"
    assert door.answer(refusal.reason, refusal.detail).startswith(b"HTTP/1.1 403 ")


def test_http_door_with_consumed_credentials_allows_one_request_only() -> None:
    """On a listener with users the head is replayed without Proxy-Authorization, and a
    second request is refused as one_request_with_auth."""
    head = (
        b"GET http://registry.cn-beijing.aliyuncs.com/v2/ HTTP/1.1\r\n"
        b"Host: registry.cn-beijing.aliyuncs.com\r\nProxy-Authorization: Basic eDp5\r\n\r\n"
    )
    outcome = door_for(b"G", consume_auth=True).feed(head)
    assert isinstance(outcome, Ask)
    replay = outcome.door.replay(head)
    assert b"Proxy-Authorization" not in replay and b"Connection: close" in replay
    refusal = outcome.door.follow(
        b"GET /v2/ HTTP/1.1\r\nHost: registry.cn-beijing.aliyuncs.com\r\n\r\n"
    )
    assert isinstance(refusal, Refused) and refusal.reason == "one_request_with_auth"


def test_a_door_the_listener_does_not_list_is_refused_in_its_language() -> None:
    """CONNECT on an http-only listener is protocol_not_allowed, answered by the CONNECT
    door (403), and TLS on a listener without it gets an alert from the door-less answer."""
    head = b"CONNECT registry.cn-beijing.aliyuncs.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    outcome = door_for(b"C", protocols=("http",)).feed(head)
    assert isinstance(outcome, Refused) and outcome.reason == "protocol_not_allowed"
    assert outcome.door is not None and outcome.door.protocol == "connect"
    refused = door_for(b"\x16", protocols=("http",))
    assert isinstance(refused, Refused) and refused.door is not None
    assert alert_description(refused.door.answer(refused.reason, "")) == 112


def test_not_tls_and_not_recognized_close_without_an_answer() -> None:
    """Bytes no door takes are not_tls on a TLS-only listener, not_recognized elsewhere,
    and nothing is sent back."""
    tls_only = door_for(b"\x00", protocols=("tls",))
    assert isinstance(tls_only, Refused) and tls_only.reason == "not_tls"
    other = door_for(b"\x00")
    assert isinstance(other, Refused) and other.reason == "not_recognized"
    assert NoDoor().answer("not_recognized", "") == b""


def test_auth_required_is_answered_with_407_and_a_challenge() -> None:
    """The 407 carries Proxy-Authenticate, so clients know to send credentials."""
    head = b"CONNECT registry.cn-beijing.aliyuncs.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = door_for(b"C").feed(head).door.answer("auth_required", "missing")
    assert answer.startswith(b"HTTP/1.1 407 ")
    assert b'Proxy-Authenticate: Basic realm="acrrelay"' in answer


def test_a_head_door_timing_out_becomes_an_http_door() -> None:
    """A stalled head is peek_timeout, and from then on the door is named http."""
    door = HeadDoor(16384, ALL, False)
    assert door.feed(b"GET / HT") is NEED_MORE
    refusal = door.timed_out("no complete request")
    assert refusal.reason == "peek_timeout" and door.protocol == "http"
    assert door.answer(refusal.reason, refusal.detail).startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize(
    ("peeked", "expected"),
    [
        (b"PROXY TCP4 ", "refused"),
        (b"\r\n\r\n\x00\r\nQUIT\n", "refused"),
        (b"\r\n", NEED_MORE),
        (b"PRO", False),
        (b"GET /", True),
        (b"\x16\x03\x01", True),
    ],
)
def test_proxy_signature_from_an_untrusted_peer(peeked: bytes, expected: object) -> None:
    """A PROXY signature from a peer not trusted to send one is refused as proxy_untrusted;
    too few bytes wait, unless an HTTP door can already start (then checked again)."""
    outcome = proxy_signature(peeked, "192.0.2.7:40000")
    if expected == "refused":
        assert isinstance(outcome, Refused) and outcome.reason == "proxy_untrusted"
    else:
        assert outcome is expected


def test_the_tls_alert_record_is_fatal_and_well_framed() -> None:
    """An alert is one record: type 21, TLS 1.2, length 2, level fatal, the description."""
    assert tls_alert(112) == b"\x15\x03\x03\x00\x02\x02\x70"


def test_every_reason_has_one_status_and_http_errors_use_it() -> None:
    """The HTTP answer's status is the table's, for every reason an HTTP door can give."""
    for reason in reasons.REFUSALS.values():
        if reason.status is None:
            continue
        answer = doors.http_answer(reason.name, "detail")
        assert answer.startswith(f"HTTP/1.1 {reason.status} ".encode()), reason.name
        assert f"acrrelay: {reason.name}: detail".encode() in answer


def test_readme_refusal_table_matches_the_reason_table() -> None:
    """The README's refusal table lists exactly the reasons of acrrelay.reasons, each with
    its HTTP answer (so a reason sent with 408, 502 or 504 cannot be missing)."""
    text = README.read_text()
    section = text.split("### Refusals and their answers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d+|none) \|", section, re.MULTILINE)
    documented = {name: None if status == "none" else int(status) for name, status in rows}
    assert documented == {name: r.status for name, r in reasons.REFUSALS.items()}


def test_readme_names_every_close_reason() -> None:
    """The access-log section names every close_reason the relay writes."""
    text = README.read_text()
    section = text.split("## The access log", 1)[1].split("\n## ", 1)[0]
    for reason in (*reasons.CLOSE_REASONS, *reasons.BACKEND_FAILURES):
        assert f"`{reason}`" in section, reason
