"""Configuration: TOML (and command-line flags) into one frozen, validated value.

Every mistake raises :class:`ConfigError`, whose text is one line naming the
source, the key and what was expected, for example::

    etc/acrrelay.toml: relay.idle_timeout: expected a duration such as "90s", … got "soon"

Unknown keys are rejected, with a suggestion where one is close. The schema is
documented in ``etc/acrrelay.toml``.

This module needs no reactor; endpoint strings are checked by :mod:`acrrelay.endpoints`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, TypeVar

import attrs

from acrrelay import catalogue
from acrrelay import configvalues as v
from acrrelay.configvalues import (
    ConfigError,
    Table,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
    read_users_file,
)
from acrrelay.routing import (
    DEFAULT_PORTS,
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
    "RELAY_SETTINGS",
    "AcrConfig",
    "AdminConfig",
    "ConfigError",
    "ListenerConfig",
    "Overlay",
    "RelayConfig",
    "Setting",
    "format_duration",
    "format_size",
    "load_config",
    "parse_config",
    "parse_document",
    "parse_duration",
    "parse_size",
    "read_users_file",
]

T = TypeVar("T")

COMMAND_LINE: Final = "command line"


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
    #: OpenSSH authorized_keys file of the keys that may log in (the service parses it).
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


_SETTING: Final = "acrrelay.setting"
#: The access log's default target, typed as the setting is (None turns it off).
_STDOUT: str | None = "-"


@attrs.frozen
class Setting:
    """One ``[relay]`` key, as defined by its :class:`RelayConfig` field."""

    name: str
    default: Any
    #: TOML value -> checked value; raises ValueError saying what was expected.
    convert: Callable[[Any], Any]
    #: A value as a person writes it: "15m", "16KiB", "no limit".
    show: Callable[[Any], str]
    #: False if a reload cannot apply it: it takes effect at the next start.
    reloadable: bool = True

    def of(self, config: RelayConfig) -> Any:
        """This setting's value in ``config``."""
        return getattr(config, self.name)


def _setting(
    default: T,
    convert: Callable[[Any], T],
    show: Callable[[T], str],
    *,
    reloadable: bool = True,
) -> T:
    """A RelayConfig field that is a ``[relay]`` key: the one place that key is defined."""
    metadata = {_SETTING: (convert, show, reloadable)}
    return attrs.field(default=default, metadata=metadata)


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
    # The [relay] settings: each field below made with _setting() is one key, and the
    # parser, check-config, reload summaries and the README's table derive from it.
    #: How long a client may take to send its whole ClientHello or request head.
    peek_timeout: float = _setting(10.0, v.positive_duration, format_duration)
    #: Most bytes read before routing, record headers included.
    peek_limit: int = _setting(16 * 1024, v.in_range(1024, 64 * 1024, parse_size), format_size)
    #: How long a backend may take to accept.
    connect_timeout: float = _setting(10.0, v.positive_duration, format_duration)
    #: Close once no byte moved either way for this long.
    idle_timeout: float = _setting(15 * 60.0, v.positive_duration, format_duration)
    #: Per-direction high-water mark: a side stops reading once this much waits to be written.
    buffer_size: int = _setting(64 * 1024, v.in_range(4 * 1024, 16 << 20, parse_size), format_size)
    #: "-" for standard output, a file path, or None for no access log.
    access_log: str | None = _setting(_STDOUT, v.access_log, v.show_access_log)
    #: Most connections at once; 0 derives it from the file-descriptor limit at start.
    max_connections: int = _setting(0, v.count, v.show_count("from the file-descriptor limit"))
    #: Most connections at once from one client address; 0 for no limit.
    max_connections_per_client: int = _setting(0, v.count, v.show_count("no limit"))
    #: On SIGTERM or drain: how long in-flight connections may go on before they are cut.
    drain_timeout: float = _setting(30.0, parse_duration, format_duration)
    #: Move bulk transfers with splice(2) (Linux), never through Python.
    zero_copy: bool = _setting(True, v.boolean, v.show_boolean)
    #: Processes serving the same listening sockets (see acrrelay.workers). The worker
    #: processes start with the relay, so a reload cannot change how many there are.
    workers: int = _setting(1, v.workers, str, reloadable=False)
    admin: AdminConfig = attrs.field(factory=lambda: AdminConfig())

    def route_table(self) -> RouteTable:
        return RouteTable(self.routes)


#: Every ``[relay]`` setting, in the order of RelayConfig's fields.
RELAY_SETTINGS: Final[tuple[Setting, ...]] = tuple(
    Setting(field.name, field.default, *field.metadata[_SETTING])
    for field in attrs.fields(RelayConfig)
    if _SETTING in field.metadata
)


@attrs.frozen
class Overlay:
    """Command-line additions on top of (or instead of) a file."""

    listen: tuple[str, ...] = ()
    route: tuple[str, ...] = ()
    acr: tuple[str, ...] = ()
    access_log: str | None = None


# ---------------------------------------------------------------- reading


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


