"""Layer 3: the plugin, the options, and the service on a MemoryReactor."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, RaisingMemoryReactor
from twisted.plugin import getPlugins
from twisted.python.failure import Failure

from acrrelay import ListenError, RelayFactory, make_relay_service, parse_config
from acrrelay.limits import local_addresses
from acrrelay.listening import ListeningService
from acrrelay.routing import Route, parse_pattern
from acrrelay.service import SignalledRelayService
from acrrelay.tap import Options, makeService
from tests.doubles import Events, PipeEnd

REPO = Path(__file__).resolve().parent.parent

CONFIG = """
[[listen]]
endpoint = "tcp:8443:interface=127.0.0.1"
name = "tls"
[[listen]]
endpoint = "tcp:9443"
[[acr]]
region = "cn-beijing"
"""


def test_plugin_is_discovered() -> None:
    """Twisted's plugin system finds exactly one acrrelay service maker."""
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "acrrelay"]
    assert len(makers) == 1
    assert makers[0].options is Options


def test_plugin_module_imports_nothing_of_ours() -> None:
    """Loading the plugin module must not import acrrelay (Twisted imports every plugin)."""
    code = textwrap.dedent(
        """
        import sys, importlib
        importlib.import_module("twisted.plugins.acrrelay_plugin")
        assert not any(m == "acrrelay" or m.startswith("acrrelay.") for m in sys.modules), \\
            sorted(m for m in sys.modules if m.startswith("acrrelay"))
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("module", "forbid"),
    [
        ("acrrelay.clienthello", "twisted"),
        ("acrrelay.routing", "twisted"),
        ("acrrelay.catalogue", "twisted"),
        ("acrrelay.config", "twisted.internet.reactor"),
        ("acrrelay", "twisted"),
    ],
)
def test_pure_core_imports_no_reactor(module: str, forbid: str) -> None:
    """The pure core never imports a reactor; the parsers and routing not even Twisted."""
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in sys.modules if m == {forbid!r} or m.startswith({forbid!r} + '.')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_with_an_admin_shell_needs_neither_conch_nor_a_reactor(tmp_path: Path) -> None:
    """Loading a configuration with an SSH shell checks the keys file is there without
    importing conch (the service parses the keys) or a reactor."""
    keys = tmp_path / "authorized_keys"
    keys.write_text("not parsed here\n")
    toml = tmp_path / "relay.toml"
    toml.write_text(
        CONFIG + f'[admin]\nssh = "tcp:2222"\nauthorized_keys = "{keys}"\nmetrics = "tcp:9180"\n'
    )
    code = textwrap.dedent(
        f"""
        import sys
        from acrrelay.config import load_config
        config = load_config({str(toml)!r})
        assert config.admin.authorized_keys == {str(keys)!r}
        forbidden = ("twisted.conch", "twisted.internet.reactor")
        bad = [m for m in sys.modules if m.startswith(forbidden)]
        assert not bad, bad
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_options_repeat_and_combine() -> None:
    """--listen, --route and --acr repeat, and sit on top of --config."""
    options = Options()
    options.parseOptions(
        [
            "--config", "etc/acrrelay.toml",
            "--listen", "tcp:1",
            "--listen", "tcp:2",
            "--route", "a.example.com=resolve",
            "--route", "b.example.com=tcp:host=10.0.0.1:port=443",
            "--acr", "cn-hangzhou",
            "--access-log", "off",
        ]
    )  # fmt: skip
    overlay = options.overlay()
    assert options["config"] == "etc/acrrelay.toml"
    assert overlay.listen == ("tcp:1", "tcp:2")
    assert overlay.route == ("a.example.com=resolve", "b.example.com=tcp:host=10.0.0.1:port=443")
    assert overlay.acr == ("cn-hangzhou",)
    assert overlay.access_log == "off"


def test_make_service_with_a_bad_config_exits_with_one_line() -> None:
    """twist's makeService turns a config error into SystemExit with one clear line."""
    options = Options()
    options.parseOptions(["--listen", "tcp:8443", "--route", "*.com=resolve"])
    with pytest.raises(SystemExit) as info:
        makeService(options)
    assert str(info.value).startswith("acrrelay: command line: --route *.com=resolve: ")
    assert "\n" not in str(info.value)


def test_service_listens_on_every_endpoint() -> None:
    """startService binds each listener with a RelayFactory; stopService releases them."""
    reactor = MemoryReactorClock()
    service = make_relay_service(parse_config(CONFIG), reactor)
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (8443, "127.0.0.1"),
        (9443, ""),
    ]
    factories = [factory for _, factory, _, _ in reactor.tcpServers]
    assert all(isinstance(f, RelayFactory) for f in factories)
    assert [f.listener.name for f in factories] == ["tls", "tcp:9443"]
    assert factories[0].relay is factories[1].relay is service.relay
    assert len(service.ports) == 2
    service.stopService()
    assert service.ports == []


def test_privileged_start_binds_once() -> None:
    """twistd binds in privilegedStartService; startService does not bind again."""
    reactor = MemoryReactorClock()
    service = make_relay_service(parse_config(CONFIG), reactor)
    service.privilegedStartService()
    service.startService()
    assert len(reactor.tcpServers) == 2


def test_a_port_that_cannot_bind_fails_start() -> None:
    """A listener that cannot bind raises ListenError naming the endpoint and the cause."""
    reactor = RaisingMemoryReactor(
        listenException=CannotListenError("127.0.0.1", 8443, OSError(98, "Address already in use"))
    )
    service = make_relay_service(parse_config(CONFIG), reactor)
    with pytest.raises(ListenError) as info:
        service.startService()
    assert str(info.value) == (
        "cannot listen on tcp:8443:interface=127.0.0.1: address already in use"
    )
    assert service.ports == []


