"""The library entry point: a Twisted service that runs the relay.

Embed it in any Twisted program::

    from twisted.internet import reactor
    from acrrelay import load_config, make_relay_service

    service = make_relay_service(load_config("etc/acrrelay.toml"), reactor)
    service.startService()        # raises ListenError if a port cannot be bound
    reactor.run()

The service binds its listeners in ``privilegedStartService`` (so ``twistd`` can
bind 443 before dropping privileges) or, failing that, in ``startService``. A
listener that cannot bind raises :class:`ListenError` there, naming the
endpoint and the reason; nothing is left half-bound.
"""

from __future__ import annotations

import ipaddress
import re
import resource
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import attrs
import psutil
from twisted.application.service import MultiService
from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from acrrelay.admin.shell import namespace
from acrrelay.admin.ssh import (
    KeyFileError,
    host_key,
    make_ssh_factory,
    read_authorized_keys,
    ssh_portal,
)
from acrrelay.config import (
    RELAY_SETTINGS,
    ConfigError,
    ListenerConfig,
    RelayConfig,
    format_duration,
)
from acrrelay.metrics import metrics_site
from acrrelay.peek import RelayFactory, describe
from acrrelay.relay import AccessObserver, Relay

__all__ = ["ListenError", "RelayService", "make_relay_service", "raise_fd_limit"]

#: Descriptors kept back from the connection limit: listeners, logs, resolver threads
#: (an eighth of the limit, between 16 and 64).
FD_RESERVE_MIN: Final = 16
FD_RESERVE_MAX: Final = 64

#: While draining, how often the connections still open are logged, and how many by name.
DRAIN_REPORT_EVERY: Final = 10.0
DRAIN_REPORT_NAMES: Final = 10

