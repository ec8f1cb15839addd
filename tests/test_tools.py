"""The client tools: `acrrelay hosts` and `acrrelay resolve`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from acrrelay.clienthelp import client_names, hosts_lines
from acrrelay.config import parse_config
from acrrelay.reach import Resolution, covering, exact_cidrs, resolve_config

BIN = Path(sys.executable).parent


def acrrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "acrrelay"), *args], capture_output=True, text=True, timeout=60
    )


def hosts_entries(text: str) -> list[tuple[str, str]]:
    """(address, name) of the non-comment lines of a hosts file."""
    return [
        (line.split()[0], line.split()[1])
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_hosts_covers_registry_token_service_and_oss() -> None:
    """The VPC hosts lines name the registry, every token service and the OSS endpoint."""
    result = acrrelay("hosts", "--relay", "10.8.0.1", "--acr", "cn-beijing")
    assert result.returncode == 0, result.stderr
    names = {name for address, name in hosts_entries(result.stdout) if address == "10.8.0.1"}
    assert names == {
        "registry-vpc.cn-beijing.aliyuncs.com",
        "dockerauth-vpc.cn-beijing.aliyuncs.com",
        "dockerauth-ee-vpc.cn-beijing.aliyuncs.com",
        "oss-cn-beijing-internal.aliyuncs.com",
    }


def test_hosts_without_a_bucket_says_how_to_find_it() -> None:
    """A hosts file cannot hold *.oss…, so the output says where the bucket name comes from."""
    result = acrrelay("hosts", "--relay", "10.8.0.1", "--acr", "cn-beijing")
    assert "<bucket>.oss-cn-beijing-internal.aliyuncs.com" in result.stdout
    assert "Location of a blob redirect" in result.stdout
    assert "acrrelay doctor" in result.stdout


def test_hosts_with_instances_and_buckets() -> None:
    """--instance, --personal and --bucket add their concrete names; public network too."""
    result = acrrelay(
        "hosts", "--relay", "10.8.0.1", "--acr", "cn-hangzhou", "--network", "public",
        "--instance", "myco", "--personal", "abc123", "--bucket", "cri-xyz-registry",
    )  # fmt: skip
    names = [name for _, name in hosts_entries(result.stdout)]
    assert "myco-registry.cn-hangzhou.cr.aliyuncs.com" in names
    assert "crpi-abc123.cn-hangzhou.personal.cr.aliyuncs.com" in names
    assert "cri-xyz-registry.oss-cn-hangzhou.aliyuncs.com" in names
    assert "registry.cn-hangzhou.aliyuncs.com" in names
    assert not any("-vpc" in n or "-internal" in n for n in names)
    assert "<bucket>" not in result.stdout


def test_every_hosts_name_is_routed_by_the_same_region() -> None:
    """What `hosts` tells clients to send is exactly what `--acr` lets through the relay."""
    config = parse_config('[[listen]]\nendpoint = "tcp:443"\n[[acr]]\nregion = "cn-shanghai"\n')
    table = config.route_table()
    for network in ("vpc", "public"):
        names = client_names(
            "cn-shanghai",
            network,
            instances=["x"],
            personal=["y"],
            buckets=["b"],  # type: ignore[arg-type]
        )
        for name in names.all():
            assert table.lookup(name) is not None, name


def test_zhangjiakou_gets_its_extra_token_host() -> None:
    """China (Zhangjiakou)'s public token service name is listed."""
    text = hosts_lines("10.0.0.1", client_names("cn-zhangjiakou", "public"))
    assert "dockerauth-cn-zhangjiakou.aliyuncs.com" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--relay", "relay.example.com", "--acr", "cn-beijing"], "needs the relay's IP address"),
        (["--relay", "10.0.0.1:8443", "--acr", "cn-beijing"], "a hosts file cannot name a port"),
        (["--relay", "10.0.0.1", "--acr", "cn-bejing"], "did you mean cn-beijing"),
    ],
)
def test_hosts_mistakes_are_one_line(args: list[str], message: str) -> None:
    """Bad input is one line on stderr and exit 1."""
    result = acrrelay("hosts", *args)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_proxy_formats() -> None:
    """dockerd and containerd settings carry the proxy URL with the default CONNECT port."""
    dockerd = acrrelay(
        "hosts", "--relay", "10.8.0.1", "--acr", "cn-beijing", "--format", "dockerd",
        "--proxy-user", "ci",
    )  # fmt: skip
    assert 'Environment="HTTPS_PROXY=http://ci:<password>@10.8.0.1:3128"' in dockerd.stdout
    assert '"https-proxy": "http://ci:<password>@10.8.0.1:3128"' in dockerd.stdout
    containerd = acrrelay(
        "hosts", "--relay", "10.8.0.1:8080", "--acr", "cn-beijing", "--format", "containerd"
    )
    assert 'Environment="HTTPS_PROXY=http://10.8.0.1:8080"' in containerd.stdout


