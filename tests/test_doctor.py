"""`acrrelay doctor` against a fake ACR, through the real relay: every hop, and the hints."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from acrrelay.doctor import derive_oss_endpoint, realm_url
from tests import fake_acr
from tests.e2e_support import DEFAULT_LISTENER, Relay, TestCA, clean_env

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
    wanted = names or (
        fake_acr.REGISTRY, fake_acr.AUTH, fake_acr.OSS, f"*.{fake_acr.OSS}", fake_acr.CHART_HOST,
    )  # fmt: skip
    return {name: backend for name in wanted}


def doctor_args(relay: Relay, ca: TestCA, password: str | None, *extra: str) -> list[str]:
    """The `acrrelay doctor` command line through ``relay``, with ci's name if ``password``."""
    args = [
        str(BIN / "acrrelay"), "doctor", fake_acr.REGISTRY,
        "--via", f"127.0.0.1:{relay.port}", "--ca-file", str(ca.ca_file), "--timeout", "5",
    ]  # fmt: skip
    if password is not None:
        args += ["--username", fake_acr.USER, "--password-stdin"]
    return [*args, *extra]


def doctor_text(
    relay: Relay, ca: TestCA, *extra: str, password: str | None = fake_acr.PASSWORD
) -> subprocess.CompletedProcess[str]:
    """The installed `acrrelay doctor` through ``relay``, as a person runs it (no --json)."""
    return subprocess.run(
        doctor_args(relay, ca, password, *extra), input=f"{password}\n", capture_output=True,
        text=True, timeout=120, env=clean_env(relay.directory),
    )  # fmt: skip


