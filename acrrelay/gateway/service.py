"""The gateway as a Twisted service: listeners, TLS, the HTTP side, store, metrics, reload.

    relay, gateway = load_gateway("etc/gateway.toml")
    service = make_gateway_service(relay, gateway, reactor)

Listeners come from ``[[listen]]`` and terminate TLS for the routed names; the routes say both
which names are served and how each upstream is reached. A reload (:meth:`GatewayService.apply`)
changes routes, limits (cap, proof time, timeouts) and the access log for new requests without
cutting a transfer. Stopping stops accepting, lets requests in flight finish for up to
``drain_timeout``, then cuts the rest.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure

from acrrelay.accesslog import AccessLog
from acrrelay.backends import BackendConnector
from acrrelay.config import ConfigError, ListenerConfig, RelayConfig, format_duration
from acrrelay.gateway.app import GatewayHandler
from acrrelay.gateway.ca import CAError, load_ca
from acrrelay.gateway.cache import BlobPath
from acrrelay.gateway.config import GatewayConfig, load_gateway
from acrrelay.gateway.metrics import gateway_registry
from acrrelay.gateway.proof import ProofCache
from acrrelay.gateway.server import Exchange, GatewayHTTPFactory
from acrrelay.gateway.shell import gateway_namespace
from acrrelay.gateway.store import BlobStore
from acrrelay.gateway.tls import SNIServerContexts, tls_factory
from acrrelay.gateway.upstream import Upstream, UpstreamEndpoints, trust_root
from acrrelay.listening import ExitsOnListenError
from acrrelay.metrics import metrics_site
from acrrelay.routing import Door, ListenerPolicy, Policy, Refusal, Route, client_ip
from acrrelay.service import ListenError

__all__ = ["GatewayService", "gateway_service_for", "make_gateway_service"]

Loader = Callable[[], tuple[RelayConfig, GatewayConfig | None]]


def _describe(address: Any) -> str:
    host, port = getattr(address, "host", "?"), getattr(address, "port", "?")
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _policy(config: RelayConfig) -> Policy:
    return Policy(
        config.route_table(),
        {
            listener.name: ListenerPolicy(
                frozenset(listener.protocols), listener.allow, listener.deny
            )
            for listener in config.listeners
        },
    )


class GatewayService(MultiService):
    """Runs the gateway on every configured listener, with the metrics page if configured."""

    _log = Logger(namespace="acrrelay.gateway.service")

    def __init__(
        self,
        config: RelayConfig,
        gateway: GatewayConfig,
        reactor: Any,
        *,
        access_observer: ILogObserver | None = None,
        config_loader: Loader | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.gateway = gateway
        self.config_loader = config_loader
        self.ca = load_ca(Path(gateway.ca))
        self.store = BlobStore(Path(gateway.cache_dir), gateway.cache_size)
        self.proofs = ProofCache(gateway.proof_ttl, reactor)
        self.policy = _policy(config)
        self.connector = self._connector(config)
        endpoints = UpstreamEndpoints(
            reactor,
            lambda: self.policy.table,
            lambda: self.connector,
            trust=trust_root(gateway.upstream_ca),
            proxy=gateway.upstream_proxy,
        )
        self.upstream = Upstream(reactor, endpoints, timeout=gateway.upstream_timeout)
        self.blobs = BlobPath(reactor, self.store, self.upstream, self.proofs)
        self.handler = GatewayHandler(self.upstream, self.blobs)
        self.metrics_registry = gateway_registry(self.blobs.stats, self.store.stats)
        self._access_observer = access_observer
        self.access_log: AccessLog | None = None
        self._set_access_log(config)
        self.access = Logger(namespace="acrrelay.access", observer=cast(ILogObserver, self._emit))
        self._ids = itertools.count(1)
        self.refusals: dict[str, int] = {}
        self.connections: set[Any] = set()
        self._ports: list[tuple[IListeningPort, ListenerConfig]] = []
        self._admin_ports: list[IListeningPort] = []

    def _connector(self, config: RelayConfig) -> BackendConnector:
        guard = getattr(getattr(self, "connector", None), "guard", None)
        return BackendConnector(
            self.reactor, hosts=config.hosts, connect_timeout=config.connect_timeout, guard=guard
        )

    def _set_access_log(self, config: RelayConfig) -> None:
        if self._access_observer is not None:
            return
        target = config.access_log
        if self.access_log is not None and self.access_log.target == target:
            return
        if self.access_log is not None:
            self.access_log.close()
        self.access_log = AccessLog(target) if target is not None else None
        if self.access_log is not None and self.running:
            self.access_log.open()

    def _emit(self, event: LogEvent) -> None:
        if self._access_observer is not None:
            self._access_observer(event)
        elif self.access_log is not None:
            self.access_log(event)

    # -- per listener

    def _decide(self, listener: ListenerConfig) -> Callable[[str | None, str], Route | Refusal]:
        door = Door(listener.name, "tls")
        port = listener.target_port or 443

        def decide(name: str | None, client: str) -> Route | Refusal:
            return self.policy.decide(door, name, port, client)

        return decide

    def _refused(self, refusal: Refusal) -> None:
        self.refusals[refusal.reason] = self.refusals.get(refusal.reason, 0) + 1

    def _factory(self, listener: ListenerConfig) -> Any:
        contexts = SNIServerContexts(self.ca, self._decide(listener), refused=self._refused)
        http = _TrackingHTTPFactory(
            self.handler,
            self.reactor,
            idle_timeout=self.config.idle_timeout,
            first_timeout=self.config.peek_timeout,
            done=lambda exchange, how: self._done(listener, exchange, how),
        )
        http.connections = self.connections
        return tls_factory(contexts, http)

    def _done(self, listener: ListenerConfig, exchange: Exchange, how: str) -> None:
        now = self.reactor.seconds()
        self.access.info(
            "{method} {sni}{target} {status} {cache}",
            id=next(self._ids),
            listener=listener.name,
            client=exchange.client,
            front_door="tls",
            sni=exchange.host,
            # The path only: a query may carry upload state or signatures.
            target=exchange.target.partition("?")[0],
            method=exchange.method,
            status=exchange.status or None,
            cache=exchange.cache,
            bytes_up=exchange.bytes_in,
            bytes_down=exchange.bytes_out,
            total_ms=round((now - exchange.started) * 1000, 1),
            close_reason=None if how == "done" else how,
            detail=exchange.detail,
        )

    # -- start and stop

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind()
        if self.access_log is not None:
            self.access_log.open()
        super().startService()
        for port, listener in self._ports:
            # Tests and scripts read "listening on HOST:PORT" to learn a port-0 listener's port.
            self._log.info(
                "listening on {address} ({listener}) with {routes} routes",
                address=_describe(port.getHost()),
                listener=listener.name,
                routes=len(self.config.routes),
            )

    def _bind(self) -> None:
        if self._ports:
            return
        try:
            for listener in self.config.listeners:
                self._ports.append(
                    (self._listen(listener.endpoint, self._factory(listener)), listener)
                )
            if self.config.admin.ssh is not None:
                self._bind_shell(self.config.admin.ssh)
            if self.config.admin.metrics is not None:
                site = metrics_site(self.metrics_registry)
                port = self._listen(self.config.admin.metrics, site)
                self._admin_ports.append(port)
                self._log.info(
                    "metrics on http://{address}/metrics", address=_describe(port.getHost())
                )
        except ListenError:
            for port in [p for p, _ in self._ports] + self._admin_ports:
                port.stopListening()
            self._ports, self._admin_ports = [], []
            raise
        # A resolve route must never loop back into the gateway's own listeners.
        own = [
            (getattr(p.getHost(), "host", ""), getattr(p.getHost(), "port", 0))
            for p, _ in self._ports
        ]
        self.connector.guard.set_own(
            [(ipaddress.ip_address(h), port) for h, port in own if client_ip(h) is not None]
        )

    def _bind_shell(self, endpoint: str) -> None:
        # conch imports the global reactor: only a configured shell may pay for that.
        from acrrelay.admin.ssh import (
            KeyFileError,
            host_key,
            make_ssh_factory,
            read_authorized_keys,
        )

        admin = self.config.admin
        try:
            assert admin.authorized_keys is not None
            authorized = {admin.ssh_user.encode(): read_authorized_keys(admin.authorized_keys)}
            factory = make_ssh_factory(
                gateway_namespace(self), authorized=authorized, server_key=host_key(admin.host_key)
            )
        except KeyFileError as e:
            raise ListenError(f"cannot start the SSH shell: {e}") from None
        port = self._listen(endpoint, factory)
        self._admin_ports.append(port)
        self._log.info("admin shell on {address}", address=_describe(port.getHost()))

    def addresses(self) -> list[Any]:
        """The bound gateway listeners' addresses, in listener order (port 0 shows the port)."""
        return [port.getHost() for port, _ in self._ports]

    def _listen(self, description: str, factory: Any) -> IListeningPort:
        outcome: list[Any] = []
        serverFromString(self.reactor, description).listen(factory).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            why = outcome[0].getErrorMessage() if outcome else "it did not bind at once"
            raise ListenError(f"cannot listen on {description}: {why}")
        return cast(IListeningPort, outcome[0])

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        ports, self._ports = self._ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p, _ in ports])
        yield self.drain(self.config.drain_timeout)
        yield super().stopService()
        admin, self._admin_ports = self._admin_ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in admin])
        yield self.upstream.close()
        if self.access_log is not None:
            self.access_log.close()

    @defer.inlineCallbacks
    def drain(self, deadline: float):  # type: ignore[no-untyped-def]
        """Wait up to ``deadline`` seconds for requests in flight, then cut what is left."""
        end = self.reactor.seconds() + deadline
        if any(c.exchange is not None for c in self.connections):
            self._log.info(
                "draining {count} connections for up to {deadline}",
                count=len(self.connections),
                deadline=format_duration(deadline),
            )
        while self.reactor.seconds() < end:
            busy = [c for c in self.connections if c.exchange is not None]
            if not busy:
                break
            yield deferLater(self.reactor, 0.1, lambda: None)
        for connection in list(self.connections):
            connection.transport.abortConnection()

    # -- reload

    def reload(self) -> str:
        if self.config_loader is None:
            return "reload: this gateway was given a configuration, not a file to read again"
        try:
            config, gateway = self.config_loader()
        except ConfigError as e:
            return self._reload_failed(str(e))
        if gateway is None:
            return self._reload_failed(
                "the [gateway] table is gone: switching role needs a restart"
            )
        return self.apply(config, gateway)

    def apply(self, config: RelayConfig, gateway: GatewayConfig) -> str:
        """Use new routes and limits for new requests; transfers in flight go on."""
        endpoints = [listener.endpoint for listener in config.listeners]
        if endpoints != [listener.endpoint for listener in self.config.listeners]:
            return self._reload_failed("adding or removing gateway listeners needs a restart")
        if (gateway.ca, gateway.cache_dir) != (self.gateway.ca, self.gateway.cache_dir):
            return self._reload_failed("changing ca or cache_dir needs a restart")
        self.policy = _policy(config)
        self.connector = self._connector(config)
        self.store.set_cap(gateway.cache_size)
        self.proofs.ttl = gateway.proof_ttl
        self.upstream.timeout = gateway.upstream_timeout
        self.config, self.gateway = config, gateway
        self._set_access_log(config)
        if self.access_log is not None and self.access_log.is_open:
            self.access_log.reopen()
        self._log.info("reloaded {source}", source=config.source)
        return f"reloaded {config.source}"

    def _reload_failed(self, why: str) -> str:
        self._log.error("reload rejected, the previous configuration stays: {why}", why=why)
        return f"reload rejected, the previous configuration stays: {why}"


