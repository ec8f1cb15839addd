"""Layer 1: the [gateway] table and the gateway file as a whole."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from acrrelay.config import ConfigError, Overlay
from acrrelay.gateway.config import (
    GatewayConfig,
    load_gateway,
    parse_gateway,
    parse_gateway_table,
)

REPO = Path(__file__).resolve().parent.parent
BASE = """
[[listen]]
endpoint = "tcp:9443:interface=127.0.0.1"

[[acr]]
region = "cn-hangzhou"
"""
REQUIRED = 'ca = "ca-dir"\ncache_dir = "cache"\n'


def gateway(body: str, base: str = BASE) -> GatewayConfig:
    _, config = parse_gateway(f"[gateway]\n{body}\n{base}", "gw.toml")
    assert config is not None
    return config


def test_defaults() -> None:
    """With only the required keys, every other key takes its documented default."""
    assert gateway(REQUIRED) == GatewayConfig(
        ca="ca-dir",
        cache_dir="cache",
        cache_size=10 << 30,
        proof_ttl=60.0,
        upstream_ca=None,
        upstream_proxy=None,
        upstream_timeout=30.0,
    )


def test_every_key() -> None:
    """Every key is read and converted: sizes, durations, paths and the proxy endpoint."""
    config = gateway(
        REQUIRED
        + """
cache_size = "512MiB"
proof_ttl = "15s"
upstream_ca = "/etc/ssl/bundle.pem"
upstream_proxy = "tcp:host=proxy.example:port=3128"
upstream_timeout = "1m"
"""
    )
    assert config == GatewayConfig(
        "ca-dir", "cache", 512 << 20, 15.0, "/etc/ssl/bundle.pem",
        "tcp:host=proxy.example:port=3128", 60.0,
    )  # fmt: skip


def test_proof_ttl_zero_is_allowed() -> None:
    """proof_ttl = 0 is valid: it means every cached request is proven upstream."""
    assert gateway(REQUIRED + "proof_ttl = 0").proof_ttl == 0.0


def test_unknown_key_is_rejected_with_a_hint() -> None:
    """A misspelt key names file and key and suggests the right one."""
    with pytest.raises(ConfigError) as e:
        gateway(REQUIRED + 'cache_sise = "1GiB"')
    assert str(e.value).startswith("gw.toml: gateway.cache_sise: unknown key")
    assert "did you mean 'cache_size'" in str(e.value)


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('cache_dir = "c"', "gateway", "missing required key 'ca'"),
        ('ca = "c"', "gateway", "missing required key 'cache_dir'"),
        (REQUIRED + 'cache_size = "lots"', "gateway.cache_size", "expected a size"),
        (REQUIRED + "cache_size = -1", "gateway.cache_size", "expected a size"),
        (REQUIRED + 'proof_ttl = "soon"', "gateway.proof_ttl", "expected a duration"),
        (REQUIRED + 'proof_ttl = "2h"', "gateway.proof_ttl", "at most 1h"),
        (REQUIRED + "upstream_timeout = 0", "gateway.upstream_timeout", "above zero"),
        (REQUIRED + 'upstream_proxy = "nonsense"', "gateway.upstream_proxy", "endpoint"),
        (REQUIRED + "upstream_proxy = 3128", "gateway.upstream_proxy", "endpoint"),
        (REQUIRED + 'upstream_ca = ""', "gateway.upstream_ca", "expected a path"),
        ('ca = 1\ncache_dir = "c"', "gateway.ca", "expected a path"),
    ],
)
def test_errors_name_file_and_key(body: str, key: str, fragment: str) -> None:
    """Each bad value is one line naming the file, the key and what was expected."""
    with pytest.raises(ConfigError) as e:
        gateway(body)
    text = str(e.value)
    assert text.startswith(f"gw.toml: {key}: "), text
    assert fragment in text
    assert "\n" not in text


def test_gateway_must_be_a_table() -> None:
    """`gateway = 1` is refused as not a table."""
    with pytest.raises(ConfigError, match=r"gw\.toml: gateway: expected a table"):
        parse_gateway("gateway = 1\n" + BASE, "gw.toml")


def test_parse_gateway_table_directly() -> None:
    """parse_gateway_table validates a bare dict, naming the source given."""
    assert parse_gateway_table("x.toml", {"ca": "a", "cache_dir": "b"}).ca == "a"
    with pytest.raises(ConfigError, match=r"^x\.toml: gateway\.nope: unknown key"):
        parse_gateway_table("x.toml", {"ca": "a", "cache_dir": "b", "nope": 1})


def test_a_file_without_gateway_is_the_relay() -> None:
    """No [gateway] table: the relay config and None, so the relay role runs."""
    relay, config = parse_gateway(BASE, "relay.toml")
    assert config is None
    assert relay.listeners[0].endpoint == "tcp:9443:interface=127.0.0.1"


def test_gateway_listeners_terminate_tls_only() -> None:
    """A gateway listener offering http or connect is refused, naming the listener's key."""
    base = BASE.replace('interface=127.0.0.1"', 'interface=127.0.0.1"\nprotocols = ["tls", "http"]')
    with pytest.raises(ConfigError, match=r'^gw\.toml: listen\[0\]\.protocols: .*\["tls"\]'):
        parse_gateway(f"[gateway]\n{REQUIRED}{base}", "gw.toml")
    relay, _ = parse_gateway(f"[gateway]\n{REQUIRED}{BASE}", "g", Overlay(listen=("tcp:1",)))
    assert relay.listeners[1].protocols == ("tls",)  # a --listen is TLS, so it is fine


