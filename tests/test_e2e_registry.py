"""End to end with a real registry: skopeo pushes and pulls a big layer through the relay.

The world (``tests/registry_world.py``) is docker-registry with token auth and S3
redirects, a token service and moto on OSS's name, a client network namespace whose
hosts file points ACR's names at the relay, and the relay on the namespace's veth.
skopeo runs inside the namespace: every byte it moves crosses the relay, and the
access log must show all three services.

The layer size is ``$ACRRELAY_E2E_LAYER_MB`` MiB (default 200).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import MiB, clean_env
from tests.registry_world import (
    AUTH,
    COMMAND_TIMEOUT,
    IMAGE,
    NAMES,
    NETNS_PREFIX,
    OSS,
    PASSWORD,
    REALM,
    REGISTRY,
    SERVICE,
    USER,
    ClientNamespace,
    RegistryWorld,
    build_oci_image,
    https_request,
    layer_bytes_from_env,
    sha256_file,
    sweep_leftovers,
)

pytest_plugins = ["tests.e2e_fixtures"]
pytestmark = pytest.mark.e2e

#: What skopeo may take per MiB moved (generous: 2 cores, TLS three times on the way).
SECONDS_PER_MIB = 1.5


def _failure(what: str, result: Any, world: RegistryWorld) -> str:
    return world.failure(what, result)


def _login(world: RegistryWorld, home: Path, password: str = PASSWORD) -> Any:
    return world.skopeo(
        ["login", "--username", USER, "--password-stdin", REGISTRY],
        home=home,
        stdin=password,
        timeout=60,
    )


def _entries_after(world: RegistryWorld, first_id: int) -> list[dict[str, Any]]:
    """The main relay's access entries of connections accepted from ``first_id`` on."""
    return [e for e in world.relay.access_entries() if e["id"] >= first_id]


def _next_id(world: RegistryWorld) -> int:
    return max((e["id"] for e in world.relay.access_entries()), default=0) + 1


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def test_the_registry_challenges_with_the_token_service_as_realm(
    registry_world: RegistryWorld,
) -> None:
    """Through the relay, GET /v2/ answers ACR's shape: 401, Bearer realm on dockerauth."""
    world = registry_world
    status, headers, body = https_request(
        world.ca, world.relay.port, REGISTRY, "GET", "/v2/", host=world.relay.address
    )
    assert status == 401, (status, headers, body, world.diagnostics())
    assert headers["www-authenticate"] == f'Bearer realm="{REALM}",service="{SERVICE}"', headers
    assert headers["docker-distribution-api-version"] == "registry/2.0", headers


def test_the_token_service_answers_get_and_post_and_checks_the_password(
    registry_world: RegistryWorld,
) -> None:
    """The realm grants the asked scope to docker's GET and containerd's POST, and refuses a
    wrong password: the world's auth is real, not an open door."""
    world = registry_world
    scope = "repository:acrrelay-e2e/any:pull,push"
    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    query = f"/auth?service={SERVICE.replace(':', '%3A')}&scope={scope.replace(':', '%3A')}"
    via = {"host": world.relay.address}

    status, _, body = https_request(
        world.ca,
        world.relay.port,
        AUTH,
        "GET",
        query,
        headers={"Authorization": f"Basic {basic}"},
        **via,
    )
    assert status == 200, (status, body, world.diagnostics())
    answer = json.loads(body)
    assert answer["token"] == answer["access_token"] and answer["expires_in"] >= 60, answer
    claims = _jwt_claims(answer["token"])
    assert claims["aud"] == SERVICE and claims["sub"] == USER, claims
    assert claims["access"] == [
        {"type": "repository", "name": "acrrelay-e2e/any", "actions": ["pull", "push"]}
    ], claims

    form = (
        f"grant_type=password&username={USER}&password={PASSWORD.replace(' ', '+')}"
        f"&service={SERVICE}&scope={scope}&client_id=containerd-client&access_type=offline"
    )
    status, _, body = https_request(
        world.ca,
        world.relay.port,
        AUTH,
        "POST",
        "/auth",
        form.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        **via,
    )
    assert status == 200, (status, body, world.diagnostics())
    answer = json.loads(body)
    assert answer["access_token"] == answer["token"] and answer["refresh_token"], answer

    wrong = base64.b64encode(f"{USER}:not the password".encode()).decode()
    status, headers, body = https_request(
        world.ca,
        world.relay.port,
        AUTH,
        "GET",
        query,
        headers={"Authorization": f"Basic {wrong}"},
        **via,
    )
    assert status == 401 and "basic" in headers["www-authenticate"].lower(), (status, body)


