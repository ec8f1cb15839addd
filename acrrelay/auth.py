"""Proxy-Authorization (Basic) for the CONNECT front door, against bcrypt hashes.

Users and hashes come from an htpasswd-style file (``htpasswd -nbB USER PASSWORD``),
read with the configuration. bcrypt is deliberately slow, so checks run on the
reactor's thread pool, never in the reactor thread, and a successful check is
remembered for a short while by a digest of the credentials (docker sends the same
header on every CONNECT). Failures are not remembered, so a fixed password works at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

import bcrypt
from twisted.internet import defer, threads

__all__ = ["BasicAuth", "parse_basic"]

CACHE_SECONDS: Final = 300.0
CACHE_SIZE: Final = 1024

#: Runs a blocking function somewhere else and gives its result as a Deferred.
Runner = Callable[..., "defer.Deferred[Any]"]


def parse_basic(header: bytes | None) -> tuple[str, bytes] | None:
    """(user, password) from a ``Basic`` header value, or None if absent or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", "replace"), password


class BasicAuth:
    """Checks Basic credentials against bcrypt hashes, off the reactor thread."""

    def __init__(self, users: Mapping[str, bytes], reactor: Any, run: Runner | None = None):
        self._users = dict(users)
        self._reactor = reactor
        self._run: Runner = run or self._in_thread
        self._good: OrderedDict[bytes, float] = OrderedDict()

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def check(self, header: bytes | None) -> defer.Deferred[str | None]:
        """Fires with the user name if the header's credentials are good, else None."""
        credentials = parse_basic(header)
        if credentials is None:
            return defer.succeed(None)
        user, password = credentials
        digest = self._users.get(user)
        if digest is None:
            return defer.succeed(None)
        key = hashlib.sha256(user.encode() + b"\0" + password + b"\0" + digest).digest()
        now = self._reactor.seconds()
        expires = self._good.get(key)
        if expires is not None and expires > now:
            self._good.move_to_end(key)
            return defer.succeed(user)

        def remember(ok: bool) -> str | None:
            if not ok:
                return None
            self._good[key] = self._reactor.seconds() + CACHE_SECONDS
            self._good.move_to_end(key)
            while len(self._good) > CACHE_SIZE:
                self._good.popitem(last=False)
            return user

        d = self._run(_checkpw, password, digest)
        d.addCallback(remember)
        return d


def _checkpw(password: bytes, digest: bytes) -> bool:
    # htpasswd writes $2y$; the bcrypt library speaks $2b$, the same algorithm.
    if digest.startswith(b"$2y$"):
        digest = b"$2b$" + digest[4:]
    try:
        return bcrypt.checkpw(password, digest)
    except ValueError:
        return False