def test_containerd_gets_no_hosts_toml_that_changes_nothing() -> None:
    """A hosts.toml cannot route by name, so containerd's output writes none (one pinning a
    registry to itself is a no-op); its comments say why, and which files to check for a
    mirror that would bypass the relay."""
    result = acrrelay(
        "hosts", "--relay", "10.8.0.1", "--acr", "cn-beijing", "--format", "containerd",
        "--instance", "myco",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    settings = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert settings == [
        "[Service]",
        'Environment="HTTPS_PROXY=http://10.8.0.1:3128"',
        'Environment="HTTP_PROXY=http://10.8.0.1:3128"',
        'Environment="NO_PROXY=localhost,127.0.0.1"',
    ]
    assert "# No hosts.toml is needed: containerd takes HTTPS_PROXY from its environment" in (
        result.stdout
    )
    for registry in (
        "registry-vpc.cn-beijing.aliyuncs.com",
        "myco-registry-vpc.cn-beijing.cr.aliyuncs.com",
    ):
        assert f"#   /etc/containerd/certs.d/{registry}/hosts.toml\n" in result.stdout
    assert "#   /etc/containerd/certs.d/_default/hosts.toml\n" in result.stdout


RESOLVE = """
[[listen]]
endpoint = "tcp:8443"
[[route]]
name = "registry-vpc.cn-beijing.aliyuncs.com"
backend = "resolve"
[[route]]
name = "dockerauth-vpc.cn-beijing.aliyuncs.com"
backend = "resolve"
[[route]]
name = "*.oss-cn-beijing-internal.aliyuncs.com"
backend = "resolve"
[[route]]
name = "pinned.example.com"
backend = "tcp:host=100.118.30.7:port=443"
[resolver.hosts]
"registry-vpc.cn-beijing.aliyuncs.com" = ["100.118.28.5", "100.118.28.6"]
"dockerauth-vpc.cn-beijing.aliyuncs.com" = ["100.118.31.9", "fd00::5"]
"bkt.oss-cn-beijing-internal.aliyuncs.com" = "100.118.28.4"
"""


def test_resolve_prints_addresses_and_cidrs(tmp_path: Path) -> None:
    """resolve lists each name's addresses and the CIDRs to route, from static hosts only."""
    path = tmp_path / "relay.toml"
    path.write_text(RESOLVE)
    result = acrrelay("resolve", "--config", str(path), "--no-dns")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(
        line.split()[:4]
        == ["registry-vpc.cn-beijing.aliyuncs.com", "static", "100.118.28.5", "100.118.28.6"]
        for line in lines
    )
    assert any(
        "bkt.oss-cn-beijing-internal.aliyuncs.com" in line and "100.118.28.4" in line
        for line in lines
    )
    assert any("pinned.example.com" in line and "100.118.30.7" in line for line in lines)
    exact = lines[lines.index("routes that cover exactly these addresses:") + 1 :]
    assert [line.strip() for line in exact[:5]] == [
        "100.118.28.4/31",
        "100.118.28.6/32",
        "100.118.30.7/32",
        "100.118.31.9/32",
        "fd00::5/128",
    ]
    cover = lines[lines.index("one covering route per address family:") + 1 :]
    assert [line.strip() for line in cover[:2]] == ["100.118.28.0/22", "fd00::5/128"]


def test_resolve_json_and_failure(tmp_path: Path) -> None:
    """--json gives the same facts; a name that does not resolve makes the exit status 1."""
    path = tmp_path / "relay.toml"
    path.write_text(RESOLVE + '[[route]]\nname = "missing.example.com"\nbackend = "resolve"\n')
    result = acrrelay("resolve", "--config", str(path), "--no-dns", "--json")
    assert result.returncode == 1
    document = json.loads(result.stdout)
    by_name = {entry["name"]: entry for entry in document["names"]}
    assert by_name["missing.example.com"]["source"] == "error"
    assert by_name["*.oss-cn-beijing-internal.aliyuncs.com"]["source"] == "wildcard"
    assert "100.118.28.4/31" in document["exact_cidrs"]
    assert document["covering_cidrs"] == ["100.118.28.0/22", "fd00::5/128"]


def test_resolve_uses_the_lookup_for_names_without_static_hosts() -> None:
    """Names not in [resolver.hosts] go to the lookup (the system resolver in real use)."""
    config = parse_config(RESOLVE + '[[route]]\nname = "dns.example.com"\nbackend = "resolve"\n')
    asked: list[str] = []

    def lookup(name: str) -> list[str]:
        asked.append(name)
        if name == "dns.example.com":
            return ["192.0.2.10"]
        raise OSError(-2, "Name or service not known")

    resolutions = {r.name: r for r in resolve_config(config, lookup=lookup)}
    assert asked == ["dns.example.com"]
    assert resolutions["dns.example.com"] == Resolution("dns.example.com", "dns", ("192.0.2.10",))


def test_cidr_helpers() -> None:
    """Exact CIDRs merge neighbours; the covering CIDR is the smallest supernet of all."""
    rs = [Resolution("a", "static", ("10.0.0.1", "10.0.0.0", "10.0.0.3", "::ffff:10.0.0.2"))]
    assert [str(n) for n in exact_cidrs(rs)] == ["10.0.0.0/30"]
    assert [str(n) for n in covering(rs)] == ["10.0.0.0/30"]
    assert [str(n) for n in covering([Resolution("b", "static", ("10.0.0.1", "10.0.1.1"))])] == [
        "10.0.0.0/23"
    ]