def test_skopeo_login_with_a_wrong_password_fails(
    registry_world: RegistryWorld, tmp_path: Path
) -> None:
    """skopeo in the namespace reaches the token service through the relay, which refuses
    a wrong password (so the successful login below means something)."""
    result = _login(registry_world, tmp_path / "home", password="not the password")
    assert result.returncode != 0, _failure("skopeo login", result, registry_world)
    assert "invalid username/password" in result.stderr, result.stderr


def test_skopeo_pushes_and_pulls_a_big_layer_through_the_relay(
    registry_world: RegistryWorld,
    tmp_path: Path,
    record_property: Any,
) -> None:
    """skopeo logs in, pushes an image with a big gzip'd layer, and pulls it back, all
    through the relay: the pulled layer's sha256 equals the pushed one, the pull's bytes
    came from OSS by the redirect, and the access log shows registry, token service and
    OSS, each with connections that finished cleanly, and no refusal or failure."""
    # A layer of its own, in a repository of its own: the layer must really go up. The
    # session's shared image may already be in the registry (other tests push it), and
    # skopeo, as root, remembers where it saw a blob machine-wide and mounts it from
    # there instead of uploading it.
    world = registry_world
    image = build_oci_image(tmp_path / "image", layer_bytes_from_env(), tag="big", seed=31)
    home = tmp_path / "home"
    size = image.layer_size
    mib = size / MiB
    reference = f"docker://{REGISTRY}/{USER}/relay-push:big"
    first_id = _next_id(world)

    result = _login(world, home)
    assert result.returncode == 0, _failure("skopeo login", result, world)
    assert "Login Succeeded" in result.stdout, result.stdout

    timeout = 120 + SECONDS_PER_MIB * mib
    started = time.monotonic()
    result = world.skopeo(["copy", image.reference, reference], home=home, timeout=timeout)
    push_seconds = time.monotonic() - started
    assert result.returncode == 0, _failure("skopeo copy (push)", result, world)
    pull_first_id = _next_id(world)

    pulled = tmp_path / "pulled"
    started = time.monotonic()
    result = world.skopeo(["copy", reference, f"dir:{pulled}"], home=home, timeout=timeout)
    pull_seconds = time.monotonic() - started
    assert result.returncode == 0, _failure("skopeo copy (pull)", result, world)

    manifest = json.loads((pulled / "manifest.json").read_text())
    assert [layer["digest"] for layer in manifest["layers"]] == [image.layer_digest], manifest
    layer_file = pulled / image.layer_digest.removeprefix("sha256:")
    assert layer_file.stat().st_size == size, (layer_file.stat().st_size, size)
    assert sha256_file(layer_file) == image.layer_digest, "the pulled layer differs"
    shutil.rmtree(pulled)  # a big file nobody needs now

    # The blob came down from OSS by the 307 redirect (the pull's one big download), and
    # went up to the registry on the push.
    relay = world.relay
    oss_down = relay.wait_access(
        lambda e: e["id"] >= pull_first_id and e.get("sni") == OSS and e["bytes_down"] >= size,
        timeout=15,
    )
    relay.wait_access(
        lambda e: (
            first_id <= e["id"] < pull_first_id
            and e.get("sni") == REGISTRY
            and e["bytes_up"] >= size
        ),
        timeout=15,
    )
    entries = _entries_after(world, first_id)
    log = "\n".join(json.dumps(e) for e in entries)
    for name in (REGISTRY, AUTH, OSS):
        done = [e for e in entries if e.get("sni") == name and e["close_reason"] == "done"]
        assert done, f"no finished connection to {name} in the access log:\n{log}"
    assert {e["client"].rpartition(":")[0] for e in entries} == {world.netns.client_address}, log
    assert {e["sni"] for e in entries} <= set(NAMES), log
    # Go's TLS stacks (skopeo's and docker-registry's) often end a finished connection
    # with close_notify then a TCP RST, at either end and at once, and the relay reports
    # the reset it saw (client_reset or backend_reset); the relay's own handling of those
    # resets is pinned in test_e2e_reset.py. Every transfer above completed and checked
    # out; what must never appear is a refusal, a failed connect or a timeout.
    ended_badly = [
        e for e in entries if e["close_reason"] not in ("done", "client_reset", "backend_reset")
    ]
    assert not ended_badly, f"connections ended badly: {ended_badly}\n{world.diagnostics()}"
    assert oss_down[0]["close_reason"] == "done", oss_down
    relay_output = relay.output.text()
    assert "Traceback" not in relay_output and "Unhandled" not in relay_output, relay_output

    figures = {
        "layer_mib": round(mib, 1),
        "world_start_s": round(world.start_seconds, 2),
        "push_s": round(push_seconds, 2),
        "push_mib_s": round(mib / push_seconds, 1),
        "pull_s": round(pull_seconds, 2),
        "pull_mib_s": round(mib / pull_seconds, 1),
        "oss_bytes_down": oss_down[0]["bytes_down"],
        "connections": len(entries),
    }
    for key, value in figures.items():
        record_property(key, value)
    print(f"\nregistry e2e figures: {json.dumps(figures)}")


