"""Layer 1 (plus the real command line): configuration loading and its error messages."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from acrrelay import cli
from acrrelay.config import (
    RELAY_SETTINGS,
    ConfigError,
    Overlay,
    format_duration,
    format_size,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

MINIMAL = """
[[listen]]
endpoint = "tcp:8443"
[[route]]
name = "a.example.com"
backend = "tcp:host=10.0.0.5:port=443"
"""


def run_check(path: Path | str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "acrrelay"), "check-config", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )


# Each kind of mistake: the TOML, the key the message must name, and what it must say.
MISTAKES = {
    "wrong type": (
        MINIMAL + "[relay]\npeek_limit = true\n",
        "relay.peek_limit",
        'expected a size such as 16384, "16KiB" or "1MiB", got true',
    ),
    "unknown key": (
        MINIMAL + "[relay]\nidel_timeout = 5\n",
        "relay.idel_timeout",
        "unknown key (did you mean 'idle_timeout'?)",
    ),
    "unknown table": (
        MINIMAL + "[relays]\nx = 1\n",
        "relays",
        "unknown key (did you mean 'relay'?)",
    ),
    "bad listen endpoint": (
        '[[listen]]\nendpoint = "tcpp:8443"\n[[route]]\nname = "a.b.c"\nbackend = "resolve"\n',
        "listen[0].endpoint",
        "bad server endpoint: 'tcpp:8443': Unknown endpoint type: 'tcpp'",
    ),
    "bad backend endpoint": (
        '[[listen]]\nendpoint = "tcp:8443"\n[[route]]\nname = "a.b.c"\n'
        'backend = "tcp:host=10.0.0.5"\n',
        "route[0].backend",
        "bad backend: 'tcp:host=10.0.0.5': missing 'port'",
    ),
    "bad duration": (
        MINIMAL + '[relay]\nidle_timeout = "forever"\n',
        "relay.idle_timeout",
        'expected a duration such as "90s", "15m" or "1h30m", got "forever"',
    ),
    "zero duration": (
        MINIMAL + '[relay]\nconnect_timeout = "0s"\n',
        "relay.connect_timeout",
        "expected a duration above zero",
    ),
    "duplicate route": (
        MINIMAL + '[[route]]\nname = "A.example.com."\nbackend = "tcp:host=10.0.0.5:port=443"\n',
        "route[1].name",
        "duplicate route 'a.example.com'",
    ),
    "conflicting route": (
        MINIMAL + '[[route]]\nname = "a.example.com"\nbackend = "resolve"\n',
        "route[1].name",
        "conflicting route 'a.example.com'",
    ),
    "overbroad wildcard": (
        MINIMAL + '[[route]]\nname = "*.com"\nbackend = "resolve"\n',
        "route[1].name",
        "a wildcard needs a suffix of at least two labels",
    ),
    "unknown region": (
        '[[listen]]\nendpoint = "tcp:8443"\n[[acr]]\nregion = "cn-bejing"\n',
        "acr[0].region",
        "unknown ACR region 'cn-bejing' (did you mean cn-beijing?)",
    ),
    "missing required key": (
        '[[listen]]\nname = "x"\n[[route]]\nname = "a.b.c"\nbackend = "resolve"\n',
        "listen[0]",
        "missing required key 'endpoint'",
    ),
    "bad host address": (
        MINIMAL + '[resolver.hosts]\n"a.example.com" = "10.0.0.300"\n',
        "resolver.hosts.a.example.com",
        'expected an IP address, got "10.0.0.300"',
    ),
    "no listeners": (
        '[[route]]\nname = "a.b.c"\nbackend = "resolve"\n',
        "listen",
        "no listeners",
    ),
    "bad cidr": (
        MINIMAL.replace('endpoint = "tcp:8443"', 'endpoint = "tcp:8443"\nallow = ["10.0.0.1/8"]'),
        "listen[0].allow",
        'expected a CIDR such as "10.0.0.0/8", got "10.0.0.1/8"',
    ),
    "unknown protocol": (
        MINIMAL.replace('endpoint = "tcp:8443"', 'endpoint = "tcp:8443"\nprotocols = ["socks5"]'),
        "listen[0].protocols",
        'expected one of "tls", "http", "connect", got "socks5"',
    ),
    "users without connect": (
        MINIMAL.replace('endpoint = "tcp:8443"', 'endpoint = "tcp:8443"\nconnect_users = "/x"'),
        "listen[0].connect_users",
        'needs "connect" in protocols',
    ),
    "missing users file": (
        MINIMAL.replace(
            'endpoint = "tcp:8443"',
            'endpoint = "tcp:8443"\nprotocols = ["connect"]\nconnect_users = "/nonexistent/users"',
        ),
        "listen[0].connect_users",
        "users file /nonexistent/users does not exist",
    ),
    "bad route port": (
        MINIMAL + '[[route]]\nname = "b.example.com"\nbackend = "resolve"\nports = [443, 70000]\n',
        "route[1].ports",
        "expected a port number from 1 to 65535, got 70000",
    ),
    "bad proxy version": (
        MINIMAL + '[[route]]\nname = "b.example.com"\nbackend = "resolve"\nproxy_protocol = 2\n',
        "route[1].proxy_protocol",
        'expected "v1" or "v2", got 2',
    ),
    "invalid toml": (
        "[[listen]\nendpoint = 1\n",
        "",
        "not valid TOML",
    ),
}


@pytest.mark.parametrize("kind", sorted(MISTAKES))
def test_each_mistake_is_one_line_naming_file_and_key(tmp_path: Path, kind: str) -> None:
    """acrrelay check-config prints one line naming the file, the key and the expectation,
    and exits non-zero."""
    text, key, expected = MISTAKES[kind]
    path = tmp_path / "relay.toml"
    path.write_text(text)
    result = run_check(path)
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"acrrelay: {path}: {key}: " if key else f"acrrelay: {path}: "
    assert lines[0].startswith(prefix), lines[0]
    assert expected in lines[0]


def test_users_file_needs_bcrypt_hashes(tmp_path: Path) -> None:
    """A users line that is not user:bcrypt-hash is refused with its line number and a fix."""
    users = tmp_path / "users"
    users.write_text("# comment\nci:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    path = tmp_path / "relay.toml"
    path.write_text(
        MINIMAL.replace(
            'endpoint = "tcp:8443"',
            f'endpoint = "tcp:8443"\nprotocols = ["connect"]\nconnect_users = "{users}"',
        )
    )
    result = run_check(path)
    assert result.returncode == 1
    assert f"{users} line 2: the hash is not bcrypt" in result.stderr
    assert "htpasswd -nbB USER PASSWORD" in result.stderr


def test_a_file_that_is_not_utf8_is_one_line_naming_the_byte(tmp_path: Path) -> None:
    """A config file that is not UTF-8 (a Latin-1 comment, say) is one line naming the file,
    the byte and its line, and a non-zero exit, not a traceback."""
    path = tmp_path / "relay.toml"
    text = MINIMAL.encode() + "# café\n".encode("latin-1")
    path.write_bytes(text)
    result = run_check(path)
    assert result.returncode == 1, result
    assert result.stdout == ""
    byte = text.index(b"\xe9")
    assert result.stderr == (
        f"acrrelay: {path}: not UTF-8 at byte {byte} (line {MINIMAL.count(chr(10)) + 1}): "
        "invalid continuation byte; TOML files must be UTF-8\n"
    ), result.stderr


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is one line naming it, and a non-zero exit."""
    result = run_check(tmp_path / "nope.toml")
    assert result.returncode == 1
    assert result.stderr == f"acrrelay: {tmp_path / 'nope.toml'}: no such file\n"


