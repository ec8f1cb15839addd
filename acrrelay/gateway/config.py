"""The ``[gateway]`` table: a TOML file that has one runs the caching gateway role.

The rest of the file is the relay's format, read by :mod:`acrrelay.config`: ``[[listen]]``
(here each listener terminates TLS, so its only protocol is ``"tls"``), ``[[acr]]`` and
``[[route]]`` (which names the gateway serves, and how it reaches each upstream), ``[resolver]``,
``[admin]`` and ``[relay]``. Every key is documented in ``etc/gateway.toml``.

Mistakes raise :class:`acrrelay.config.ConfigError`, one line naming the file and the key. Paths
are kept as written (relative to the working directory, as in the relay's own settings); the CA
and the store are opened by the service, not here.

Pure: no reactor (endpoint strings are checked without one, see :mod:`acrrelay.endpoints`).
"""

from __future__ import annotations

import tomllib
from typing import Any, Final

import attrs

from acrrelay.config import (
    ConfigError,
    Overlay,
    RelayConfig,
    _build,
    _read_document,
    _show,
    _Table,
    parse_duration,
    parse_size,
)
from acrrelay.endpoints import EndpointError, check_client_endpoint

__all__ = [
    "GatewayConfig",
    "load_gateway",
    "parse_gateway",
    "parse_gateway_table",
]

GATEWAY_KEYS: Final = (
    "ca",
    "cache_dir",
    "cache_size",
    "proof_ttl",
    "upstream_ca",
    "upstream_proxy",
    "upstream_timeout",
)
DEFAULT_CACHE_SIZE: Final = 10 << 30
DEFAULT_PROOF_TTL: Final = 60.0
#: A remembered proof outlives a revoked user by at most this long; no setting goes past it.
MAX_PROOF_TTL: Final = 3600.0
DEFAULT_UPSTREAM_TIMEOUT: Final = 30.0


@attrs.frozen
class GatewayConfig:
    """The ``[gateway]`` table, validated."""

    #: Directory made by ``acrrelay ca init DIR``: ``ca.crt`` and ``ca.key`` (0600).
    ca: str
    #: The blob store's directory.
    cache_dir: str
    #: Size cap of the store in bytes (least recently used blobs are evicted); 0 caches nothing.
    cache_size: int = DEFAULT_CACHE_SIZE
    #: Seconds a proven (credential, repository) is remembered, never past the token's expiry;
    #: 0 proves every request upstream.
    proof_ttl: float = DEFAULT_PROOF_TTL
    #: PEM bundle to verify upstream certificates; None for the system roots.
    upstream_ca: str | None = None
    #: Client endpoint of an HTTP CONNECT proxy for every upstream connection; None for none.
    upstream_proxy: str | None = None
    #: Seconds to connect upstream and receive a response head.
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT


def parse_gateway_table(source: str, table: dict[str, Any]) -> GatewayConfig:
    """Validate the ``[gateway]`` table of ``source``; unknown keys are rejected."""
    t = _Table(source, "gateway", table)
    config = GatewayConfig(
        ca=t.require("ca", _path),
        cache_dir=t.require("cache_dir", _path),
        cache_size=t.get("cache_size", parse_size, DEFAULT_CACHE_SIZE),
        proof_ttl=t.get("proof_ttl", _proof_ttl, DEFAULT_PROOF_TTL),
        upstream_ca=t.get("upstream_ca", _path, None),
        upstream_proxy=t.get("upstream_proxy", _client_endpoint, None),
        upstream_timeout=t.get("upstream_timeout", _positive_duration, DEFAULT_UPSTREAM_TIMEOUT),
    )
    t.finish(GATEWAY_KEYS)
    return config


def load_gateway(
    path: str, overlay: Overlay | None = None
) -> tuple[RelayConfig, GatewayConfig | None]:
    """Read ``path``: the relay settings, and the gateway's if it has a ``[gateway]`` table."""
    return _split(path, _read_document(path), overlay)


def parse_gateway(
    text: str, source: str = "<string>", overlay: Overlay | None = None
) -> tuple[RelayConfig, GatewayConfig | None]:
    """Like :func:`load_gateway`, from TOML text (for embedding and tests)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    return _split(source, document, overlay)


def _split(
    source: str, document: dict[str, Any], overlay: Overlay | None
) -> tuple[RelayConfig, GatewayConfig | None]:
    table = document.pop("gateway", None)
    gateway = None if table is None else parse_gateway_table(source, table)
    relay = _build(source, document, overlay or Overlay())
    if gateway is not None:
        _check_relay_for_gateway(source, relay)
    return relay, gateway


def _check_relay_for_gateway(source: str, relay: RelayConfig) -> None:
    """Settings of the relay's format that a gateway cannot honour are errors, not surprises."""
    for i, listener in enumerate(relay.listeners):
        if listener.protocols != ("tls",):
            # Only [[listen]] tables can name protocols (a --listen is TLS), so i is theirs.
            raise ConfigError(
                source,
                f"listen[{i}].protocols",
                'a gateway listener terminates TLS: expected ["tls"], '
                f"got {_show(list(listener.protocols))}",
            )
    if relay.workers != 1:
        raise ConfigError(
            source, "relay.workers", "the gateway runs in one process (its store has one owner)"
        )


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a path, got {_show(value)}")
    return value


def _proof_ttl(value: object) -> float:
    seconds = parse_duration(value)
    if seconds > MAX_PROOF_TTL:
        raise ValueError(
            "expected at most 1h (a revoked user is served from the cache for this long), "
            f"got {_show(value)}"
        )
    return seconds


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {_show(value)}")
    return seconds


def _client_endpoint(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f'expected a client endpoint such as "tcp:proxy:3128", got {_show(value)}')
    try:
        check_client_endpoint(value.strip())
    except EndpointError as e:
        raise ValueError(f"bad client endpoint: {e}") from None
    return value.strip()
