"""Layers 2 and 3: reload, drain, metrics, the admin shell and its SSH keys, on fake reactors."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.conch.manhole_ssh import ConchFactory
from twisted.conch.ssh import keys
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, formatEvent
from twisted.python.failure import Failure

from acrrelay import ListenError, make_relay_service, parse_config
from acrrelay.admin.shell import RelayShell, human_bytes
from acrrelay.admin.ssh import (
    KeyFileError,
    host_key,
    make_ssh_factory,
    read_authorized_keys,
    run_command,
)
from acrrelay.config import RELAY_SETTINGS, ConfigError, RelayConfig, Setting, load_config
from acrrelay.listening import adopted_family_mismatch
from acrrelay.service import RelayService, describe_changes
from acrrelay.testing import alert_description, client_hello_bytes
from tests.doubles import Events, PipeEnd

A = "a.example.com"
B = "b.example.com"
BASE = """
[relay]
drain_timeout = "20s"
[[listen]]
endpoint = "tcp:8443"
name = "front"
[[route]]
name = "a.example.com"
backend = "tcp:host=10.1.1.1:port=443"
"""


class Port:
    """A listening port on the fake reactor that remembers whether it was stopped."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "0.0.0.0", self.port)

    def stopListening(self) -> None:
        self.stopped = True


class Reactor(MemoryReactorClock):
    """A MemoryReactorClock whose listenTCP fails for chosen ports, and keeps the ports it
    gave out (``ports``) so a test can see which were stopped."""

    def __init__(self, refuse: set[int] | None = None) -> None:
        super().__init__()
        self.refuse = refuse or set()
        self.ports: list[Port] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.refuse:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(Port(port))
        return self.ports[-1]


class Running:
    """A started RelayService on a fake reactor whose config can be swapped for reloads."""

    def __init__(self, toml: str = BASE, refuse: set[int] | None = None) -> None:
        self.reactor = Reactor(refuse)
        self.events = Events()
        self.next_config: RelayConfig | Exception = parse_config(toml, "relay.toml")
        self.service: RelayService = make_relay_service(
            parse_config(toml, "relay.toml"),
            self.reactor,
            access_observer=self.events,
            config_loader=self._load,
        )
        self.service.startService()
        #: What the service logs (its reloads, drains and cuts), as events.
        self.logged = Events()
        self.service._log = Logger(namespace="acrrelay.service", observer=self.logged)

    def log_lines(self) -> list[str]:
        return [formatEvent(event) for event in self.logged]

    def _load(self) -> RelayConfig:
        if isinstance(self.next_config, Exception):
            raise self.next_config
        return self.next_config

    def reload_with(self, toml: str) -> str:
        self.next_config = parse_config(toml, "relay.toml")
        return self.service.reload()

    def factory(self, port: int) -> Any:
        return next(f for p, f, _, _ in reversed(self.reactor.tcpServers) if p == port)

    def connect(
        self, name: str, port: int = 8443, peer: tuple[str, int] = ("192.0.2.7", 40000)
    ) -> tuple[Any, PipeEnd]:
        protocol = self.factory(port).buildProtocol(IPv4Address("TCP", *peer))
        transport = PipeEnd(peer)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(client_hello_bytes(name))
        return protocol, transport

    def splice(self, protocol: Any) -> tuple[Any, PipeEnd]:
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        backend = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = PipeEnd((host, port), port=50000)
        transport.protocol = backend
        backend.makeConnection(transport)
        return backend, transport


def close_pair(client: Any, backend: Any) -> None:
    client.readConnectionLost()
    backend.readConnectionLost()
    client.connectionLost(Failure(ConnectionDone()))
    backend.connectionLost(Failure(ConnectionDone()))


# -- reload


