"""Layer 1: the ClientHello reader, on real OpenSSL hellos and on hostile bytes."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acrrelay.clienthello import (
    NEED_MORE,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    NotTLS,
    parse_client_hello,
)
from acrrelay.testing import client_hello_bytes, records_of, reframe

NAMES = [
    "registry.cn-beijing.aliyuncs.com",
    "dockerauth-ee-vpc.cn-shanghai.aliyuncs.com",
    "my-registry-vpc.cn-hangzhou.cr.aliyuncs.com",
    "cri-abc123-registry.oss-cn-hangzhou-internal.aliyuncs.com",
    "a.b",
]


def feed_pieces(data: bytes, cuts: list[int], limit: int = 16 * 1024) -> object:
    """Feed ``data`` cut at ``cuts``; return the first decisive outcome."""
    reader = ClientHelloReader(limit)
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        piece = data[start:cut]
        start = cut
        if not piece:
            continue
        outcome = reader.feed(piece)
        if outcome is not NEED_MORE:
            return outcome
    return NEED_MORE


@pytest.fixture(scope="module")
def hellos() -> dict[str, bytes]:
    return {name: client_hello_bytes(name, alpn=["h2", "http/1.1"]) for name in NAMES}


def test_real_hellos_give_their_server_name(hellos: dict[str, bytes]) -> None:
    """Every real OpenSSL hello yields its SNI, ALPN, size and a single record."""
    for name, data in hellos.items():
        hello = parse_client_hello(data)
        assert isinstance(hello, ClientHello)
        assert hello.server_name == name
        assert hello.alpn == ("h2", "http/1.1")
        assert hello.records == 1
        assert hello.stream_bytes == len(data)
        assert hello.size == len(data) - 5


@pytest.mark.parametrize("name", NAMES)
def test_split_at_every_offset(hellos: dict[str, bytes], name: str) -> None:
    """A hello cut in two at any byte offset reassembles to the same result."""
    data = hellos[name]
    whole = parse_client_hello(data)
    for offset in range(1, len(data)):
        assert feed_pieces(data, [offset]) == whole, offset


def test_one_byte_at_a_time(hellos: dict[str, bytes]) -> None:
    """Feeding one byte per call works and answers NEED_MORE until the last byte."""
    data = hellos[NAMES[0]]
    reader = ClientHelloReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is NEED_MORE
    hello = reader.feed(data[-1:])
    assert isinstance(hello, ClientHello) and hello.server_name == NAMES[0]


@pytest.mark.parametrize("pieces", [2, 3])
def test_reframed_into_several_records(hellos: dict[str, bytes], pieces: int) -> None:
    """The same handshake message split across 2 and 3 TLS records is reassembled."""
    data = reframe(hellos[NAMES[1]], pieces)
    assert len(records_of(data)) == pieces
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello)
    assert hello.server_name == NAMES[1]
    assert hello.records == pieces
    # ...and across TCP reads too, at every offset.
    for offset in range(1, len(data)):
        assert feed_pieces(data, [offset]) == hello


def test_record_per_byte_of_handshake(hellos: dict[str, bytes]) -> None:
    """An extreme but legal framing, one handshake byte per record, still parses under a cap."""
    data = reframe(hellos["a.b"], len(hellos["a.b"]) - 5)
    hello = parse_client_hello(data, limit=64 * 1024)
    assert isinstance(hello, ClientHello) and hello.server_name == "a.b"


def test_hello_over_5_kb() -> None:
    """A real 6 KB OpenSSL hello (long ALPN list) parses, split anywhere."""
    alpn = [f"{'x' * 200}{i}" for i in range(30)]
    data = client_hello_bytes("big.example.com", alpn=alpn)
    assert len(data) > 5 * 1024
    hello = parse_client_hello(data)
    assert isinstance(hello, ClientHello)
    assert hello.server_name == "big.example.com"
    assert len(hello.alpn) == 30
    for offset in range(1, len(data), 97):
        assert feed_pieces(data, [offset, offset + 1500]) == hello


def test_hello_above_the_limit_is_too_large() -> None:
    """A hello bigger than the cap is refused as too_large, before it is all buffered."""
    data = client_hello_bytes("big.example.com", alpn=[f"{'y' * 250}{i}" for i in range(40)])
    assert len(data) > 8 * 1024
    with pytest.raises(ClientHelloError) as info:
        feed_pieces(data, [100], limit=4096)
    assert info.value.reason == "too_large"


def test_many_small_records_hit_the_limit() -> None:
    """Record headers count against the cap, so tiny records cannot stretch it."""
    data = reframe(client_hello_bytes("a.example"), 400)
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(data, limit=1024)
    assert info.value.reason == "too_large"


def test_no_sni() -> None:
    """A hello without the server_name extension parses with server_name None."""
    hello = parse_client_hello(client_hello_bytes(None))
    assert isinstance(hello, ClientHello) and hello.server_name is None


def test_uppercase_sni_is_lowered() -> None:
    """Host names are case-insensitive; the reader lower-cases them."""
    hello = parse_client_hello(client_hello_bytes("Registry.CN-Beijing.Aliyuncs.COM"))
    assert isinstance(hello, ClientHello)
    assert hello.server_name == "registry.cn-beijing.aliyuncs.com"


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "not a TLS handshake record"),
        (b"CONNECT a:443 HTTP/1.1\r\n", "not a TLS handshake record"),
        (b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10", "sslv2"),
        (b"\x00", "not a TLS handshake record"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not a TLS handshake record"),
    ],
)
def test_not_tls_is_told_from_the_first_byte(data: bytes, detail: str) -> None:
    """Non-TLS input (HTTP, CONNECT, SSLv2-style, SSH) is NotTLS after one byte."""
    assert ClientHelloReader().feed(data[:1]) == NotTLS(detail)


def _hello_with_extensions(ext_block: bytes, *, declared: int | None = None) -> bytes:
    body = (
        b"\x03\x03"
        + b"\x00" * 32
        + b"\x00"  # session id
        + b"\x00\x02\x13\x01"  # one cipher suite
        + b"\x01\x00"  # null compression
        + struct.pack("!H", len(ext_block) if declared is None else declared)
        + ext_block
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def _sni_extension(name: bytes) -> bytes:
    entry = b"\x00" + struct.pack("!H", len(name)) + name
    names = struct.pack("!H", len(entry)) + entry
    return b"\x00\x00" + struct.pack("!H", len(names)) + names


def test_handmade_hello_parses() -> None:
    """The hand-built hello used by the malformed cases is itself well formed."""
    hello = parse_client_hello(_hello_with_extensions(_sni_extension(b"ok.example")))
    assert isinstance(hello, ClientHello) and hello.server_name == "ok.example"


@pytest.mark.parametrize(
    "data",
    [
        # extension block length larger than what follows
        _hello_with_extensions(_sni_extension(b"a.example"), declared=200),
        # extension block truncated in the middle of an extension
        _hello_with_extensions(_sni_extension(b"a.example")[:-3]),
        # SNI extension whose inner list overruns the extension
        _hello_with_extensions(b"\x00\x00\x00\x05\x00\x09\x00\x00\x05"),
        # the same extension twice
        _hello_with_extensions(_sni_extension(b"a.example") * 2),
        # a host name with a character DNS does not allow
        _hello_with_extensions(_sni_extension(b"a b.example")),
        # an empty host name
        _hello_with_extensions(_sni_extension(b"")),
        # a record of another type (an alert) after part of the hello
        b"\x16\x03\x01\x00\x04\x01\x00\x01\x00" + b"\x15\x03\x01\x00\x02\x02\x28",
        # a handshake message that is not a ClientHello
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
        # a record claiming more than 2^14 bytes
        b"\x16\x03\x01\x40\x01" + b"\x00" * 10,
        # a zero-length handshake record
        b"\x16\x03\x01\x00\x00",
        # record version 2.0
        b"\x16\x02\x00\x00\x04\x01\x00\x00\x00",
    ],
)
def test_malformed_raises_the_module_error(data: bytes) -> None:
    """Malformed TLS raises ClientHelloError(reason='malformed') and nothing else."""
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(data)
    assert info.value.reason == "malformed"


def test_truncated_extension_block_at_every_length(hellos: dict[str, bytes]) -> None:
    """A real hello whose extension block is cut short, re-framed consistently, is malformed."""
    data = hellos[NAMES[0]]
    body = data[9:]
    for cut in range(1, 60):
        shorter = body[:-cut]
        handshake = b"\x01" + len(shorter).to_bytes(3, "big") + shorter
        framed = b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake
        with pytest.raises(ClientHelloError):
            parse_client_hello(framed)


def test_reader_refuses_to_be_fed_after_deciding(hellos: dict[str, bytes]) -> None:
    """A finished reader is not silently reused."""
    reader = ClientHelloReader()
    reader.feed(hellos["a.b"])
    with pytest.raises(RuntimeError):
        reader.feed(b"\x16")


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0, max_value=4096), max_size=8))
def test_arbitrary_bytes_raise_only_the_module_error(data: bytes, cuts: list[int]) -> None:
    """Any bytes, in any split, give an outcome or ClientHelloError, and the same outcome
    whatever the split."""
    results = []
    for pieces in ([], cuts):
        try:
            results.append(feed_pieces(data, pieces))
        except ClientHelloError as e:
            results.append(("error", e.reason))
    assert results[0] == results[1]


_MUTATION_BASE = client_hello_bytes("mutate.example", alpn=["h2"])


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=0, max_value=2999))
def test_mutated_real_hello_never_escapes(mutation: bytes, where: int) -> None:
    """Real hellos with bytes overwritten raise only ClientHelloError."""
    base = bytearray(_MUTATION_BASE)
    where %= len(base)
    base[where : where + len(mutation)] = mutation[: len(base) - where]
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(bytes(base))


@pytest.mark.parametrize(
    "opening",
    [
        b"\x16\x03\x01\x3f\xf0\x01\x00\x3f\xec",  # one record, a hello claiming 16 KiB
        b"\x16\x03\x01\x00\x04\x01\x01\x00\x00",  # a hello claiming 64 KiB, in many records
    ],
)
def test_memory_is_bounded_by_the_limit(opening: bytes) -> None:
    """A megabyte offered 1 KiB at a time is cut off near the cap, with bounded memory."""
    reader = ClientHelloReader(limit=16 * 1024)
    filler = b"\x16\x03\x01\x03\xfb" + b"\x00" * 1019 if opening.endswith(b"\x00\x00") else None
    tracemalloc.start()
    fed = 0
    try:
        with pytest.raises(ClientHelloError):
            reader.feed(opening)
            for _ in range(1024):
                reader.feed(filler or b"\x00" * 1024)
                fed += 1024
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert fed <= 17 * 1024
    assert peak < 256 * 1024


def _extension_at(hello: bytes, wanted: int) -> int:
    """The offset in ``hello`` (one record) of extension ``wanted``'s body."""
    pos = 5 + 4 + 2 + 32
    pos += 1 + hello[pos]  # session id
    pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher suites
    pos += 1 + hello[pos]  # compression methods
    pos += 2  # extensions length
    while pos < len(hello):
        kind = int.from_bytes(hello[pos : pos + 2], "big")
        length = int.from_bytes(hello[pos + 2 : pos + 4], "big")
        if kind == wanted:
            return pos + 4
        pos += 4 + length
    raise AssertionError(f"no extension {wanted}")


def test_a_hello_is_not_refused_over_supported_versions() -> None:
    """supported_versions is nothing the relay reads: a hello whose version list the
    relay used to call malformed (an odd length) is routed by its SNI like any other."""
    hello = bytearray(client_hello_bytes("registry.cn-beijing.aliyuncs.com"))
    body = _extension_at(bytes(hello), 43)
    assert hello[body] >= 2
    hello[body] = 1  # one byte of a two-byte version: the list no longer splits into versions
    parsed = parse_client_hello(bytes(hello))
    assert isinstance(parsed, ClientHello)
    assert parsed.server_name == "registry.cn-beijing.aliyuncs.com"
