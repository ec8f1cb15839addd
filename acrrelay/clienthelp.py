"""What a client machine needs to use the relay: hosts lines, or proxy settings.

``acrrelay hosts`` prints, for one region and network, the hosts-file lines that point
the registry, its token service and OSS at the relay; or, for ``HTTPS_PROXY`` mode,
the dockerd and containerd settings (containerd needs no ``hosts.toml`` in either
mode; see :func:`containerd_proxy`). A hosts file cannot hold a wildcard, so the OSS
*bucket* host is listed only when ``--bucket`` names it; otherwise the output says how
to find it (the host in the ``Location`` of a blob redirect, which ``acrrelay doctor``
shows).

Pure: no reactor, no sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

import attrs

from acrrelay.addresses import host_port
from acrrelay.catalogue import Network, acr_entries

__all__ = [
    "ClientNames",
    "client_names",
    "containerd_proxy",
    "dockerd_proxy",
    "hosts_lines",
]


@attrs.frozen
class ClientNames:
    """The concrete names a client of one region and network resolves, by service."""

    registry: tuple[str, ...]
    auth: tuple[str, ...]
    oss: tuple[str, ...]
    #: Set when a bucket host is needed but was not given.
    missing_bucket: str | None = None

    def all(self) -> tuple[str, ...]:
        return self.registry + self.auth + self.oss


def client_names(
    region: str,
    network: Network,
    *,
    instances: Iterable[str] = (),
    personal: Iterable[str] = (),
    buckets: Iterable[str] = (),
) -> ClientNames:
    """The names for ``region`` on ``network`` ("public" or "vpc").

    ``instances`` are Enterprise instance names, ``personal`` new Personal instance ids
    (the part after ``crpi-``), ``buckets`` OSS bucket names. Raises UnknownRegion.
    """
    entries = acr_entries(region, [network])
    vpc = network == "vpc"
    registry = [e.pattern for e in entries if e.service == "registry" and "*" not in e.pattern]
    registry += [
        f"{name}-registry{'-vpc' if vpc else ''}.{region}.cr.aliyuncs.com" for name in instances
    ]
    registry += [
        f"crpi-{ident}{'-vpc' if vpc else ''}.{region}.personal.cr.aliyuncs.com"
        for ident in personal
    ]
    auth = [e.pattern for e in entries if e.service == "auth"]
    endpoint = f"oss-{region}{'-internal' if vpc else ''}.aliyuncs.com"
    oss = [endpoint] + [f"{bucket}.{endpoint}" for bucket in buckets]
    missing = None if list(buckets) else f"<bucket>.{endpoint}"
    return ClientNames(tuple(registry), tuple(auth), tuple(oss), missing)


def hosts_lines(relay: str, names: ClientNames) -> str:
    """/etc/hosts lines pointing ``names`` at the relay address."""
    ipaddress.ip_address(relay)  # a hosts file takes addresses only
    width = len(relay)
    lines = ["# acrrelay: point these names at the relay (append to /etc/hosts)"]
    for title, group in (("registry", names.registry), ("token service", names.auth)):
        lines.append(f"# {title}")
        lines += [f"{relay:<{width}}  {name}" for name in group]
    lines.append("# OSS (blob downloads are redirected here)")
    lines += [f"{relay:<{width}}  {name}" for name in names.oss]
    if names.missing_bucket is not None:
        lines += [
            "# The bucket host is not known yet, and a hosts file cannot hold a wildcard.",
            "# Find it as the host in the Location of a blob redirect:",
            "#   acrrelay doctor <registry host> --via <relay>:443 --image <ns>/<name>:<tag>",
            f"# then add:  {relay}  {names.missing_bucket}   (with the real bucket name),",
            "# or give --bucket NAME here.",
        ]
    return "\n".join(lines) + "\n"


def _proxy_url(relay: str, port: int, user: str | None) -> str:
    credentials = f"{user}:<password>@" if user else ""
    return f"http://{credentials}{host_port(relay, port)}"


def _systemd_drop_in(service: str, url: str) -> str:
    return f"""\
# {service} through the relay's CONNECT front door: a systemd drop-in,
# /etc/systemd/system/{service}.service.d/acrrelay-proxy.conf:
[Service]
Environment="HTTPS_PROXY={url}"
Environment="HTTP_PROXY={url}"
Environment="NO_PROXY=localhost,127.0.0.1"
# then: systemctl daemon-reload && systemctl restart {service}
"""


def dockerd_proxy(relay: str, port: int, user: str | None = None) -> str:
    """dockerd settings for HTTPS_PROXY mode: a systemd drop-in, or daemon.json (23.0+)."""
    url = _proxy_url(relay, port, user)
    return (
        _systemd_drop_in("docker", url)
        + f"""\
#
# or, with Docker 23.0 or newer, in /etc/docker/daemon.json:
#   {{"proxies": {{"https-proxy": "{url}", "http-proxy": "{url}",
#                 "no-proxy": "localhost,127.0.0.1"}}}}
"""
    )


def containerd_proxy(
    relay: str, port: int, registries: Sequence[str], user: str | None = None
) -> str:
    """containerd settings for HTTPS_PROXY mode: the systemd drop-in, and why no hosts.toml.

    A hosts.toml chooses which URL containerd asks for a registry's images (a mirror)
    and how to trust it; it cannot change the address a name is dialled at, so it has no
    part in either mode: with HTTPS_PROXY the environment sends every host (registry,
    token service, OSS) through the relay; in hosts-file mode the names and certificates
    stay the registry's own. A hosts.toml *can* send pulls past the relay, to a mirror,
    so the output says which files to check.
    """
    url = _proxy_url(relay, port, user)
    checks = "\n".join(
        f"#   /etc/containerd/certs.d/{registry}/hosts.toml" for registry in registries
    )
    return _systemd_drop_in("containerd", url) + (
        "#\n"
        "# No hosts.toml is needed: containerd takes HTTPS_PROXY from its environment for\n"
        "# the registry, its token service and the OSS redirects alike (and in hosts-file\n"
        "# mode the names and certificates stay the registry's own). A hosts.toml that\n"
        "# names a mirror would send pulls past the relay: if any of these files exists,\n"
        "# check that its server and [host] entries name the registry itself:\n"
        + checks
        + "\n#   /etc/containerd/certs.d/_default/hosts.toml\n"
    )