def test_reload_swaps_routes_for_new_connections_only() -> None:
    """After a reload new connections use the new routes; an established one keeps its route."""
    r = Running()
    old, _ = r.connect(A)
    backend, _ = r.splice(old)
    summary = r.reload_with(BASE.replace(A, B))
    assert "routes +1 -1 ~0 (now 1)" in summary
    assert "added: b.example.com" in summary and "removed: a.example.com" in summary
    _, refused = r.connect(A)
    assert alert_description(refused.value()) == 112
    refused.protocol.connectionLost(Failure(ConnectionDone()))
    assert r.service.relay.stats.refused["not_allowed"] == 1
    routed, _ = r.connect(B)
    assert routed.session.route_taken is not None and routed.session.route_taken.name == B
    # The established connection still runs on the route it had.
    assert old.session.route_taken is not None and old.session.route_taken.name == A
    old.dataReceived(b"still flowing")
    assert old.pump.bytes_up > len(b"still flowing")
    close_pair(old, backend)
    assert r.events[-1]["route"] == A and r.events[-1]["close_reason"] == "done"
    assert r.service.relay.stats.reloads["ok"] == 1


def test_an_invalid_config_is_rejected_and_the_old_one_stays() -> None:
    """A reload whose config does not load changes nothing, is logged, and counted."""
    r = Running()
    r.next_config = ConfigError("relay.toml", "relay.idle_timeout", "expected a duration")
    summary = r.service.reload()
    assert summary.startswith("reload rejected, the previous configuration stays: ")
    assert "relay.idle_timeout" in summary
    routed, _ = r.connect(A)
    assert routed.session.route_taken is not None
    assert r.service.relay.stats.reloads == {"failed": 1}


def test_reload_adds_and_removes_listeners() -> None:
    """An added listener starts accepting; a removed one stops; the kept one gets new settings."""
    r = Running()
    added = BASE + '[[listen]]\nendpoint = "tcp:9443"\nname = "second"\n'
    assert "listeners +1 -0" in r.reload_with(added)
    assert [p for p, *_ in r.reactor.tcpServers] == [8443, 9443]
    protocol, _ = r.connect(A, port=9443)
    assert protocol.listener.name == "second"
    renamed = added.replace(
        'endpoint = "tcp:8443"\nname = "front"', 'endpoint = "tcp:8443"\nname = "main"'
    )
    r.reload_with(renamed.replace('[[listen]]\nendpoint = "tcp:9443"\nname = "second"\n', ""))
    assert len(r.service.ports) == 1
    assert r.service.ports[0].getHost().port == 8443
    assert r.factory(8443).listener.name == "main"
    assert [(port.port, port.stopped) for port in r.reactor.ports] == [(8443, False), (9443, True)]


def test_a_listener_that_cannot_bind_rolls_the_reload_back() -> None:
    """If an added listener cannot bind, nothing of the new config is applied."""
    r = Running(refuse={9443})
    summary = r.reload_with(BASE.replace(A, B) + '[[listen]]\nendpoint = "tcp:9443"\n')
    assert "cannot listen on tcp:9443: address already in use" in summary
    assert r.service.relay.policy.table.lookup(A) is not None
    assert r.service.relay.policy.table.lookup(B) is None
    assert r.service.relay.stats.reloads["failed"] == 1


def test_a_reload_while_draining_is_refused_and_binds_nothing() -> None:
    """A reload during a drain is refused, logged and counted as failed: no listener is
    bound again, the routes and the config stay, and the drain goes on."""
    r = Running()
    client, _ = r.connect(A)
    backend, _ = r.splice(client)
    old = r.service.config
    stopped: list[object] = []
    r.service.stopService().addBoth(stopped.append)
    summary = r.reload_with(BASE.replace(A, B) + '[[listen]]\nendpoint = "tcp:9443"\n')
    assert summary == (
        "reload rejected, the previous configuration stays: draining: a relay that is "
        "stopping takes no new configuration"
    )
    assert r.service.relay.stats.reloads == {"failed": 1}
    assert [(port.port, port.stopped) for port in r.reactor.ports] == [(8443, True)]
    assert r.service.ports == [] and r.service.config is old
    assert r.service.relay.policy.table.lookup(A) is not None
    assert r.service.relay.policy.table.lookup(B) is None
    assert [e["log_level"].name for e in r.logged if "reload" in e["log_format"]] == ["error"]
    assert summary in r.log_lines()
    # Applying a config directly (as an embedding program might) is refused the same way.
    assert r.service.apply(parse_config(BASE.replace(A, B))).endswith("no new configuration")
    assert r.service.relay.stats.reloads == {"failed": 2}
    close_pair(client, backend)
    r.reactor.advance(0.2)
    assert stopped == [None]


