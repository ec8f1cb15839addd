"""The soak's judgement of backend resets: the client must get every byte the relay read."""

from __future__ import annotations

from typing import Any

from soak.run import ResetSeen, _audit_resets


def _entry(
    client: str, bytes_down: int, reason: str = "backend_reset", number: int = 1
) -> dict[str, Any]:
    return {"id": number, "client": client, "bytes_down": bytes_down, "close_reason": reason}


def test_a_reset_delivered_in_full_is_no_error() -> None:
    """The client got exactly what the relay read, all the backend sent: delivered."""
    audit = _audit_resets(
        [ResetSeen("127.0.1.1:4000", 1200, True)], [_entry("127.0.1.1:4000", 1200)]
    )
    assert (audit.delivered, audit.cut_short, audit.errors) == (1, 0, [])


def test_a_reset_cut_by_the_backend_before_the_relay_read_is_counted_not_an_error() -> None:
    """The relay read less than the backend wrote, and passed all of it on: cut short."""
    audit = _audit_resets(
        [ResetSeen("127.0.1.1:4000", 300, False)], [_entry("127.0.1.1:4000", 300)]
    )
    assert (audit.delivered, audit.cut_short, audit.errors) == (1, 1, [])


def test_bytes_the_relay_read_but_did_not_deliver_are_an_error() -> None:
    """The client got fewer bytes than the relay logged as read: the relay lost them."""
    audit = _audit_resets(
        [ResetSeen("127.0.1.1:4000", 300, False)], [_entry("127.0.1.1:4000", 1200, number=7)]
    )
    assert audit.delivered == 0
    assert audit.errors == [
        "a backend reset from 127.0.1.1:4000: the client got 300 bytes, the relay read 1200 "
        "(access entry 7)"
    ]


def test_a_reset_without_its_backend_reset_entry_is_an_error() -> None:
    """A reset the client saw must be logged backend_reset, from the same address."""
    seen = [ResetSeen("127.0.1.1:4000", 300, True), ResetSeen("127.0.1.2:4001", 300, True)]
    entries = [_entry("127.0.1.1:4000", 300, "done"), _entry("127.0.1.9:4001", 300)]
    audit = _audit_resets(seen, entries)
    assert audit.delivered == 0 and len(audit.errors) == 2, audit


def test_resets_from_one_address_are_matched_in_order() -> None:
    """An address used twice (far apart in a long soak) pairs its resets in order."""
    seen = [ResetSeen("127.0.1.1:4000", 100, True), ResetSeen("127.0.1.1:4000", 900, True)]
    entries = [
        _entry("127.0.1.1:4000", 100, number=1),
        _entry("127.0.1.1:4000", 50, "done", number=2),
        _entry("127.0.1.1:4000", 900, number=3),
    ]
    audit = _audit_resets(seen, entries)
    assert (audit.delivered, audit.errors) == (2, [])
