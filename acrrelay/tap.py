"""twistd / twist glue: the options, and ``makeService``.

twist acrrelay --config etc/acrrelay.toml
twist acrrelay --listen tcp:8443 --acr cn-beijing --route registry.example=resolve

The service is a :class:`~acrrelay.service.SignalledRelayService`: SIGHUP re-reads the
configuration (the file and the same flags); SIGTERM and SIGINT drain for up to
``drain_timeout`` and exit 0, and a second one cuts what is left.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from twisted.application.service import IService
from twisted.internet.interfaces import IListeningPort
from twisted.python import usage

from acrrelay.config import ConfigError, Overlay, load_config
from acrrelay.configvalues import read_toml
from acrrelay.service import ProcessReactor, RelayService, SignalledRelayService
from acrrelay.workers import WorkerPool

__all__ = ["Options", "global_reactor", "makeService"]


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT]... [--route NAME=BACKEND]... [--acr REGION]..."
    longdesc = (
        "Relay TLS (by SNI) to Alibaba Cloud Container Registry and its token and OSS "
        "services. Flags add to --config, or replace it for a quick start."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/acrrelay.toml)."],
        ["access-log", None, None, 'Access log: "-" for stdout, a file path, or "off".'],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["route"] = []
        self["acr"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on a server endpoint string, e.g. tcp:8443 (repeatable)."""
        self["listen"].append(endpoint)

    def opt_route(self, route: str) -> None:
        """Route NAME (exact or *.suffix) to BACKEND (endpoint string or 'resolve'),
        written NAME=BACKEND (repeatable)."""
        self["route"].append(route)

    def opt_acr(self, region: str) -> None:
        """Route all ACR names of REGION (registry, token service, OSS) with
        backend 'resolve' (repeatable)."""
        self["acr"].append(region)

    def as_argv(self) -> list[str]:
        """These options again, as flags (for worker processes)."""
        argv = ["--config", self["config"]] if self["config"] else []
        for flag in ("listen", "route", "acr"):
            for value in self[flag]:
                argv += [f"--{flag}", value]
        if self["access-log"] is not None:
            argv += ["--access-log", self["access-log"]]
        return argv

    def overlay(self) -> Overlay:
        return Overlay(
            listen=tuple(self["listen"]),
            route=tuple(self["route"]),
            acr=tuple(self["acr"]),
            access_log=self["access-log"],
        )


def makeService(options: Options, reactor: ProcessReactor | None = None) -> IService:
    """The relay service for ``options``, on ``reactor`` (by default, the global one:
    this and the command line are the only places that use it)."""
    if reactor is None:
        reactor = global_reactor()
    path, overlay = options["config"], options.overlay()
    if path is not None and _runs_gateway(path):  # a [gateway] table: the gateway role
        from acrrelay.gateway.service import gateway_service_for

        gateway = gateway_service_for(path, overlay, reactor)
        if gateway is not None:
            return gateway
    try:
        config = load_config(path, overlay)
    except ConfigError as e:
        raise SystemExit(f"acrrelay: {e}") from None
    service = SignalledRelayService(
        config, reactor, config_loader=lambda: load_config(path, overlay)
    )
    if config.workers > 1:
        pool = WorkerPool(reactor, config.workers, _Ports(service), options.as_argv())
        pool.setServiceParent(service)  # started once the listeners are bound
        service.forward_signal = pool.signal
    return service


def global_reactor() -> ProcessReactor:
    """The installed reactor, for the entry points (twist, a worker process) only."""
    from twisted.internet import reactor

    # Twisted types it by the interfaces every reactor has; the ones Twisted installs on
    # Linux (epoll, poll, select) also provide IReactorFromThreads and IReactorSocket.
    return cast(ProcessReactor, reactor)


class _Ports:
    """The service's listening ports, read when the workers start (after binding)."""

    def __init__(self, service: RelayService) -> None:
        self._service = service

    def __iter__(self) -> Iterator[IListeningPort]:
        return iter(self._service.ports)


def _runs_gateway(path: str) -> bool:
    """Whether the file at ``path`` has a ``[gateway]`` table (an unreadable file is the
    relay's to report, as before)."""
    try:
        return "gateway" in read_toml(path)
    except ConfigError:
        return False