def test_a_config_file_that_is_not_utf8_is_rejected_on_reload(tmp_path: Path) -> None:
    """A config file that is not UTF-8 is a rejected reload naming the file and the byte
    (not an exception out of SIGHUP), counted as failed; the old routes stay."""
    path = tmp_path / "relay.toml"
    path.write_bytes(BASE.replace(A, B).encode() + b"# caf\xe9\n")
    r = Running()
    r.service.config_loader = lambda: load_config(str(path))
    summary = r.service.reload()
    offset = len(BASE.replace(A, B).encode()) + len(b"# caf")
    line = BASE.replace(A, B).count("\n") + 1
    assert summary == (
        f"reload rejected, the previous configuration stays: {path}: not UTF-8 at byte "
        f"{offset} (line {line}): invalid continuation byte; TOML files must be UTF-8"
    )
    assert r.service.relay.stats.reloads == {"failed": 1}
    assert r.service.relay.policy.table.lookup(A) is not None
    assert r.service.relay.policy.table.lookup(B) is None


def test_change_summary_names_settings() -> None:
    """The reload summary says which settings changed, as they are written in the file."""
    old = parse_config(BASE)
    new = parse_config(BASE.replace('drain_timeout = "20s"', 'drain_timeout = "5m"'))
    assert "settings: drain_timeout 20s -> 5m" in describe_changes(old, new)


#: For each [relay] setting, a value other than BASE's, and how the summary shows it.
OTHER_VALUES = {
    "peek_timeout": ('"3s"', "10s -> 3s"),
    "peek_limit": ('"8KiB"', "16KiB -> 8KiB"),
    "connect_timeout": ("2.5", "10s -> 2.5s"),
    "idle_timeout": ('"1h"', "15m -> 1h"),
    "buffer_size": ("8192", "64KiB -> 8KiB"),
    "access_log": ('"off"', "- -> off"),
    "max_connections": ("100", "from the file-descriptor limit -> 100"),
    "max_connections_per_client": ("5", "no limit -> 5"),
    "drain_timeout": ('"1m"', "20s -> 1m"),
    "zero_copy": ("false", "true -> false"),
    "workers": ("2", "1 -> 2 (at restart)"),
}


def test_every_setting_has_a_reload_case() -> None:
    """A new [relay] setting cannot be left out of the reload test below."""
    assert sorted(OTHER_VALUES) == sorted(setting.name for setting in RELAY_SETTINGS)


@pytest.mark.parametrize("setting", RELAY_SETTINGS, ids=lambda setting: setting.name)
def test_a_reload_reports_each_setting_it_changes(setting: Setting) -> None:
    """A reload that changes any one [relay] setting names it in its summary, old -> new."""
    value, shown = OTHER_VALUES[setting.name]
    r = Running()
    lines = [line for line in BASE.splitlines() if not line.startswith(f"{setting.name} =")]
    toml = "\n".join(lines).replace("[relay]\n", f"[relay]\n{setting.name} = {value}\n")
    summary = r.reload_with(toml)
    assert summary.endswith(f"; settings: {setting.name} {shown}")
    assert setting.of(r.service.config) != setting.of(parse_config(BASE))


