"""Configuration: TOML (and command-line flags) into one frozen, validated value.

Every mistake raises :class:`ConfigError`, whose text is one line naming the
source, the key and what was expected, for example::

    etc/acrrelay.toml: relay.idle_timeout: expected a duration such as "90s", "15m"
    or "1h30m", got "soon"

(on one line).

Unknown keys are rejected, with a suggestion where one is close. The schema is
documented in ``etc/acrrelay.toml``.

This module needs no reactor; endpoint strings are checked by :mod:`acrrelay.endpoints`.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, TypeVar

import attrs

from acrrelay import catalogue
from acrrelay.endpoints import EndpointError, check_client_endpoint, check_server_endpoint
from acrrelay.routing import (
    DEFAULT_PORTS,
    PROTOCOLS,
    RESOLVE,
    InvalidName,
    IPNetwork,
    Route,
    RouteConflict,
    RouteTable,
    normalize_name,
    parse_pattern,
)

__all__ = [
    "AcrConfig",
    "AdminConfig",
    "ConfigError",
    "ListenerConfig",
    "Overlay",
    "RelayConfig",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]

T = TypeVar("T")

COMMAND_LINE: Final = "command line"


class ConfigError(Exception):
    """A configuration mistake: which source, which key, what was expected."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)


# ---------------------------------------------------------------- values


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB)?\Z")
_SIZE_UNITS: Final = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_duration(value: object) -> float:
    """Seconds from ``"10s"``, ``"15m"``, ``"1h30m"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a duration of zero or more seconds, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if text and pos == len(text):
            return total
    raise ValueError(f'expected a duration such as "90s", "15m" or "1h30m", got {_show(value)}')


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration` for display: 900.0 -> "15m"."""
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    out = []
    rest = int(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    frac = seconds - int(seconds)
    if rest or frac or not out:
        out.append(f"{rest + frac:g}s")
    return "".join(out)


def parse_size(value: object) -> int:
    """Bytes from an integer or ``"16KiB"``, ``"1MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'expected a size such as 16384, "16KiB" or "1MiB", got {_show(value)}')


def _show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


# ---------------------------------------------------------------- the value


@attrs.frozen
class ListenerConfig:
    """One listening endpoint, its front doors and who may use it."""

    #: A Twisted server endpoint string, for example ``tcp:8443:interface=0.0.0.0``.
    endpoint: str
    #: A short name for logs and metrics; defaults to the endpoint string.
    name: str
    #: The target port of a TLS connection (it carries none): what the route's ports are
    #: checked against, and what ``resolve`` backends connect to. None means 443.
    target_port: int | None = None
    #: The front doors: "tls" (SNI), "http" (Host), "connect" (HTTP CONNECT).
    protocols: tuple[str, ...] = ("tls",)
    #: Client networks admitted (empty: all) and refused (deny wins).
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    #: Peers that must begin with a PROXY protocol v1/v2 header naming the real client.
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    #: CONNECT users and their bcrypt hashes; None means CONNECT needs no credentials.
    connect_users: Mapping[str, bytes] | None = attrs.field(default=None, eq=False)
    connect_users_file: str | None = None

    @property
    def tls_port(self) -> int:
        return self.target_port or 443


@attrs.frozen
class AdminConfig:
    """The admin listeners: an SSH shell and a Prometheus endpoint, both off by default."""

    #: Server endpoint of the SSH admin shell; None for none.
    ssh: str | None = None
    #: The user name to log in as.
    ssh_user: str = "admin"
    #: OpenSSH authorized_keys file of the keys that may log in.
    authorized_keys: str | None = None
    #: The SSH host key, created (Ed25519, mode 0600) at first start if missing.
    host_key: str = "ssh_host_ed25519_key"
    #: Server endpoint of the Prometheus metrics page (/metrics); None for none.
    metrics: str | None = None


@attrs.frozen
class AcrConfig:
    """One ``[[acr]]`` table (or ``--acr REGION``): a region's names and their backend."""

    region: str
    networks: tuple[catalogue.Network, ...] = catalogue.NETWORKS
    backend: str = RESOLVE
    origin: str = ""


@attrs.frozen
class RelayConfig:
    """The whole, validated configuration. Build it with :func:`load_config`."""

    #: Where it came from, for messages: a file path and/or "command line".
    source: str
    listeners: tuple[ListenerConfig, ...]
    #: Every route, explicit and expanded from ``acr``, in definition order.
    routes: tuple[Route, ...]
    acr: tuple[AcrConfig, ...] = ()
    #: Static name -> addresses for ``resolve`` backends, consulted before DNS.
    hosts: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=lambda: MappingProxyType({}), eq=False
    )
    peek_timeout: float = 10.0
    peek_limit: int = 16 * 1024
    connect_timeout: float = 10.0
    idle_timeout: float = 15 * 60.0
    #: Per-direction high-water mark: a side stops reading once this much waits to be written.
    buffer_size: int = 64 * 1024
    #: "-" for standard output, a file path, or None for no access log.
    access_log: str | None = "-"
    #: Most connections at once; 0 derives it from the file-descriptor limit at start.
    max_connections: int = 0
    #: Most connections at once from one client address; 0 for no limit.
    max_connections_per_client: int = 0
    #: On SIGTERM or drain: how long in-flight connections may go on before they are cut.
    drain_timeout: float = 30.0
    #: Move bulk transfers with splice(2) (Linux), never through Python.
    zero_copy: bool = True
    #: Processes serving the same listening sockets (see acrrelay.workers).
    workers: int = 1
    admin: AdminConfig = attrs.field(factory=lambda: AdminConfig())

    def route_table(self) -> RouteTable:
        return RouteTable(self.routes)


