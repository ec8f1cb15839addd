"""Build the seed corpus from real clients: ``python -m fuzz seed``.

- ClientHellos from OpenSSL (through :mod:`ssl`, several shapes), from ``curl`` and
  from ``openssl s_client``, captured by a loopback socket that reads the first flight;
- request heads from ``curl``: origin-form, forward-proxy absolute-form, and CONNECT
  (curl is pointed at the loopback capture socket as its proxy: nothing leaves);
- PROXY protocol v1/v2 headers from the encoders, and a v2 header with TLVs.

Every seed starts with a zero byte: the targets read their split points from the
first byte, and zero means "one read".
"""

from __future__ import annotations

import socket
import struct
import subprocess
from pathlib import Path

from acrrelay.proxyproto import encode_v1, encode_v2
from acrrelay.testing import client_hello_bytes, reframe

NAMES = (
    "registry-vpc.cn-beijing.aliyuncs.com",
    "dockerauth.cn-hangzhou.aliyuncs.com",
    "bucket.oss-cn-shanghai-internal.aliyuncs.com",
)


def _capture(command: list[str], *, timeout: float = 5.0) -> bytes:
    """Run ``command`` (with PORT replaced) against a socket that keeps what it reads first."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(timeout)
        port = server.getsockname()[1]
        argv = [part.replace("PORT", str(port)) for part in command]
        client = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        got = b""
        try:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(2.0)
                while True:
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    got += chunk
                    if got.startswith(b"\x16") and len(got) >= 5:
                        if len(got) >= 5 + int.from_bytes(got[3:5], "big"):
                            break
                    elif b"\r\n\r\n" in got:
                        break
        finally:
            client.kill()
            client.wait(timeout=5)
    return got


def _hellos() -> dict[str, bytes]:
    seeds = {}
    for i, name in enumerate(NAMES):
        seeds[f"openssl-{i}"] = client_hello_bytes(name, alpn=["h2", "http/1.1"])
    seeds["openssl-no-sni"] = client_hello_bytes(None)
    seeds["openssl-tls13"] = client_hello_bytes(NAMES[0], tls13_only=True)
    seeds["openssl-3-records"] = reframe(client_hello_bytes(NAMES[1]), 3)
    seeds["openssl-large"] = client_hello_bytes(NAMES[2], alpn=[f"p{i:03}" * 20 for i in range(12)])
    seeds["curl"] = _capture(
        [
            "curl",
            "-sk",
            "--max-time",
            "3",
            "--resolve",
            f"{NAMES[0]}:PORT:127.0.0.1",
            f"https://{NAMES[0]}:PORT/v2/",
        ]
    )
    seeds["s_client"] = _capture(
        ["openssl", "s_client", "-connect", "127.0.0.1:PORT", "-servername", NAMES[2]]
    )
    return seeds


def _heads() -> dict[str, bytes]:
    proxy = ["curl", "-s", "--max-time", "3", "-x", "http://127.0.0.1:PORT"]
    seeds = {
        "curl-get": _capture(
            [
                "curl",
                "-s",
                "--max-time",
                "3",
                "--resolve",
                f"{NAMES[2]}:PORT:127.0.0.1",
                f"http://{NAMES[2]}:PORT/docker/registry/v2/blobs/sha256/ab/data?Expires=1&Signature=x",
            ]
        ),
        "curl-absolute": _capture([*proxy, f"http://{NAMES[2]}/docker/registry/v2/blobs/x"]),
        "curl-connect": _capture([*proxy, "-k", f"https://{NAMES[0]}/v2/"]),
        "curl-connect-auth": _capture([*proxy, "-U", "ci:secret", "-k", f"https://{NAMES[0]}/v2/"]),
        "post-body": (
            b"POST /v2/team/app/blobs/uploads/ HTTP/1.1\r\nHost: "
            + NAMES[0].encode()
            + b"\r\nContent-Length: 5\r\n\r\nhelloGET /v2/ HTTP/1.1\r\nHost: "
            + NAMES[0].encode()
            + b"\r\n\r\n"
        ),
        "chunked": (
            b"PATCH /v2/team/app/blobs/uploads/1 HTTP/1.1\r\nHost: "
            + NAMES[0].encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        ),
        "http10": b"GET / HTTP/1.0\r\n\r\n",
    }
    return seeds


def _proxy_headers() -> dict[str, bytes]:
    tlvs = (
        b"\x01\x00\x02h2"  # ALPN
        + b"\x02\x00\x0bexample.com"  # AUTHORITY
        + b"\x04\x00\x00"  # NOOP
    )
    addresses = (
        socket.inet_aton("198.51.100.1")
        + socket.inet_aton("10.0.0.1")
        + struct.pack("!HH", 40000, 443)
    )
    block = addresses + tlvs
    v2_tlv = b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11" + struct.pack("!H", len(block)) + block
    return {
        "v1-tcp4": encode_v1(("198.51.100.1", 40000), ("10.0.0.1", 443)) + b"\x16\x03\x01",
        "v1-tcp6": encode_v1(("2001:db8::1", 40000), ("2001:db8::2", 443)),
        "v1-unknown": encode_v1(None, None),
        "v2-tcp4": encode_v2(("198.51.100.1", 40000), ("10.0.0.1", 443)) + b"GET / HTTP/1.1\r\n",
        "v2-tcp6": encode_v2(("2001:db8::1", 40000), ("2001:db8::2", 443)),
        "v2-local": encode_v2(None, None),
        "v2-tlv": v2_tlv,
    }


def build(corpus: Path) -> None:
    """Write every seed, each prefixed with a zero byte (one read)."""
    for parser, seeds in (
        ("clienthello", _hellos()),
        ("httphead", _heads()),
        ("proxyproto", _proxy_headers()),
    ):
        directory = corpus / parser
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        for name, data in seeds.items():
            if not data:
                raise RuntimeError(f"seed {parser}/{name} captured nothing")
            (directory / name).write_bytes(b"\x00" + data)
        print(f"{parser}: {len(seeds)} seeds in {directory}")


if __name__ == "__main__":  # pragma: no cover
    build(Path(__file__).resolve().parent / "corpus")
