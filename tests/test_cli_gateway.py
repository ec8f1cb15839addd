"""The gateway's commands through the ``acrrelay`` command: ca init, cache verify, and
``hosts --format gateway-trust``."""

from __future__ import annotations

import io
import stat
from pathlib import Path

from acrrelay.cli import main


def test_ca_init_through_acrrelay_makes_a_private_key_and_refuses_to_overwrite(
    tmp_path: Path,
) -> None:
    """``acrrelay ca init DIR`` writes ca.crt and a 0600 ca.key, and a second run changes
    nothing and fails."""
    out = io.StringIO()
    assert main(["ca", "init", str(tmp_path / "ca")], out) == 0
    key = tmp_path / "ca" / "ca.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    assert "ca.crt" in out.getvalue()
    assert main(["ca", "init", str(tmp_path / "ca")], io.StringIO()) != 0
    assert key.read_bytes() == before


def test_cache_verify_through_acrrelay_checks_an_empty_store(tmp_path: Path) -> None:
    """``acrrelay cache verify DIR`` on a store with nothing in it passes; on a directory
    that is no store it fails."""
    from acrrelay.gateway.store import BlobStore

    BlobStore(tmp_path / "store", 1 << 20)
    assert main(["cache", "verify", str(tmp_path / "store")], io.StringIO()) == 0
    assert main(["cache", "verify", str(tmp_path / "nothing")], io.StringIO()) != 0


def test_hosts_gateway_trust_names_the_registry_and_token_hosts_only(tmp_path: Path) -> None:
    """``acrrelay hosts --format gateway-trust`` tells docker to trust the CA for the
    registry and token-service names of the region, and for no OSS name."""
    out = io.StringIO()
    status = main(
        [
            "hosts",
            "--relay",
            "10.0.0.5",
            "--acr",
            "cn-beijing",
            "--format",
            "gateway-trust",
            "--ca",
            "/etc/acrrelay/ca/ca.crt",
            "--client",
            "docker",
        ],
        out,
    )
    text = out.getvalue()
    assert status == 0
    assert "/etc/docker/certs.d/registry-vpc.cn-beijing.aliyuncs.com/ca.crt" in text
    assert "/etc/docker/certs.d/dockerauth-vpc.cn-beijing.aliyuncs.com/ca.crt" in text
    assert "oss-" not in text
    assert text.endswith("\n")


def test_hosts_gateway_trust_needs_the_ca() -> None:
    """Without --ca, gateway-trust is a one-line error and exit 1."""
    args = ["hosts", "--relay", "10.0.0.5", "--acr", "cn-beijing", "--format", "gateway-trust"]
    assert main(args, io.StringIO()) == 1


def test_check_config_reads_the_example_gateway_config() -> None:
    """``acrrelay check-config etc/gateway.toml`` validates the gateway role's file (the same
    format as the relay's, plus a ``[gateway]`` table) and shows the gateway's settings."""
    out = io.StringIO()
    example = Path(__file__).resolve().parent.parent / "etc" / "gateway.toml"
    assert main(["check-config", str(example)], out) == 0
    assert "gateway (this file runs the caching gateway" in out.getvalue()
    assert "proof_ttl = 60.0" in out.getvalue()