class _TrackingHTTPFactory(GatewayHTTPFactory):
    """Keeps the set of open connections, for draining."""

    connections: set[Any]

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        connections = self.connections
        lost = protocol.connectionLost

        def connection_lost(reason: Failure = Failure(Exception())) -> None:  # noqa: B008
            connections.discard(protocol)
            lost(reason)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        connections.add(protocol)
        return protocol


def make_gateway_service(
    config: RelayConfig,
    gateway: GatewayConfig,
    reactor: Any,
    *,
    access_observer: ILogObserver | None = None,
    config_loader: Loader | None = None,
) -> GatewayService:
    """Build the gateway service for ``config`` and its ``[gateway]`` table on ``reactor``."""
    return GatewayService(
        config, gateway, reactor, access_observer=access_observer, config_loader=config_loader
    )


def gateway_service_for(path: str, overlay: Any, reactor: Any) -> GatewayService | None:
    """The gateway service if ``path`` has a ``[gateway]`` table, else None (the relay's role).

    For the tap: a bad file or an unbindable listener exits with one line on stderr."""
    try:
        config, gateway = load_gateway(path, overlay)
    except ConfigError as e:
        raise SystemExit(f"acrrelay: {e}") from None
    if gateway is None:
        return None
    try:
        return _ExitingGatewayService(
            config, gateway, reactor, config_loader=lambda: load_gateway(path, overlay)
        )
    except (CAError, OSError) as e:
        raise SystemExit(f"acrrelay: {e}") from None


class _ExitingGatewayService(ExitsOnListenError, GatewayService):
    """As run by twist(d): a start-up failure is one line on stderr and a non-zero exit;
    SIGHUP reloads."""

    def startService(self) -> None:
        super().startService()
        import signal

        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