def test_example_config_is_valid_and_expands_acr() -> None:
    """etc/acrrelay.toml is valid, and check-config prints its expanded ACR route table."""
    result = run_check(REPO / "etc" / "acrrelay.toml")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "OK" in out.splitlines()[0]
    for name in [
        "registry.cn-beijing.aliyuncs.com",
        "registry-vpc.cn-beijing.aliyuncs.com",
        "dockerauth-ee-vpc.cn-beijing.aliyuncs.com",
        "*-registry.cn-beijing.cr.aliyuncs.com",
        "crpi-*.cn-beijing.personal.cr.aliyuncs.com",
        "*.oss-cn-beijing-internal.aliyuncs.com",
    ]:
        assert name in out
    assert "TLS target port 443" in out
    assert "tcp:8080:interface=127.0.0.1  (http): http, connect" in out


def test_flags_work_on_top_of_a_file(tmp_path: Path) -> None:
    """--listen, --route and --acr add to a file, and clash with it loudly."""
    path = tmp_path / "relay.toml"
    path.write_text(MINIMAL)
    config = load_config(
        str(path),
        Overlay(
            listen=("tcp:9443",),
            route=("b.example.com=resolve", "*.c.example.com=tcp:host=10.0.0.9:port=443"),
            acr=("cn-hangzhou",),
        ),
    )
    assert [listener.endpoint for listener in config.listeners] == ["tcp:8443", "tcp:9443"]
    table = config.route_table()
    assert table.lookup("b.example.com").backend == "resolve"  # type: ignore[union-attr]
    assert table.lookup("x.c.example.com").backend == "tcp:host=10.0.0.9:port=443"  # type: ignore[union-attr]
    assert table.lookup("registry.cn-hangzhou.aliyuncs.com").service == "registry"  # type: ignore[union-attr]
    assert config.source == f"{path} + command line"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), Overlay(route=("a.example.com=resolve",)))
    assert str(info.value).startswith("command line: --route a.example.com=resolve: conflicting")


