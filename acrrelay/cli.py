"""The ``acrrelay`` command: tools around the relay (the relay itself runs under ``twist``).

acrrelay check-config etc/acrrelay.toml [--listen E] [--route N=B] [--acr REGION]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

import attrs

from acrrelay import __version__
from acrrelay.config import RELAY_SETTINGS, ConfigError, Overlay, RelayConfig, load_config
from acrrelay.gateway.cliparts import add_gateway_commands, gateway_trust
from acrrelay.routing import DEFAULT_PORTS, Route

__all__ = ["format_config", "main"]

_SETTING_WIDTH = max(len(setting.name) for setting in RELAY_SETTINGS)


def format_config(config: RelayConfig) -> str:
    """A readable summary: settings, listeners, and the expanded route table."""
    lines = [
        f"{config.source}: OK",
        "",
        "settings:",
        *(
            f"  {setting.name:<{_SETTING_WIDTH}}  {setting.show(setting.of(config))}"
            for setting in RELAY_SETTINGS
        ),
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
    if args.file is None:
        out.write(format_config(load_config(None, overlay)))
        return 0
    from acrrelay.gateway.config import load_gateway

    config, gateway = load_gateway(args.file, overlay)  # the same file format, either role
    out.write(format_config(config))
    if gateway is not None:
        out.write("\ngateway (this file runs the caching gateway: its listeners terminate TLS)\n")
        for field in attrs.fields(type(gateway)):
            out.write(f"  {field.name} = {getattr(gateway, field.name)!r}\n")
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


def _split_relay(text: str, default_port: int) -> tuple[str, int]:
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = int(port_text)
    return host, port


def _hosts(args: argparse.Namespace, out: TextIO) -> int:
    from acrrelay.catalogue import UnknownRegion
    from acrrelay.clienthelp import client_names, containerd_proxy, dockerd_proxy, hosts_lines

    try:
        host, port = _split_relay(args.relay, 443 if args.format == "hosts" else 3128)
        names = client_names(
            args.acr,
            args.network,
            instances=args.instance,
            personal=args.personal,
            buckets=args.bucket,
        )
    except UnknownRegion as e:
        raise ConfigError("hosts", f"--acr {args.acr}", str(e)) from None
    except ValueError:
        raise ConfigError("hosts", f"--relay {args.relay}", "expected ADDRESS[:PORT]") from None
    if args.format == "hosts":
        if port != 443:  # hosts-file clients of the relay (and of the gateway) use 443
            raise ConfigError(
                "hosts",
                f"--relay {args.relay}",
                "a hosts file cannot name a port; the relay "
                "must answer on 443 (and 80) for hosts-file clients",
            )
        try:
            out.write(hosts_lines(host, names))
        except ValueError:
            raise ConfigError(
                "hosts", f"--relay {args.relay}", "a hosts file needs the relay's IP address"
            ) from None
    elif args.format == "gateway-trust":
        out.write(gateway_trust(args, names.registry + names.auth))
    elif args.format == "dockerd":
        out.write(dockerd_proxy(host, port, args.proxy_user))
    else:
        out.write(containerd_proxy(host, port, names.registry, args.proxy_user))
    return 0


def _resolve(args: argparse.Namespace, out: TextIO) -> int:
    import json

    from acrrelay.reach import covering, exact_cidrs, resolve_config, system_lookup

    overlay = Overlay(listen=tuple(args.listen), route=tuple(args.route), acr=tuple(args.acr))
    config = load_config(args.config, overlay)
    resolutions = resolve_config(config, lookup=None if args.no_dns else system_lookup)
    exact, cover = exact_cidrs(resolutions), covering(resolutions)
    failed = [r for r in resolutions if r.source == "error"]
    if args.json:
        document = {
            "names": [
                {
                    "name": r.name,
                    "source": r.source,
                    "addresses": list(r.addresses),
                    "error": r.error,
                    "backend": r.backend,
                }
                for r in resolutions
            ],
            "exact_cidrs": [str(n) for n in exact],
            "covering_cidrs": [str(n) for n in cover],
        }
        out.write(json.dumps(document, indent=2) + "\n")
        return 1 if failed else 0
    width = max(len(r.name) for r in resolutions)
    out.write(f"{'NAME':<{width}}  SOURCE    ADDRESSES\n")
    for r in resolutions:
        if r.source == "wildcard":
            detail = "a pattern: add its concrete names to [resolver.hosts] or routes"
        elif r.error is not None:
            detail = f"does not resolve: {r.error}"
        else:
            detail = " ".join(r.addresses)
        if r.backend is not None:
            detail = f"{detail} (explicit backend {r.backend})".lstrip()
        out.write(f"{r.name:<{width}}  {r.source:<8}  {detail}\n")
    out.write("\n")
    if exact:
        out.write("routes that cover exactly these addresses:\n")
        out.write("".join(f"  {network}\n" for network in exact))
        out.write("one covering route per address family:\n")
        out.write("".join(f"  {network}\n" for network in cover))
    else:
        out.write("no address resolved\n")
    if failed:
        out.write(f"\n{len(failed)} name(s) did not resolve\n")
    return 1 if failed else 0


def _doctor(args: argparse.Namespace, out: TextIO) -> int:
    from acrrelay.doctor import Options, main_doctor

    def address(flag: str, text: str | None, default_port: int) -> tuple[str, int] | None:
        if text is None:
            return None
        try:
            return _split_relay(text, default_port)
        except ValueError:
            raise ConfigError("doctor", f"{flag} {text}", "expected HOST[:PORT]") from None

    if args.chart_host is not None and args.chart is None:
        raise ConfigError("doctor", f"--chart-host {args.chart_host}", "needs --chart NS/REPO")
    password = None
    if args.password_stdin:
        if args.username is None:
            raise ConfigError("doctor", "--password-stdin", "needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
    elif args.username is not None:
        # Sending "user:" with an empty password would fail as a wrong password, far
        # from the cause; ask, or say how to pass it where nobody can be asked.
        if not sys.stdin.isatty():
            print(
                f"acrrelay: doctor: --username {args.username}: standard input is not a "
                "terminal to ask for the password on; pipe it in with --password-stdin",
                file=sys.stderr,
            )
            return 2
        import getpass

        password = getpass.getpass(f"password for {args.username}: ")
    options = Options(
        registry=args.registry.lower().rstrip("."),
        via=address("--via", args.via, 443),
        via_http=address("--via-http", args.via_http, 80),
        username=args.username,
        password=password,
        image=args.image,
        chart=args.chart,
        chart_host=args.chart_host.lower().rstrip(".") if args.chart_host else None,
        ca_file=args.ca_file,
        timeout=args.timeout,
    )
    return main_doctor(options, out, as_json=args.json)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acrrelay",
        description="Tools for acrrelay. Run the relay itself with: twist acrrelay --config FILE",
    )
    parser.add_argument("--version", action="version", version=f"acrrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_config_commands(commands)
    _add_hosts(commands)
    _add_resolve(commands)
    _add_doctor(commands)
    add_gateway_commands(commands)
    return parser


def _add_config_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """check-config and passwd."""
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


def _add_hosts(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """hosts: what a client machine needs."""
    hosts = commands.add_parser(
        "hosts",
        help="print the hosts lines (or proxy settings) a client needs",
        description="Print what a client needs to use the relay for one region: hosts-file "
        "lines pointing the registry, its token service and OSS at the relay, or, with "
        "--format dockerd/containerd, the settings for HTTPS_PROXY mode.",
    )
    hosts.add_argument(
        "--relay",
        required=True,
        metavar="ADDRESS[:PORT]",
        help="the relay's address (proxy formats: port 3128 unless given)",
    )
    hosts.add_argument("--acr", required=True, metavar="REGION", help="e.g. cn-beijing")
    hosts.add_argument(
        "--network",
        choices=("vpc", "public"),
        default="vpc",
        help="the -vpc/-internal names (default) or the public ones",
    )
    hosts.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="NAME",
        help="an Enterprise instance name (repeatable)",
    )
    hosts.add_argument(
        "--personal",
        action="append",
        default=[],
        metavar="ID",
        help="a new Personal instance id, the part after crpi- (repeatable)",
    )
    hosts.add_argument(
        "--bucket",
        action="append",
        default=[],
        metavar="NAME",
        help="an OSS bucket name, from a blob redirect (repeatable)",
    )
    hosts.add_argument(
        "--format",
        choices=("hosts", "dockerd", "containerd", "gateway-trust"),
        default="hosts",
        help="gateway-trust: how each client kind trusts the gateway's CA (with --ca)",
    )
    hosts.add_argument("--ca", metavar="PATH", help="the gateway's ca.crt, for gateway-trust")
    hosts.add_argument(
        "--client",
        choices=("docker", "containerd", "podman", "all"),
        default="all",
        help="which client kind gateway-trust is for (default all)",
    )
    hosts.add_argument("--proxy-user", metavar="USER", help="for proxy formats with connect_users")
    hosts.set_defaults(run=_hosts)


def _add_resolve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """resolve: the configured names from the relay's side."""
    resolve = commands.add_parser(
        "resolve",
        help="resolve the configured names from the relay's side and print routes for CEN/VPN",
        description="Resolve every concrete configured name the way a resolve route would "
        "([resolver.hosts] first, then the system resolver); print the addresses, the CIDRs "
        "that cover exactly them, and one covering CIDR per family. Exits 1 if a name does "
        "not resolve.",
    )
    resolve.add_argument("--config", metavar="FILE", help="TOML configuration file")
    resolve.add_argument("--listen", action="append", default=[], metavar="ENDPOINT")
    resolve.add_argument("--route", action="append", default=[], metavar="NAME=BACKEND")
    resolve.add_argument("--acr", action="append", default=[], metavar="REGION")
    resolve.add_argument("--json", action="store_true", help="print JSON")
    resolve.add_argument(
        "--no-dns", action="store_true", help="use [resolver.hosts] only; send no DNS query"
    )
    resolve.set_defaults(run=_resolve)


