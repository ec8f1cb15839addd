"""The blob path: blobs and manifests by digest, proven upstream with the client's own token.

1. In the store and proven recently (:class:`~acrrelay.gateway.proof.ProofCache`): serve.
2. Else prove upstream with the client's Authorization: a blob by ``GET`` with
   ``Range: bytes=0-0`` (redirects are not followed), a manifest by ``HEAD``. Any answer but a
   proof goes to the client as it is, with zero cached bytes; an unreachable upstream is a
   502/504. The gateway fails closed.
3. Proven and stored: serve from the store (Range, If-None-Match, HEAD).
4. Proven and not stored: join the one :class:`~acrrelay.gateway.download.Download` of that
   digest, or start it; each waiter tails the spool at its own pace. No room in the store:
   bypass, this client alone, uncached.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Final

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from acrrelay.gateway.download import REDIRECTS, Download, _drain
from acrrelay.gateway.passthrough import answer_error, pass_through, relay_response
from acrrelay.gateway.proof import ProofCache, credential_key, token_expiry
from acrrelay.gateway.registryapi import ApiRequest
from acrrelay.gateway.sender import BlobSender, Source
from acrrelay.gateway.server import Exchange
from acrrelay.gateway.store import BlobStore
from acrrelay.gateway.upstream import Upstream

__all__ = ["BlobPath", "parse_range"]

_log = Logger(namespace="acrrelay.gateway.cache")

PROVEN: Final = frozenset({200, 206, *REDIRECTS})
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
_MANIFEST_TYPES: Final = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def parse_range(value: bytes | None, size: int) -> tuple[int, int] | str | None:
    """A single byte range as [start, end); None to serve it all; "unsatisfiable" for 416."""
    if value is None:
        return None
    match = _RANGE.match(value.decode("ascii", "replace").strip())
    if match is None:
        return None  # multiple or odd ranges: the whole body is a valid answer
    first, last = match.group(1), match.group(2)
    if not first:
        if not last or int(last) == 0:
            return "unsatisfiable"
        return max(0, size - int(last)), size
    start = int(first)
    end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        return "unsatisfiable"
    return start, end


class BlobPath:
    """Answers cacheable requests; ``stats`` counts what happened (see the service's metrics)."""

    def __init__(
        self, reactor: Any, store: BlobStore, upstream: Upstream, proofs: ProofCache
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.upstream = upstream
        self.proofs = proofs
        self.downloads: dict[str, Download] = {}
        self.stats: Counter[str] = Counter()

    def __call__(self, exchange: Exchange, api: ApiRequest) -> defer.Deferred[Any]:
        return defer.ensureDeferred(self._answer(exchange, api))

    async def _answer(self, exchange: Exchange, api: ApiRequest) -> None:
        assert api.repository is not None and api.digest is not None
        authorization = exchange.header(b"authorization")
        key = credential_key(authorization)
        if not (api.digest in self.store and self.proofs.proven(key, api.repository, api.digest)):
            try:
                response = await self._prove(exchange, api)
            except Exception:
                self.stats["proofs_failed"] += 1
                answer_error(exchange, Failure())
                return
            if response is not None:
                self.stats["proofs_denied"] += 1
                relay_response(exchange, response)
                return
            self.stats["proofs_ok"] += 1
            self.proofs.remember(key, api.repository, api.digest, token_expiry(authorization))
        if exchange.finished:
            return
        if self._serve_stored(exchange, api):
            return
        if exchange.method == "HEAD":
            exchange.cache = "bypass"
            pass_through(exchange, self.upstream)
            return
        await self._from_download(exchange, api)

    async def _prove(self, exchange: Exchange, api: ApiRequest) -> Any:
        """None if upstream accepted the client's credential for this digest; else the answer
        to give the client as it is."""
        headers = Headers()
        for name in (b"authorization", b"accept"):
            value = exchange.joined(name)
            if value is not None:
                headers.addRawHeader(name, value)
        url = self._url(exchange, api)
        if api.kind == "manifest":
            response = await self.upstream.request(b"HEAD", url, headers)
            if response.code == 200:
                _drain(response)
                return None
            return response
        headers.addRawHeader(b"range", b"bytes=0-0")
        response = await self.upstream.request(b"GET", url, headers)
        if response.code in PROVEN:
            _drain(response)
            return None
        return response

    def _url(self, exchange: Exchange, api: ApiRequest) -> bytes:
        noun = "manifests" if api.kind == "manifest" else "blobs"
        return f"https://{exchange.host}/v2/{api.repository}/{noun}/{api.digest}".encode("ascii")

    # -- from the store

    def _serve_stored(self, exchange: Exchange, api: ApiRequest) -> bool:
        assert api.digest is not None
        handle = self.store.open_blob(api.digest)
        if handle is None:
            return False
        exchange.cache = exchange.cache or "hit"
        self.stats["hits"] += 1
        size = handle.size
        headers = _entity_headers(api, self._content_type(api, handle))
        if exchange.header(b"if-none-match") in (
            f'"{api.digest}"'.encode(),
            api.digest.encode(),
        ):
            handle.close()
            exchange.start_response(304, headers)
            exchange.finish()
            return True
        span = parse_range(exchange.header(b"range"), size)
        if span == "unsatisfiable":
            handle.close()
            exchange.start_response(
                416, [(b"content-range", b"bytes */%d" % size), (b"content-length", b"0")]
            )
            exchange.finish()
            return True
        start, end = span if isinstance(span, tuple) else (0, size)
        status = 206 if isinstance(span, tuple) else 200
        if status == 206:
            headers.append((b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size)))
        headers.append((b"content-length", str(end - start).encode()))
        exchange.start_response(status, headers)
        if exchange.method == "HEAD":
            handle.close()
            exchange.finish()
            return True
        digest = api.digest

        def closed(why: str) -> None:
            handle.close()
            if why == "digest_mismatch":
                _log.warn("stored {digest} is corrupt: dropped", digest=digest)
                self.store.discard(digest)
                self.stats["corrupt"] += 1

        BlobSender(
            self.reactor,
            exchange,
            handle.file,
            start,
            end,
            digest=digest,
            sent=self._count("bytes_store"),
            closed=closed,
        ).start()
        return True

    def _content_type(self, api: ApiRequest, handle: Any) -> bytes:
        if api.kind != "manifest":
            return b"application/octet-stream"
        try:
            media = json.loads(handle.file.read(4 * 1024 * 1024)).get("mediaType")
        except (ValueError, AttributeError):
            media = None
        handle.file.seek(0)
        if media not in _MANIFEST_TYPES:
            media = _MANIFEST_TYPES[0]
        return str(media).encode()

    def _count(self, name: str) -> Any:
        def add(n: int) -> None:
            self.stats[name] += n

        return add

    # -- from a download

    async def _from_download(self, exchange: Exchange, api: ApiRequest) -> None:
        assert api.digest is not None
        download = self.downloads.get(api.digest)
        if download is None:
            exchange.cache = "miss"
            self.stats["misses"] += 1
            download = self._start(exchange, api)
        else:
            exchange.cache = "coalesced"
            self.stats["coalesced"] += 1
        await download.sized
        if exchange.finished:
            return
        if download.state == "bypass" or download.spool is None:
            if download.state == "failed":
                # Nothing was answered yet: a 502 says so; it is no short 200.
                exchange.detail = "download_failed"
                exchange.start_response(502, [(b"content-length", b"0")])
                exchange.finish()
                return
            exchange.cache = "bypass"
            self.stats["bypass"] += 1
            await self._bypass(exchange, api)
            return
        if download.state == "done" and self._serve_stored(exchange, api):
            return
        self._tail(exchange, api, download)

    def _start(self, exchange: Exchange, api: ApiRequest) -> Download:
        assert api.digest is not None
        waiters: list[Exchange] = [exchange]

        def current_authorization() -> bytes | None:
            for waiter in waiters:
                if not waiter.finished:
                    return waiter.header(b"authorization")
            return exchange.header(b"authorization")

        download = Download(
            self.reactor,
            self.store,
            self.upstream,
            url=self._url(exchange, api),
            digest=api.digest,
            authorization=current_authorization,
            accept=exchange.joined(b"accept") if api.kind == "manifest" else None,
            counted=self._count("bytes_upstream"),
        )
        download.waiters = waiters  # type: ignore[attr-defined]
        self.downloads[api.digest] = download
        digest = api.digest

        def ended(state: str) -> str:
            self.downloads.pop(digest, None)
            if state == "failed":
                self.stats["download_failures"] += 1
            return state

        download.finished.addCallback(ended)
        download.run()
        return download

    def _tail(self, exchange: Exchange, api: ApiRequest, download: Download) -> None:
        assert download.spool is not None and download.size is not None
        getattr(download, "waiters", []).append(exchange)
        size = download.size
        span = parse_range(exchange.header(b"range"), size)
        if span == "unsatisfiable":
            exchange.start_response(416, [(b"content-length", b"0")])
            exchange.finish()
            return
        start, end = span if isinstance(span, tuple) else (0, size)
        content_type = (
            download.content_type if api.kind == "manifest" else b"application/octet-stream"
        )
        headers = _entity_headers(api, content_type)
        if isinstance(span, tuple):
            headers.append((b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size)))
        headers.append((b"content-length", str(end - start).encode()))
        reader = download.spool.open_reader()
        exchange.start_response(206 if isinstance(span, tuple) else 200, headers)
        source: Source = download
        sender: BlobSender

        def closed(why: str) -> None:
            download.unwatch(sender.wake)
            reader.close()

        sender = BlobSender(
            self.reactor,
            exchange,
            reader.file,
            start,
            end,
            source=source,
            sent=self._count("bytes_spool"),
            closed=closed,
        )
        download.watch(sender.wake)
        sender.start()

    async def _bypass(self, exchange: Exchange, api: ApiRequest) -> None:
        """No room to cache: this client's own download, uncached, redirect followed here."""
        headers = Headers()
        authorization = exchange.header(b"authorization")
        if authorization is not None:
            headers.addRawHeader(b"authorization", authorization)
        range_ = exchange.header(b"range")
        if range_ is not None:
            headers.addRawHeader(b"range", range_)
        try:
            response = await self.upstream.request(b"GET", self._url(exchange, api), headers)
            if response.code in REDIRECTS:
                location = response.headers.getRawHeaders(b"location", [b""])[0]
                _drain(response)
                headers.removeHeader(b"authorization")
                response = await self.upstream.request(b"GET", location, headers)
        except Exception:
            answer_error(exchange, Failure())
            return
        relay_response(exchange, response, counted=self._count("bytes_upstream"))


def _entity_headers(api: ApiRequest, content_type: bytes) -> list[tuple[bytes, bytes]]:
    assert api.digest is not None
    digest = api.digest.encode()
    return [
        (b"content-type", content_type),
        (b"docker-content-digest", digest),
        (b"etag", b'"' + digest + b'"'),
        (b"accept-ranges", b"bytes"),
    ]
