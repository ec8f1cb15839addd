"""End to end: the world's token service has users with rights, lifetimes and revocation,
and docker-registry enforces what its tokens say.

These pin the refusals that the gateway's authorization tests rely on: each is asked here
of the registry itself (through the world's relay, which only passes bytes on), so that a
refusal seen through the gateway is the registry's own. Each test adds users of its own
(``world.users``), so tests never depend on each other's changes.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from tests.registry_world import (
    IMAGE_REPOSITORY,
    OTHER_REPOSITORY,
    SERVICE,
    USER,
    LocalImage,
    RegistryWorld,
)
from tests.test_e2e_registry import _jwt_claims

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

_names = itertools.count()
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json"


def _user(world: RegistryWorld, rights: dict[str, list[str]], **options: Any) -> str:
    """A new user with ``rights`` (its password is its name)."""
    name = f"user{next(_names)}-{time.monotonic_ns()}"
    world.users.add(name, name, rights, **options)
    return name


def _pull(repository: str) -> str:
    return f"repository:{repository}:pull"


def _get(world: RegistryWorld, path: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` of the registry through the world's relay, with ``token``."""
    return world.registry_request(
        "GET",
        path,
        token=token,
        headers={"Accept": MANIFEST_TYPES},
        port=world.relay.port,
        host=world.relay.address,
    )


def _blob(repository: str, image: LocalImage) -> str:
    return f"/v2/{repository}/blobs/{image.layer_digest}"


def test_a_user_without_pull_right_gets_no_access_and_the_registry_refuses(
    registry_world: RegistryWorld, small_images: dict[str, LocalImage]
) -> None:
    """A user whose rights cover only the other repository gets a token whose ``access`` is
    empty for this one, and the registry answers its manifest and blob GETs with 401
    ``insufficient_scope``; the full user's token gets the manifest and the blob's 307."""
    world = registry_world
    image = small_images[IMAGE_REPOSITORY]
    outsider = _user(world, {OTHER_REPOSITORY: ["pull", "push"]})
    status, answer = world.request_token(outsider, outsider, [_pull(IMAGE_REPOSITORY)])
    assert status == 200, answer
    assert _jwt_claims(answer["token"])["access"] == [], answer

    for path in (f"/v2/{IMAGE_REPOSITORY}/manifests/small", _blob(IMAGE_REPOSITORY, image)):
        status, headers, body = _get(world, path, answer["token"])
        assert status == 401, (path, status, body)
        assert 'error="insufficient_scope"' in headers["www-authenticate"], headers
        assert f'scope="{_pull(IMAGE_REPOSITORY)}"' in headers["www-authenticate"], headers

    token = world.token(USER, world.password, [_pull(IMAGE_REPOSITORY)])
    status, _, body = _get(world, f"/v2/{IMAGE_REPOSITORY}/manifests/small", token)
    assert status == 200 and json.loads(body)["layers"][0]["digest"] == image.layer_digest
    status, headers, _ = _get(world, _blob(IMAGE_REPOSITORY, image), token)
    assert status == 307 and headers["location"].startswith("https://"), (status, headers)


def test_an_expired_token_is_refused_by_the_registry(
    registry_world: RegistryWorld, small_images: dict[str, LocalImage]
) -> None:
    """A token signed by the service's key for the right scope whose ``exp`` passed more
    than a minute ago gets 401 from docker-registry; the same with a future ``exp`` gets
    the blob. One that expired 30 s ago still works: distribution 2.8 allows 60 s of
    clock skew (``token.Leeway``), so "expired" at the registry means ``exp + 60 s``."""
    world = registry_world
    path = _blob(IMAGE_REPOSITORY, small_images[IMAGE_REPOSITORY])
    scopes = [_pull(IMAGE_REPOSITORY)]
    status, headers, body = _get(world, path, world.mint_token(USER, scopes, lifetime=-120))
    assert status == 401, (status, headers, body)
    assert headers["www-authenticate"].startswith("Bearer "), headers
    status, _, body = _get(world, path, world.mint_token(USER, scopes, lifetime=600))
    assert status == 307, (status, body)
    status, _, body = _get(world, path, world.mint_token(USER, scopes, lifetime=-30))
    assert status == 307, (status, body)


