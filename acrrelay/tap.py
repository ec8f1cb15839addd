"""twistd / twist glue: options, signals, and a service that exits cleanly when it cannot start.

twist acrrelay --config etc/acrrelay.toml
twist acrrelay --listen tcp:8443 --acr cn-beijing --route registry.example=resolve

SIGHUP re-reads the configuration (the file and the same flags); SIGTERM and SIGINT
drain for up to ``drain_timeout`` and exit 0.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from acrrelay.config import ConfigError, Overlay, load_config
from acrrelay.service import ListenError, RelayService
from acrrelay.workers import WorkerPool

__all__ = ["Options", "makeService"]


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


class _ExitingRelayService(RelayService):
    """As run by twist(d): a start-up failure is one line on stderr and a non-zero exit,
    and SIGHUP reloads."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            raise SystemExit(f"acrrelay: {e}") from None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenError as e:
            raise SystemExit(f"acrrelay: {e}") from None
        signal.signal(signal.SIGHUP, self._on_sighup)
        # After the reactor installs its own handlers: ours drain and exit 0, where the
        # reactor's would end the process by the signal once it stops.
        self.reactor.callWhenRunning(self._install_stop_handlers)

    def _install_stop_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    pool: WorkerPool | None = None

    def _on_sighup(self, signum: int, frame: object) -> None:
        # Not here, in the middle of whatever the signal interrupted: in the reactor.
        self.reactor.callFromThread(self.reload)
        if self.pool is not None:
            self.reactor.callFromThread(self.pool.signal, signal.SIGHUP)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self.draining:
            # A second stop signal while draining: cut what is left now.
            self.reactor.callFromThread(self.cut_now)
        else:
            self.reactor.callFromThread(self.start_shutdown)

    def stopService(self):  # type: ignore[no-untyped-def]
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late reload must not race the drain
        if self.pool is not None:
            self.pool.signal(signal.SIGTERM)  # workers drain alongside, not afterwards
        return super().stopService()


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    path, overlay = options["config"], options.overlay()
    if path is not None:  # a file with a [gateway] table runs the gateway role
        from acrrelay.gateway.service import gateway_service_for

        gateway = gateway_service_for(path, overlay, reactor)
        if gateway is not None:
            return gateway
    try:
        config = load_config(path, overlay)
    except ConfigError as e:
        raise SystemExit(f"acrrelay: {e}") from None
    service: Any = _ExitingRelayService(
        config, reactor, config_loader=lambda: load_config(path, overlay)
    )
    if config.workers > 1:
        pool = WorkerPool(reactor, config.workers, _Ports(service), options.as_argv())
        pool.setServiceParent(service)  # started once the listeners are bound
        service.pool = pool
    return service  # type: ignore[no-any-return]


class _Ports:
    """The service's listening ports, read when the workers start (after binding)."""

    def __init__(self, service: RelayService) -> None:
        self._service = service

    def __iter__(self) -> Any:
        return iter(self._service.ports)
