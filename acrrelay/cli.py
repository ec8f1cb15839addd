"""The ``acrrelay`` command: tools around the relay (the relay itself runs under ``twist``).

acrrelay check-config etc/acrrelay.toml [--listen E] [--route N=B] [--acr REGION]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from acrrelay import __version__
from acrrelay.config import ConfigError, Overlay, RelayConfig, format_duration, load_config
from acrrelay.routing import DEFAULT_PORTS, Route

__all__ = ["format_config", "main"]


def format_config(config: RelayConfig) -> str:
    """A readable summary: settings, listeners, and the expanded route table."""
    lines = [
        f"{config.source}: OK",
        "",
        "settings:",
        f"  peek_timeout     {format_duration(config.peek_timeout)}",
        f"  peek_limit       {config.peek_limit} bytes",
        f"  connect_timeout  {format_duration(config.connect_timeout)}",
        f"  idle_timeout     {format_duration(config.idle_timeout)}",
        f"  buffer_size      {config.buffer_size} bytes per direction",
        f"  access_log       {config.access_log or 'off'}",
        f"  max_connections  {config.max_connections or 'from the file-descriptor limit'}",
        f"  per client       {config.max_connections_per_client or 'no limit'}",
        "",
        "listeners:",
    ]
    for listener in config.listeners:
        name = "" if listener.name == listener.endpoint else f"  ({listener.name})"
        lines.append(f"  {listener.endpoint}{name}: {', '.join(listener.protocols)}")
        if "tls" in listener.protocols:
            lines.append(f"      TLS target port {listener.tls_port}")
        if listener.allow:
            lines.append(f"      allow {_networks(listener.allow)}")
        if listener.deny:
            lines.append(f"      deny {_networks(listener.deny)}")
        if listener.proxy_protocol_from:
            lines.append(
                f"      PROXY header required from {_networks(listener.proxy_protocol_from)}"
            )
        if listener.connect_users is not None:
            lines.append(
                f"      CONNECT needs a user of {listener.connect_users_file} "
                f"({len(listener.connect_users)} users)"
            )
    lines += [
        "",
        f"routes ({len(config.routes)}; most specific wins: "
        "exact, then first-label *, then *.suffix):",
    ]
    width = max(len(r.name) for r in config.routes)
    backend_width = max(len(r.backend) for r in config.routes)
    lines.append(f"  {'NAME':<{width}}  {'BACKEND':<{backend_width}}  SERVICE   FROM")
    for route in config.routes:
        lines.append(
            f"  {route.name:<{width}}  {route.backend:<{backend_width}}  "
            f"{route.service:<8}  {route.origin}{_route_options(route)}"
        )
    if config.hosts:
        lines += ["", "static hosts (used by resolve routes before DNS):"]
        for name, addresses in sorted(config.hosts.items()):
            lines.append(f"  {name}  {' '.join(addresses)}")
    return "\n".join(lines) + "\n"


def _networks(networks: Iterable[object]) -> str:
    return " ".join(str(n) for n in networks)


def _route_options(route: Route) -> str:
    options = []
    if route.ports != DEFAULT_PORTS:
        options.append("ports " + ",".join(str(p) for p in sorted(route.ports)))
    if route.proxy_protocol:
        options.append(f"sends PROXY {route.proxy_protocol}")
    if route.allow_addresses:
        options.append(f"also allows {_networks(route.allow_addresses)}")
    return f"  [{'; '.join(options)}]" if options else ""


def _check_config(args: argparse.Namespace, out: TextIO) -> int:
    overlay = Overlay(listen=tuple(args.listen), route=tuple(args.route), acr=tuple(args.acr))
    config = load_config(args.file, overlay)
    out.write(format_config(config))
    return 0


def _passwd(args: argparse.Namespace, out: TextIO) -> int:
    import getpass

    import bcrypt

    if ":" in args.user or not args.user.strip():
        raise ConfigError("passwd", args.user, "a user name may not be empty or contain ':'")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.user}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("passwd", args.user, "the two passwords differ")
    if len(password) < 8:
        raise ConfigError("passwd", args.user, "use a password of 8 characters or more")
    digest = bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    out.write(f"{args.user}:{digest}\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acrrelay",
        description="Tools for acrrelay. Run the relay itself with: twist acrrelay --config FILE",
    )
    parser.add_argument("--version", action="version", version=f"acrrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="validate a configuration and print the expanded route table",
        description="Validate FILE (plus any flags, as twist would apply them) and print "
        "the settings, listeners and the expanded route table. Exits 1 on the first mistake.",
    )
    check.add_argument("file", metavar="FILE", nargs="?", help="TOML configuration file")
    check.add_argument("--listen", action="append", default=[], metavar="ENDPOINT")
    check.add_argument("--route", action="append", default=[], metavar="NAME=BACKEND")
    check.add_argument("--acr", action="append", default=[], metavar="REGION")
    check.set_defaults(run=_check_config)
    passwd = commands.add_parser(
        "passwd",
        help="print a connect_users line (user:bcrypt-hash) for a new password",
        description="Ask for a password and print USER:HASH for a connect_users file, "
        "as htpasswd -nB would.",
    )
    passwd.add_argument("user", metavar="USER")
    passwd.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    passwd.set_defaults(run=_passwd)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command; returns the exit status (also the console script's)."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args, out or sys.stdout)
    except ConfigError as e:
        print(f"acrrelay: {e}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
