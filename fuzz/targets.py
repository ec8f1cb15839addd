"""Fuzz targets: one per parser that reads bytes from the network.

Each target takes one fuzz input and checks the parser's contract:

- it raises nothing but its own error type (anything else is a crash);
- its outcome does not depend on how the bytes were split across reads (the first
  input bytes choose the split points, so the fuzzer explores splits too);
- its buffers stay within its limit after every read, and it holds none of them
  once it has answered.

Hangs are caught by libFuzzer itself (``-timeout``); memory growth by the runner
(:mod:`fuzz.run_one` samples RSS, ``python -m fuzz run`` judges it), with libFuzzer's
``-rss_limit_mb`` as the backstop for a blow-up.

Two planted targets (:data:`PLANTED`), a crash and a leak, exist only so the tests can
show that a crash and memory growth are caught; they are reachable only when the
environment sets ``ACRRELAY_FUZZ_PLANTED=1``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from acrrelay.clienthello import NEED_MORE, ClientHelloError, ClientHelloReader
from acrrelay.httphead import HttpHeadError, HttpHeadReader
from acrrelay.proxyproto import (
    DEFAULT_MAX_V2_LENGTH,
    V1_MAX_LENGTH,
    ProxyHeaderReader,
    ProxyProtocolError,
)

LIMIT = 4096
#: A v2 PROXY header's fixed part: signature, version/command, family, length.
V2_FIXED = 16
#: The environment variable that makes the planted targets reachable (tests only).
PLANTED_ENV = "ACRRELAY_FUZZ_PLANTED"

Check = Callable[[bytes], None]
_R = TypeVar("_R", bound="_Reader")


def _cuts(data: bytes) -> tuple[list[int], bytes]:
    """Split points taken from the first byte(s); the rest is the payload."""
    if not data:
        return [], b""
    count = data[0] % 4
    cuts = [b for b in data[1 : 1 + count]]
    return sorted(cuts), data[1 + count :]


def _pieces(payload: bytes, cuts: list[int]) -> list[bytes]:
    out, start = [], 0
    for cut in [*cuts, len(payload)]:
        cut = min(cut, len(payload))
        if cut > start:
            out.append(payload[start:cut])
            start = cut
    return out


def _outcome(
    feed: Callable[[bytes], Any],
    pieces: list[bytes],
    error: type[Exception],
    check: Check | None = None,
) -> Any:
    """Feed ``pieces`` in turn; ``check(piece)`` runs after each read that asked for more."""
    try:
        for piece in pieces:
            result = feed(piece)
            if result is not NEED_MORE:
                return ("done", result)
            if check is not None:
                check(piece)
        return ("need-more",)
    except error as e:
        return ("error", getattr(e, "reason", None))


class _Reader(Protocol):
    def feed(self, data: bytes) -> Any: ...


def _whole_and_split(
    make: Callable[[], _R],
    data: bytes,
    error: type[Exception],
    within: Callable[[_R], Check],
) -> tuple[Any, Any, _R, _R, bytes]:
    """Feed the payload once whole and once in the pieces ``data`` chose, each to a new
    reader whose buffers ``within`` checks: (whole outcome, split outcome, the whole
    reader, the split reader, the payload)."""
    cuts, payload = _cuts(data)
    whole_reader, split_reader = make(), make()
    whole = _outcome(whole_reader.feed, [payload] if payload else [], error, within(whole_reader))
    split = _outcome(split_reader.feed, _pieces(payload, cuts), error, within(split_reader))
    return whole, split, whole_reader, split_reader, payload


def _hello_within_limit(reader: ClientHelloReader) -> Check:
    def check(piece: bytes) -> None:
        # Record headers count too: the relay's peek buffer holds them.
        assert reader._consumed + len(reader._pending) <= LIMIT, "buffered past the limit"

    return check


def client_hello(data: bytes) -> None:
    whole, split, *_ = _whole_and_split(
        lambda: ClientHelloReader(LIMIT), data, ClientHelloError, _hello_within_limit
    )
    assert whole == split, (whole, split)


def _head_within_limit(reader: HttpHeadReader) -> Check:
    def check(piece: bytes) -> None:
        # The reader keeps the raw head to check it. Past the limit it may hold the read
        # that crossed it only until it refuses (too_large), so waiting it holds the limit.
        assert len(reader._raw) <= LIMIT, (len(reader._raw), len(piece))

    return check


def http_head(data: bytes) -> None:
    whole, split, whole_reader, split_reader, payload = _whole_and_split(
        lambda: HttpHeadReader(LIMIT), data, HttpHeadError, _head_within_limit
    )
    assert whole == split, (whole, split)
    if whole[0] != "need-more":
        # Answered, either way: the raw head is let go.
        assert not whole_reader._raw and not split_reader._raw, "kept the head after answering"
    if whole[0] == "done":
        # Follow the rest of the connection as the relay does; only HttpHeadError may escape.
        follower = whole_reader.follower()
        try:
            follower.feed(b"")
            follower.feed(payload[:64])
        except HttpHeadError:
            pass


def _proxy_bound(reader: ProxyHeaderReader) -> int:
    """What the reader may hold: the signature so far, a v1 line, or a whole v2 header."""
    if reader._version == 1:
        return V1_MAX_LENGTH
    if reader._version == 2:
        return V2_FIXED + DEFAULT_MAX_V2_LENGTH
    return V2_FIXED  # still telling the signatures apart (12 bytes at most)


def _proxy_within_limit(reader: ProxyHeaderReader) -> Check:
    def check(piece: bytes) -> None:
        assert len(reader._buf) <= _proxy_bound(reader), (reader._version, len(reader._buf))

    return check


def proxy_header(data: bytes) -> None:
    whole, split, whole_reader, _, payload = _whole_and_split(
        lambda: ProxyHeaderReader(DEFAULT_MAX_V2_LENGTH), data, ProxyProtocolError,
        _proxy_within_limit,
    )  # fmt: skip
    if whole[0] == "done" and split[0] == "done":
        # The header is the same; the bytes after it come in pieces when split.
        assert whole[1][0] == split[1][0], (whole, split)
        header, rest = whole[1]
        # The header took exactly its own bytes, within its bound; the rest passes on as is.
        assert header.size <= _proxy_bound(whole_reader), header
        assert rest == payload[header.size :], (header, len(rest), len(payload))
    else:
        assert whole == split, (whole, split)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "clienthello": client_hello,
    "httphead": http_head,
    "proxyproto": proxy_header,
}


# ---------------------------------------------------------------- planted, for the tests


def _planted_crash(data: bytes) -> None:
    """A "parser" whose bug the fuzzer finds in a few hundred inputs: an input starting
    with ``!`` lets a foreign exception escape."""
    if data[:1] == b"!":
        raise KeyError("planted crash")


_hoard: list[bytes] = []
_next_leak = 0.0
LEAK_STEP = 1 << 20
LEAK_EVERY = 0.05


def _planted_leak(data: bytes) -> None:
    """A "parser" that keeps memory as it goes: 1 MiB per 50 ms of fuzzing, so the growth
    does not depend on how fast the machine runs inputs."""
    global _next_leak
    now = time.monotonic()
    if now >= _next_leak:
        _next_leak = now + LEAK_EVERY
        _hoard.append(bytes([len(_hoard) % 251 + 1]) * LEAK_STEP)  # touched, so resident


PLANTED: dict[str, Callable[[bytes], None]] = {
    "planted-crash": _planted_crash,
    "planted-leak": _planted_leak,
}


def reachable() -> dict[str, Callable[[bytes], None]]:
    """The targets a run may name: the parsers, and the planted ones in tests."""
    if os.environ.get(PLANTED_ENV) == "1":
        return {**TARGETS, **PLANTED}
    return dict(TARGETS)