@attrs.frozen
class Overlay:
    """Command-line additions on top of (or instead of) a file."""

    listen: tuple[str, ...] = ()
    route: tuple[str, ...] = ()
    acr: tuple[str, ...] = ()
    access_log: str | None = None


# ---------------------------------------------------------------- reading


_RELAY_KEYS: Final = (
    "peek_timeout",
    "peek_limit",
    "connect_timeout",
    "idle_timeout",
    "buffer_size",
    "access_log",
    "max_connections",
    "max_connections_per_client",
    "drain_timeout",
    "zero_copy",
    "workers",
)
_ADMIN_KEYS: Final = ("ssh", "ssh_user", "authorized_keys", "host_key", "metrics")
_LISTEN_KEYS: Final = (
    "endpoint",
    "name",
    "target_port",
    "protocols",
    "allow",
    "deny",
    "proxy_protocol_from",
    "connect_users",
)
_ROUTE_KEYS: Final = ("name", "backend", "ports", "proxy_protocol", "allow_addresses")
_BCRYPT = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")


class _Table:
    """Typed, tracked access to one TOML table; leftovers are unknown keys."""

    def __init__(self, source: str, path: str, data: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            raise ConfigError(source, path, f"expected a table, got {_show(data)}")
        self._data: dict[str, Any] = data
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), message)

    def has(self, name: str) -> bool:
        return name in self._data

    def get(self, name: str, convert: Callable[[Any], T], default: T) -> T:
        self._used.add(name)
        if name not in self._data:
            return default
        return self._convert(name, convert)

    def require(self, name: str, convert: Callable[[Any], T]) -> T:
        self._used.add(name)
        if name not in self._data:
            raise ConfigError(self.source, self.path, f"missing required key {name!r}")
        return self._convert(name, convert)

    def _convert(self, name: str, convert: Callable[[Any], T]) -> T:
        try:
            return convert(self._data[name])
        except ValueError as e:
            raise self.error(name, str(e)) from None

    def finish(self, allowed: Iterable[str] | None = None) -> None:
        known = set(allowed) if allowed is not None else self._used
        for name in self._data:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                expected = ", ".join(sorted(known)) or "nothing"
                raise self.error(name, f"unknown key{hint}; expected one of: {expected}")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {_show(value)}")
    return value