def load_config(path: str | None = None, overlay: Overlay | None = None) -> RelayConfig:
    """Read ``path`` (if given), apply command-line ``overlay``, validate, and expand.

    Raises :class:`ConfigError` for any mistake.
    """
    overlay = overlay or Overlay()
    source = path if path is not None else COMMAND_LINE
    document = v.read_toml(path) if path is not None else {}
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


def parse_document(
    source: str, document: dict[str, Any], overlay: Overlay | None = None
) -> RelayConfig:
    """Like :func:`parse_config`, from a TOML document the gateway's loader has read."""
    return _build(source, document, overlay or Overlay())


def _build(source: str, document: dict[str, Any], overlay: Overlay) -> RelayConfig:
    doc = Table(source, "", document)

    relay = doc.table("relay") or Table(source, "relay", {})
    settings: dict[str, Any] = {
        setting.name: relay.get(setting.name, setting.convert, setting.default)
        for setting in RELAY_SETTINGS
    }
    relay.finish(setting.name for setting in RELAY_SETTINGS)
    if overlay.access_log is not None:
        settings["access_log"] = v.access_log(overlay.access_log)

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
    text = v.server_endpoint(value)
    kind, _, rest = text.partition(":")
    if kind in ("tcp", "tcp6") and "interface=" not in rest:
        loopback = "127.0.0.1" if kind == "tcp" else "\\:\\:1"
        text = f"{text}:interface={loopback}"
    return text


def _admin(source: str, doc: Table) -> AdminConfig:
    table = doc.table("admin")
    if table is None:
        return AdminConfig()
    defaults = AdminConfig()
    admin = AdminConfig(
        ssh=table.get("ssh", _local_by_default, None),
        ssh_user=table.get("ssh_user", v.string, defaults.ssh_user),
        authorized_keys=table.get("authorized_keys", v.readable_file("authorized keys"), None),
        host_key=table.get("host_key", v.string, defaults.host_key),
        metrics=table.get("metrics", _local_by_default, None),
    )
    table.finish(_ADMIN_KEYS)
    # The keys file is only checked to be readable: parsing keys needs conch, and the
    # service parses them at start and at reload anyway.
    if admin.ssh is not None and admin.authorized_keys is None:
        raise table.error("authorized_keys", "the SSH shell needs an authorized_keys file")
    return admin


def _listeners(source: str, doc: Table, overlay: Overlay) -> tuple[ListenerConfig, ...]:
    out: list[ListenerConfig] = []
    for table in doc.tables("listen"):
        endpoint = table.require("endpoint", v.server_endpoint)
        tls_only: tuple[str, ...] = ("tls",)
        protocols = table.get(
            "protocols", v.nonempty(v.list_of(v.protocol, '["tls", "http"]')), tls_only
        )
        users_file = table.get("connect_users", v.string, None)
        users = None
        if users_file is not None:
            if "connect" not in protocols:
                raise table.error("connect_users", 'needs "connect" in protocols')
            users = table.get("connect_users", read_users_file, None)
        networks = v.list_of(v.network, '["10.0.0.0/8"]')
        listener = ListenerConfig(
            endpoint=endpoint,
            name=table.get("name", v.string, endpoint),
            target_port=table.get("target_port", v.port, None),
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
            endpoint = v.server_endpoint(text)
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


def _acr_tables(source: str, doc: Table, overlay: Overlay) -> list[AcrConfig]:
    out: list[AcrConfig] = []
    items: list[tuple[str, str, AcrConfig]] = []
    for table in doc.tables("acr"):
        region = table.require("region", v.string)
        item = AcrConfig(
            region=region,
            networks=table.get("networks", v.networks, catalogue.NETWORKS),
            backend=table.get("backend", v.backend, RESOLVE),
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


def _explicit_routes(source: str, doc: Table, overlay: Overlay) -> list[tuple[str, str, Route]]:
    out: list[tuple[str, str, Route]] = []
    for i, table in enumerate(doc.tables("route")):
        name = table.require("name", v.string)
        backend = table.require("backend", v.backend)
        ports = table.get("ports", v.nonempty(v.list_of(v.port, "[443, 80]")), tuple(DEFAULT_PORTS))
        proxy_protocol = table.get("proxy_protocol", v.proxy_version, None)
        no_networks: tuple[IPNetwork, ...] = ()
        allow_addresses = table.get(
            "allow_addresses", v.list_of(v.network, '["10.0.0.0/8"]'), no_networks
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
            backend = v.backend(backend_text)
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


def _hosts(source: str, doc: Table) -> dict[str, tuple[str, ...]]:
    resolver = doc.table("resolver")
    if resolver is None:
        return {}
    raw: object = resolver.get("hosts", lambda v: v, {})
    resolver.finish(("hosts",))
    hosts_table = Table(source, "resolver.hosts", raw)
    out: dict[str, tuple[str, ...]] = {}
    for name in hosts_table.names():
        try:
            host = normalize_name(name)
        except InvalidName as e:
            raise hosts_table.error(name, f"not a host name: {e}") from None
        if host in out:
            raise hosts_table.error(name, f"{host} is listed twice")
        out[host] = hosts_table.get(name, v.addresses, ())
    return out
