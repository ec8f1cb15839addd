"""Routes and the one policy decision every front door asks for.

A route maps a name pattern to a backend. Patterns come in three kinds:

- ``registry.cn-beijing.aliyuncs.com``: one exact host name;
- ``crpi-*.cn-beijing.personal.cr.aliyuncs.com``: a ``*`` inside the *first* label
  matches one or more characters of that label only;
- ``*.oss-cn-beijing.aliyuncs.com``: any name with one or more labels in front of the
  suffix (never the bare suffix itself).

Matching is case-insensitive and ignores one trailing dot. It compares whole labels,
so ``registry-vpc.cn-beijing.aliyuncs.com.evil.example`` is never ``*.aliyuncs.com``.
When several patterns match, the most specific wins: an exact name, then a
first-label pattern (the longest literal part first, then the earliest defined),
then the longest ``*.`` suffix.

:func:`Policy.decide` is the one function every front door calls with
(front door, target name, target port, client address). It answers with a
:class:`Route` or a :class:`Refusal`, checking in turn: the listener's client ACL,
that the listener accepts this protocol, that the name is a host name and not an
IP literal in disguise, that a route covers it, and that the route allows the port.
Nothing is reachable unless a route names it.

This module is pure: no reactor, no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Final, Literal

import attrs

from acrrelay.addresses import IPAddress, ipv4_unmapped

__all__ = [
    "DEFAULT_PORTS",
    "PROTOCOLS",
    "RESOLVE",
    "Door",
    "InvalidName",
    "ListenerPolicy",
    "Pattern",
    "Policy",
    "Refusal",
    "Route",
    "RouteConflict",
    "RouteTable",
    "normalize_name",
    "parse_pattern",
]

#: The backend that means "connect to the requested name itself, through the relay's resolver".
RESOLVE: Final = "resolve"
#: The target ports a route allows unless it says otherwise.
DEFAULT_PORTS: Final = frozenset({443, 80})
#: The front doors a listener may accept.
PROTOCOLS: Final = ("tls", "http", "connect")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_GLOB_LABEL = re.compile(r"([a-z0-9_-]*)\*([a-z0-9_-]*)\Z")
# A last label of digits, or 0x-hex, is an IP address in one of inet_aton's forms
# (127.0.0.1, 0177.0.0.1, 2130706433, 0x7f000001): no top-level domain looks like that.
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0x[0-9a-f]*)\Z")


class InvalidName(ValueError):
    """A host name or route pattern that cannot be used."""


class RouteConflict(ValueError):
    """Two routes claim the same pattern."""


def normalize_name(name: str) -> str:
    """Lower-case ``name``, drop one trailing dot, and check it is a DNS host name.

    Raises :class:`InvalidName` with a short reason.
    """
    host = name.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise InvalidName("empty host name")
    if len(host) > 253:
        raise InvalidName("host name longer than 253 characters")
    for label in host.split("."):
        if not _LABEL.match(label):
            raise InvalidName(f"{label!r} is not a valid DNS label")
    return host


@attrs.frozen
class Pattern:
    """A parsed route name: exact, first-label glob, or ``*.`` suffix."""

    text: str
    kind: Literal["exact", "label", "suffix"]
    #: For "label": the rest of the name after the first label. For "suffix": the suffix.
    rest: str = ""
    prefix: str = ""
    postfix: str = ""

    def matches(self, name: str) -> bool:
        """Whether an already normalised host name matches this pattern."""
        if self.kind == "exact":
            return name == self.text
        if self.kind == "suffix":
            return name.endswith("." + self.rest)
        first, _, rest = name.partition(".")
        return rest == self.rest and self._label_matches(first)

    def _label_matches(self, label: str) -> bool:
        return (
            len(label) > len(self.prefix) + len(self.postfix)
            and label.startswith(self.prefix)
            and label.endswith(self.postfix)
        )

    @property
    def literal_length(self) -> int:
        return len(self.text) - 1 if self.kind != "exact" else len(self.text)


def parse_pattern(text: str) -> Pattern:
    """Parse a route name. Raises :class:`InvalidName` saying what is wrong."""
    raw = text.strip()
    if "*" not in raw:
        return Pattern(normalize_name(raw), "exact")
    lowered = raw.lower().rstrip(".") if raw.endswith(".") else raw.lower()
    first, dot, rest = lowered.partition(".")
    if not dot or not rest:
        raise InvalidName(f"{text!r}: a wildcard needs a suffix of at least two labels")
    if "*" in rest:
        raise InvalidName(f"{text!r}: '*' may appear only in the first label")
    suffix = normalize_name(rest)
    if "." not in suffix:
        raise InvalidName(
            f"{text!r}: a wildcard needs a suffix of at least two labels, not {suffix!r}"
        )
    if first == "*":
        return Pattern(f"*.{suffix}", "suffix", rest=suffix)
    glob = _GLOB_LABEL.match(first)
    if glob is None:
        raise InvalidName(f"{text!r}: the first label may hold one '*' and label characters")
    prefix, postfix = glob.group(1), glob.group(2)
    if prefix.startswith("-") or postfix.endswith("-"):
        raise InvalidName(f"{text!r}: a label may not start or end with '-'")
    return Pattern(f"{first}.{suffix}", "label", rest=suffix, prefix=prefix, postfix=postfix)


def is_ip_literal(host: str) -> bool:
    """Whether a normalised host name is really an IP address (any inet_aton form)."""
    return bool(_NUMERIC_LABEL.match(host.rpartition(".")[2]))


@attrs.frozen
class Route:
    """Where a name goes: a pattern, a backend, and where the route came from."""

    pattern: Pattern
    #: A Twisted client endpoint string, or ``resolve``.
    backend: str
    #: What the name serves: registry, auth, oss, chart, or custom.
    service: str = "custom"
    #: Where it was defined, for messages: "etc/acrrelay.toml route[2]", "acr cn-beijing".
    origin: str = ""
    #: Target ports a client may ask for on this route.
    ports: frozenset[int] = DEFAULT_PORTS
    #: Send a PROXY protocol header ("v1" or "v2") to the backend first; None for none.
    proxy_protocol: str | None = None
    #: For ``resolve``: resolved addresses allowed although the deny-list covers them.
    allow_addresses: tuple[IPNetwork, ...] = ()

    @property
    def name(self) -> str:
        return self.pattern.text


@attrs.frozen
class Refusal:
    """Why a connection was not routed. ``reason`` is a stable token for counters."""

    reason: str
    detail: str = ""


class RouteTable:
    """An immutable set of routes with fast, most-specific-first lookup."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes: tuple[Route, ...] = tuple(routes)
        self._exact: dict[str, Route] = {}
        self._suffix: dict[str, Route] = {}
        self._label: dict[str, list[Route]] = {}
        seen: dict[str, Route] = {}
        for route in self._routes:
            key = route.pattern.text
            earlier = seen.get(key)
            if earlier is not None:
                kind = "duplicate" if earlier.backend == route.backend else "conflicting"
                raise RouteConflict(
                    f"{kind} route {key!r}: {route.origin or 'a route'} repeats "
                    f"{earlier.origin or 'an earlier route'}"
                    + ("" if kind == "duplicate" else f" with another backend ({earlier.backend})")
                )
            seen[key] = route
            if route.pattern.kind == "exact":
                self._exact[key] = route
            elif route.pattern.kind == "suffix":
                self._suffix[route.pattern.rest] = route
            else:
                self._label.setdefault(route.pattern.rest, []).append(route)
        for candidates in self._label.values():
            # Stable sort keeps definition order among equally specific patterns.
            candidates.sort(key=lambda r: -r.pattern.literal_length)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def __len__(self) -> int:
        return len(self._routes)

    def lookup(self, name: str) -> Route | None:
        """The most specific route for a normalised host name, or None."""
        route = self._exact.get(name)
        if route is not None:
            return route
        first, _, rest = name.partition(".")
        if self._label:
            for candidate in self._label.get(rest, ()):
                if candidate.pattern._label_matches(first):
                    return candidate
        if self._suffix:
            while rest:
                route = self._suffix.get(rest)
                if route is not None:
                    return route
                _, _, rest = rest.partition(".")
        return None