class Adopted:
    """A port adopted from an inherited socket, as far as the family check looks."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_an_inherited_socket_of_another_family_is_named_with_the_fix() -> None:
    """A systemd: socket whose address family is not the endpoint's domain= is a listen
    error saying which family it is and what to write (Twisted would misread addresses)."""
    with (
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as v6,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as v4,
    ):
        assert adopted_family_mismatch("systemd:domain=INET:index=0", Adopted(v6)) == (
            "the socket systemd passed is INET6, not INET, and Twisted reads client addresses "
            "by domain=: write domain=INET6, or ListenStream=0.0.0.0:PORT in the .socket unit "
            "for an IPv4 socket"
        )
        assert adopted_family_mismatch("systemd:domain=INET6:index=1", Adopted(v4)) == (
            "the socket systemd passed is INET, not INET6, and Twisted reads client addresses "
            "by domain=: write domain=INET"
        )
        assert adopted_family_mismatch("systemd:domain=INET6:index=0", Adopted(v6)) is None
        assert adopted_family_mismatch("systemd:index=0:domain=INET", Adopted(v4)) is None
        assert adopted_family_mismatch("tcp:0", Adopted(v6)) is None


# -- drain


def test_drain_waits_for_in_flight_connections() -> None:
    """Stopping stops accepting, waits for connections to finish, then fires."""
    r = Running()
    client, _ = r.connect(A)
    backend, _ = r.splice(client)
    stopped = r.service.stopService()
    assert [port.stopped for port in r.reactor.ports] == [True] and r.service.ports == []
    assert not r.service.relay.accepting
    fired: list[object] = []
    stopped.addBoth(fired.append)
    r.reactor.advance(5)
    assert not fired
    close_pair(client, backend)
    r.reactor.advance(0.2)
    assert fired == [None]
    assert r.events[-1]["close_reason"] == "done"


def test_drain_cuts_what_is_left_at_the_deadline() -> None:
    """At drain_timeout the remaining connections are cut, and logged as drained."""
    r = Running()
    client, client_end = r.connect(A)
    backend, backend_end = r.splice(client)
    fired: list[object] = []
    r.service.stopService().addBoth(fired.append)
    r.reactor.advance(19.9)
    assert not client_end.disconnected
    r.reactor.advance(0.2)
    assert client_end.disconnected and backend_end.disconnected
    client.connectionLost(Failure(ConnectionLost()))
    backend.connectionLost(Failure(ConnectionLost()))
    r.reactor.advance(0.2)
    assert fired == [None]
    assert r.events[-1]["close_reason"] == "drained"


def test_drain_reports_name_what_remains() -> None:
    """Every 10 s a drain logs what it still waits for: the first 10 connections by id,
    client -> target, bytes each way and age, then how many more."""
    r = Running(BASE.replace('drain_timeout = "20s"', 'drain_timeout = "1m"'))
    pairs = []
    for n in range(12):
        client, _ = r.connect(A, peer=("192.0.2.7", 40000 + n))
        backend, _ = r.splice(client)
        backend.dataReceived(b"x" * (1000 + n))
        pairs.append((client, backend))
    r.reactor.advance(3)  # the connections are 3 s old when the drain starts
    r.service.stopService()
    hello = len(client_hello_bytes(A))

    def reports() -> list[str]:
        return [line for line in r.log_lines() if line.startswith("draining: ")]

    r.reactor.advance(9.9)
    assert reports() == []
    r.reactor.advance(0.1)
    [report] = reports()
    shown = [
        f"{c.session.id} 192.0.2.7:{40000 + n} -> {A}:443 ({hello} up, {1000 + n} down, 13s)"
        for n, (c, _) in enumerate(pairs[:10])
    ]
    assert report == (
        "draining: 12 connections left, 50s to go: " + "; ".join(shown) + " and 2 more"
    )
    # Ten seconds on, with two finished: the report names the ten left, and no "more".
    for client, backend in pairs[:2]:
        close_pair(client, backend)
    r.reactor.advance(10)
    _, latest = reports()
    shown = [
        f"{c.session.id} 192.0.2.7:{40000 + n} -> {A}:443 ({hello} up, {1000 + n} down, 23s)"
        for n, (c, _) in enumerate(pairs)
        if n >= 2
    ]
    assert latest == "draining: 10 connections left, 40s to go: " + "; ".join(shown)


def test_drain_ends_when_the_last_connection_closes_and_stops_reporting() -> None:
    """A drain fires on the turn after the connection table empties (no polling): no timer
    is left behind, and the drain logs that every connection finished."""
    r = Running()
    client, _ = r.connect(A)
    backend, _ = r.splice(client)
    fired: list[object] = []
    r.service.stopService().addBoth(fired.append)
    r.reactor.advance(12)
    assert not fired and len(r.reactor.getDelayedCalls()) > 0
    close_pair(client, backend)
    r.reactor.advance(0)  # the turn after, once the last connection wrote its access record
    assert fired == [None]
    assert r.reactor.getDelayedCalls() == []
    assert r.events[-1]["close_reason"] == "done"
    assert "drained: every connection finished" in r.log_lines()
    assert [line for line in r.log_lines() if line.startswith("draining: ")] == [
        f"draining: 1 connections left, 8s to go: {client.session.id} 192.0.2.7:40000 -> {A}:443 "
        f"({len(client_hello_bytes(A))} up, 0 down, 12s)"
    ]


def test_a_second_stop_cuts_every_connection_now() -> None:
    """cut_now (a second SIGTERM while draining) cuts every connection at once, logging
    each with its bytes, and the drain then ends."""
    r = Running()
    client, client_end = r.connect(A)
    backend, backend_end = r.splice(client)
    fired: list[object] = []
    r.service.stopService().addBoth(fired.append)
    r.service.cut_now()
    assert client_end.disconnected and backend_end.disconnected
    hello = len(client_hello_bytes(A))
    assert (
        f"cutting now: {client.session.id} 192.0.2.7:40000 -> {A}:443 "
        f"({hello} up, 0 down, splicing)" in r.log_lines()
    )
    client.connectionLost(Failure(ConnectionLost()))
    backend.connectionLost(Failure(ConnectionLost()))
    r.reactor.advance(0)
    assert fired == [None]


def test_start_shutdown_drains_with_its_own_deadline() -> None:
    """relay.drain(seconds) from the shell drains with that deadline, then stops the reactor."""
    r = Running()
    client, client_end = r.connect(A)
    r.splice(client)
    stopped: list[bool] = []
    r.reactor.stop = lambda: stopped.append(True)  # type: ignore[method-assign]
    text = RelayShell(r.service).drain(2)
    assert "draining: 1 connection(s), deadline 2s" in text
    r.reactor.advance(0)
    assert stopped == [True]
    r.service.stopService()
    r.reactor.advance(2.1)
    assert client_end.disconnected


# -- metrics


def scrape(service: RelayService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(service.relay.metrics.registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_what_happened() -> None:
    """Counters and histograms move by exactly what the connections did, in flight too."""
    r = Running()
    hello = client_hello_bytes(A)
    client, _ = r.connect(A)
    backend, _ = r.splice(client)
    backend.dataReceived(b"x" * 1000)
    _, refused = r.connect("unknown.example.com")
    refused.protocol.connectionLost(Failure(ConnectionDone()))  # as the relay closed it
    live = scrape(r.service)
    route = (("front_door", "tls"), ("route", A))
    assert live[("acrrelay_connections_active", route)] == 1
    assert live[("acrrelay_connections_total", route)] == 1
    assert live[("acrrelay_bytes_total", (("direction", "down"), ("route", A)))] == 1000
    assert live[("acrrelay_refusals_total", (("reason", "not_allowed"),))] == 1
    assert live[("acrrelay_client_hello_bytes_count", ())] == 2
    assert live[("acrrelay_accepting", ())] == 1
    close_pair(client, backend)
    done = scrape(r.service)
    assert ("acrrelay_connections_active", route) not in done
    assert done[("acrrelay_bytes_total", (("direction", "down"), ("route", A)))] == 1000
    assert done[("acrrelay_bytes_total", (("direction", "up"), ("route", A)))] >= len(hello) - 10
    assert done[("acrrelay_reloads_total", (("result", "ok"),))] == 0
    assert ("acrrelay_backpressure_seconds_total", (("direction", "up"),)) in done


def test_metrics_registries_are_per_service() -> None:
    """Two services never share a registry (nor use the global one)."""
    from prometheus_client import REGISTRY

    one, two = Running(), Running()
    assert one.service.relay.metrics.registry is not two.service.relay.metrics.registry
    assert REGISTRY.get_sample_value("acrrelay_accepting") is None


# -- the shell


def test_shell_connections_kill_routes_stats() -> None:
    """The relay object shows live connections in a table, kills one, and reports."""
    r = Running()
    client, client_end = r.connect(A)
    r.splice(client)
    r.reactor.advance(65)
    shell = RelayShell(r.service)
    table = repr(shell.connections())
    header, row, summary = table.splitlines()
    columns = ["ID", "CLIENT", "DOOR", "TARGET", "ROUTE", "BACKEND", "UP", "DOWN", "AGE"]
    assert header.split() == [*columns, "STATE", "PAUSED"]
    assert row.split()[:4] == [str(client.session.id), "192.0.2.7:40000", "tls", f"{A}:443"]
    assert "1m5s" in row and "splicing" in row
    assert summary == "1 connection(s)"
    assert (
        repr(shell.kill(client.session.id))
        == f"killed {client.session.id} (192.0.2.7:40000 -> {A}:443)"
    )
    assert client_end.disconnected
    assert repr(shell.kill(999)) == "no connection 999"
    assert A in repr(shell.routes())
    assert "accepted      1" in repr(shell.stats())


def test_shell_reload_prints_the_summary_and_the_new_routes_apply() -> None:
    """relay.reload() typed at the shell re-reads the config, shows what changed, and new
    connections use the new routes at once; a broken config shows why and changes nothing."""
    r = Running()
    shell = RelayShell(r.service)
    r.next_config = parse_config(
        BASE + f'[[route]]\nname = "{B}"\nbackend = "tcp:host=10.2.2.2:port=443"\n', "relay.toml"
    )
    assert repr(shell.reload()) == (
        "reloaded relay.toml: routes +1 -0 ~0 (now 2); listeners +0 -0; added: b.example.com"
    )
    routed, _ = r.connect(B)
    assert routed.session.route_taken is not None and routed.session.route_taken.name == B
    r.splice(routed)
    assert r.reactor.tcpClients[-1][:2] == ("10.2.2.2", 443)
    assert B in repr(shell.routes())
    r.next_config = ConfigError("relay.toml", "route[1].backend", "expected an endpoint")
    assert repr(shell.reload()) == (
        "reload rejected, the previous configuration stays: "
        "relay.toml: route[1].backend: expected an endpoint"
    )
    assert "reloads       1 ok, 1 failed" in repr(shell.stats())


def test_human_bytes() -> None:
    """Byte counts read as K, M, G."""
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 << 30)] == ["0", "1023", "1.5K", "5.0G"]


# -- SSH keys and commands


def test_host_key_is_created_private_and_reused(tmp_path: Path) -> None:
    """The host key is made at first start with mode 0600, and read back the same after."""
    path = tmp_path / "state" / "host_key"
    first = host_key(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.sshType() == b"ssh-ed25519"
    assert host_key(str(path)).fingerprint() == first.fingerprint()
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        host_key(str(path))


def test_each_factory_has_its_own_keys(tmp_path: Path) -> None:
    """Two shells in one process keep their own host keys; conch's class dicts stay empty."""
    one = make_ssh_factory({}, authorized={}, server_key=host_key(str(tmp_path / "one")))
    two = make_ssh_factory({}, authorized={}, server_key=host_key(str(tmp_path / "two")))
    assert one.privateKeys != two.privateKeys
    assert ConchFactory.publicKeys == {} and ConchFactory.privateKeys == {}


