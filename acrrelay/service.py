"""The library entry point: a Twisted service that runs the relay.

Embed it in any Twisted program::

    from twisted.internet import reactor
    from acrrelay import load_config, make_relay_service

    service = make_relay_service(load_config("etc/acrrelay.toml"), reactor)
    service.startService()        # raises ListenError if a port cannot be bound
    reactor.run()

Each listener, the admin shell and the metrics page is a child
:class:`~acrrelay.listening.ListeningService`. The service binds them all in
``privilegedStartService`` (so ``twistd`` can bind 443 before dropping privileges)
or, failing that, in ``startService``. A listener that cannot bind raises
:class:`ListenError` there, naming the endpoint and the reason; nothing is left
half-bound. Stopping drains (:mod:`acrrelay.drain`) before the children stop.

:class:`SignalledRelayService` is the same service as a process runs it (``twist``,
a worker): SIGHUP reloads, SIGTERM and SIGINT drain, a start-up failure exits.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import Logger

from acrrelay.addresses import describe_address as describe
from acrrelay.admin.shell import namespace
from acrrelay.config import RELAY_SETTINGS, ConfigError, ListenerConfig, RelayConfig
from acrrelay.drain import Clock, Drain, cut_all
from acrrelay.limits import connections_for, local_addresses, own_endpoints, raise_fd_limit
from acrrelay.listening import ExitsOnListenError, ListenError, ListeningService, listen_now
from acrrelay.metrics import metrics_site
from acrrelay.peek import RelayFactory
from acrrelay.relay import AccessObserver, Relay
from acrrelay.workers import PoolReactor

if TYPE_CHECKING:
    from twisted.conch.manhole_ssh import ConchFactory
    from twisted.conch.ssh.keys import Key

__all__ = [
    "ListenError",
    "ProcessReactor",
    "RelayReactor",
    "RelayService",
    "SignalledRelayService",
    "describe_changes",
    "make_relay_service",
    "raise_fd_limit",
]

#: Why a reload is refused while draining: the listeners are closed for good by then, and a
#: reload would bind added ones again and accept on them.
RELOAD_WHILE_DRAINING: Final = "draining: a relay that is stopping takes no new configuration"


class RelayReactor(Clock, Protocol):
    """What the service uses of its reactor, besides what endpoints and the relay use."""

    def stop(self) -> None: ...

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None: ...

    def callWhenRunning(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> Any: ...

    def adoptStreamPort(
        self, fileDescriptor: int, addressFamily: Any, factory: IProtocolFactory
    ) -> IListeningPort: ...


class ProcessReactor(RelayReactor, PoolReactor, Protocol):
    """The reactor of a process that runs the relay, with worker processes if configured."""


class RelayListening(ListeningService):
    """One ``[[listen]]`` listener: its port and the factory its connections come from."""

    def __init__(self, factory: RelayFactory, bind: Callable[[RelayFactory], IListeningPort]):
        super().__init__(lambda: bind(factory))
        self.factory = factory


class RelayService(MultiService):
    """Runs a :class:`~acrrelay.relay.Relay` on every configured listener, with the admin
    shell and metrics if configured.

    :meth:`reload` re-reads the configuration (``config_loader``) and applies it to new
    connections without touching established ones; stopping drains for up to
    ``drain_timeout`` first.
    """

    _log = Logger(namespace="acrrelay.service")

    def __init__(
        self,
        config: RelayConfig,
        reactor: RelayReactor,
        *,
        access_observer: AccessObserver | None = None,
        config_loader: Callable[[], RelayConfig] | None = None,
        adopt: Sequence[tuple[int, int]] = (),
        worker: int = 1,
    ) -> None:
        super().__init__()
        if adopt and len(adopt) != len(config.listeners):
            raise ValueError(f"{len(adopt)} sockets to adopt for {len(config.listeners)} listeners")
        self.reactor = reactor
        self.config = config
        self.config_loader = config_loader
        #: Listening sockets inherited from the main process: (fd, address family) each.
        self._adopt = list(adopt)
        self.worker = worker
        self.relay = Relay(config, reactor, access_observer=access_observer)
        self.relay.worker = worker
        self._listeners: dict[str, RelayListening] = {}
        for index, listener in enumerate(config.listeners):
            child = self._listening(listener, index)
            child.setServiceParent(self)
            self._listeners[listener.endpoint] = child
        self._ssh_factory: ConchFactory | None = None
        if worker == 1 and config.admin.ssh is not None:
            ListeningService(self._listen_ssh).setServiceParent(self)
        if worker == 1 and config.admin.metrics is not None:
            ListeningService(self._listen_metrics).setServiceParent(self)
        self._drain_deadline: float | None = None
        self.draining = False

    @property
    def ports(self) -> list[IListeningPort]:
        """The relay's listening ports, in listener order (not the admin ones)."""
        children = (self._listeners.get(listener.endpoint) for listener in self.config.listeners)
        return [child.port for child in children if child is not None and child.port is not None]

    def addresses(self) -> list[Any]:
        """The bound addresses, in listener order (port 0 shows the port chosen)."""
        return [port.getHost() for port in self.ports]

    def privilegedStartService(self) -> None:
        self._listen_all()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen_all()
        self._apply_limits()
        self.relay.open()
        super().startService()
        for port, listener in zip(self.ports, self.config.listeners, strict=False):
            if self.worker > 1:
                self._log.info(
                    "worker {worker} serving {address} ({listener})",
                    worker=self.worker,
                    address=describe(port.getHost()),
                    listener=listener.name,
                )
                continue
            # Tests and scripts read "listening on HOST:PORT" to learn a port-0 listener's port.
            self._log_listening(port, listener)

    def stopService(self) -> defer.Deferred[None]:
        deadline = self._drain_deadline
        drained = self.drain(self.config.drain_timeout if deadline is None else deadline)
        drained.addCallback(lambda _: MultiService.stopService(self))
        drained.addCallback(lambda _: self.relay.close())
        return drained

    def _listen_all(self) -> None:
        """Bind every child that listens, in order; if one cannot, release them all."""
        children = [child for child in self if isinstance(child, ListeningService)]
        try:
            for child in children:
                child.listen()
        except ListenError:
            for child in children:
                child.unbind()
            raise

    def _listening(self, listener: ListenerConfig, index: int) -> RelayListening:
        factory = RelayFactory(self.relay, listener)
        if self._adopt:
            fd, family = self._adopt[index]
            return RelayListening(factory, lambda f: self.reactor.adoptStreamPort(fd, family, f))
        return RelayListening(factory, lambda f: listen_now(self.reactor, listener.endpoint, f))

    def _log_listening(self, port: IListeningPort, listener: ListenerConfig) -> None:
        self._log.info(
            "listening on {address} ({listener}) with {routes} routes",
            address=describe(port.getHost()),
            listener=listener.name,
            routes=len(self.config.routes),
        )

    # -- reload

    def reload(self) -> str:
        """Re-read the configuration and apply it; a summary of what changed, or why not."""
        if self.config_loader is None:
            return "reload: this relay was given a configuration, not a file to read again"
        if self.draining:
            return self._reload_failed(RELOAD_WHILE_DRAINING)
        try:
            config = self.config_loader()
        except ConfigError as e:
            return self._reload_failed(str(e))
        return self.apply(config)

    def apply(self, config: RelayConfig) -> str:
        """Use ``config`` for new connections; established ones are not touched.

        Refused while draining: nothing is bound and the old configuration stays."""
        if self.draining:
            return self._reload_failed(RELOAD_WHILE_DRAINING)
        old = self.config
        new_endpoints = {listener.endpoint for listener in config.listeners}
        if (self._adopt or old.workers > 1) and set(self._listeners) != new_endpoints:
            return self._reload_failed("with workers, adding or removing listeners needs a restart")
        try:
            keys = self._admin_keys(config)
            added = self._listen_added(config)
        except (ConfigError, ListenError) as e:
            return self._reload_failed(str(e))
        self.relay.apply(config)
        for endpoint in set(self._listeners) - new_endpoints:
            self._listeners.pop(endpoint).disownServiceParent()  # its connections go on
        for listener in config.listeners:
            child = self._listeners.get(listener.endpoint) or added[listener.endpoint]
            child.factory.listener = listener  # new connections see the new listener settings
            if listener.endpoint in added:
                child.setServiceParent(self)
            self._listeners[listener.endpoint] = child
        self.config = config
        self._apply_limits()
        for child in added.values():
            assert child.port is not None
            self._log_listening(child.port, child.factory.listener)
        if self.relay.access_log is not None and self.relay.access_log.is_open:
            self.relay.access_log.reopen()  # after logrotate moved it away
        if keys is not None and self._ssh_factory is not None:
            from acrrelay.admin.ssh import ssh_portal

            self._ssh_factory.portal = ssh_portal(namespace(self), keys)
        summary = describe_changes(old, config)
        self.relay.stats.reloads["ok"] += 1
        self._log.info("reloaded {source}: {summary}", source=config.source, summary=summary)
        return f"reloaded {config.source}: {summary}"

    def _listen_added(self, config: RelayConfig) -> dict[str, RelayListening]:
        """Bind the listeners ``config`` adds; if one cannot, release them and raise."""
        added: dict[str, RelayListening] = {}
        try:
            for index, listener in enumerate(config.listeners):
                if listener.endpoint not in self._listeners:
                    added[listener.endpoint] = self._listening(listener, index)
                    added[listener.endpoint].listen()
        except ListenError:
            for child in added.values():
                child.unbind()
            raise
        return added

    def _reload_failed(self, why: str) -> str:
        self.relay.stats.reloads["failed"] += 1
        self._log.error("reload rejected, the previous configuration stays: {why}", why=why)
        return f"reload rejected, the previous configuration stays: {why}"

    # -- drain and stop

    def start_shutdown(self, seconds: float | None = None) -> float:
        """Drain for ``seconds`` (default: drain_timeout), then stop the reactor."""
        deadline = self.config.drain_timeout if seconds is None else seconds
        if self._drain_deadline is None:
            self._drain_deadline = deadline
            self.reactor.callLater(0, self.reactor.stop)
        return self._drain_deadline

    def cut_now(self) -> None:
        """Cut every connection at once, each logged (a second stop signal while draining)."""
        cut_all(self.relay, self.reactor, self._log, "cutting now:")

    def drain(self, deadline: float) -> defer.Deferred[None]:
        """Stop accepting; wait up to ``deadline`` seconds for connections to finish, logging
        what remains; then cut the rest and log each. Fires when none is left."""
        self.draining = True
        self.relay.draining = True
        self.relay.accepting = False
        self.relay.watch_ports([])
        listeners, self._listeners = list(self._listeners.values()), {}
        for child in listeners:
            child.disownServiceParent()
            child.unbind()  # also when the service never started
        return Drain(self.relay, self.reactor, deadline, self._log).start()

    # -- limits and the admin listeners

    def _apply_limits(self) -> None:
        self.relay.watch_ports(self.ports)
        self.relay.connector.guard.set_own(own_endpoints(self.addresses(), local_addresses))
        if not self.config.max_connections:
            fd_limit = raise_fd_limit()
            self.relay.max_connections = connections_for(fd_limit)
            self._log.info(
                "at most {limit} connections at once ({fds} file descriptors)",
                limit=self.relay.max_connections,
                fds=fd_limit,
            )

    def _admin_keys(self, config: RelayConfig) -> dict[bytes, list[Key]] | None:
        """The shell's users and keys under ``config``; None without a shell."""
        admin = config.admin
        if admin.ssh is None or admin.authorized_keys is None:
            return None
        # conch (which imports the global reactor) only for a relay with a shell.
        from acrrelay.admin.ssh import KeyFileError, read_authorized_keys

        try:
            return {admin.ssh_user.encode(): read_authorized_keys(admin.authorized_keys)}
        except KeyFileError as e:
            raise ConfigError(config.source, "admin.authorized_keys", str(e)) from None

    def _listen_ssh(self) -> IListeningPort:
        from acrrelay.admin.ssh import KeyFileError, host_key, make_ssh_factory

        admin = self.config.admin
        assert admin.ssh is not None
        try:
            server_key = host_key(admin.host_key)
            keys = self._admin_keys(self.config) or {}
        except (KeyFileError, ConfigError) as e:
            why = e.message if isinstance(e, ConfigError) else str(e)
            raise ListenError(f"cannot start the SSH shell: {why}") from None
        factory = make_ssh_factory(namespace(self), authorized=keys, server_key=server_key)
        port = listen_now(self.reactor, admin.ssh, factory)
        self._ssh_factory = factory
        address = port.getHost()
        self._log.info(
            "admin shell on {address}: ssh -p {port} {user}@{host}",
            address=describe(address),
            port=getattr(address, "port", "?"),
            user=admin.ssh_user,
            host=getattr(address, "host", "?"),
        )
        return port

    def _listen_metrics(self) -> IListeningPort:
        assert self.config.admin.metrics is not None
        site = metrics_site(self.relay.metrics.registry)
        port = listen_now(self.reactor, self.config.admin.metrics, site)
        self._log.info("metrics on http://{address}/metrics", address=describe(port.getHost()))
        return port