def _workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"expected a number of processes from 1 to 64, got {_show(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number, 0 or more, got {_show(value)}")
    return value


def _list_of(convert: Callable[[object], T], example: str) -> Callable[[object], tuple[T, ...]]:
    def check(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected an array such as {example}, got {_show(value)}")
        out: list[T] = []
        for item in value:
            converted = convert(item)
            if converted in out:
                raise ValueError(f"{_show(item)} is listed twice")
            out.append(converted)
        return tuple(out)

    return check


def _network(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f'expected a CIDR such as "10.0.0.0/8", got {_show(value)}')
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(
            f'expected a CIDR such as "10.0.0.0/8", got {_show(value)} ({e})'
        ) from None


def _protocol(value: object) -> str:
    if value not in PROTOCOLS:
        raise ValueError(f"expected one of {', '.join(map(_show, PROTOCOLS))}, got {_show(value)}")
    return str(value)


def _proxy_version(value: object) -> str:
    if value not in ("v1", "v2"):
        raise ValueError(f'expected "v1" or "v2", got {_show(value)}')
    return str(value)


def _nonempty(convert: Callable[[object], tuple[T, ...]]) -> Callable[[object], tuple[T, ...]]:
    def check(value: object) -> tuple[T, ...]:
        items = convert(value)
        if not items:
            raise ValueError("expected at least one item")
        return items

    return check


def read_users_file(path: str) -> dict[str, bytes]:
    """``user:bcrypt-hash`` lines (htpasswd -B format); '#' comments and blank lines skipped."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"users file {path} does not exist") from None
    except OSError as e:
        raise ValueError(f"cannot read users file {path}: {e.strerror or e}") from None
    users: dict[str, bytes] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, digest = line.partition(b":")
        if not sep or not user:
            raise ValueError(f"{path} line {number}: expected user:bcrypt-hash")
        if not _BCRYPT.match(digest):
            raise ValueError(
                f"{path} line {number}: the hash is not bcrypt ($2b$...); "
                "make one with: htpasswd -nbB USER PASSWORD"
            )
        name = user.decode("utf-8", "replace")
        if name in users:
            raise ValueError(f"{path} line {number}: user {name} is listed twice")
        users[name] = digest
    if not users:
        raise ValueError(f"users file {path} lists no users")
    return users


def _server_endpoint(value: object) -> str:
    text = _string(value)
    try:
        check_server_endpoint(text)
    except EndpointError as e:
        raise ValueError(f"bad server endpoint: {e}") from None
    return text


def _backend(value: object) -> str:
    text = _string(value).strip()
    if text == RESOLVE:
        return text
    try:
        check_client_endpoint(text)
    except EndpointError as e:
        raise ValueError(
            f'bad backend: {e}; expected a client endpoint string or "{RESOLVE}"'
        ) from None
    return text


def _in_range(low: int, high: int, convert: Callable[[object], int]) -> Callable[[object], int]:
    def check(value: object) -> int:
        n = convert(value)
        if not low <= n <= high:
            raise ValueError(f"expected between {low} and {high} bytes, got {n}")
        return n

    return check


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {_show(value)}")
    return seconds


def _access_log(value: object) -> str | None:
    text = _string(value)
    if text in ("off", ""):
        return None
    return text


def _networks(value: object) -> tuple[catalogue.Network, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(
            f'expected a non-empty array such as ["public", "vpc"], got {_show(value)}'
        )
    out: list[catalogue.Network] = []
    for item in value:
        network = next((n for n in catalogue.NETWORKS if n == item), None)
        if network is None:
            raise ValueError(f'expected "public" or "vpc", got {_show(item)}')
        if network not in out:
            out.append(network)
    return tuple(out)


def _addresses(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an IP address or an array of them, got {_show(value)}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected an IP address, got {_show(item)}")
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(f"expected an IP address, got {_show(item)}") from None
    return tuple(out)


def _array_of_tables(source: str, doc: _Table, name: str) -> list[_Table]:
    doc._used.add(name)
    if not doc.has(name):
        return []
    items = doc._data[name]
    if not isinstance(items, list):
        raise ConfigError(
            source, name, f"expected an array of tables ([[{name}]]), got {_show(items)}"
        )
    return [_Table(source, f"{name}[{i}]", item) for i, item in enumerate(items)]


def _read_document(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(path, "", "permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(path, "", _not_utf8(e)) from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None


def _not_utf8(e: UnicodeDecodeError) -> str:
    """Where a TOML file stops being UTF-8 (TOML files must be), by byte and line."""
    line = e.object[: e.start].count(b"\n") + 1
    return f"not UTF-8 at byte {e.start} (line {line}): {e.reason}; TOML files must be UTF-8"


def load_config(path: str | None = None, overlay: Overlay | None = None) -> RelayConfig:
    """Read ``path`` (if given), apply command-line ``overlay``, validate, and expand.

    Raises :class:`ConfigError` for any mistake.
    """
    overlay = overlay or Overlay()
    source = path if path is not None else COMMAND_LINE
    document = _read_document(path) if path is not None else {}
    return _build(source, document, overlay)


def parse_config(
    text: str, source: str = "<string>", overlay: Overlay | None = None
) -> RelayConfig:
    """Like :func:`load_config`, from TOML text (for embedding and tests)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return _build(source, document, overlay or Overlay())


def _build(source: str, document: dict[str, Any], overlay: Overlay) -> RelayConfig:
    doc = _Table(source, "", document)

    relay = _Table(source, "relay", document.get("relay", {}))
    doc._used.add("relay")
    settings: dict[str, Any] = {
        "peek_timeout": relay.get("peek_timeout", _positive_duration, 10.0),
        "peek_limit": relay.get("peek_limit", _in_range(1024, 64 * 1024, parse_size), 16 * 1024),
        "connect_timeout": relay.get("connect_timeout", _positive_duration, 10.0),
        "idle_timeout": relay.get("idle_timeout", _positive_duration, 900.0),
        "buffer_size": relay.get(
            "buffer_size", _in_range(4 * 1024, 16 << 20, parse_size), 64 * 1024
        ),
        "access_log": relay.get("access_log", _access_log, _access_log("-")),
        "max_connections": relay.get("max_connections", _count, 0),
        "max_connections_per_client": relay.get("max_connections_per_client", _count, 0),
        "drain_timeout": relay.get("drain_timeout", parse_duration, 30.0),
        "zero_copy": relay.get("zero_copy", _boolean, True),
        "workers": relay.get("workers", _workers, 1),
    }
    relay.finish(_RELAY_KEYS)
    if overlay.access_log is not None:
        settings["access_log"] = _access_log(overlay.access_log)

    listeners = _listeners(source, doc, overlay)
    acr = _acr_tables(source, doc, overlay)
    explicit = _explicit_routes(source, doc, overlay)
    hosts = _hosts(source, doc)
    admin = _admin(source, doc)
    doc.finish(("relay", "listen", "route", "acr", "resolver", "admin"))

    routes = _expand(explicit, acr)
    if not listeners:
        raise ConfigError(source, "listen", "no listeners: add a [[listen]] table or --listen")
    if not routes:
        raise ConfigError(
            source, "route", "no routes: add [[route]] or [[acr]] tables, --route or --acr"
        )
    flags = overlay.listen or overlay.route or overlay.acr or overlay.access_log is not None
    if flags and source != COMMAND_LINE:
        source = f"{source} + {COMMAND_LINE}"
    return RelayConfig(
        source=source,
        listeners=listeners,
        routes=routes,
        acr=tuple(acr),
        hosts=MappingProxyType(hosts),
        admin=admin,
        **settings,
    )


def _local_by_default(value: object) -> str:
    """A server endpoint; a tcp one without an interface is bound to 127.0.0.1."""
    text = _server_endpoint(value)
    kind, _, rest = text.partition(":")
    if kind in ("tcp", "tcp6") and "interface=" not in rest:
        loopback = "127.0.0.1" if kind == "tcp" else "\\:\\:1"
        text = f"{text}:interface={loopback}"
    return text


def _admin(source: str, doc: _Table) -> AdminConfig:
    doc._used.add("admin")
    if not doc.has("admin"):
        return AdminConfig()
    table = _Table(source, "admin", doc._data["admin"])
    defaults = AdminConfig()
    admin = AdminConfig(
        ssh=table.get("ssh", _local_by_default, None),
        ssh_user=table.get("ssh_user", _string, defaults.ssh_user),
        authorized_keys=table.get("authorized_keys", _string, None),
        host_key=table.get("host_key", _string, defaults.host_key),
        metrics=table.get("metrics", _local_by_default, None),
    )
    table.finish(_ADMIN_KEYS)
    if admin.ssh is not None:
        if admin.authorized_keys is None:
            raise table.error("authorized_keys", "the SSH shell needs an authorized_keys file")
        from acrrelay.admin.ssh import KeyFileError, read_authorized_keys

        try:
            read_authorized_keys(admin.authorized_keys)
        except KeyFileError as e:
            raise table.error("authorized_keys", str(e)) from None
    return admin


def _listeners(source: str, doc: _Table, overlay: Overlay) -> tuple[ListenerConfig, ...]:
    out: list[ListenerConfig] = []
    for table in _array_of_tables(source, doc, "listen"):
        endpoint = table.require("endpoint", _server_endpoint)
        tls_only: tuple[str, ...] = ("tls",)
        protocols = table.get(
            "protocols", _nonempty(_list_of(_protocol, '["tls", "http"]')), tls_only
        )
        users_file = table.get("connect_users", _string, None)
        users = None
        if users_file is not None:
            if "connect" not in protocols:
                raise table.error("connect_users", 'needs "connect" in protocols')
            users = table.get("connect_users", read_users_file, None)
        networks = _list_of(_network, '["10.0.0.0/8"]')
        listener = ListenerConfig(
            endpoint=endpoint,
            name=table.get("name", _string, endpoint),
            target_port=table.get("target_port", _port, None),
            protocols=protocols,
            allow=table.get("allow", networks, ()),
            deny=table.get("deny", networks, ()),
            proxy_protocol_from=table.get("proxy_protocol_from", networks, ()),
            connect_users=None if users is None else MappingProxyType(users),
            connect_users_file=users_file,
        )
        table.finish(_LISTEN_KEYS)
        out.append(_unique_listener(out, listener, table.source, table.path))
    for text in overlay.listen:
        try:
            endpoint = _server_endpoint(text)
        except ValueError as e:
            raise ConfigError(COMMAND_LINE, f"--listen {text}", str(e)) from None
        listener = ListenerConfig(endpoint=endpoint, name=endpoint)
        out.append(_unique_listener(out, listener, COMMAND_LINE, f"--listen {text}"))
    return tuple(out)


def _unique_listener(
    existing: Sequence[ListenerConfig], new: ListenerConfig, source: str, key: str
) -> ListenerConfig:
    for other in existing:
        if other.endpoint == new.endpoint:
            raise ConfigError(source, key, f"endpoint {new.endpoint!r} is already listed")
        if other.name == new.name:
            raise ConfigError(source, key, f"listener name {new.name!r} is already used")
    return new


def _acr_tables(source: str, doc: _Table, overlay: Overlay) -> list[AcrConfig]:
    out: list[AcrConfig] = []
    items: list[tuple[str, str, AcrConfig]] = []
    for table in _array_of_tables(source, doc, "acr"):
        region = table.require("region", _string)
        item = AcrConfig(
            region=region,
            networks=table.get("networks", _networks, catalogue.NETWORKS),
            backend=table.get("backend", _backend, RESOLVE),
            origin=f"acr {region}",
        )
        table.finish(("region", "networks", "backend"))
        items.append((source, table.key("region"), item))
    for region in overlay.acr:
        items.append(
            (COMMAND_LINE, f"--acr {region}", AcrConfig(region=region, origin=f"acr {region}"))
        )
    for src, key, item in items:
        try:
            catalogue.acr_entries(item.region, item.networks)
        except catalogue.UnknownRegion as e:
            raise ConfigError(src, key, str(e)) from None
        if any(other.region == item.region for other in out):
            raise ConfigError(src, key, f"region {item.region} is already listed")
        out.append(item)
    return out


def _explicit_routes(source: str, doc: _Table, overlay: Overlay) -> list[tuple[str, str, Route]]:
    out: list[tuple[str, str, Route]] = []
    for i, table in enumerate(_array_of_tables(source, doc, "route")):
        name = table.require("name", _string)
        backend = table.require("backend", _backend)
        ports = table.get("ports", _nonempty(_list_of(_port, "[443, 80]")), tuple(DEFAULT_PORTS))
        proxy_protocol = table.get("proxy_protocol", _proxy_version, None)
        no_networks: tuple[IPNetwork, ...] = ()
        allow_addresses = table.get(
            "allow_addresses", _list_of(_network, '["10.0.0.0/8"]'), no_networks
        )
        table.finish(_ROUTE_KEYS)
        try:
            pattern = parse_pattern(name)
        except InvalidName as e:
            raise table.error("name", str(e)) from None
        origin = f"route[{i}]" if source == COMMAND_LINE else f"{source} route[{i}]"
        route = Route(
            pattern,
            backend,
            "custom",
            origin,
            ports=frozenset(ports),
            proxy_protocol=proxy_protocol,
            allow_addresses=allow_addresses,
        )
        out.append((source, table.key("name"), route))
    for text in overlay.route:
        key = f"--route {text}"
        name, sep, backend_text = text.partition("=")
        if not sep or not name.strip() or not backend_text.strip():
            raise ConfigError(COMMAND_LINE, key, "expected NAME=BACKEND, e.g. a.example=resolve")
        try:
            pattern = parse_pattern(name)
            backend = _backend(backend_text)
        except ValueError as e:
            raise ConfigError(COMMAND_LINE, key, str(e)) from None
        out.append((COMMAND_LINE, key, Route(pattern, backend, "custom", key)))
    # Catch duplicates here, where the key that repeats is still known.
    seen: dict[str, Route] = {}
    for src, key, route in out:
        earlier = seen.get(route.pattern.text)
        if earlier is not None:
            try:
                RouteTable([earlier, route])
            except RouteConflict as e:
                raise ConfigError(src, key, str(e)) from None
        seen[route.pattern.text] = route
    return out


def _expand(explicit: list[tuple[str, str, Route]], acr: list[AcrConfig]) -> tuple[Route, ...]:
    """Explicit routes first; catalogue entries fill in names no explicit route claims."""
    routes = [route for _, _, route in explicit]
    claimed = {route.pattern.text for route in routes}
    for item in acr:
        for entry in catalogue.acr_entries(item.region, item.networks):
            pattern = parse_pattern(entry.pattern)
            if pattern.text in claimed:
                continue
            claimed.add(pattern.text)
            routes.append(Route(pattern, item.backend, entry.service, item.origin))
    return tuple(routes)


def _hosts(source: str, doc: _Table) -> dict[str, tuple[str, ...]]:
    doc._used.add("resolver")
    if not doc.has("resolver"):
        return {}
    resolver = _Table(source, "resolver", doc._data["resolver"])
    raw: object = resolver.get("hosts", lambda v: v, {})
    resolver.finish(("hosts",))
    hosts_table = _Table(source, "resolver.hosts", raw)
    out: dict[str, tuple[str, ...]] = {}
    for name in list(hosts_table._data):
        try:
            host = normalize_name(name)
        except InvalidName as e:
            raise hosts_table.error(name, f"not a host name: {e}") from None
        if host in out:
            raise hosts_table.error(name, f"{host} is listed twice")
        out[host] = hosts_table.get(name, _addresses, ())
    return out
