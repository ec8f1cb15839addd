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
:class:`Route` or a :class:`Refusal`. Nothing is reachable unless a route names it.

This module is pure: no reactor, no sockets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final, Literal

import attrs

__all__ = [
    "RESOLVE",
    "InvalidName",
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

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_GLOB_LABEL = re.compile(r"([a-z0-9_-]*)\*([a-z0-9_-]*)\Z")


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


class Policy:
    """The single decision point for every front door: route or refuse, with a reason.

    ``allowed_ports`` maps a front door to the target ports it may reach; a front
    door missing from the map may reach any port its listener implies.
    """

    def __init__(
        self,
        table: RouteTable,
        *,
        allowed_ports: Mapping[str, frozenset[int]] | None = None,
    ) -> None:
        self.table = table
        self._allowed_ports = dict(allowed_ports or {})

    def decide(self, front_door: str, name: str | None, port: int, client: str) -> Route | Refusal:
        """Route a target or refuse it. Never raises for bad input; refuses it."""
        if name is None:
            return Refusal("no_sni", f"{front_door} request carries no target name")
        try:
            host = normalize_name(name)
        except InvalidName as e:
            return Refusal("malformed", f"bad target name: {e}")
        ports = self._allowed_ports.get(front_door)
        if ports is not None and port not in ports:
            return Refusal("port_not_allowed", f"port {port} is not allowed for {front_door}")
        route = self.table.lookup(host)
        if route is None:
            return Refusal("not_allowed", f"no route for {host}")
        return route