class SignalledRelayService(ExitsOnListenError, RelayService):
    """The relay as a process runs it (``twist``, a worker): a start-up failure is one line
    on stderr and a non-zero exit; SIGHUP reloads; SIGTERM and SIGINT drain and exit 0, and
    a second one while draining cuts what is left."""

    #: Told of every SIGHUP and SIGTERM too: the worker pool, in the main process.
    forward_signal: Callable[[int], None] | None = None

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._on_sighup)
        # After the reactor installs its own handlers: ours drain and exit 0, where the
        # reactor's would end the process by the signal once it stops.
        self.reactor.callWhenRunning(self._install_stop_handlers)

    def _install_stop_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)

    def _on_sighup(self, signum: int, frame: object) -> None:
        # Not here, in the middle of whatever the signal interrupted: in the reactor.
        self.reactor.callFromThread(self.reload)
        if self.forward_signal is not None:
            self.reactor.callFromThread(self.forward_signal, signal.SIGHUP)

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        if self.draining:
            self.reactor.callFromThread(self.cut_now)
        else:
            self.reactor.callFromThread(self.start_shutdown)

    def stopService(self) -> defer.Deferred[None]:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a late reload must not race the drain
        if self.forward_signal is not None:
            self.forward_signal(signal.SIGTERM)  # workers drain alongside, not afterwards
        return super().stopService()