def test_gateway_runs_one_worker() -> None:
    """relay.workers above 1 is refused in a gateway file: the store has one owner."""
    with pytest.raises(ConfigError, match=r"^gw\.toml: relay\.workers: "):
        parse_gateway(f"[gateway]\n{REQUIRED}{BASE}\n[relay]\nworkers = 2\n", "gw.toml")


def test_relay_errors_still_name_the_file() -> None:
    """The rest of a gateway file is checked by the relay's own rules, with their messages."""
    with pytest.raises(ConfigError, match=r"^gw\.toml: relay\.idle_timeout: "):
        parse_gateway(f'[gateway]\n{REQUIRED}{BASE}\n[relay]\nidle_timeout = "x"\n', "gw.toml")
    with pytest.raises(ConfigError, match=r"^gw\.toml: listen: no listeners"):
        parse_gateway(f'[gateway]\n{REQUIRED}\n[[acr]]\nregion = "cn-hangzhou"\n', "gw.toml")


def test_load_gateway_reads_a_file(tmp_path: Path) -> None:
    """load_gateway reads a file, errors naming its path; a missing file says so."""
    path = tmp_path / "gw.toml"
    path.write_text(f"[gateway]\n{REQUIRED}{BASE}")
    relay, config = load_gateway(str(path))
    assert config is not None and config.cache_dir == "cache"
    assert relay.source == str(path)
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'none.toml'}: no such file")):
        load_gateway(str(tmp_path / "none.toml"))


def test_the_example_config_is_valid_and_documents_every_key() -> None:
    """etc/gateway.toml loads as a gateway on 127.0.0.1:9443, and mentions every key."""
    path = REPO / "etc" / "gateway.toml"
    relay, config = load_gateway(str(path))
    assert config is not None
    assert (config.ca, config.cache_dir) == ("gateway-ca", "gateway-cache")
    assert [listener.endpoint for listener in relay.listeners] == ["tcp:9443:interface=127.0.0.1"]
    assert {a.region for a in relay.acr} == {"cn-hangzhou"}
    text = path.read_text()
    for key in GatewayConfig.__attrs_attrs__:
        assert re.search(rf"^#? ?{key.name} = ", text, re.M), key.name