def test_a_relay_without_the_oss_route_breaks_the_pull_at_the_redirect(
    registry_world: RegistryWorld, tmp_path: Path
) -> None:
    """A second relay on the same servers, whose routes leave out OSS: the push works (it
    needs only registry and token service), the pull fails at the blob redirect, and that
    relay refuses the OSS name, so all three services must go through the relay."""
    world = registry_world
    image = build_oci_image(tmp_path / "image", 256 * 1024, seed=1)
    reference = f"docker://{IMAGE}:no-oss"
    routes = {REGISTRY: world.backends[REGISTRY], AUTH: world.backends[AUTH]}
    second = world.start_relay(routes)
    home = tmp_path / "home"
    hosts = second.hosts()
    name = world.push(image, "no-oss", home=home, hosts=hosts)
    assert name == reference.removeprefix("docker://")

    result = world.skopeo(
        ["copy", reference, f"dir:{tmp_path / 'pulled'}"], home=home, hosts=hosts, timeout=60
    )
    assert result.returncode != 0, _failure("skopeo copy (pull without OSS)", result, world)
    refused = second.wait_access(
        lambda e: e.get("sni") == OSS and e["close_reason"] == "refused:not_allowed"
    )
    assert refused[0]["client"].startswith(world.netns.client_address + ":"), refused
    assert not [e for e in second.access_entries() if e.get("sni") == OSS and e["bytes_down"]]
    # The same pull through the world's relay, which routes OSS, works.
    result = world.skopeo(["copy", reference, f"dir:{tmp_path / 'pulled-ok'}"], home=home)
    assert result.returncode == 0, _failure("skopeo copy (pull, world relay)", result, world)
    layer = tmp_path / "pulled-ok" / image.layer_digest.removeprefix("sha256:")
    assert sha256_file(layer) == image.layer_digest
    second.stop()


def _netns_state(name: str) -> dict[str, bool]:
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.split()
    link = subprocess.run(
        ["ip", "link", "show", f"{name}h"], capture_output=True, text=True, timeout=30
    )
    return {
        "namespace": name in namespaces,
        "veth": link.returncode == 0,
        "etc": (Path("/etc/netns") / name).exists(),
    }


def test_a_client_namespace_is_removed_on_close(tmp_path: Path) -> None:
    """A client namespace's veth pair, namespace and /etc/netns entry are all gone after
    close(); its hosts file pointed the names at the root side of the veth."""
    netns = ClientNamespace(tmp_path / "netns")
    try:
        assert _netns_state(netns.name) == {"namespace": True, "veth": True, "etc": True}
        result = netns.run(
            ["getent", "hosts", REGISTRY], env=clean_env(tmp_path), timeout=COMMAND_TIMEOUT
        )
        assert result.stdout.split() == [netns.host_address, REGISTRY], result
    finally:
        netns.close()
    assert _netns_state(netns.name) == {"namespace": False, "veth": False, "etc": False}


def test_leftovers_of_a_crashed_run_are_swept(tmp_path: Path) -> None:
    """A namespace, veth and /etc/netns entry named for a test run that is gone (a PID
    above pid_max) are removed by the next world's sweep; a live run's are not."""
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    name = f"{NETNS_PREFIX}{dead}n0"
    live = ClientNamespace(tmp_path / "live")
    try:
        subprocess.run(["ip", "netns", "add", name], timeout=30, check=True)
        subprocess.run(
            ["ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", f"{name}c"],
            timeout=30,
            check=True,
        )
        (Path("/etc/netns") / name).mkdir(parents=True)
        (Path("/etc/netns") / name / "hosts").write_text("127.0.0.1 localhost\n")
        assert _netns_state(name) == {"namespace": True, "veth": True, "etc": True}
        swept = sweep_leftovers()
        assert _netns_state(name) == {"namespace": False, "veth": False, "etc": False}, swept
        assert name in swept, swept
        assert _netns_state(live.name) == {"namespace": True, "veth": True, "etc": True}
    finally:
        live.close()
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
