"""The values a configuration is made of: durations, sizes, and one converter per kind of key.

Each converter takes a TOML value and returns the checked value, or raises ``ValueError``
with a message saying what was expected; :class:`Table` turns that into a
:class:`~acrrelay.config.ConfigError` naming the source and the key. No reactor here.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar

from acrrelay import catalogue
from acrrelay.endpoints import EndpointError, check_client_endpoint, check_server_endpoint
from acrrelay.routing import PROTOCOLS, RESOLVE, IPNetwork

__all__ = [
    "ConfigError",
    "Table",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
    "read_toml",
    "read_users_file",
]

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration mistake: which source, which key, what was expected."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)


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
    raise ValueError(f'expected a duration such as "90s", "15m" or "1h30m", got {show(value)}')


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


def format_size(size: int) -> str:
    """The inverse of :func:`parse_size` for display: 16384 -> "16KiB"."""
    for unit in ("GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit]
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_size(value: object) -> int:
    """Bytes from an integer or ``"16KiB"``, ``"1MiB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'expected a size such as 16384, "16KiB" or "1MiB", got {show(value)}')


def show(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


_BCRYPT = re.compile(rb"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}\Z")


class Table:
    """Typed, tracked access to one TOML table; leftovers are unknown keys."""

    def __init__(self, source: str, path: str, data: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(data, dict):
            raise ConfigError(source, path, f"expected a table, got {show(data)}")
        self._data: dict[str, Any] = data
        self._used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), message)

    def has(self, name: str) -> bool:
        return name in self._data

    def names(self) -> list[str]:
        return list(self._data)

    def table(self, name: str) -> Table | None:
        """The sub-table ``name``, or None if absent."""
        self._used.add(name)
        if name not in self._data:
            return None
        return Table(self.source, self.key(name), self._data[name])

    def tables(self, name: str) -> list[Table]:
        """The array of tables ``[[name]]`` (empty if absent)."""
        self._used.add(name)
        items = self._data.get(name, [])
        if not isinstance(items, list):
            raise self.error(name, f"expected an array of tables ([[{name}]]), got {show(items)}")
        return [Table(self.source, f"{self.key(name)}[{i}]", item) for i, item in enumerate(items)]

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


def string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {show(value)}")
    return value


def port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {show(value)}")
    return value


def workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ValueError(f"expected a number of processes from 1 to 64, got {show(value)}")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show(value)}")
    return value


def count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number, 0 or more, got {show(value)}")
    return value


def list_of(convert: Callable[[object], T], example: str) -> Callable[[object], tuple[T, ...]]:
    def check(value: object) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected an array such as {example}, got {show(value)}")
        out: list[T] = []
        for item in value:
            converted = convert(item)
            if converted in out:
                raise ValueError(f"{show(item)} is listed twice")
            out.append(converted)
        return tuple(out)

    return check


def network(value: object) -> IPNetwork:
    if not isinstance(value, str):
        raise ValueError(f'expected a CIDR such as "10.0.0.0/8", got {show(value)}')
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ValueError(f'expected a CIDR such as "10.0.0.0/8", got {show(value)} ({e})') from None


def protocol(value: object) -> str:
    if value not in PROTOCOLS:
        raise ValueError(f"expected one of {', '.join(map(show, PROTOCOLS))}, got {show(value)}")
    return str(value)


def proxy_version(value: object) -> str:
    if value not in ("v1", "v2"):
        raise ValueError(f'expected "v1" or "v2", got {show(value)}')
    return str(value)


def nonempty(convert: Callable[[object], tuple[T, ...]]) -> Callable[[object], tuple[T, ...]]:
    def check(value: object) -> tuple[T, ...]:
        items = convert(value)
        if not items:
            raise ValueError("expected at least one item")
        return items

    return check


def readable_file(what: str) -> Callable[[object], str]:
    """A path to a file that exists and can be read; ``what`` names it in messages."""

    def check(value: object) -> str:
        path = string(value)
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise ValueError(f"{what} {path} does not exist") from None
        except OSError as e:
            raise ValueError(f"{what} {path} cannot be read: {e.strerror or e}") from None
        return path

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


def server_endpoint(value: object) -> str:
    text = string(value)
    try:
        check_server_endpoint(text)
    except EndpointError as e:
        raise ValueError(f"bad server endpoint: {e}") from None
    return text


def backend(value: object) -> str:
    text = string(value).strip()
    if text == RESOLVE:
        return text
    try:
        check_client_endpoint(text)
    except EndpointError as e:
        raise ValueError(
            f'bad backend: {e}; expected a client endpoint string or "{RESOLVE}"'
        ) from None
    return text


def in_range(low: int, high: int, convert: Callable[[object], int]) -> Callable[[object], int]:
    def check(value: object) -> int:
        n = convert(value)
        if not low <= n <= high:
            raise ValueError(f"expected between {low} and {high} bytes, got {n}")
        return n

    return check


def positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {show(value)}")
    return seconds


def access_log(value: object) -> str | None:
    text = string(value)
    if text in ("off", ""):
        return None
    return text


def show_access_log(target: str | None) -> str:
    return "off" if target is None else target


def show_boolean(value: bool) -> str:
    return "true" if value else "false"


def show_count(zero: str) -> Callable[[int], str]:
    """Show a count whose 0 means ``zero`` ("no limit")."""

    def show(count: int) -> str:
        return str(count) if count else zero

    return show


def networks(value: object) -> tuple[catalogue.Network, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f'expected a non-empty array such as ["public", "vpc"], got {show(value)}')
    out: list[catalogue.Network] = []
    for item in value:
        network = next((n for n in catalogue.NETWORKS if n == item), None)
        if network is None:
            raise ValueError(f'expected "public" or "vpc", got {show(item)}')
        if network not in out:
            out.append(network)
    return tuple(out)


def addresses(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"expected an IP address or an array of them, got {show(value)}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected an IP address, got {show(item)}")
        try:
            out.append(str(ipaddress.ip_address(item)))
        except ValueError:
            raise ValueError(f"expected an IP address, got {show(item)}") from None
    return tuple(out)


def read_toml(path: str) -> dict[str, Any]:
    """The TOML document at ``path``; any failure is a one-line ConfigError naming it."""
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
        raise ConfigError(path, "", not_utf8(e)) from None
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror or e}") from None


def not_utf8(e: UnicodeDecodeError) -> str:
    """Where a TOML file stops being UTF-8 (TOML files must be), by byte and line."""
    line = e.object[: e.start].count(b"\n") + 1
    return f"not UTF-8 at byte {e.start} (line {line}): {e.reason}; TOML files must be UTF-8"