def test_authorized_keys_file(tmp_path: Path) -> None:
    """authorized_keys lines with comments and options are read; junk is an error with a line."""
    key = keys.Key.fromString(host_key(str(tmp_path / "k")).public().toString("OPENSSH"))
    line = key.toString("OPENSSH").decode()
    path = tmp_path / "authorized_keys"
    path.write_text(f'# admins\n{line} alice@laptop\nfrom="10.0.0.0/8",no-pty {line} bob\n')
    assert [k.fingerprint() for k in read_authorized_keys(str(path))] == [key.fingerprint()] * 2
    path.write_text("# admins\nnot a key\n")
    with pytest.raises(KeyFileError, match="line 2: no public key found"):
        read_authorized_keys(str(path))
    path.write_text("# nobody yet\n")
    with pytest.raises(KeyFileError, match="lists no keys"):
        read_authorized_keys(str(path))


def test_run_command_gives_output_and_status() -> None:
    """One expression prints its value; statements print what they print; errors exit 1."""
    namespace: dict[str, Any] = {"x": 41}
    assert run_command(namespace, "x + 1") == ("42\n", 0)
    assert run_command(namespace, "y = x; print(y)") == ("41\n", 0)
    output, status = run_command(namespace, "1/0")
    assert status == 1 and "ZeroDivisionError" in output


