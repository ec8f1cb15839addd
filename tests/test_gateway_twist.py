"""The gateway role as a real process: ``twist acrrelay --config gateway.toml`` serving a miss
then a hit over TLS to curl, which trusts only the gateway's CA."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from acrrelay.gateway.ca import init_ca
from tests import gateway_support as gs
from tests.e2e_support import VENV_BIN, _Output, clean_env, stop_process
from tests.test_gateway_cache import _OSS, GOOD, _Registry

pytestmark = pytest.mark.e2e

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(gateway\)")
METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
MiB = 1 << 20


def _config(tmp: Path, reg: int, oss: int, upstream_ca: Path) -> Path:
    path = tmp / "gateway.toml"
    path.write_text(
        f"""
[gateway]
ca = "{tmp / "gwca"}"
cache_dir = "{tmp / "cache"}"
cache_size = "1GiB"
upstream_ca = "{upstream_ca}"

[[listen]]
endpoint = "tcp:0:interface=127.0.0.1"
name = "gateway"
protocols = ["tls"]

[[route]]
name = "{gs.REGISTRY}"
backend = "tcp:host=127.0.0.1:port={reg}"

[[route]]
name = "*.oss.gw.test"
backend = "tcp:host=127.0.0.1:port={oss}"

[relay]
access_log = "{tmp / "access.log"}"

[admin]
metrics = "tcp:0:interface=127.0.0.1"
"""
    )
    return path


def _curl(tmp: Path, port: int, digest: str, out: Path) -> dict[str, Any]:
    result = subprocess.run(
        [
            "curl", "-sS", "--fail", "--cacert", str(tmp / "gwca" / "ca.crt"),
            "--resolve", f"{gs.REGISTRY}:{port}:127.0.0.1",
            "-H", f"Authorization: {GOOD.decode()}",
            "-o", str(out), "-w", "%{json}",
            f"https://{gs.REGISTRY}:{port}/v2/lib/app/blobs/{digest}",
        ],
        capture_output=True, text=True, timeout=120, check=True, env=clean_env(tmp),
    )  # fmt: skip
    return dict(json.loads(result.stdout))


def _metrics(port: int) -> dict[tuple[str, str], float]:
    """(sample name, its one label value or "") -> value, from the admin metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {
        (sample.name, next(iter(sample.labels.values()), "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest_twisted.inlineCallbacks
def test_twist_serves_a_miss_then_a_hit_over_tls_to_curl(tmp_path: Path) -> Any:
    """A [gateway] file runs the gateway: curl gets the blob twice, byte-exact; the access log
    says miss then hit, and the object store sent the bytes once."""
    upstream_ca = gs.make_ca(tmp_path / "upstream-ca")
    init_ca(tmp_path / "gwca")
    registry, oss = _Registry(), _OSS(tmp_path / "oss")
    (tmp_path / "oss").mkdir()
    reg_root, oss_root = Resource(), Resource()
    reg_root.putChild(b"v2", registry)
    oss_root.putChild(b"data", oss)
    reg_port = gs.listen_tls_site(upstream_ca, gs.REGISTRY, reg_root)
    oss_port = gs.listen_tls_site(upstream_ca, gs.OSS, oss_root)
    data = os.urandom(64 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "oss" / digest).write_bytes(data)
    config = _config(
        tmp_path, reg_port.getHost().port, oss_port.getHost().port, upstream_ca.ca_file
    )
    proc = subprocess.Popen(
        [str(VENV_BIN / "twist"), "--log-format=text", "acrrelay", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=clean_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    output = _Output(proc)
    try:
        match = yield deferToThread(output.wait_for, METRICS, 20)  # bound before listeners
        metrics_port = int(match.group(1))
        port = int(output.wait_for(LISTENING, 10).group(1))
        speeds = []
        for name in ("first", "second"):
            out = tmp_path / name
            stats = yield deferToThread(_curl, tmp_path, port, digest, out)
            assert stats["http_code"] == 200
            assert hashlib.sha256(out.read_bytes()).hexdigest() == digest.split(":")[1]
            speeds.append(stats["speed_download"] / 1e6)
        log = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
        assert [e.get("cache") for e in log] == ["miss", "hit"]
        assert [e.get("status") for e in log] == [200, 200]
        assert oss.bytes == len(data)
        assert not any(b"Authorization" in h for h in oss.headers)
        page = yield deferToThread(_metrics, metrics_port)
        assert page[("acrrelay_gateway_requests_total", "hit")] == 1
        assert page[("acrrelay_gateway_requests_total", "miss")] == 1
        assert page[("acrrelay_gateway_bytes_total", "upstream")] == len(data)
        assert page[("acrrelay_gateway_bytes_total", "store")] == len(data)
        assert page[("acrrelay_gateway_proofs_total", "ok")] == 1  # the hit was remembered
        assert page[("acrrelay_gateway_store_bytes", "")] == len(data)
        print(f"gateway twist: miss {speeds[0]:.0f} MB/s, hit {speeds[1]:.0f} MB/s over TLS")
    finally:
        stop_process(proc)
        reg_port.stopListening()
        oss_port.stopListening()
