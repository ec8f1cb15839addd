"""`acrrelay doctor` against a fake ACR, through the real relay: every hop, and the hints."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acrrelay.doctor import derive_oss_endpoint
from tests import fake_acr
from tests.e2e_support import Relay, TestCA, clean_env

pytest_plugins = ["tests.e2e_fixtures"]

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def acr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestCA, fake_acr.FakeACR]]:
    ca = TestCA(tmp_path_factory.mktemp("acr-ca"), fake_acr.NAMES)
    server = fake_acr.FakeACR(ca)
    try:
        yield ca, server
    finally:
        server.stop()


def routes_for(server: fake_acr.FakeACR, *names: str) -> dict[str, str]:
    backend = f"tcp:host=127.0.0.1:port={server.port}"
    wanted = names or (fake_acr.REGISTRY, fake_acr.AUTH, fake_acr.OSS, f"*.{fake_acr.OSS}")
    return {name: backend for name in wanted}


def doctor(
    relay: Relay, ca: TestCA, *extra: str, password: str | None = fake_acr.PASSWORD
) -> tuple[int, str, dict[str, dict[str, str]]]:
    """Run the installed `acrrelay doctor` through ``relay``; (status, text, hops by name)."""
    args = [
        str(BIN / "acrrelay"), "doctor", fake_acr.REGISTRY,
        "--via", f"127.0.0.1:{relay.port}", "--ca-file", str(ca.ca_file), "--timeout", "5",
    ]  # fmt: skip
    if password is not None:
        args += ["--username", fake_acr.USER, "--password-stdin"]
    text = subprocess.run(
        [*args, *extra], input=f"{password}\n", capture_output=True, text=True, timeout=120,
        env=clean_env(relay.directory),
    )  # fmt: skip
    document = subprocess.run(
        [*args, *extra, "--json"], input=f"{password}\n", capture_output=True, text=True,
        timeout=120, env=clean_env(relay.directory),
    )  # fmt: skip
    hops = {hop["name"]: hop for hop in json.loads(document.stdout)["hops"]}
    assert text.returncode == document.returncode
    return text.returncode, text.stdout, hops


Start = Callable[..., Relay]


def test_every_hop_passes_through_the_relay(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """With all three services routed, doctor passes TLS, challenge, realm, token, manifest,
    blob redirect, the OSS blob and the OSS endpoint, and prints a table."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, text, hops = doctor(relay, ca, "--image", fake_acr.IMAGE)
    assert status == 0, text
    assert [name for name in hops] == [
        "tls", "v2", "realm", "token", "manifest", "blob", "oss-blob", "oss",
    ]  # fmt: skip
    assert all(hop["status"] == "ok" for hop in hops.values()), hops
    assert f"certificate for {fake_acr.REGISTRY}" in hops["tls"]["result"]
    assert f"realm=https://{fake_acr.AUTH}/auth" in hops["v2"]["result"]
    assert hops["token"]["result"] == "token as ci, expires in 600s"
    assert hops["blob"]["result"].startswith(f"307 to https://{fake_acr.BUCKET}/docker/blob")
    assert hops["oss-blob"]["result"] == "206, read 1024 bytes (gzip)"
    assert hops["oss"]["result"] == "403 AccessDenied (OSS answers)"
    assert "every hop passed" in text
    lines = text.splitlines()
    assert lines[1].split() == ["HOP", "HOST", "RESULT", "TIME"]
    sources = {entry.get("sni") for entry in relay.access_entries()}
    assert {fake_acr.REGISTRY, fake_acr.AUTH, fake_acr.BUCKET, fake_acr.OSS} <= sources


