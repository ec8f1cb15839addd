"""Layer 1: name patterns, the route table, and the one policy decision."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from acrrelay.catalogue import REGIONS, UnknownRegion, acr_entries
from acrrelay.routing import (
    Door,
    InvalidName,
    Policy,
    Refusal,
    Route,
    RouteConflict,
    RouteTable,
    normalize_name,
    parse_pattern,
)


def table(*pairs: tuple[str, str]) -> RouteTable:
    return RouteTable(Route(parse_pattern(name), backend) for name, backend in pairs)


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("Registry.CN-Beijing.Aliyuncs.com", "registry.cn-beijing.aliyuncs.com"),
        ("registry.cn-beijing.aliyuncs.com.", "registry.cn-beijing.aliyuncs.com"),
        ("a_b.example", "a_b.example"),
    ],
)
def test_names_ignore_case_and_one_trailing_dot(raw: str, normal: str) -> None:
    """Matching is case-insensitive and ignores one trailing dot."""
    assert normalize_name(raw) == normal


@pytest.mark.parametrize(
    "bad", ["", ".", "a..b", "a b.c", "-a.b", "a-.b", "x" * 64 + ".b", "a.b.."]
)
def test_bad_names_are_rejected(bad: str) -> None:
    """Empty labels, spaces, edge hyphens and over-long labels are not host names."""
    with pytest.raises(InvalidName):
        normalize_name(bad)


def test_exact_suffix_and_label_patterns() -> None:
    """Exact names, *.suffix and first-label globs each match what they say."""
    t = table(
        ("registry.cn-beijing.aliyuncs.com", "exact"),
        ("*.oss-cn-beijing.aliyuncs.com", "buckets"),
        ("*-registry.cn-beijing.cr.aliyuncs.com", "ee"),
        ("crpi-*.cn-beijing.personal.cr.aliyuncs.com", "personal"),
    )

    def backend(name: str) -> str | None:
        route = t.lookup(name)
        return route.backend if route else None

    assert backend("registry.cn-beijing.aliyuncs.com") == "exact"
    assert backend("bucket.oss-cn-beijing.aliyuncs.com") == "buckets"
    assert backend("a.b.oss-cn-beijing.aliyuncs.com") == "buckets"
    assert backend("oss-cn-beijing.aliyuncs.com") is None  # the bare suffix is not *.suffix
    assert backend("myinst-registry.cn-beijing.cr.aliyuncs.com") == "ee"
    assert backend("-registry.cn-beijing.cr.aliyuncs.com") is None  # * is one or more chars
    assert backend("myinst-registry-vpc.cn-beijing.cr.aliyuncs.com") is None
    assert backend("crpi-abc.cn-beijing.personal.cr.aliyuncs.com") == "personal"
    assert backend("crpi-abc-vpc.cn-beijing.personal.cr.aliyuncs.com") == "personal"
    assert backend("x.crpi-abc.cn-beijing.personal.cr.aliyuncs.com") is None


@pytest.mark.parametrize(
    "lookalike",
    [
        "registry-vpc.cn-beijing.aliyuncs.com.evil.example",
        "evilaliyuncs.com",
        "aliyuncs.com",
        "registry-vpc.cn-beijing.aliyuncs.co",
        "aliyuncs.com.evil.example",
    ],
)
def test_wildcards_never_match_lookalikes(lookalike: str) -> None:
    """*.aliyuncs.com compares whole labels: no longer or shorter look-alike matches."""
    assert table(("*.aliyuncs.com", "x")).lookup(normalize_name(lookalike)) is None


def test_most_specific_route_wins() -> None:
    """Exact beats a first-label glob, which beats the longest suffix, which beats a shorter one."""
    t = table(
        ("*.aliyuncs.com", "short-suffix"),
        ("*.cn-beijing.cr.aliyuncs.com", "long-suffix"),
        ("*-registry.cn-beijing.cr.aliyuncs.com", "glob"),
        ("prod-*-registry.cn-beijing.cr.aliyuncs.com", "longer-glob"),
        ("prod-registry.cn-beijing.cr.aliyuncs.com", "exact"),
    )
    assert t.lookup("prod-registry.cn-beijing.cr.aliyuncs.com").backend == "exact"  # type: ignore[union-attr]
    assert t.lookup("prod-x-registry.cn-beijing.cr.aliyuncs.com").backend == "longer-glob"  # type: ignore[union-attr]
    assert t.lookup("dev-registry.cn-beijing.cr.aliyuncs.com").backend == "glob"  # type: ignore[union-attr]
    assert t.lookup("other.cn-beijing.cr.aliyuncs.com").backend == "long-suffix"  # type: ignore[union-attr]
    assert t.lookup("oss-cn-beijing.aliyuncs.com").backend == "short-suffix"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad", ["*", "*.com", "*.*.example.com", "a.*.example.com", "**.example.com", "a*b*.x.y"]
)
def test_overbroad_or_odd_wildcards_are_rejected(bad: str) -> None:
    """A wildcard needs a two-label suffix and at most one '*', in the first label."""
    with pytest.raises(InvalidName):
        parse_pattern(bad)


def test_duplicate_and_conflicting_routes_are_errors() -> None:
    """The same pattern twice is an error, whether or not the backends agree."""
    with pytest.raises(RouteConflict, match="duplicate"):
        table(("a.example.com", "x"), ("A.example.com.", "x"))
    with pytest.raises(RouteConflict, match="conflicting"):
        table(("*.example.com", "x"), ("*.EXAMPLE.com", "y"))


def test_policy_routes_and_refuses_with_reasons() -> None:
    """decide() answers a Route or a Refusal whose reason is a stable token."""
    policy = Policy(table(("a.example.com", "x")))
    tls = Door("front", "tls")
    assert isinstance(policy.decide(tls, "A.example.com.", 443, "10.0.0.1"), Route)
    assert policy.decide(tls, None, 443, "10.0.0.1") == Refusal(
        "no_sni", "tls request carries no target name"
    )
    assert policy.decide(tls, "b.example.com", 443, "10.0.0.1").reason == "not_allowed"  # type: ignore[union-attr]
    assert policy.decide(tls, "bad name", 443, "10.0.0.1").reason == "malformed"  # type: ignore[union-attr]
    assert policy.decide(tls, "a.example.com", 22, "10.0.0.1").reason == "port_not_allowed"  # type: ignore[union-attr]
    # A listener missing from the policy takes TLS only.
    http = Door("front", "http")
    assert policy.decide(http, "a.example.com", 80, "10.0.0.1").reason == "protocol_not_allowed"  # type: ignore[union-attr]


@given(st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,4}", fullmatch=True))
def test_lookup_agrees_with_pattern_matching(name: str) -> None:
    """The indexed lookup returns a route whose pattern matches, and finds one whenever any does."""
    patterns = ["*.example.com", "a-*.example.com", "*-b.x.example.com", "exact.example.com"]
    t = table(*[(p, p) for p in patterns])
    try:
        host = normalize_name(name + ".example.com")
    except InvalidName:
        return
    route = t.lookup(host)
    matching = [p for p in patterns if parse_pattern(p).matches(host)]
    if route is None:
        assert not matching
    else:
        assert route.pattern.matches(host)


def test_catalogue_names_for_a_region() -> None:
    """--acr cn-beijing covers registry, token service and OSS names, public and VPC."""
    names = {e.pattern for e in acr_entries("cn-beijing")}
    for expected in [
        "registry.cn-beijing.aliyuncs.com",
        "registry-vpc.cn-beijing.aliyuncs.com",
        "dockerauth.cn-beijing.aliyuncs.com",
        "dockerauth-vpc.cn-beijing.aliyuncs.com",
        "dockerauth-ee.cn-beijing.aliyuncs.com",
        "dockerauth-ee-vpc.cn-beijing.aliyuncs.com",
        "*-registry.cn-beijing.cr.aliyuncs.com",
        "*-registry-vpc.cn-beijing.cr.aliyuncs.com",
        "crpi-*.cn-beijing.personal.cr.aliyuncs.com",
        "oss-cn-beijing.aliyuncs.com",
        "oss-cn-beijing-internal.aliyuncs.com",
        "*.oss-cn-beijing.aliyuncs.com",
        "*.oss-cn-beijing-internal.aliyuncs.com",
    ]:
        assert expected in names
    assert "dockerauth-cn-zhangjiakou.aliyuncs.com" not in names
    assert all(e.service in ("registry", "auth", "oss") for e in acr_entries("cn-beijing"))


def test_catalogue_zhangjiakou_exception() -> None:
    """China (Zhangjiakou) also gets dockerauth-cn-zhangjiakou.aliyuncs.com."""
    names = {e.pattern for e in acr_entries("cn-zhangjiakou")}
    assert "dockerauth-cn-zhangjiakou.aliyuncs.com" in names


def test_catalogue_networks_filter() -> None:
    """networks=["vpc"] keeps only -vpc and -internal names."""
    vpc = {e.pattern for e in acr_entries("cn-beijing", ["vpc"])}
    assert "registry-vpc.cn-beijing.aliyuncs.com" in vpc
    assert "registry.cn-beijing.aliyuncs.com" not in vpc
    assert all("-vpc" in n or "-internal" in n for n in vpc)


def test_catalogue_entries_are_valid_patterns_for_every_region() -> None:
    """Every region's entries parse and build a table with no conflicts."""
    for region in REGIONS:
        t = RouteTable(
            Route(parse_pattern(e.pattern), "resolve", e.service) for e in acr_entries(region)
        )
        assert t.lookup(f"registry.{region}.aliyuncs.com") is not None
        assert t.lookup(f"bkt.oss-{region}-internal.aliyuncs.com") is not None


def test_unknown_region_suggests_the_close_one() -> None:
    """A misspelt region is an error that names the likely one."""
    with pytest.raises(UnknownRegion, match="did you mean cn-beijing"):
        acr_entries("cn-bejing")