def test_quick_start_without_a_file() -> None:
    """The goproxy-style quick start needs no file at all."""
    config = load_config(None, Overlay(listen=("tcp:8443",), acr=("cn-beijing",)))
    assert config.source == "command line"
    assert config.route_table().lookup("bkt.oss-cn-beijing.aliyuncs.com") is not None
    with pytest.raises(ConfigError, match="expected NAME=BACKEND"):
        load_config(None, Overlay(listen=("tcp:8443",), route=("just-a-name",)))


def test_explicit_route_overrides_the_catalogue() -> None:
    """A [[route]] for an ACR name replaces that catalogue entry instead of clashing."""
    config = parse_config(
        '[[listen]]\nendpoint = "tcp:8443"\n[[acr]]\nregion = "cn-beijing"\n'
        '[[route]]\nname = "registry-vpc.cn-beijing.aliyuncs.com"\n'
        'backend = "tcp:host=192.168.0.10:port=443"\n'
    )
    route = config.route_table().lookup("registry-vpc.cn-beijing.aliyuncs.com")
    assert route is not None and route.backend == "tcp:host=192.168.0.10:port=443"
    assert sum(r.name == "registry-vpc.cn-beijing.aliyuncs.com" for r in config.routes) == 1


def test_defaults() -> None:
    """The documented defaults: 10 s peek, 16 KiB cap, 10 s connect, 15 min idle, stdout log."""
    config = parse_config(MINIMAL)
    assert config.peek_timeout == 10.0
    assert config.peek_limit == 16 * 1024
    assert config.connect_timeout == 10.0
    assert config.idle_timeout == 900.0
    assert config.access_log == "-"
    assert config.listeners[0].target_port is None


