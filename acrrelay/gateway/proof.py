"""What the registry has proven about a client's credential, remembered for a short time.

A cached byte may reach a client only after the registry has accepted that client's own
credential for the repository, and the digest is known to be in that repository. Two facts,
kept apart on purpose:

- a **proof**: upstream accepted credential C for repository R (keyed by a hash of C);
- a **link**: digest D is in repository R (upstream answered for R and D).

:meth:`ProofCache.proven` needs both, fresh. So a token for repository B that asks for
repository A's digest is refused under either path: under A's path there is no proof for
(token, A); under B's path there is no link (B, D) (the lesson of zot#4363: a content-addressed
store must not leak across repositories).

Freshness lasts ``ttl`` seconds and never past the token's own ``exp`` (read from the JWT
without verification, only to shorten how long a proof is kept). Credentials are never kept in
clear: only a keyed hash (HMAC-SHA256 with a per-process random key, so a memory dump does not
offer an unsalted hash of a Basic password to brute-force).

Pure: the clock is passed in (``IReactorTime``); no reactor is imported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = ["ProofCache", "credential_key", "token_expiry"]

_KEY: Final = os.urandom(32)
_CREDENTIAL_KEY: Final = re.compile(r"[0-9a-f]{64}\Z")


def credential_key(authorization: bytes | None) -> str | None:
    """A hex key standing for the whole Authorization value; None when there is none.

    Equal headers give equal keys within one process; the header cannot be read back.
    """
    if not authorization:
        return None
    return hmac.new(_KEY, authorization, hashlib.sha256).hexdigest()


def token_expiry(authorization: bytes | None) -> float | None:
    """The ``exp`` claim of a ``Bearer`` JWT, decoded WITHOUT verification; else None.

    Used only to cap how long a proof is remembered; never to accept anything.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    parts = token.strip().split(b".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


class ProofCache:
    """Proofs per (credential key, repository) and links per (repository, digest), both LRU.

    ``credential`` arguments are keys from :func:`credential_key` (64 hex digits); anything
    else is refused with ValueError, so a raw token can never be stored by mistake. None (no
    Authorization) is never remembered and never proven: every such request asks upstream.
    """

    def __init__(self, ttl: float, clock: IReactorTime, max_entries: int = 100_000) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must be zero or more seconds, got {ttl}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._proofs: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._links: OrderedDict[tuple[str, str], float] = OrderedDict()

    def remember(
        self, credential: str | None, repository: str, digest: str, expires: float | None
    ) -> None:
        """Upstream accepted ``credential`` for ``repository``, and ``digest`` is in it.

        ``expires`` is the token's own expiry (epoch seconds) or None; the proof is kept until
        the earlier of that and now + ttl. The link is kept for ttl.
        """
        if credential is None:
            return
        _check_key(credential)
        now = self._clock.seconds()
        until = now + self.ttl
        if until <= now:
            return
        _put(self._links, (repository, digest), until, self.max_entries)
        if expires is not None:
            until = min(until, expires)
        if until > now:
            _put(self._proofs, (credential, repository), until, self.max_entries)

    def proven(self, credential: str | None, repository: str, digest: str) -> bool:
        """True only if a fresh proof for (credential, repository) and a fresh link exist."""
        if credential is None:
            return False
        _check_key(credential)
        now = self._clock.seconds()
        return _fresh(self._proofs, (credential, repository), now) and _fresh(
            self._links, (repository, digest), now
        )

    def forget(self, credential: str) -> None:
        """Drop every proof made with ``credential`` (links are facts about the registry)."""
        for key in [k for k in self._proofs if k[0] == credential]:
            del self._proofs[key]

    def clear(self) -> None:
        self._proofs.clear()
        self._links.clear()

    def __len__(self) -> int:
        """The number of (credential, repository) proofs held, fresh or not yet purged."""
        return len(self._proofs)

    def __repr__(self) -> str:
        return (
            f"<ProofCache ttl={self.ttl:g}s proofs={len(self._proofs)} "
            f"links={len(self._links)} max_entries={self.max_entries}>"
        )


def _check_key(credential: str) -> None:
    if not isinstance(credential, str) or not _CREDENTIAL_KEY.match(credential):
        raise ValueError("credential must be a key from credential_key(), never a raw token")


def _put(
    table: OrderedDict[tuple[str, str], float], key: tuple[str, str], until: float, limit: int
) -> None:
    table[key] = until
    table.move_to_end(key)
    while len(table) > limit:
        table.popitem(last=False)


def _fresh(table: OrderedDict[tuple[str, str], float], key: tuple[str, str], now: float) -> bool:
    until = table.get(key)
    if until is None:
        return False
    if until <= now:
        del table[key]
        return False
    table.move_to_end(key)
    return True
