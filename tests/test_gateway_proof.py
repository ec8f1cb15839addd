"""Layer 1: the proof cache, on a Clock: what may skip the upstream check, and for how long."""

from __future__ import annotations

import base64
import gc
import json

import pytest
from twisted.internet.task import Clock

from acrrelay.gateway.proof import ProofCache, credential_key, token_expiry

NOW = 1_800_000_000.0
DIGEST_A = "sha256:" + "aa" * 32
DIGEST_B = "sha256:" + "bb" * 32


def jwt(claims: object) -> bytes:
    def part(value: object) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    return b"Bearer " + part({"alg": "RS256"}) + b"." + part(claims) + b".c2lnbmF0dXJl"


def clock_at(now: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(now)
    return clock


def key(authorization: bytes) -> str:
    k = credential_key(authorization)
    assert k is not None
    return k


def test_credential_key_is_stable_and_opaque() -> None:
    """Equal headers give one 64-hex key, different headers differ, no header gives None."""
    a = credential_key(b"Bearer abc")
    assert a == credential_key(b"Bearer abc")
    assert a is not None and len(a) == 64 and "abc" not in a
    assert a != credential_key(b"Bearer abd")
    assert credential_key(None) is None
    assert credential_key(b"") is None


def test_token_expiry_reads_the_jwt_exp_claim() -> None:
    """The exp of a Bearer JWT is read; Basic, opaque and malformed tokens give None."""
    assert token_expiry(jwt({"exp": 1_800_000_123, "sub": "u"})) == 1_800_000_123.0
    assert token_expiry(jwt({"exp": 5.5})) == 5.5
    assert token_expiry(b"Basic dXNlcjpwYXNz") is None
    assert token_expiry(b"Bearer opaque-token") is None
    assert token_expiry(b"Bearer a.!!!.c") is None
    assert token_expiry(jwt(["exp", 1])) is None
    assert token_expiry(jwt({"exp": "soon"})) is None
    assert token_expiry(jwt({"exp": True})) is None
    assert token_expiry(None) is None


def test_proof_lasts_ttl() -> None:
    """A proof without a token expiry holds for ttl seconds, and not a moment longer."""
    clock = clock_at()
    cache = ProofCache(60, clock)
    cred = key(b"Bearer opaque")
    cache.remember(cred, "team/app", DIGEST_A, token_expiry(b"Bearer opaque"))
    assert cache.proven(cred, "team/app", DIGEST_A)
    clock.advance(59.9)
    assert cache.proven(cred, "team/app", DIGEST_A)
    clock.advance(0.1)
    assert not cache.proven(cred, "team/app", DIGEST_A)


def test_proof_never_outlives_the_token() -> None:
    """A token that expires before the ttl ends its proof at the token's exp."""
    clock = clock_at()
    cache = ProofCache(60, clock)
    header = jwt({"exp": NOW + 10})
    cache.remember(key(header), "team/app", DIGEST_A, token_expiry(header))
    clock.advance(9.9)
    assert cache.proven(key(header), "team/app", DIGEST_A)
    clock.advance(0.1)
    assert not cache.proven(key(header), "team/app", DIGEST_A)


def test_an_expired_token_is_not_remembered() -> None:
    """A token whose exp has passed leaves no proof at all."""
    cache = ProofCache(60, clock_at())
    header = jwt({"exp": NOW - 1})
    cache.remember(key(header), "team/app", DIGEST_A, token_expiry(header))
    assert not cache.proven(key(header), "team/app", DIGEST_A)
    assert len(cache) == 0


def test_ttl_zero_remembers_nothing() -> None:
    """With ttl 0 every request is proven upstream: nothing is ever remembered."""
    cache = ProofCache(0, clock_at())
    cred = key(b"Bearer t")
    cache.remember(cred, "team/app", DIGEST_A, None)
    assert not cache.proven(cred, "team/app", DIGEST_A)
    assert len(cache) == 0


def test_no_credential_is_never_proven() -> None:
    """An anonymous request (no Authorization) is neither remembered nor proven."""
    cache = ProofCache(60, clock_at())
    cache.remember(None, "team/app", DIGEST_A, None)
    assert not cache.proven(None, "team/app", DIGEST_A)
    assert len(cache) == 0


def test_token_for_b_cannot_reach_a_digest_under_either_path() -> None:
    """A token proven for repository B gets A's digest under neither A's path nor B's."""
    cache = ProofCache(60, clock_at())
    token_a, token_b = key(b"Bearer for-a"), key(b"Bearer for-b")
    cache.remember(token_a, "team/a", DIGEST_A, None)
    cache.remember(token_b, "team/b", DIGEST_B, None)
    assert cache.proven(token_a, "team/a", DIGEST_A)
    assert cache.proven(token_b, "team/b", DIGEST_B)
    # A's path: the token was never proven for repository A.
    assert not cache.proven(token_b, "team/a", DIGEST_A)
    # B's path: the digest was never seen in repository B.
    assert not cache.proven(token_b, "team/b", DIGEST_A)


def test_a_proof_covers_other_digests_of_the_repository_only_once_linked() -> None:
    """A repository proof serves a second digest only after that digest is linked to it."""
    cache = ProofCache(60, clock_at())
    alice, bob = key(b"Bearer alice"), key(b"Bearer bob")
    cache.remember(alice, "team/a", DIGEST_A, None)
    assert not cache.proven(alice, "team/a", DIGEST_B)
    cache.remember(bob, "team/a", DIGEST_B, None)
    assert cache.proven(alice, "team/a", DIGEST_B)


def test_size_is_bounded_least_recently_used_dropped() -> None:
    """Past max_entries the least recently used proof goes; a used one stays."""
    cache = ProofCache(60, clock_at(), max_entries=3)
    creds = [key(f"Bearer t{i}".encode()) for i in range(4)]
    for cred in creds[:3]:
        cache.remember(cred, "r", DIGEST_A, None)
    assert cache.proven(creds[0], "r", DIGEST_A)  # now the most recently used
    cache.remember(creds[3], "r", DIGEST_A, None)
    assert len(cache) == 3
    assert not cache.proven(creds[1], "r", DIGEST_A)
    assert all(cache.proven(c, "r", DIGEST_A) for c in (creds[0], creds[2], creds[3]))


def test_links_are_bounded_too() -> None:
    """The (repository, digest) links obey max_entries as well, dropping the oldest."""
    cache = ProofCache(60, clock_at(), max_entries=2)
    cred = key(b"Bearer t")
    digests = [f"sha256:{i:064x}" for i in range(3)]
    for digest in digests:
        cache.remember(cred, "r", digest, None)
    assert not cache.proven(cred, "r", digests[0])
    assert cache.proven(cred, "r", digests[1]) and cache.proven(cred, "r", digests[2])


def test_forget_and_clear() -> None:
    """forget drops one credential's proofs, clear drops everything."""
    cache = ProofCache(60, clock_at())
    a, b = key(b"Bearer a"), key(b"Bearer b")
    cache.remember(a, "r", DIGEST_A, None)
    cache.remember(b, "r", DIGEST_A, None)
    cache.forget(a)
    assert not cache.proven(a, "r", DIGEST_A)
    assert cache.proven(b, "r", DIGEST_A)
    cache.clear()
    assert not cache.proven(b, "r", DIGEST_A)
    assert len(cache) == 0


def test_raw_tokens_are_refused_as_credentials() -> None:
    """Passing a raw token where a credential key belongs raises, so it is never stored."""
    cache = ProofCache(60, clock_at())
    with pytest.raises(ValueError):
        cache.remember("Bearer secret-token", "r", DIGEST_A, None)
    with pytest.raises(ValueError):
        cache.proven("Bearer secret-token", "r", DIGEST_A)


def test_the_token_is_never_kept_in_clear() -> None:
    """No attribute, repr or object reachable from the cache holds the token's text."""
    token = b"Bearer " + b"s3cr3t-" * 8
    cache = ProofCache(60, clock_at())
    cache.remember(credential_key(token), "team/app", DIGEST_A, token_expiry(token))
    assert b"s3cr3t" not in repr(cache).encode()
    seen: set[int] = set()
    stack: list[object] = [cache, *vars(cache).values()]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is Clock:
            continue
        seen.add(id(obj))
        if isinstance(obj, bytes | str):
            text = obj.encode() if isinstance(obj, str) else obj
            assert b"s3cr3t" not in text
            continue
        stack.extend(r for r in gc.get_referents(obj) if not isinstance(r, type))
