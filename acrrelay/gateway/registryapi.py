"""Which registry API request is this, and may its answer come from the store?

The gateway caches exactly one thing: the bytes of a blob or a manifest named by its sha256
digest, fetched with GET or HEAD. Everything else (pings, tag manifests, uploads, catalog,
anything odd) is passed through as it came. :func:`classify` is deliberately strict: a target
that does not follow the distribution spec's grammar to the letter is ``other``, and ``other``
is never cached, so a parsing surprise costs a cache miss, never a wrong answer.

Pure: no reactor, no sockets.
"""

from __future__ import annotations

import re
from typing import Final, Literal

import attrs

__all__ = ["CACHEABLE_METHODS", "ApiRequest", "Kind", "classify", "parse_digest"]

Kind = Literal["ping", "blob", "manifest", "upload", "catalog", "tags", "other"]

CACHEABLE_METHODS: Final = frozenset({"GET", "HEAD"})

# The distribution spec's repository name: path components of lowercase alphanumerics joined
# by one of "." "_" "__" or a run of "-", components joined by "/".
_COMPONENT: Final = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_PATTERN: Final = rf"{_COMPONENT}(?:/{_COMPONENT})*"
# Clients refuse names over 255 characters; so do we (the spec's "<host>/<name>" limit).
NAME_MAX: Final = 255
_TAG: Final = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
# A reference is a tag or a digest (algorithm:encoded), both free of "/".
_DIGEST_ANY: Final = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[A-Za-z0-9=_-]+"
_REFERENCE: Final = rf"(?:{_TAG}|{_DIGEST_ANY})"
_SHA256: Final = re.compile(r"sha256:[0-9a-f]{64}\Z")

_ROUTES: Final = re.compile(
    rf"/v2/(?P<name>{NAME_PATTERN})/(?:"
    rf"(?P<upload>blobs/uploads/?(?P<upload_id>[A-Za-z0-9._=-]*))"
    rf"|blobs/(?P<blob>{_REFERENCE})"
    rf"|manifests/(?P<manifest>{_REFERENCE})"
    rf"|(?P<tags>tags/list)"
    r")\Z"
)


@attrs.frozen
class ApiRequest:
    """One classified request: what it asks for, and of which repository."""

    method: str
    kind: Kind
    #: The repository name (distribution grammar), or None for ping, catalog and other.
    repository: str | None = None
    #: The tag, digest or upload id as written in the path; None where there is none.
    reference: str | None = None
    #: ``sha256:<64 lowercase hex>`` when the reference is exactly that; else None.
    digest: str | None = None

    @property
    def cacheable(self) -> bool:
        """GET or HEAD of a blob or manifest by sha256 digest, in a well-formed repository."""
        return (
            self.method in CACHEABLE_METHODS
            and self.kind in ("blob", "manifest")
            and self.repository is not None
            and self.digest is not None
        )


def parse_digest(text: str) -> str | None:
    """``text`` if it is ``sha256:`` and 64 lowercase hex digits, else None."""
    return text if _SHA256.match(text) else None


def classify(method: str, target: str) -> ApiRequest:
    """Classify an origin-form request target; the query string is ignored (``?ns=``)."""
    path = target.partition("?")[0]
    if path in ("/v2/", "/v2"):
        return ApiRequest(method, "ping")
    if path == "/v2/_catalog":
        return ApiRequest(method, "catalog")
    m = _ROUTES.match(path)
    if m is None or len(m["name"]) > NAME_MAX:
        return ApiRequest(method, "other")
    name = m["name"]
    if m["upload"] is not None:
        return ApiRequest(method, "upload", name, m["upload_id"] or None)
    if m["tags"] is not None:
        return ApiRequest(method, "tags", name)
    if m["blob"] is not None:
        return ApiRequest(method, "blob", name, m["blob"], parse_digest(m["blob"]))
    reference = m["manifest"]
    return ApiRequest(method, "manifest", name, reference, parse_digest(reference))