#: Why a reload is refused while draining: the listeners are closed for good by then, and a
#: reload would bind added ones again and accept on them.
RELOAD_WHILE_DRAINING: Final = "draining: a relay that is stopping takes no new configuration"


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connections_for(fd_limit: int) -> int:
    """How many relayed connections fit in ``fd_limit`` descriptors (two each)."""
    reserve = max(FD_RESERVE_MIN, min(FD_RESERVE_MAX, fd_limit // 8))
    return max(1, (fd_limit - reserve) // 2)


def local_addresses() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address of this machine's interfaces."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            try:
                found.append(ipaddress.ip_address(address.address.split("%")[0]))
            except ValueError:
                continue  # MAC addresses and the like
    return found


class ListenError(Exception):
    """A listener could not be bound. The message names the endpoint and the reason."""


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
        reactor: Any,
        *,
        access_observer: AccessObserver | None = None,
        config_loader: Callable[[], RelayConfig] | None = None,
        adopt: Sequence[tuple[int, int]] = (),
        worker: int = 1,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.config_loader = config_loader
        #: Listening sockets inherited from the main process: (fd, address family) each.
        self._adopt = list(adopt)
        self.worker = worker
        self.relay = Relay(config, reactor, access_observer=access_observer)
        self.relay.worker = worker
        self._listening: dict[str, tuple[IListeningPort, RelayFactory]] = {}
        self._admin_ports: list[IListeningPort] = []
        self._ssh_factory: Any = None
        self._bound = False
        self._drain_deadline: float | None = None
        self.draining = False

    @property
    def ports(self) -> list[IListeningPort]:
        """The relay's listening ports, in listener order (not the admin ones)."""
        return [port for port, _ in self._listening.values()]

    def privilegedStartService(self) -> None:
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind()
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
            self._log.info(
                "listening on {address} ({listener}) with {routes} routes",
                address=describe(port.getHost()),
                listener=listener.name,
                routes=len(self.config.routes),
            )

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[no-untyped-def]
        deadline = self._drain_deadline
        yield self.drain(self.config.drain_timeout if deadline is None else deadline)
        yield super().stopService()
        admin, self._admin_ports = self._admin_ports, []
        yield defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in admin])
        self._bound = False
        self.relay.close()

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
        old_endpoints = {listener.endpoint for listener in old.listeners}
        new_endpoints = {listener.endpoint for listener in config.listeners}
        if (self._adopt or old.workers > 1) and old_endpoints != new_endpoints:
            return self._reload_failed("with workers, adding or removing listeners needs a restart")
        added: list[tuple[str, tuple[IListeningPort, RelayFactory]]] = []
        try:
            for listener in config.listeners:
                if listener.endpoint not in old_endpoints:
                    added.append((listener.endpoint, self._listen_now(listener)))
        except ListenError as e:
            for _, (port, _) in added:
                port.stopListening()
            return self._reload_failed(str(e))
        self.relay.apply(config)
        listening: dict[str, tuple[IListeningPort, RelayFactory]] = {}
        fresh = dict(added)
        for listener in config.listeners:
            port, factory = self._listening.get(listener.endpoint) or fresh[listener.endpoint]
            factory.listener = listener  # new connections see the new listener settings
            listening[listener.endpoint] = (port, factory)
        for endpoint, (port, _) in self._listening.items():
            if endpoint not in new_endpoints:
                port.stopListening()  # its established connections go on
        self._listening = listening
        self.config = config
        self._apply_limits()
        for _, (port, factory) in added:
            self._log.info(
                "listening on {address} ({listener}) with {routes} routes",
                address=describe(port.getHost()),
                listener=factory.listener.name,
                routes=len(config.routes),
            )
        if self.relay.access_log is not None and self.relay.access_log.is_open:
            self.relay.access_log.reopen()  # after logrotate moved it away
        self._refresh_admin_keys()
        summary = describe_changes(old, config)
        self.relay.stats.reloads["ok"] += 1
        self._log.info("reloaded {source}: {summary}", source=config.source, summary=summary)
        return f"reloaded {config.source}: {summary}"

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
        now = self.reactor.seconds()
        for connection in list(self.relay.connections.values()):
            self._log.warn(
                "cutting {id} {client} -> {target} now ({up} up, {down} down, {state})",
                **_connection_fields(connection, now),
            )
            connection.kill("drained")

    def drain(self, deadline: float) -> defer.Deferred[None]:
        """Stop accepting; wait up to ``deadline`` seconds for connections to finish, logging
        what remains; then cut the rest and log each. Fires when none is left."""
        self.draining = True
        self.relay.draining = True
        self.relay.accepting = False
        self.relay.watch_ports([])
        ports, self._listening = self.ports, {}
        for port in ports:
            port.stopListening()
        done: defer.Deferred[None] = defer.Deferred()
        started = self.reactor.seconds()
        relay = self.relay
        had_connections = bool(relay.connections)
        if had_connections:
            self._log.info(
                "draining {count} connections for up to {deadline}",
                count=len(relay.connections),
                deadline=format_duration(deadline),
            )
        state = {"next_report": started + DRAIN_REPORT_EVERY, "cut_at": None}

        def check() -> None:
            now = self.reactor.seconds()
            if not relay.connections:
                if state["cut_at"] is None and had_connections:
                    self._log.info("drained: every connection finished")
                done.callback(None)
                return
            if state["cut_at"] is None and now - started >= deadline:
                state["cut_at"] = now
                for connection in list(relay.connections.values()):
                    self._log.warn(
                        "drain deadline: cutting {id} {client} -> {target} "
                        "({up} up, {down} down, {state})",
                        **_connection_fields(connection, now),
                    )
                    connection.kill("drained")
            elif state["cut_at"] is not None and now - state["cut_at"] > 5:
                done.callback(None)  # cut connections that will not even close
                return
            elif now >= state["next_report"]:
                state["next_report"] = now + DRAIN_REPORT_EVERY
                self._log.info(
                    "draining: {count} connections left, {left} to go: {remaining}",
                    count=len(relay.connections),
                    left=format_duration(max(0.0, deadline - (now - started))),
                    remaining=describe_remaining(relay.connections.values(), now),
                )
            self.reactor.callLater(0.1, check)

        check()
        return done

    # -- listening

    def _apply_limits(self) -> None:
        self.relay.watch_ports(self.ports)
        self.relay.connector.guard.set_own(_own_endpoints(self.addresses(), local_addresses))
        if not self.config.max_connections:
            fd_limit = raise_fd_limit()
            self.relay.max_connections = connections_for(fd_limit)
            self._log.info(
                "at most {limit} connections at once ({fds} file descriptors)",
                limit=self.relay.max_connections,
                fds=fd_limit,
            )

    def addresses(self) -> list[Any]:
        """The bound addresses, in listener order (port 0 shows the port chosen)."""
        return [port.getHost() for port in self.ports]

    def admin_addresses(self) -> list[Any]:
        """The admin shell's and the metrics page's bound addresses, in that order."""
        return [port.getHost() for port in self._admin_ports]

    def _bind(self) -> None:
        if self._bound:
            return
        self._bound = True
        try:
            if self._adopt:
                for listener, (fd, family) in zip(self.config.listeners, self._adopt, strict=True):
                    factory = RelayFactory(self.relay, listener)
                    port = self.reactor.adoptStreamPort(fd, family, factory)
                    self._listening[listener.endpoint] = (port, factory)
            else:
                for listener in self.config.listeners:
                    self._listening[listener.endpoint] = self._listen_now(listener)
            if self.worker == 1:
                self._bind_admin()
        except ListenError:
            for port in [*self.ports, *self._admin_ports]:
                port.stopListening()
            self._listening, self._admin_ports = {}, []
            self._bound = False
            raise

    def _bind_admin(self) -> None:
        admin = self.config.admin
        if admin.ssh is not None:
            try:
                server_key = host_key(admin.host_key)
                self._ssh_factory = make_ssh_factory(
                    namespace(self), authorized=self._authorized(), server_key=server_key
                )
            except KeyFileError as e:
                raise ListenError(f"cannot start the SSH shell: {e}") from None
            port = self._listen_endpoint(admin.ssh, self._ssh_factory)
            self._admin_ports.append(port)
            address = port.getHost()
            self._log.info(
                "admin shell on {address}: ssh -p {port} {user}@{host}",
                address=describe(address),
                port=getattr(address, "port", "?"),
                user=admin.ssh_user,
                host=getattr(address, "host", "?"),
            )
        if admin.metrics is not None:
            port = self._listen_endpoint(admin.metrics, metrics_site(self.relay.metrics.registry))
            self._admin_ports.append(port)
            self._log.info("metrics on http://{address}/metrics", address=describe(port.getHost()))

    def _authorized(self) -> dict[bytes, list[Any]]:
        admin = self.config.admin
        assert admin.authorized_keys is not None
        return {admin.ssh_user.encode(): read_authorized_keys(admin.authorized_keys)}

    def _refresh_admin_keys(self) -> None:
        if self._ssh_factory is None or self.config.admin.ssh is None:
            return
        try:
            self._ssh_factory.portal = ssh_portal(namespace(self), self._authorized())
        except KeyFileError as e:
            self._log.error("admin shell keys not reloaded: {why}", why=str(e))

    def _listen_now(self, listener: ListenerConfig) -> tuple[IListeningPort, RelayFactory]:
        factory = RelayFactory(self.relay, listener)
        return self._listen_endpoint(listener.endpoint, factory), factory

    def _listen_endpoint(self, description: str, factory: Any) -> IListeningPort:
        endpoint = serverFromString(self.reactor, with_backlog(description))
        outcome: list[IListeningPort | Failure] = []
        d = endpoint.listen(factory)
        d.addBoth(outcome.append)
        if not outcome:
            # Standard endpoints bind synchronously; anything else must not leave us guessing.
            d.cancel()
            raise ListenError(f"cannot listen on {description}: it did not bind at once")
        result = outcome[0]
        if isinstance(result, Failure):
            raise ListenError(f"cannot listen on {description}: {_why(result)}")
        mismatch = _adopted_family_mismatch(description, result)
        if mismatch is not None:
            result.stopListening()
            raise ListenError(f"cannot listen on {description}: {mismatch}")
        return result


def _connection_fields(connection: Any, now: float) -> dict[str, Any]:
    pump = connection.pump
    target = connection.target
    return {
        "id": connection.id,
        "client": connection.client,
        "target": f"{target[0]}:{target[1]}" if target else "-",
        "up": pump.bytes_up if pump else 0,
        "down": pump.bytes_down if pump else 0,
        "age": format_duration(round(now - connection.started)),
        "state": connection.state.value,
    }


def describe_remaining(
    connections: Iterable[Any], now: float, limit: int = DRAIN_REPORT_NAMES
) -> str:
    """The connections a drain still waits for, oldest id first: the first ``limit`` by
    name (id, client -> target, bytes each way, age), the rest as a count."""
    ordered = sorted(connections, key=lambda connection: connection.id)
    shown = [
        "{id} {client} -> {target} ({up} up, {down} down, {age})".format(
            **_connection_fields(connection, now)
        )
        for connection in ordered[:limit]
    ]
    rest = len(ordered) - len(shown)
    return "; ".join(shown) + (f" and {rest} more" if rest > 0 else "")


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


#: The listen backlog unless an endpoint string sets one (the kernel caps it at somaxconn).
#: Twisted's default of 50 overflows under a burst, and connections the kernel has
#: completed but nobody accepted escape the peek timeout.
DEFAULT_BACKLOG: Final = 4096


def with_backlog(description: str) -> str:
    """``description``, with ``backlog=`` added for tcp, tcp6 and unix endpoints."""
    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


def _own_endpoints(
    bound: Iterable[Any], interfaces: Any
) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(address, port) pairs that reach this relay: a wildcard listener is on every interface."""
    own: set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = set()
    local: list[ipaddress.IPv4Address | ipaddress.IPv6Address] | None = None
    for address in bound:
        host, port = getattr(address, "host", None), getattr(address, "port", None)
        if host is None or port is None:
            continue
        ip = ipaddress.ip_address(host.split("%")[0])
        if ip.is_unspecified:
            local = local if local is not None else interfaces()
            own.update((each, port) for each in local)
        else:
            own.add((ip, port))
    return own


_DOMAIN: Final = re.compile(r"(?:^|:)domain=([A-Za-z0-9]+)(?::|$)")


def _adopted_family_mismatch(description: str, port: Any) -> str | None:
    """Why an inherited ``systemd:`` socket does not match its ``domain=``, or None.

    Twisted believes ``domain=``: an IPv6 socket adopted as INET reads every peer address
    as garbage, and the client ACLs, per-client limits and logs with it. systemd makes an
    IPv6 (dual-stack) socket for a bare ``ListenStream=443``, so this is an easy mistake.
    """
    if not description.startswith("systemd:"):
        return None
    declared = _DOMAIN.search(description)
    sock = getattr(port, "socket", None)
    option = getattr(socket, "SO_DOMAIN", None)  # Linux; elsewhere, trust the string
    if declared is None or sock is None or option is None:
        return None
    actual = sock.getsockopt(socket.SOL_SOCKET, option)
    if actual == getattr(socket, f"AF_{declared.group(1)}", None):
        return None
    try:
        actual_domain = socket.AddressFamily(actual).name.removeprefix("AF_")
    except ValueError:
        actual_domain = str(actual)
    why = (
        f"the socket systemd passed is {actual_domain}, not {declared.group(1)}, and Twisted "
        f"reads client addresses by domain=: write domain={actual_domain}"
    )
    if actual_domain == "INET6" and declared.group(1) == "INET":
        why += ", or ListenStream=0.0.0.0:PORT in the .socket unit for an IPv4 socket"
    return why


def _why(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, error.CannotListenError) and isinstance(value.socketError, OSError):
        return (value.socketError.strerror or str(value.socketError)).lower()
    return failure.getErrorMessage().strip() or type(value).__name__


def make_relay_service(
    config: RelayConfig,
    reactor: Any,
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