def test_admin_config(tmp_path: Path) -> None:
    """The SSH shell needs an authorized_keys file that exists, and binds 127.0.0.1 unless
    told otherwise."""
    with pytest.raises(ConfigError, match=r"admin\.authorized_keys: the SSH shell needs"):
        parse_config(BASE + '[admin]\nssh = "tcp:2222"\n')
    missing = tmp_path / "nobody"
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + f'[admin]\nssh = "tcp:2222"\nauthorized_keys = "{missing}"\n')
    assert str(info.value) == (
        f"<string>: admin.authorized_keys: authorized keys {missing} does not exist"
    )
    path = tmp_path / "authorized_keys"
    path.write_text(host_key(str(tmp_path / "k")).public().toString("OPENSSH").decode() + "\n")
    config = parse_config(
        BASE + f'[admin]\nssh = "tcp:2222"\nauthorized_keys = "{path}"\nmetrics = "tcp6:9180"\n'
    )
    assert config.admin.ssh == "tcp:2222:interface=127.0.0.1"
    assert config.admin.metrics == "tcp6:9180:interface=\\:\\:1"


def test_unusable_authorized_keys_fail_start_with_one_line(tmp_path: Path) -> None:
    """The service parses the authorized_keys file when it binds the shell: a file without
    a key fails the start with one line naming the file and line, and nothing stays bound."""
    keys_file = tmp_path / "authorized_keys"
    keys_file.write_text("# admins\nnot a key\n")
    toml = BASE + (
        f'[admin]\nssh = "tcp:2222"\nauthorized_keys = "{keys_file}"\n'
        f'host_key = "{tmp_path / "host_key"}"\n'
    )
    reactor = Reactor()
    service = make_relay_service(parse_config(toml), reactor)
    with pytest.raises(ListenError) as info:
        service.startService()
    assert str(info.value) == (
        f"cannot start the SSH shell: {keys_file} line 2: no public key found"
    )
    assert [(port.port, port.stopped) for port in reactor.ports] == [(8443, True)]