def doctor(
    relay: Relay, ca: TestCA, *extra: str, password: str | None = fake_acr.PASSWORD
) -> tuple[int, str, dict[str, dict[str, str]]]:
    """Run the installed `acrrelay doctor` through ``relay``; (status, text, hops by name)."""
    text = doctor_text(relay, ca, *extra, password=password)
    document = subprocess.run(
        [*doctor_args(relay, ca, password, *extra), "--json"], input=f"{password}\n",
        capture_output=True, text=True, timeout=120, env=clean_env(relay.directory),
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
    # The test CA's certificates last two days: under the two weeks that earn a warning.
    assert hops["tls"]["result"].endswith(", expires in 2 days (soon!)")
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
    """Nothing listening at --via: the first hop fails, asking whether the relay runs; the
    chart hop on the registry host needs TLS, so it is skipped."""
    ca, _ = acr
    result = subprocess.run(
        [
            str(BIN / "acrrelay"), "doctor", fake_acr.REGISTRY, "--via", "127.0.0.1:9",
            "--ca-file", str(ca.ca_file), "--json", "--chart", fake_acr.CHARTS,
        ],
        capture_output=True, text=True, timeout=60, env=clean_env(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    first = json.loads(result.stdout)["hops"][0]
    assert first["name"] == "tls" and first["status"] == "failed"
    assert first["hint"] == "is the relay running and listening on 127.0.0.1:9?"
    chart = json.loads(result.stdout)["hops"][-1]
    assert (chart["name"], chart["status"], chart["result"]) == ("chart", "skipped", "needs tls")


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
    """--chart passes only on the chart API's 200 (after the Bearer dance helm-acr does);
    a missing repository fails naming it, with the Charts-component hint."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, _, hops = doctor(relay, ca, "--chart", fake_acr.CHARTS)
    assert status == 0, hops
    assert hops["chart"]["host"] == fake_acr.REGISTRY
    assert hops["chart"]["result"] == f"200 from the chart API: 1 chart(s) in {fake_acr.CHARTS}"
    status, _, hops = doctor(relay, ca, "--chart", "team/nothing-here")
    assert status == 1
    assert hops["chart"]["status"] == "failed"
    assert (
        hops["chart"]["result"]
        == f"404: no chart repository team/nothing-here on {fake_acr.REGISTRY}"
    )
    assert "'team/nothing-here'" in hops["chart"]["hint"]
    assert "Charts component" in hops["chart"]["hint"]


def test_chart_api_refusals_are_failures(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """A 401 (no credentials) or 403 (not allowed) from the chart API fails the hop with a
    credentials hint; it is not a sign that the API answers."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, _, hops = doctor(relay, ca, "--chart", fake_acr.CHARTS, password=None)
    assert status == 1
    assert hops["chart"]["status"] == "failed"
    assert (
        hops["chart"]["result"]
        == f"401 from the chart API for {fake_acr.CHARTS}, and no token for it"
    )
    assert hops["chart"]["hint"].endswith("pass --username, --password-stdin")
    status, _, hops = doctor(relay, ca, "--chart", fake_acr.LOCKED_CHARTS)
    assert status == 1
    assert hops["chart"]["result"] == f"403 from the chart API for {fake_acr.LOCKED_CHARTS}"
    assert hops["chart"]["hint"] == (
        f"check that {fake_acr.USER} may read the chart repository {fake_acr.LOCKED_CHARTS}"
    )


def test_chart_host(acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start) -> None:
    """--chart-host checks the chart API on that host (an instance's -chart name); when the
    relay does not route it, the hint says to add a route, since --acr does not cover it."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    extra = ("--chart", fake_acr.CHARTS, "--chart-host", fake_acr.CHART_HOST)
    status, _, hops = doctor(relay, ca, *extra)
    assert status == 0, hops
    assert hops["chart"]["host"] == fake_acr.CHART_HOST
    assert hops["chart"]["result"].startswith("200 from the chart API")
    assert (fake_acr.CHART_HOST, f"/api/{fake_acr.CHARTS}/charts") in server.seen
    unrouted = start_relay(routes_for(server, fake_acr.REGISTRY, fake_acr.AUTH, fake_acr.OSS))
    status, _, hops = doctor(unrouted, ca, *extra)
    assert status == 1
    assert hops["chart"]["hint"] == (
        f"the chart host {fake_acr.CHART_HOST} is not routed by the relay: add a route for it "
        "(--acr REGION does not include chart hosts)"
    )


def test_chart_host_needs_chart(tmp_path: Path) -> None:
    """--chart-host alone is a one-line mistake, not a silent no-op."""
    result = subprocess.run(
        [str(BIN / "acrrelay"), "doctor", fake_acr.REGISTRY, "--chart-host", fake_acr.CHART_HOST],
        capture_output=True, text=True, timeout=60, env=clean_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"acrrelay: doctor: --chart-host {fake_acr.CHART_HOST}: needs --chart NS/REPO"
    ]


@pytest.mark.parametrize(
    ("image", "result", "hint"),
    [
        (
            "broken/portal",
            "is not JSON (text/html): '<html><body>Log in",
            "a captive portal or a web proxy?",
        ),
        ("broken/latin1", "is not JSON", "a captive portal or a web proxy?"),
        ("broken/list", "is not a JSON object: '[1, 2]'", ""),
        ("broken/empty-index", "lists no platform manifest with a digest", "push the image"),
        ("broken/index-entry", "lists no platform manifest with a digest", "push the image"),
        ("broken/missing-platform", "404 for the platform manifest sha256:", "push the image"),
        ("broken/layer-digest", "the manifest's first layer has no digest", "push the image"),
        ("broken/layers", "the manifest lists no layers", ""),
    ],
)
def test_a_manifest_that_is_not_one(
    acr: tuple[TestCA, fake_acr.FakeACR],
    start_relay: Start,
    image: str,
    result: str,
    hint: str,
) -> None:
    """An HTML page, a non-object, an empty or broken index, a missing platform manifest or
    a layer without a digest fails the manifest hop with a hint: no traceback, a table."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    text = doctor_text(relay, ca, "--image", image)
    assert text.returncode == 1, text.stderr
    assert "Traceback" not in text.stderr
    assert "1 of 8 hops failed" in text.stdout
    _, _, hops = doctor(relay, ca, "--image", image)
    assert hops["manifest"]["status"] == "failed"
    assert result in hops["manifest"]["result"]
    assert hint in hops["manifest"]["hint"]
    assert hops["blob"]["status"] == hops["oss-blob"]["status"] == "skipped"


def test_an_image_index_takes_its_first_platform(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """For an index, the first platform's manifest is fetched and its layer followed."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, _, hops = doctor(relay, ca, "--image", fake_acr.INDEX_IMAGE)
    assert status == 0, hops
    assert hops["manifest"]["result"].endswith(f"first {fake_acr.LAYER_DIGEST[:19]}…")
    assert hops["oss-blob"]["result"] == "206, read 1024 bytes (gzip)"


def test_a_blob_the_registry_serves_itself(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """A blob answered 200 is read, and the table says plainly OSS was not on its path."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, text, hops = doctor(relay, ca, "--image", fake_acr.DIRECT_IMAGE)
    assert status == 0, hops
    assert hops["blob"]["result"] == (
        "200: the registry served the blob itself (no OSS redirect); read 1024 bytes (gzip)"
    )
    assert hops["oss-blob"]["status"] == "skipped"
    assert hops["oss-blob"]["result"] == "no redirect: the registry served the blob itself"
    assert "the registry served the blob itself (no OSS redirect)" in text


@pytest.mark.parametrize(
    ("answer", "status", "result", "hint"),
    [
        (
            (500, b"<Error><Code>InternalError</Code></Error>"),
            "failed", "500 InternalError", "OSS answers an anonymous request to its root with 403",
        ),
        (
            (403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>"),
            "failed", "403 SignatureDoesNotMatch", "not healthy",
        ),
        ((200, b"<html>hello</html>"), "failed", "200 but no OSS XML", "does not look like OSS"),
        (
            (200, b"<ListAllMyBucketsResult><Buckets/></ListAllMyBucketsResult>"),
            "ok", "200 ListAllMyBucketsResult: S3-compatible storage, not OSS, answers", "",
        ),
    ],
)  # fmt: skip
def test_the_oss_root_must_deny(
    acr: tuple[TestCA, fake_acr.FakeACR],
    start_relay: Start,
    answer: tuple[int, bytes],
    status: str,
    result: str,
    hint: str,
) -> None:
    """The OSS root passes on 403 AccessDenied (and, named as such, an S3-compatible
    store's bucket list); any other code, status or body fails with a hint."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    server.oss_root = answer
    try:
        _, _, hops = doctor(relay, ca)
    finally:
        server.oss_root = None
    assert hops["oss"]["status"] == status
    assert hops["oss"]["result"].startswith(result)
    assert hint in hops["oss"]["hint"]


#: A plain-HTTP listener beside the default one (endpoint strings must differ).
HTTP_LISTENER = {
    "endpoint": "tcp:port=0:interface=127.0.0.1",
    "name": "http",
    "protocols": ["http"],
}


@pytest.mark.parametrize(
    ("bucket_route", "hint"),
    [
        (
            None,
            f"the relay does not route {fake_acr.BUCKET}: add *.{fake_acr.OSS} to its routes",
        ),
        (
            "ports-443",
            f"the relay does not route {fake_acr.BUCKET} on port 80: add 80 to the ports",
        ),
        (
            "tcp:host=127.0.0.1:port=9",
            f"the relay routes {fake_acr.BUCKET} but could not reach its backend (connect_failed)",
        ),
    ],
)
def test_a_relay_refusal_on_plain_http_gets_the_relays_hint(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start, bucket_route: str | None, hint: str
) -> None:
    """When the relay itself answers a plain-HTTP blob redirect with an error, the hint is
    about the relay's routes or backend, not about a signed URL."""
    ca, server = acr
    routes: dict[str, object] = dict(
        routes_for(server, fake_acr.REGISTRY, fake_acr.AUTH, fake_acr.OSS)
    )
    backend = routes[fake_acr.REGISTRY]
    if bucket_route == "ports-443":
        routes[f"*.{fake_acr.OSS}"] = {"backend": backend, "ports": [443]}
    elif bucket_route is not None:
        routes[f"*.{fake_acr.OSS}"] = bucket_route
    relay = start_relay(routes, listeners=[DEFAULT_LISTENER, HTTP_LISTENER])
    server.http_redirect = True
    try:
        status, _, hops = doctor(
            relay, ca, "--image", fake_acr.IMAGE, "--via-http", f"127.0.0.1:{relay.ports['http']}"
        )
    finally:
        server.http_redirect = False
    assert status == 1
    assert hops["oss-blob"]["status"] == "failed"
    assert hops["oss-blob"]["result"].startswith(("403 from the relay", "502 from the relay"))
    assert hops["oss-blob"]["hint"].startswith(hint), hops["oss-blob"]
    assert "signed URL" not in hops["oss-blob"]["hint"]


def test_progress_on_stderr_as_each_hop_starts(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """Each hop is announced on stderr when it starts (then its outcome), a slow blob read
    shows its bytes so far, and stdout holds only the table."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    server.slow_oss = 0.4
    try:
        result = doctor_text(relay, ca, "--image", fake_acr.IMAGE)
    finally:
        server.slow_oss = None
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    hosts = {
        "tls": fake_acr.REGISTRY, "v2": fake_acr.REGISTRY, "realm": fake_acr.AUTH,
        "token": fake_acr.AUTH, "manifest": fake_acr.REGISTRY, "blob": fake_acr.REGISTRY,
        "oss-blob": fake_acr.BUCKET, "oss": fake_acr.OSS,
    }  # fmt: skip
    for name, host in hosts.items():
        start = lines.index(f"{name:<9} {host}: checking ...")
        assert lines.index(f"{name:<9} {host}: ok") > start
    progress = [line for line in lines if re.search(r"read \d+ of 1024 bytes so far", line)]
    assert progress and all(line.startswith(f"oss-blob  {fake_acr.BUCKET}: ") for line in progress)
    assert lines.index(progress[0]) > lines.index(f"oss-blob  {fake_acr.BUCKET}: checking ...")
    assert "checking ..." not in result.stdout.partition("\n")[2]
    assert "so far" not in result.stdout
    assert result.stdout.splitlines()[1].split() == ["HOP", "HOST", "RESULT", "TIME"]


def test_username_without_a_password_off_a_terminal(tmp_path: Path) -> None:
    """--username without --password-stdin, stdin not a terminal: a one-line error and exit
    2, not a silent empty password."""
    result = subprocess.run(
        [
            str(BIN / "acrrelay"), "doctor", fake_acr.REGISTRY, "--via", "127.0.0.1:9",
            "--username", fake_acr.USER,
        ],
        capture_output=True, text=True, timeout=60, env=clean_env(tmp_path),
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert "pipe it in with --password-stdin" in result.stderr


def test_anonymous_token_for_a_public_repository(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """Without credentials, a repository that allows anonymous pulls gets a token, and the
    pull's hops pass with it."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    status, _, hops = doctor(relay, ca, "--image", fake_acr.PUBLIC_IMAGE, password=None)
    assert status == 0, hops
    assert hops["token"]["result"] == "token anonymously, expires in 300s"
    assert hops["oss-blob"]["result"] == "206, read 1024 bytes (gzip)"


def test_a_realm_with_its_own_query(
    acr: tuple[TestCA, fake_acr.FakeACR], start_relay: Start
) -> None:
    """A realm that carries a query string keeps it; service and scope join it with &."""
    ca, server = acr
    relay = start_relay(routes_for(server))
    server.realm_query = "region=cn-beijing&v=2"
    try:
        status, _, hops = doctor(relay, ca, "--image", fake_acr.IMAGE)
    finally:
        server.realm_query = ""
    assert status == 0, hops
    assert hops["token"]["status"] == "ok"
    assert (
        fake_acr.AUTH,
        "/auth?region=cn-beijing&v=2&service=fake-registry&scope=repository%3Ateam%2Fapp%3Apull",
    ) in server.seen


@pytest.mark.parametrize(
    ("realm", "url"),
    [
        ("https://a.example/auth", "https://a.example/auth?service=s"),
        ("https://a.example/auth?x=1", "https://a.example/auth?x=1&service=s"),
        ("https://a.example/auth?x=a%20b&y", "https://a.example/auth?x=a%20b&y&service=s"),
        ("https://a.example/auth?#frag", "https://a.example/auth?service=s"),
    ],
)
def test_realm_url(realm: str, url: str) -> None:
    """The token URL keeps the realm's own query as it is and adds ours after an &."""
    assert realm_url(realm, {"service": "s"}) == url
