"""One bench client pulling an image's blobs as a registry client does, one process each.

``python -m bench.pullclient --port P --ca CA --registry NAME --repo REPO --blob D:SIZE ...``
connects every request to 127.0.0.1:P with the real name as SNI and Host (what a hosts file
pointing the names at the gateway, or at the relay, does). It pings ``/v2/``, fetches a token
from the challenge's realm, then GETs each blob with ``Authorization: Bearer``; a 307 is
followed to its host WITHOUT the Authorization (as docker does; the fake OSS refuses a request
that carries one). Each blob's size and sha256 are checked as it streams.

It prints ``ready`` once imported and connected to nothing yet, waits for a line on stdin (so
N clients start together), and prints one JSON line: ok, bytes, start/end wall-clock times and
its own CPU seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import re
import resource
import socket
import ssl
import sys
import time
import urllib.parse

BUFFER = 1024 * 1024


class Failed(Exception):
    pass


class _Conn(http.client.HTTPSConnection):
    """HTTPS to ``name`` (SNI, Host, certificate check) over a socket to 127.0.0.1:port."""

    def __init__(self, name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(name, 443, context=context, timeout=600)
        self._real_port = port
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self._real_port), timeout=600)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _get(
    port: int, context: ssl.SSLContext, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], http.client.HTTPResponse, _Conn]:
    parts = urllib.parse.urlsplit(url)
    conn = _Conn(parts.hostname or "", port, context)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    conn.request("GET", target, headers=headers)
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response, conn


def _small(
    port: int, context: ssl.SSLContext, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    status, head, response, conn = _get(port, context, url, headers)
    body = response.read()
    conn.close()
    return status, head, body


def token(port: int, context: ssl.SSLContext, registry: str, repo: str) -> str:
    status, head, _ = _small(port, context, f"https://{registry}/v2/", {})
    if status == 200:
        return ""
    challenge = head.get("www-authenticate", "")
    realm = re.search(r'realm="([^"]+)"', challenge)
    if status != 401 or realm is None:
        raise Failed(f"/v2/ answered {status} without a Bearer challenge")
    query = urllib.parse.urlencode({"service": registry, "scope": f"repository:{repo}:pull"})
    status, _, body = _small(port, context, f"{realm.group(1)}?{query}", {})
    if status != 200:
        raise Failed(f"token service answered {status}")
    answer = json.loads(body)
    return str(answer.get("token") or answer["access_token"])


def pull_blob(
    port: int, context: ssl.SSLContext, url: str, bearer: str, digest: str, size: int
) -> int:
    """GET one blob (following one redirect without credentials); its byte count, checked."""
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    status, head, response, conn = _get(port, context, url, headers)
    if status in (301, 302, 303, 307, 308):
        response.read()
        conn.close()
        location = urllib.parse.urljoin(url, head["location"])
        if urllib.parse.urlsplit(location).hostname != urllib.parse.urlsplit(url).hostname:
            headers = {}  # never the registry's credential to another host
        status, head, response, conn = _get(port, context, location, headers)
    if status != 200:
        raise Failed(f"{digest[:19]}: status {status}")
    hasher = hashlib.sha256()
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    got = 0
    while n := response.readinto(buffer):
        hasher.update(view[:n])
        got += n
    conn.close()
    if got != size or "sha256:" + hasher.hexdigest() != digest:
        raise Failed(f"{digest[:19]}: {got} bytes of {size}, or a wrong sha256")
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pullclient")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--blob", action="append", required=True, help="DIGEST:SIZE")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.ca)
    print("ready", flush=True)
    sys.stdin.readline()
    start, cpu = time.time(), _cpu()
    result: dict[str, object] = {"ok": True, "bytes": 0}
    try:
        bearer = token(args.port, context, args.registry, args.repo)
        for blob in args.blob:
            digest, _, size = blob.rpartition(":")
            url = f"https://{args.registry}/v2/{args.repo}/blobs/{digest}"
            result["bytes"] = int(str(result["bytes"])) + pull_blob(
                args.port, context, url, bearer, digest, int(size)
            )
    except (Failed, OSError, http.client.HTTPException, ValueError, KeyError) as e:
        result.update(ok=False, error=f"{type(e).__name__}: {e}")
    result.update(start=start, end=time.time(), cpu=_cpu() - cpu)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