def test_tap_service_exits_cleanly_when_a_port_cannot_bind() -> None:
    """Under twist, the bind failure becomes SystemExit with one line, not a traceback."""
    reactor = RaisingMemoryReactor(
        listenException=CannotListenError("", 9443, OSError(13, "Permission denied"))
    )
    service = SignalledRelayService(parse_config(CONFIG), reactor)
    with pytest.raises(SystemExit) as info:
        service.startService()
    assert (
        str(info.value)
        == "acrrelay: cannot listen on tcp:8443:interface=127.0.0.1: permission denied"
    )


def test_library_exports_are_typed_and_documented() -> None:
    """The public API has docstrings and the package ships py.typed."""
    import importlib.resources

    import acrrelay

    for name in acrrelay.__all__:
        assert getattr(acrrelay, name).__doc__, name
    assert importlib.resources.files("acrrelay").joinpath("py.typed").is_file()


def test_listeners_get_a_deep_backlog_unless_they_set_one() -> None:
    """A burst must wait in the accept queue, not overflow Twisted's default of 50."""
    reactor = MemoryReactorClock()
    config = parse_config(
        '[[listen]]\nendpoint = "tcp:8443"\n[[listen]]\nendpoint = "tcp:9443:backlog=100"\n'
        '[[route]]\nname = "a.b.c"\nbackend = "resolve"\n'
    )
    make_relay_service(config, reactor).startService()
    assert [backlog for _, _, backlog, _ in reactor.tcpServers] == [4096, 100]


SELF_LOOP = """
[[listen]]
endpoint = "tcp:18080"
protocols = ["http"]
[[route]]
name = "self.example.com"
backend = "resolve"
ports = [18080, 18081]
allow_addresses = ["127.0.0.0/8"]
[resolver.hosts]
"self.example.com" = "127.0.0.1"
"""


def _http_request_to(factory: RelayFactory, host: str) -> PipeEnd:
    """Accept one connection on ``factory`` and send it a plain GET for ``host``."""
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.7", 40000))
    assert protocol is not None
    transport = PipeEnd()
    transport.protocol = protocol
    protocol.makeConnection(transport)
    protocol.dataReceived(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return transport


def test_the_service_denies_its_own_listening_address_to_resolve() -> None:
    """make_relay_service fills in the guard's own addresses from the bound listeners: a
    resolve route that allows loopback still may not reach the relay's own (wildcard)
    listener at 127.0.0.1:18080 (address_denied), while the next port connects."""
    reactor = MemoryReactorClock()
    service = make_relay_service(parse_config(SELF_LOOP), reactor, access_observer=Events())
    service.startService()
    [(port, factory, _, interface)] = reactor.tcpServers
    assert (port, interface) == (18080, "")
    assert isinstance(factory, RelayFactory)

    client = _http_request_to(factory, "self.example.com:18080")
    assert reactor.tcpClients == []
    assert client.value().startswith(b"HTTP/1.1 502 ")
    assert b"address_denied" in client.value()
    assert b"127.0.0.1 (the relay itself)" in client.value()
    client.protocol.connectionLost(Failure(ConnectionDone()))  # counted as it ends
    assert service.relay.stats.backend_failures["address_denied"] == 1

    _http_request_to(factory, "self.example.com:18081")
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("127.0.0.1", 18081)]


def test_a_wildcard_listener_is_the_relay_on_every_interface() -> None:
    """For a tcp:PORT listener, every address of every interface (127.0.0.1 among them) at
    that port is the relay itself, whatever a route allows; other ports are not."""
    service = make_relay_service(parse_config(SELF_LOOP), MemoryReactorClock())
    service.startService()
    guard = service.relay.connector.guard
    everything = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    route = Route(parse_pattern("a.example.com"), "resolve", allow_addresses=everything)
    interfaces = local_addresses()
    assert ipaddress.ip_address("127.0.0.1") in interfaces
    for address in interfaces:
        assert guard.refuse(route, str(address), 18080) == "the relay itself", address
        assert guard.refuse(route, str(address), 18082) is None, address


def test_make_service_uses_the_reactor_it_is_given() -> None:
    """makeService(options, reactor) builds the signalled service on that reactor, its
    worker pool too, and never imports the global reactor."""
    code = textwrap.dedent(
        """
        import sys
        from twisted.internet.testing import MemoryReactorClock
        from acrrelay.service import SignalledRelayService
        from acrrelay.tap import Options, makeService
        from acrrelay.workers import WorkerPool

        reactor = MemoryReactorClock()
        options = Options()
        options.parseOptions(["--config", "etc/acrrelay.toml"])
        service = makeService(options, reactor)
        assert isinstance(service, SignalledRelayService) and service.reactor is reactor
        assert service.relay.reactor is reactor
        assert not [child for child in service if isinstance(child, WorkerPool)]
        assert "twisted.internet.reactor" not in sys.modules, "the global reactor was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO)


def test_listeners_and_admin_endpoints_are_child_services(tmp_path: Path) -> None:
    """Each listener and the metrics page is a child service holding its own port: stopping
    the metrics child alone stops only its port."""
    reactor = MemoryReactorClock()
    config = parse_config(CONFIG + '[admin]\nmetrics = "tcp:9180"\n')
    service = make_relay_service(config, reactor)
    service.startService()
    children = [child for child in service if isinstance(child, ListeningService)]
    assert len(children) == 3
    assert [child.port for child in children[:2]] == service.ports
    metrics = children[2]
    assert metrics.port is not None and metrics.port.getHost().port == 9180
    metrics.stopService()
    assert metrics.port is None and len(service.ports) == 2