def test_a_reload_rereads_authorized_keys_and_refuses_unusable_ones(tmp_path: Path) -> None:
    """A reload parses authorized_keys again: new keys reach new logins; a file without a
    key rejects the reload naming the file and line, and the old keys stay."""
    keys_file = tmp_path / "authorized_keys"
    first = host_key(str(tmp_path / "one")).public().toString("OPENSSH").decode()
    second = host_key(str(tmp_path / "two")).public().toString("OPENSSH").decode()
    keys_file.write_text(first + "\n")
    toml = BASE + (
        f'[admin]\nssh = "tcp:2222"\nauthorized_keys = "{keys_file}"\n'
        f'host_key = "{tmp_path / "host_key"}"\n'
    )
    r = Running(toml)
    [ssh_factory] = [f for port, f, _, _ in r.reactor.tcpServers if port == 2222]
    portal = ssh_factory.portal
    keys_file.write_text("junk\n")
    summary = r.service.reload()
    assert summary == (
        "reload rejected, the previous configuration stays: "
        f"relay.toml: admin.authorized_keys: {keys_file} line 1: no public key found"
    )
    assert ssh_factory.portal is portal
    keys_file.write_text(second + "\n")
    assert r.service.reload().startswith("reloaded relay.toml: ")
    assert ssh_factory.portal is not portal