def test_unrouted_token_service_fails_with_the_routing_hint(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """Without a route for the realm host, the realm hop fails and says so; later hops skip."""
    ca, server = acr
    relay = start_relay(routes_for(server, fake_acr.REGISTRY, fake_acr.OSS, f"*.{fake_acr.OSS}"))
    status, text, hops = doctor(relay, ca, "--image", fake_acr.IMAGE)
    assert status == 1
    assert hops["tls"]["status"] == hops["v2"]["status"] == "ok"
    assert hops["realm"]["status"] == "failed"
    assert hops["realm"]["hint"].startswith(
        f"the realm host {fake_acr.AUTH} is not routed by the relay"
    )
    assert hops["token"]["status"] == hops["manifest"]["status"] == "skipped"
    assert f"hint: the realm host {fake_acr.AUTH} is not routed by the relay" in text


def test_unrouted_oss_fails_on_the_redirect(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """Without OSS routes, the blob redirect is followed into a refusal, with the hint."""
    ca, server = acr
    relay = start_relay(routes_for(server, fake_acr.REGISTRY, fake_acr.AUTH))
    status, _, hops = doctor(relay, ca, "--image", fake_acr.IMAGE)
    assert status == 1
    assert hops["blob"]["status"] == "ok"
    assert hops["oss-blob"]["status"] == "failed"
    assert hops["oss-blob"]["hint"].startswith(
        f"the OSS host {fake_acr.BUCKET} is not routed by the relay"
    )
    assert hops["oss"]["status"] == "failed"


def test_a_plain_http_redirect_without_an_http_listener(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """A redirect to http:// with nothing on the relay's port 80 names the missing listener."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    server.http_redirect = True
    try:
        status, _, hops = doctor(relay, ca, "--image", fake_acr.IMAGE, "--via-http", "127.0.0.1:9")
    finally:
        server.http_redirect = False
    assert status == 1
    assert hops["oss-blob"]["hint"].startswith(
        f"the blob redirect goes to http://{fake_acr.BUCKET}:80 but nothing answers there"
    )


def test_anonymous_where_credentials_are_needed(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """Without credentials the token hop fails with the hint to pass them."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, _, hops = doctor(relay, ca, password=None)
    assert status == 1
    assert hops["token"]["status"] == "failed"
    assert "pass --username and --password-stdin" in hops["token"]["hint"]


def test_a_relay_that_is_not_there(acr: tuple[TestCA, fake_acr.FakeACR], tmp_path: Path) -> None:
    """Nothing listening at --via: the first hop fails, asking whether the relay runs."""
    ca, _ = acr
    result = subprocess.run(
        [
            str(BIN / "acrrelay"), "doctor", fake_acr.REGISTRY, "--via", "127.0.0.1:9",
            "--ca-file", str(ca.ca_file), "--json",
        ],
        capture_output=True, text=True, timeout=60, env=clean_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    first = json.loads(result.stdout)["hops"][0]
    assert first["name"] == "tls" and first["status"] == "failed"
    assert first["hint"] == "is the relay running and listening on 127.0.0.1:9?"


@pytest.mark.parametrize(
    ("registry", "oss"),
    [
        ("registry-vpc.cn-beijing.aliyuncs.com", "oss-cn-beijing-internal.aliyuncs.com"),
        ("registry.cn-hangzhou.aliyuncs.com", "oss-cn-hangzhou.aliyuncs.com"),
        ("myco-registry-vpc.cn-shanghai.cr.aliyuncs.com", "oss-cn-shanghai-internal.aliyuncs.com"),
        ("crpi-abc.cn-chengdu.personal.cr.aliyuncs.com", "oss-cn-chengdu.aliyuncs.com"),
        ("registry.example.com", None),
    ],
)
def test_oss_endpoint_from_the_registry_name(registry: str, oss: str | None) -> None:
    """The OSS endpoint to check follows the registry's region and network."""
    assert derive_oss_endpoint(registry) == oss


def test_chart_repository_hop(acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start) -> None:
    """--chart checks an Enterprise chart repository's API; a missing one gets the hint."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, _, hops = doctor(relay, ca, "--chart", fake_acr.CHARTS)
    assert status == 0 and hops["chart"]["result"] == "200 from the chart API"
    status, _, hops = doctor(relay, ca, "--chart", "team/nothing-here")
    assert status == 1
    assert hops["chart"]["status"] == "failed"
    assert "Charts component" in hops["chart"]["hint"] or "ChartMuseum" in hops["chart"]["hint"]