def test_a_user_token_lifetime_is_expires_in_and_exp(
    registry_world: RegistryWorld, small_images: dict[str, LocalImage]
) -> None:
    """A user's ``token_seconds`` is the answer's ``expires_in`` and the JWT's ``exp - iat``,
    and a change to it shows in the next token."""
    world = registry_world
    path = _blob(IMAGE_REPOSITORY, small_images[IMAGE_REPOSITORY])
    short = _user(world, {IMAGE_REPOSITORY: ["pull"]}, token_seconds=2)
    status, answer = world.request_token(short, short, [_pull(IMAGE_REPOSITORY)])
    assert status == 200 and answer["expires_in"] == 2, answer
    claims = _jwt_claims(answer["token"])
    assert claims["exp"] - claims["iat"] == 2, claims
    assert claims["aud"] == SERVICE and claims["sub"] == short, claims
    status, _, body = _get(world, path, answer["token"])
    assert status == 307, (status, body)

    world.users.set_token_seconds(short, 900)
    status, answer = world.request_token(short, short, [_pull(IMAGE_REPOSITORY)])
    assert status == 200 and answer["expires_in"] == 900, answer
    claims = _jwt_claims(answer["token"])
    assert claims["exp"] - claims["iat"] == 900, claims


def test_a_revoked_user_gets_no_token_and_no_refresh(
    registry_world: RegistryWorld, small_images: dict[str, LocalImage]
) -> None:
    """Once revoked, a user's password and refresh token get 401 from the token service;
    a token issued before lives on until its ``exp`` (revocation acts on new tokens), and
    restoring the user gives tokens again."""
    world = registry_world
    path = _blob(IMAGE_REPOSITORY, small_images[IMAGE_REPOSITORY])
    scopes = [_pull(IMAGE_REPOSITORY)]
    user = _user(world, {"acrrelay-e2e/*": ["pull"]})
    before = world.token(user, user, scopes)

    world.users.revoke(user)
    status, answer = world.request_token(user, user, scopes)
    assert status == 401, answer
    status, _, _ = _get(world, path, before)
    assert status == 307, "a token issued before the revocation is valid until its exp"

    world.users.restore(user)
    assert world.token(user, user, scopes)


def test_a_token_for_one_repository_never_reaches_the_others_blob(
    registry_world: RegistryWorld, small_images: dict[str, LocalImage]
) -> None:
    """A token for repository B asking for repository A's layer: under A's path the
    registry answers 401 (no access to A), under B's path 404 BLOB_UNKNOWN (the blob is
    not linked in B); B's own layer under B's path is a 307."""
    world = registry_world
    a, b = small_images[IMAGE_REPOSITORY], small_images[OTHER_REPOSITORY]
    assert a.layer_digest != b.layer_digest
    user = _user(world, {OTHER_REPOSITORY: ["pull"]})
    token = world.token(user, user, [_pull(OTHER_REPOSITORY), _pull(IMAGE_REPOSITORY)])
    assert [e["name"] for e in _jwt_claims(token)["access"]] == [OTHER_REPOSITORY]

    status, headers, body = _get(world, _blob(IMAGE_REPOSITORY, a), token)
    assert status == 401, (status, headers, body)
    status, headers, body = _get(world, f"/v2/{OTHER_REPOSITORY}/blobs/{a.layer_digest}", token)
    assert status == 404 and b"BLOB_UNKNOWN" in body, (status, headers, body)
    status, headers, _ = _get(world, _blob(OTHER_REPOSITORY, b), token)
    assert status == 307, (status, headers)
