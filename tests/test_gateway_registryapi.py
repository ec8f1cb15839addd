"""Layer 1: registry API classification, the gateway's first cache decision."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acrrelay.gateway.registryapi import NAME_PATTERN, ApiRequest, classify, parse_digest

DIGEST = "sha256:" + "ab" * 32
NAMES = st.from_regex(re.compile(rf"{NAME_PATTERN}\Z"), fullmatch=True).filter(
    lambda n: len(n) <= 255
)
HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@pytest.mark.parametrize(
    ("method", "target", "expected"),
    [
        ("GET", "/v2/", ApiRequest("GET", "ping")),
        ("GET", "/v2", ApiRequest("GET", "ping")),
        ("GET", "/v2/_catalog?n=100", ApiRequest("GET", "catalog")),
        ("GET", "/v2/lib/app/tags/list", ApiRequest("GET", "tags", "lib/app")),
        ("POST", "/v2/lib/app/blobs/uploads/", ApiRequest("POST", "upload", "lib/app")),
        (
            "PATCH",
            "/v2/lib/app/blobs/uploads/3f2a-b_c=",
            ApiRequest("PATCH", "upload", "lib/app", "3f2a-b_c="),
        ),
        (
            "GET",
            f"/v2/lib/app/blobs/{DIGEST}",
            ApiRequest("GET", "blob", "lib/app", DIGEST, DIGEST),
        ),
        (
            "HEAD",
            f"/v2/a/manifests/{DIGEST}?ns=registry.cn-hangzhou.aliyuncs.com",
            ApiRequest("HEAD", "manifest", "a", DIGEST, DIGEST),
        ),
        ("GET", "/v2/a/manifests/latest", ApiRequest("GET", "manifest", "a", "latest")),
        (
            "GET",
            "/v2/a/blobs/blobs/manifests/v1.2",
            ApiRequest("GET", "manifest", "a/blobs/blobs", "v1.2"),
        ),
    ],
)
def test_known_targets(method: str, target: str, expected: ApiRequest) -> None:
    """Each endpoint of the distribution API is recognised, with its repository and reference."""
    assert classify(method, target) == expected


def test_only_digest_reads_are_cacheable() -> None:
    """GET/HEAD of a blob or manifest by sha256 is cacheable; tags, pushes and deletes are not."""
    assert classify("GET", f"/v2/a/blobs/{DIGEST}").cacheable
    assert classify("HEAD", f"/v2/a/manifests/{DIGEST}").cacheable
    assert not classify("GET", "/v2/a/manifests/latest").cacheable
    assert not classify("PUT", f"/v2/a/manifests/{DIGEST}").cacheable
    assert not classify("DELETE", f"/v2/a/blobs/{DIGEST}").cacheable
    assert not classify("get", f"/v2/a/blobs/{DIGEST}").cacheable
    assert not classify("GET", "/v2/").cacheable


@pytest.mark.parametrize(
    "target",
    [
        "/v2/A/blobs/" + DIGEST,  # upper case is not a repository name
        "/v2/a//b/blobs/" + DIGEST,
        "/v2/a/../b/blobs/" + DIGEST,
        "/v2/./blobs/" + DIGEST,
        "/v2/a%2Fb/blobs/" + DIGEST,
        "/v2/a/blobs/sha256%3A" + "ab" * 32,
        "/v2/a/blobs/" + DIGEST + "/",
        "/v2/-a/blobs/" + DIGEST,
        "/v2/a-/blobs/" + DIGEST,
        "/v2/a___b/blobs/" + DIGEST,
        "/v2/" + "a" * 256 + "/blobs/" + DIGEST,
        "https://registry.example/v2/a/blobs/" + DIGEST,
        "/v3/a/blobs/" + DIGEST,
        "//v2/a/blobs/" + DIGEST,
        "/v2/a/blobs/" + DIGEST + "#x",
    ],
)
def test_odd_targets_are_other(target: str) -> None:
    """A target off the spec's grammar (case, dot segments, escapes, length) is `other`."""
    assert classify("GET", target).kind == "other"


@pytest.mark.parametrize(
    "reference",
    [
        "sha256:" + "AB" * 32,
        "sha256:" + "ab" * 31,
        "sha256:" + "ab" * 33,
        "sha512:" + "ab" * 64,
        "SHA256:" + "ab" * 32,
        "sha256:" + "ab" * 31 + "ag",
    ],
)
def test_only_lowercase_sha256_is_a_digest(reference: str) -> None:
    """Upper-case hex, other lengths and other algorithms are not digests, so not cacheable."""
    request = classify("GET", f"/v2/a/blobs/{reference}")
    assert request.digest is None
    assert not request.cacheable
    assert parse_digest(reference) is None


@given(st.text(), st.text(max_size=400))
def test_random_targets_never_crash_and_never_cache_by_accident(method: str, target: str) -> None:
    """Any method and target classify without error; cacheable implies a digest read."""
    request = classify(method, target)
    if request.cacheable:
        assert method in ("GET", "HEAD")
        assert request.kind in ("blob", "manifest")
        assert request.digest is not None and parse_digest(request.digest) == request.digest
        assert request.repository is not None
        assert re.fullmatch(NAME_PATTERN, request.repository)
        assert target.partition("?")[0] == (
            f"/v2/{request.repository}/{request.kind}s/{request.digest}"
        )


@given(
    st.lists(
        st.sampled_from(
            ["/v2/", "a", "b/", "blobs/", "manifests/", "sha256:", "ab" * 32, "?", ".."]
        ),
        max_size=12,
    ).map("".join)
)
def test_near_miss_targets_never_cache_by_accident(target: str) -> None:
    """Targets stitched from the API's own pieces are cacheable only when exactly well formed."""
    request = classify("GET", target)
    if request.cacheable:
        path = target.partition("?")[0]
        assert path == f"/v2/{request.repository}/{request.kind}s/{request.digest}"


@given(NAMES, HEX64, st.sampled_from(["blobs", "manifests"]), st.sampled_from(["GET", "HEAD"]))
def test_every_spec_name_round_trips(name: str, hex64: str, what: str, method: str) -> None:
    """Every repository name the spec's grammar allows is recognised, digest reads cached."""
    request = classify(method, f"/v2/{name}/{what}/sha256:{hex64}?ns=r.example")
    assert request.repository == name
    assert request.kind == what[:-1]
    assert request.digest == f"sha256:{hex64}"
    assert request.cacheable


@given(NAMES, st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", fullmatch=True))
def test_tag_manifests_pass_through(name: str, tag: str) -> None:
    """A manifest by tag is recognised with its tag, and is never cacheable."""
    request = classify("GET", f"/v2/{name}/manifests/{tag}")
    assert (request.kind, request.repository, request.reference) == ("manifest", name, tag)
    assert not request.cacheable
