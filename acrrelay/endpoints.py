"""Checking Twisted endpoint strings without a running reactor.

Configuration is validated before any reactor exists, so endpoint strings are
parsed against a :class:`~twisted.internet.testing.MemoryReactorClock`, which
builds the endpoint object (catching unknown plugins, missing or bad arguments)
without opening anything. Importing this module does not install a reactor.
"""

from __future__ import annotations

import re

__all__ = ["EndpointError", "check_client_endpoint", "check_server_endpoint"]


class EndpointError(ValueError):
    """An endpoint string Twisted cannot build."""


def _reason(e: Exception) -> str:
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    missing = re.search(
        r"missing \d+ required (?:positional |keyword-only )?arguments?: (.*)", text
    )
    if missing:
        return f"missing {missing.group(1)}"
    unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
    if unexpected:
        return f"unknown parameter {unexpected.group(1)!r}"
    return text


def check_server_endpoint(description: str) -> None:
    """Raise :class:`EndpointError` unless ``description`` is a server endpoint string."""
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactorClock

    if not description or (":" not in description and not description.isdigit()):
        raise EndpointError(f"{description!r} is not an endpoint string such as 'tcp:8443'")
    if description.startswith("systemd:"):
        # Its descriptors exist only under systemd; check the form, not the inheritance.
        if "domain=" not in description or not re.search(r":(index|name)=", description):
            raise EndpointError(f"{description!r}: systemd endpoints need domain= and index=")
        return
    try:
        serverFromString(MemoryReactorClock(), description)
    except Exception as e:
        raise EndpointError(f"{description!r}: {_reason(e)}") from None


def check_client_endpoint(description: str) -> None:
    """Raise :class:`EndpointError` unless ``description`` is a client endpoint string."""
    from twisted.internet.endpoints import clientFromString
    from twisted.internet.testing import MemoryReactorClock

    if ":" not in description:
        raise EndpointError(
            f"{description!r} is not an endpoint string such as 'tcp:host=10.0.0.5:port=443'"
        )
    try:
        clientFromString(MemoryReactorClock(), description)
    except Exception as e:
        raise EndpointError(f"{description!r}: {_reason(e)}") from None