@attrs.frozen
class Door:
    """A front door: which listener, and which protocol on it (tls, http or connect)."""

    listener: str
    protocol: str

    def __str__(self) -> str:
        return f"{self.protocol} on {self.listener}"


@attrs.frozen
class ListenerPolicy:
    """What a listener admits: its protocols, and client ACLs (deny wins; empty allow = all)."""

    protocols: frozenset[str] = frozenset({"tls"})
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()


_NO_NAME_REASON: Final = {"tls": "no_sni", "http": "no_host"}


def client_ip(client: str) -> IPAddress | None:
    """The client's IP address (IPv4-mapped IPv6 as IPv4), or None if it has none."""
    try:
        return ipv4_unmapped(ipaddress.ip_address(client))
    except ValueError:
        return None


class Policy:
    """The single decision point for every front door: route or refuse, with a reason.

    ``listeners`` maps listener names to what they admit; a listener missing from it
    admits every client on the TLS front door only.
    """

    def __init__(
        self,
        table: RouteTable,
        listeners: Mapping[str, ListenerPolicy] | None = None,
    ) -> None:
        self.table = table
        self._listeners = dict(listeners or {})
        self._default = ListenerPolicy()

    def admit(self, listener: str, client: str) -> Refusal | None:
        """The client ACL alone, for refusing a connection before reading from it."""
        rules = self._listeners.get(listener, self._default)
        if not rules.allow and not rules.deny:
            return None
        address = client_ip(client)
        if address is None:
            if rules.allow:
                return Refusal("client_denied", f"{client} has no IP address to allow")
            return None
        for network in rules.deny:
            if address in network:
                return Refusal("client_denied", f"{address} is in denied {network}")
        if rules.allow and not any(address in network for network in rules.allow):
            return Refusal("client_denied", f"{address} is not in an allowed network")
        return None

    def decide(self, door: Door, name: str | None, port: int, client: str) -> Route | Refusal:
        """Route a target or refuse it. Never raises for bad input; refuses it."""
        denied = self.admit(door.listener, client)
        if denied is not None:
            return denied
        rules = self._listeners.get(door.listener, self._default)
        if door.protocol not in rules.protocols:
            return Refusal(
                "protocol_not_allowed", f"{door.protocol} is not enabled on {door.listener}"
            )
        if not name:
            reason = _NO_NAME_REASON.get(door.protocol, "malformed")
            return Refusal(reason, f"{door.protocol} request carries no target name")
        try:
            host = normalize_name(name)
        except InvalidName as e:
            return Refusal("malformed", f"bad target name: {e}")
        if is_ip_literal(host):
            return Refusal("ip_literal", f"{host} is an IP address, not a routed name")
        route = self.table.lookup(host)
        if route is None:
            return Refusal("not_allowed", f"no route for {host}")
        if port not in route.ports:
            allowed = ", ".join(str(p) for p in sorted(route.ports))
            return Refusal(
                "port_not_allowed", f"port {port} is not allowed for {route.name} ({allowed})"
            )
        return route
