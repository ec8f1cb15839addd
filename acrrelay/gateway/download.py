"""One upstream download per digest, into the store, shared by every waiter.

The first proven request for a digest that is not stored starts a :class:`Download`: a GET of
the blob with that client's Authorization, redirects NOT followed by the agent; a 307 (or
302/303) to the object store is followed here, WITHOUT the Authorization and without cookies.
The body goes into ``store.begin`` as it comes; waiters tail the spool, each at its own pace.
After the last byte the spool is published only if size and sha256 match. A body cut short is
resumed with ``Range: bytes=<written>-`` on a fresh redirect (a new registry GET with a current
waiter's token), a few times at most. A mismatch or a download that fails for good leaves
nothing in the store and cuts every waiter with a reset.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from acrrelay.gateway.store import BlobStore, Mismatch, Spool, StoreFull
from acrrelay.gateway.upstream import Upstream

__all__ = ["REDIRECTS", "RESUMES", "Download", "DownloadFailed"]

_log = Logger(namespace="acrrelay.gateway.download")

#: How often an interrupted download is resumed before it fails for good.
RESUMES: Final = 3
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(rb"bytes (\d+)-(\d+)/(\d+)\Z")


class DownloadFailed(Exception):
    """The download cannot complete: an upstream answer, a cut, or a digest mismatch."""


class _Writer(Protocol):
    """Writes one upstream body into the spool."""

    transport: Any

    def __init__(self, download: Download, reactor: Any, idle: float) -> None:
        self._download = download
        self._reactor = reactor
        self._idle = idle
        self._timer: Any = None
        self.done: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        # Nothing ever pauses a download (it goes to disk), so silence means a stalled
        # upstream: cut it, and the download resumes on a fresh connection.
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        else:
            self._timer = self._reactor.callLater(self._idle, self.transport.stopProducing)

    def dataReceived(self, data: bytes) -> None:
        self._arm()
        if not self._download.take(data):
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class Download:
    """The download of one digest, with its waiters."""

    def __init__(
        self,
        reactor: Any,
        store: BlobStore,
        upstream: Upstream,
        *,
        url: bytes,
        digest: str,
        authorization: Callable[[], bytes | None],
        accept: bytes | None = None,
        counted: Callable[[int], None] | None = None,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._upstream = upstream
        self._url = url
        self.digest = digest
        self._authorization = authorization
        #: The first client's Accept: a registry answers a manifest only in a type it names.
        self._accept = accept
        self._counted = counted
        self.size: int | None = None
        #: The first answer's Content-Type (a manifest's media type matters to clients).
        self.content_type = b"application/octet-stream"
        self.spool: Spool | None = None
        self.state = "starting"  # starting, running, done, failed, bypass
        self.sized: defer.Deferred[Download] = defer.Deferred()
        self._watchers: list[Callable[[], None]] = []
        self.resumes = 0
        self.finished: defer.Deferred[str] = defer.Deferred()

    # -- what waiters see

    def available(self) -> int:
        return self.spool.written if self.spool is not None else 0

    def failed(self) -> bool:
        return self.state == "failed"

    def complete(self) -> bool:
        return self.state == "done"

    def watch(self, wake: Callable[[], None]) -> None:
        self._watchers.append(wake)

    def unwatch(self, wake: Callable[[], None]) -> None:
        if wake in self._watchers:
            self._watchers.remove(wake)

    def _wake(self) -> None:
        for wake in list(self._watchers):
            wake()

    # -- the download

    @defer.inlineCallbacks
    def run(self):  # type: ignore[no-untyped-def]
        """Download until published or failed for good; fires with the end state."""
        try:
            while True:
                response = yield self._fetch()
                if self.spool is None and not self._begin(response):
                    return self.state
                writer = _Writer(self, self._reactor, self._upstream.timeout)
                response.deliverBody(writer)
                try:
                    yield writer.done
                except Exception as e:
                    if self.state == "failed" or self.resumes >= RESUMES:
                        raise DownloadFailed(f"cut after {self.available()} bytes: {e}") from e
                    self.resumes += 1
                    _log.info(
                        "resuming {digest} at {offset} ({n} of {max})",
                        digest=self.digest,
                        offset=self.available(),
                        n=self.resumes,
                        max=RESUMES,
                    )
                    continue
                if self.available() < (self.size or 0):
                    raise DownloadFailed(f"ended early at {self.available()} bytes")
                return self._publish()
        except Exception as e:
            self._fail(str(e) if isinstance(e, DownloadFailed | StoreFull) else repr(e))
            return self.state
        finally:
            if not self.sized.called:
                self.sized.callback(self)
            self.finished.callback(self.state)

    def _headers(self, authorization: bytes | None) -> Headers:
        headers = Headers()
        if authorization is not None:
            headers.addRawHeader(b"authorization", authorization)
        if self.spool is not None and self.spool.written:
            headers.addRawHeader(b"range", b"bytes=%d-" % self.spool.written)
        return headers

    @defer.inlineCallbacks
    def _fetch(self):  # type: ignore[no-untyped-def]
        """The registry's answer, following one redirect without the client's credential."""
        headers = self._headers(self._authorization())
        if self._accept is not None:
            headers.addRawHeader(b"accept", self._accept)
        response = yield self._upstream.request(b"GET", self._url, headers)
        if response.code in REDIRECTS:
            location = response.headers.getRawHeaders(b"location", [None])[0]
            _drain(response)
            if location is None:
                raise DownloadFailed(f"redirect {response.code} without a Location")
            # The object store gets no Authorization and no cookies: only Range, if resuming.
            response = yield self._upstream.request(b"GET", location, self._headers(None))
        expected = 206 if self.spool is not None and self.spool.written else 200
        if response.code != expected:
            _drain(response)
            raise DownloadFailed(f"upstream answered {response.code}, not {expected}")
        if expected == 206:
            self._check_range(response)
        return response

    def _check_range(self, response: IResponse) -> None:
        value = response.headers.getRawHeaders(b"content-range", [b""])[0]
        match = _CONTENT_RANGE.match(value.strip())
        if match is None or int(match.group(1)) != self.available():
            raise DownloadFailed(f"resumed at the wrong offset: {value!r}")
        if self.size is not None and int(match.group(3)) != self.size:
            raise DownloadFailed(f"resumed blob has another size: {value!r}")

    def _begin(self, response: IResponse) -> bool:
        """Open the spool for the first answer; False (bypass) if the store has no room."""
        self.size = None if response.length is UNKNOWN_LENGTH else int(response.length)
        self.content_type = response.headers.getRawHeaders(b"content-type", [self.content_type])[0]
        self.spool = self._store.begin(self.digest, self.size)
        if self.spool is None:
            self.state = "bypass"
            response.deliverBody(_Discard())
            return False
        self.state = "running"
        self.sized.callback(self)
        return True

    def take(self, data: bytes) -> bool:
        """Spool a chunk of body; False when the download must stop."""
        assert self.spool is not None
        if self.size is not None and self.spool.written + len(data) > self.size:
            self._fail("more bytes than the Content-Length")
            return False
        try:
            self.spool.write(data)
        except StoreFull as e:
            self._fail(str(e))
            return False
        if self._counted is not None:
            self._counted(len(data))
        self._wake()
        return True

    def _publish(self) -> str:
        assert self.spool is not None
        outcome = self.spool.publish()
        if isinstance(outcome, Mismatch):
            self._fail(f"digest mismatch: got {outcome.actual} ({outcome.size} bytes)")
            return self.state
        self.state = "done"
        self._wake()
        return self.state

    def _fail(self, why: str) -> None:
        if self.state == "failed":
            return
        _log.warn("download of {digest} failed: {why}", digest=self.digest, why=why)
        self.state = "failed"
        if self.spool is not None:
            self.spool.abandon()
        self._wake()


#: A body this small is read and dropped, so its connection goes back to the pool.
SMALL_BODY: Final = 64 * 1024


class _Discard(Protocol):
    transport: Any

    def __init__(self, keep: bool = False) -> None:
        self._keep = keep

    def connectionMade(self) -> None:
        if not self._keep:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        pass


def _drain(response: IResponse) -> None:
    """Drop a response body we do not want (a redirect's, a proof's): read it to the end if it
    is small (the connection is reused), else close it (never a whole blob for a proof)."""
    length = response.length
    small = length is not UNKNOWN_LENGTH and int(length) <= SMALL_BODY
    response.deliverBody(_Discard(keep=small))
