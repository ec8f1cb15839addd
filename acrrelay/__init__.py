"""acrrelay: reach Alibaba Cloud Container Registry from where it is not reachable.

The relay reads just enough of each connection to know where it goes (the TLS
ClientHello's SNI), checks it against an allow-list, and splices the bytes to
the real service, with TLS kept end to end.

Public API:

- :func:`load_config`, :func:`parse_config`, :class:`RelayConfig`, :class:`ConfigError`
- :func:`make_relay_service`, :class:`RelayService`, :class:`ListenError`
- :class:`RelayFactory`, the per-listener protocol factory, for your own endpoints

The Twisted-facing names are imported lazily, so ``import acrrelay.clienthello``
and friends stay free of any reactor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ListenError",
    "RelayConfig",
    "RelayFactory",
    "RelayService",
    "load_config",
    "make_relay_service",
    "parse_config",
]

_LAZY = {
    "ConfigError": "acrrelay.config",
    "RelayConfig": "acrrelay.config",
    "load_config": "acrrelay.config",
    "parse_config": "acrrelay.config",
    "ListenError": "acrrelay.service",
    "RelayService": "acrrelay.service",
    "make_relay_service": "acrrelay.service",
    "RelayFactory": "acrrelay.peek",
}

if TYPE_CHECKING:
    from acrrelay.config import ConfigError, RelayConfig, load_config, parse_config
    from acrrelay.peek import RelayFactory
    from acrrelay.service import ListenError, RelayService, make_relay_service


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'acrrelay' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
