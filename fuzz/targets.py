"""Fuzz targets: one per parser that reads bytes from the network.

Each target takes one fuzz input and checks the parser's contract:

- it raises nothing but its own error type (anything else is a crash);
- its outcome does not depend on how the bytes were split across reads (the first
  input bytes choose the split points, so the fuzzer explores splits too);
- its buffers stay within its limit.

Hangs and memory growth are caught by libFuzzer itself (``-timeout``, ``-rss_limit_mb``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from acrrelay.clienthello import NEED_MORE, ClientHelloError, ClientHelloReader
from acrrelay.httphead import HttpHeadError, HttpHeadReader
from acrrelay.proxyproto import ProxyHeaderReader, ProxyProtocolError

LIMIT = 4096


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


def _outcome(feed: Callable[[bytes], Any], pieces: list[bytes], error: type[Exception]) -> Any:
    try:
        for piece in pieces:
            result = feed(piece)
            if result is not NEED_MORE:
                return ("done", result)
        return ("need-more",)
    except error as e:
        return ("error", getattr(e, "reason", None))


def client_hello(data: bytes) -> None:
    cuts, payload = _cuts(data)
    whole = _outcome(ClientHelloReader(LIMIT).feed, [payload] if payload else [], ClientHelloError)
    reader = ClientHelloReader(LIMIT)
    split = _outcome(reader.feed, _pieces(payload, cuts), ClientHelloError)
    assert whole == split, (whole, split)
    if split == ("need-more",):  # still buffering: within the limit, record headers included
        assert reader._consumed + len(reader._pending) <= LIMIT, "buffered past the limit"


def http_head(data: bytes) -> None:
    cuts, payload = _cuts(data)
    whole_reader = HttpHeadReader(LIMIT)
    whole = _outcome(whole_reader.feed, [payload] if payload else [], HttpHeadError)
    split_reader = HttpHeadReader(LIMIT)
    split = _outcome(split_reader.feed, _pieces(payload, cuts), HttpHeadError)
    assert whole == split, (whole, split)
    if whole[0] == "done":
        # Follow the rest of the connection as the relay does; only HttpHeadError may escape.
        follower = whole_reader.follower()
        try:
            follower.feed(b"")
            follower.feed(payload[:64])
        except HttpHeadError:
            pass


def proxy_header(data: bytes) -> None:
    cuts, payload = _cuts(data)
    whole = _outcome(ProxyHeaderReader().feed, [payload] if payload else [], ProxyProtocolError)
    split = _outcome(ProxyHeaderReader().feed, _pieces(payload, cuts), ProxyProtocolError)
    if whole[0] == "done" and split[0] == "done":
        # The header is the same; the bytes after it come in pieces when split.
        assert whole[1][0] == split[1][0], (whole, split)
    else:
        assert whole == split, (whole, split)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "clienthello": client_hello,
    "httphead": http_head,
    "proxyproto": proxy_header,
}
