"""The gateway's part of the ``acrrelay`` command: ``ca init``, ``cache verify``, and the
``gateway-trust`` format of ``hosts`` (kept here so :mod:`acrrelay.cli` stays the relay's).

The work itself is in :mod:`acrrelay.gateway.commands`, imported only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import TextIO

from acrrelay.configvalues import ConfigError

__all__ = ["add_gateway_commands", "gateway_trust"]


def gateway_trust(args: argparse.Namespace, names: tuple[str, ...]) -> str:
    """How each client kind trusts the gateway's CA, for the registry and token names only
    (clients never reach OSS through the gateway: it follows blob redirects itself)."""
    from acrrelay.gateway.commands import trust_instructions

    if args.ca is None:
        raise ConfigError("hosts", "--format gateway-trust", "needs --ca PATH (the ca.crt)")
    try:
        text = trust_instructions(names, args.ca, args.client)
    except ValueError as e:
        raise ConfigError("hosts", "--client", str(e)) from None
    return text if text.endswith("\n") else text + "\n"


def _ca(args: argparse.Namespace, out: TextIO) -> int:
    from acrrelay.gateway.commands import ca_init_main

    return ca_init_main(args.rest, out)


def _cache(args: argparse.Namespace, out: TextIO) -> int:
    from acrrelay.gateway.commands import cache_verify_main

    return cache_verify_main(args.rest, out)


def add_gateway_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """ca init and cache verify, for the caching gateway."""
    ca = commands.add_parser(
        "ca",
        help="the gateway's internal CA: acrrelay ca init DIR",
        description="acrrelay ca init DIR [--days N] [--name NAME]: create the gateway's CA "
        "(ca.crt for the clients, ca.key mode 0600 for the gateway); never overwrites one.",
        add_help=False,
    )
    ca.add_argument("action", choices=("init",))
    ca.add_argument("rest", nargs=argparse.REMAINDER)
    ca.set_defaults(run=_ca)
    cache = commands.add_parser(
        "cache",
        help="the gateway's blob store: acrrelay cache verify DIR [DIGEST...]",
        description="acrrelay cache verify DIR [DIGEST...]: re-hash stored blobs and drop "
        "corrupt ones, so they are fetched again; exit 1 if any was corrupt.",
        add_help=False,
    )
    cache.add_argument("action", choices=("verify",))
    cache.add_argument("rest", nargs=argparse.REMAINDER)
    cache.set_defaults(run=_cache)