def test_config_is_frozen() -> None:
    """Config objects are immutable values."""
    config = parse_config(MINIMAL)
    with pytest.raises(AttributeError):
        config.peek_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.hosts["x"] = ("1.2.3.4",)  # type: ignore[index]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10),
        ("15m", 900),
        ("1h30m", 5400),
        ("250ms", 0.25),
        (3, 3),
        (1.5, 1.5),
        ("2d", 172800),
    ],
)
def test_durations(text: str | float, seconds: float) -> None:
    """Durations accept unit strings and plain seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10", "10 sec", "s", "1m10", True, -1, "1h-5m", [1]])
def test_bad_durations(bad: object) -> None:
    """Anything else is a ValueError that says what a duration looks like."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_duration_round_trip() -> None:
    """format_duration shows what parse_duration reads."""
    for seconds in [0.25, 1, 10, 90, 900, 5400, 3661]:
        assert parse_duration(format_duration(seconds)) == seconds


def test_sizes() -> None:
    """Sizes accept bytes and binary units, and reject the rest."""
    assert parse_size("16KiB") == 16384
    assert parse_size(1024) == 1024
    assert parse_size("1MiB") == 1 << 20
    for bad in ["16KB", "lots", -1, True]:
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_cli_main_prints_the_table() -> None:
    """cli.main works in-process too, for embedding and quick checks."""
    out = io.StringIO()
    assert cli.main(["check-config", "--listen", "tcp:8443", "--acr", "cn-shanghai"], out=out) == 0
    assert "dockerauth.cn-shanghai.aliyuncs.com" in out.getvalue()


def test_passwd_prints_a_line_the_relay_accepts(tmp_path: Path) -> None:
    """acrrelay passwd writes a user:bcrypt line that connect_users reads and that verifies."""
    import bcrypt

    from acrrelay.config import read_users_file

    result = subprocess.run(
        [str(BIN / "acrrelay"), "passwd", "ci", "--password-stdin"],
        input="a long password\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    users = tmp_path / "users"
    users.write_text(result.stdout)
    digest = read_users_file(str(users))["ci"]
    assert bcrypt.checkpw(b"a long password", digest)
    short = subprocess.run(
        [str(BIN / "acrrelay"), "passwd", "ci", "--password-stdin"],
        input="short\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert short.returncode == 1
    assert short.stderr == "acrrelay: passwd: ci: use a password of 8 characters or more\n"


def test_check_config_prints_every_setting() -> None:
    """check-config shows every [relay] setting with its value, as a person would write it."""
    toml = MINIMAL + '[relay]\nidle_timeout = "2h"\nzero_copy = false\nworkers = 3\n'
    config = parse_config(toml)
    printed = cli.format_config(config).split("\n\n")[1].splitlines()
    assert printed[0] == "settings:"
    assert [line.split(None, 1) for line in printed[1:]] == [
        [setting.name, setting.show(setting.of(config))] for setting in RELAY_SETTINGS
    ]
    assert "  idle_timeout" in printed[4] and printed[4].endswith("  2h")
    assert printed[-2:] == [
        "  zero_copy                   false",
        "  workers                     3",
    ]


def test_readme_lists_every_setting_with_its_default() -> None:
    """The README's configuration table has one row per [relay] setting, in order, with the
    default the parser uses."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `relay.")
    ]
    assert [(key, default.strip("`")) for key, default, _ in rows] == [
        (f"`relay.{setting.name}`", setting.show(setting.default)) for setting in RELAY_SETTINGS
    ]


def test_size_round_trip() -> None:
    """format_size shows what parse_size reads, in the largest whole unit."""
    assert [format_size(n) for n in (16384, 1 << 20, 3 << 30, 1000, 0)] == [
        "16KiB", "1MiB", "3GiB", "1000", "0"
    ]  # fmt: skip
    for size in (16384, 1 << 20, 1000, 0, 4097):
        assert parse_size(format_size(size)) == size


def test_example_config_shows_every_setting_at_its_default() -> None:
    """etc/acrrelay.toml's [relay] table sets every setting, in order, to its default, so
    the documented example cannot fall behind the definition."""
    import tomllib

    relay = tomllib.loads((REPO / "etc" / "acrrelay.toml").read_text())["relay"]
    assert list(relay) == [setting.name for setting in RELAY_SETTINGS]
    for setting in RELAY_SETTINGS:
        assert setting.convert(relay[setting.name]) == setting.default, setting.name