def _add_doctor(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """doctor: a registry's three services, hop by hop."""
    doctor = commands.add_parser(
        "doctor",
        help="check a registry's three services hop by hop, through the relay or direct",
        description="Walk the path a pull takes: TLS to the registry, the 401 Bearer "
        "challenge, the token service, (with --image) the manifest, the blob redirect and "
        "OSS, the OSS endpoint and (with --chart) the chart API; print a table with a hint "
        "for each failure. Exits 1 if a hop fails. Each hop is shown on stderr as it "
        "starts, so a slow one is visibly in progress; the table goes to stdout.",
    )
    doctor.add_argument(
        "registry", metavar="REGISTRY_HOST", help="e.g. registry-vpc.cn-beijing.aliyuncs.com"
    )
    doctor.add_argument(
        "--via",
        metavar="HOST[:PORT]",
        help="connect through the relay at HOST (port 443 unless given)",
    )
    doctor.add_argument(
        "--via-http",
        metavar="HOST[:PORT]",
        help="where plain-HTTP redirects go (default: the --via host, port 80)",
    )
    doctor.add_argument(
        "--username",
        metavar="USER",
        help="log in to the token service as USER (the password is asked for on a terminal)",
    )
    doctor.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    doctor.add_argument(
        "--image", metavar="NS/NAME[:TAG]", help="also fetch this image's manifest and first layer"
    )
    doctor.add_argument(
        "--chart",
        metavar="NS/REPO",
        help="also check an Enterprise chart repository (ChartMuseum): "
        "GET /api/NS/REPO/charts must answer 200",
    )
    doctor.add_argument(
        "--chart-host",
        metavar="HOST",
        help="where --chart's API is served (default: REGISTRY_HOST); Enterprise instances "
        "have been seen serving charts on INSTANCE-chart.REGION.cr.aliyuncs.com, a form not "
        "confirmed by Alibaba (helm-acr's README shows -helm), so --acr does not route it: "
        "give the relay a route for it",
    )
    doctor.add_argument("--ca-file", metavar="PEM", help="trust this CA (default: the system's)")
    doctor.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.set_defaults(run=_doctor)


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run the command; returns the exit status (also the console script's)."""
    args = _parser().parse_args(argv)
    try:
        status: int = args.run(args, out or sys.stdout)
    except ConfigError as e:
        print(f"acrrelay: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (| head): not an error of ours; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status


if __name__ == "__main__":
    sys.exit(main())