def describe_changes(old: RelayConfig, new: RelayConfig) -> str:
    """A one-line summary of what a reload changes."""
    # A route's origin names its position in the file; moving it changes nothing.
    old_routes = {route.name: attrs.evolve(route, origin="") for route in old.routes}
    new_routes = {route.name: attrs.evolve(route, origin="") for route in new.routes}
    added = [name for name in new_routes if name not in old_routes]
    removed = [name for name in old_routes if name not in new_routes]
    changed = [
        name for name in new_routes if name in old_routes and new_routes[name] != old_routes[name]
    ]
    old_listeners = {listener.endpoint for listener in old.listeners}
    new_listeners = {listener.endpoint for listener in new.listeners}
    parts = [
        f"routes +{len(added)} -{len(removed)} ~{len(changed)} (now {len(new_routes)})",
        f"listeners +{len(new_listeners - old_listeners)} -{len(old_listeners - new_listeners)}",
    ]
    for title, names in (("added", added), ("removed", removed), ("changed", changed)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{title}: {shown}")
    settings = [
        f"{setting.name} {setting.show(setting.of(old))} -> {setting.show(setting.of(new))}"
        + ("" if setting.reloadable else " (at restart)")
        for setting in RELAY_SETTINGS
        if setting.of(old) != setting.of(new)
    ]
    if settings:
        parts.append("settings: " + ", ".join(settings))
    if old.admin != new.admin:
        parts.append("admin listener changes take effect at restart")
    return "; ".join(parts)


def make_relay_service(
    config: RelayConfig,
    reactor: RelayReactor,
    *,
    access_observer: AccessObserver | None = None,
    config_loader: Callable[[], RelayConfig] | None = None,
) -> RelayService:
    """Build the relay service for ``config`` on ``reactor``.

    ``access_observer`` receives one ``twisted.logger`` event per connection (see
    :mod:`acrrelay.accesslog` for the fields); by default the events are written as
    JSON lines to ``config.access_log``. ``config_loader`` is what :meth:`RelayService.reload`
    calls to read the configuration again (for example ``lambda: load_config(path)``).
    """
    return RelayService(
        config, reactor, access_observer=access_observer, config_loader=config_loader
    )
