"""Layer 2: the two-way pump, flow control, half-close and timeouts, on StringTransports."""

from __future__ import annotations

import socket

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from acrrelay.peek import RelayProtocol
from acrrelay.splice import IdleTimer, Pump, PumpResult
from acrrelay.testing import client_hello_bytes
from tests.doubles import Harness, PipeEnd

HELLO = client_hello_bytes("registry.cn-beijing.aliyuncs.com")


def spliced() -> tuple[Harness, RelayProtocol, PipeEnd, object, PipeEnd]:
    h = Harness()
    client_protocol, client = h.accept()
    client_protocol.dataReceived(HELLO)
    backend_protocol, backend = h.connect_backend()
    backend.clear()
    return h, client_protocol, client, backend_protocol, backend


def test_producers_are_registered_both_ways() -> None:
    """Each side is the streaming producer of the other."""
    _, _, client, _, backend = spliced()
    assert client.producer is not None and client.streaming is True
    assert backend.producer is not None and backend.streaming is True


def test_backend_pressure_pauses_the_client() -> None:
    """When the backend's buffer fills (it pauses its producer), the client stops being read."""
    _, _, client, _, backend = spliced()
    backend.producer.pauseProducing()
    assert client.producerState == "paused"
    backend.producer.resumeProducing()
    assert client.producerState == "producing"


def test_client_pressure_pauses_the_backend() -> None:
    """When the client reads slowly (its buffer fills), the backend stops being read."""
    _, protocol, client, _, backend = spliced()
    client.producer.pauseProducing()
    assert backend.producerState == "paused"
    assert protocol.pump is not None and protocol.pump.paused == (False, True)
    client.producer.resumeProducing()
    assert backend.producerState == "producing"
    assert protocol.pump.paused == (False, False)


def test_high_water_mark_and_tcp_options_are_set() -> None:
    """Both transports get the configured buffer size, TCP_NODELAY and keepalive."""
    h, _, client, _, backend = spliced()
    assert client.bufferSize == backend.bufferSize == h.config.buffer_size == 32 * 1024
    assert client.nodelay and backend.nodelay
    assert client.keepalive and backend.keepalive


def test_paused_time_is_accounted() -> None:
    """Time spent held back by back-pressure is measured per direction."""
    h, protocol, client, backend_protocol, _ = spliced()
    client.producer.pauseProducing()
    h.reactor.advance(3)
    client.producer.resumeProducing()
    protocol.readConnectionLost()
    backend_protocol.readConnectionLost()
    protocol.connectionLost(Failure(ConnectionDone()))
    backend_protocol.connectionLost(Failure(ConnectionDone()))
    assert h.events[-1]["paused_down_ms"] == 3000.0
    assert "paused_up_ms" not in h.events[-1] or h.events[-1]["paused_up_ms"] is None


def test_client_fin_becomes_a_half_close() -> None:
    """A FIN from the client half-closes the backend; the response still flows back."""
    _, protocol, client, backend_protocol, backend = spliced()
    protocol.readConnectionLost()
    assert backend.write_closed
    assert not backend.disconnecting and not client.disconnecting
    backend_protocol.dataReceived(b"response")
    assert client.value() == b"response"
    backend_protocol.readConnectionLost()
    assert client.write_closed
    assert client.disconnecting and backend.disconnecting


def test_backend_fin_becomes_a_half_close() -> None:
    """A FIN from the backend half-closes the client; the client may still send."""
    _, protocol, client, backend_protocol, backend = spliced()
    backend_protocol.readConnectionLost()
    assert client.write_closed and not client.disconnecting
    protocol.dataReceived(b"late upload")
    assert backend.value() == b"late upload"
    protocol.readConnectionLost()
    assert backend.write_closed
    assert client.disconnecting and backend.disconnecting


def test_orderly_close_reports_done_and_who_was_first() -> None:
    """Both FINs then both closes give one 'done' event naming the side that closed first."""
    h, protocol, _, backend_protocol, _ = spliced()
    protocol.dataReceived(b"a" * 10)
    backend_protocol.dataReceived(b"b" * 20)
    backend_protocol.readConnectionLost()
    protocol.readConnectionLost()
    backend_protocol.connectionLost(Failure(ConnectionDone()))
    assert h.events == []
    protocol.connectionLost(Failure(ConnectionDone()))
    assert len(h.events) == 1
    event = h.events[0]
    assert event["close_reason"] == "done"
    assert event["closed_first"] == "backend"
    assert event["bytes_up"] == len(HELLO) + 10
    assert event["bytes_down"] == 20


def test_backend_reset_aborts_the_client() -> None:
    """A backend reset is passed on as an abort, not a clean close the client could trust."""
    h, protocol, client, backend_protocol, _ = spliced()
    backend_protocol.dataReceived(b"partial blob")
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert client.disconnected  # aborted
    protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "backend_reset"
    assert h.events[-1]["closed_first"] == "backend"
    assert h.events[-1]["bytes_down"] == len(b"partial blob")


def test_client_reset_aborts_the_backend() -> None:
    """A client that vanishes with a reset takes the backend connection with it."""
    h, protocol, _, backend_protocol, backend = spliced()
    protocol.connectionLost(Failure(ConnectionLost()))
    assert backend.disconnected
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "client_reset"
    assert h.relay.connections == {}


def test_idle_timeout_cuts_a_silent_pair() -> None:
    """No bytes either way for the idle timeout aborts both sides."""
    h, protocol, client, backend_protocol, backend = spliced()
    h.reactor.advance(59)
    assert not client.disconnected
    h.reactor.pump([1] * 20)
    assert client.disconnected and backend.disconnected
    protocol.connectionLost(Failure(ConnectionLost()))
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert h.events[-1]["close_reason"] == "idle_timeout"
    assert h.events[-1]["closed_first"] == "relay"


def test_activity_either_way_keeps_a_long_transfer_alive() -> None:
    """Bytes in either direction reset the idle timer: a slow 10-minute transfer survives."""
    h, protocol, client, backend_protocol, _ = spliced()
    for minute in range(10):
        for _ in range(6):
            h.reactor.advance(10)
            if minute % 2:
                backend_protocol.dataReceived(b"x")
            else:
                protocol.dataReceived(b"y")
    assert not client.disconnected


def test_idle_timer_fires_within_a_quarter_of_the_timeout() -> None:
    """The polling idle timer fires between T and 1.25 T after the last activity."""
    clock = Clock()
    counter = [0]
    fired: list[float] = []
    IdleTimer(clock, 8.0, lambda: counter[0], lambda: fired.append(clock.seconds()))
    clock.advance(5)
    counter[0] += 1  # activity at t=5
    for _ in range(40):
        clock.advance(0.5)
    assert len(fired) == 1
    assert 5 + 8 <= fired[0] <= 5 + 8 * 1.25


def test_idle_timer_cancel_leaves_nothing_scheduled() -> None:
    """A cancelled idle timer leaves no call behind."""
    clock = Clock()
    timer = IdleTimer(clock, 8.0, lambda: 0, lambda: None)
    timer.cancel()
    assert clock.getDelayedCalls() == []


def test_pump_alone_reports_its_result() -> None:
    """The pump works on any two transports and reports bytes and reason when both are gone."""
    clock = Clock()
    results: list[PumpResult] = []
    client, backend = PipeEnd(), PipeEnd()
    client.pauseProducing()
    pump = Pump(clock, client, idle_timeout=60, buffer_size=16384, on_done=results.append)
    pump.start(backend, b"peeked")
    assert backend.value() == b"peeked"
    assert client.producerState == "producing"
    pump.client_data(b"12345")
    pump.backend_data(b"abc")
    pump.client_eof()
    pump.backend_eof()
    pump.client_lost(Failure(ConnectionDone()))
    pump.backend_lost(Failure(ConnectionDone()))
    assert results == [
        PumpResult(
            reason="done",
            closed_first="client",
            bytes_up=11,
            bytes_down=3,
            paused_up=0.0,
            paused_down=0.0,
        )
    ]
    assert clock.getDelayedCalls() == []


class Buffering(PipeEnd):
    """A transport whose writes sit in a buffer until the test says they went out."""

    connected = True
    # The parts of Twisted's write buffer the relay reads, as on a socket transport.
    dataBuffer = b""
    offset = 0

    def __init__(self) -> None:
        super().__init__()
        self._tempDataLen = 0

    def write(self, data: bytes) -> None:
        super().write(data)
        self._tempDataLen += len(data)


def test_a_reset_is_passed_on_after_the_bytes_already_read() -> None:
    """When the backend resets, the client first gets what the relay had read, then the reset."""
    clock = Clock()
    results: list[PumpResult] = []
    client, backend = Buffering(), PipeEnd()
    client.pauseProducing()
    pump = Pump(clock, client, idle_timeout=60, buffer_size=16384, on_done=results.append)
    pump.start(backend, b"hello")
    pump.backend_data(b"last bytes before the reset")
    pump.backend_lost(Failure(ConnectionLost()))
    assert not client.disconnected  # still writing out what it has
    assert client.producer is None  # the dead backend no longer feeds it
    clock.advance(0.1)
    assert not client.disconnected
    client._tempDataLen = 0  # the kernel took it all, and the peer acknowledged it
    clock.advance(0.01)
    assert client.disconnected
    assert client.value().endswith(b"last bytes before the reset")


def test_a_stalled_reader_is_reset_after_the_flush_limit() -> None:
    """A client that never reads does not hold a reset back for more than the limit."""
    from acrrelay.splice import RESET_FLUSH_SECONDS

    clock = Clock()
    client, backend = Buffering(), PipeEnd()
    client.pauseProducing()
    pump = Pump(clock, client, idle_timeout=60, buffer_size=16384, on_done=lambda r: None)
    pump.start(backend, b"")
    pump.backend_data(b"x" * 1000)
    pump.backend_lost(Failure(ConnectionLost()))
    clock.advance(RESET_FLUSH_SECONDS - 0.05)
    assert not client.disconnected
    clock.pump([0.01] * 10)
    assert client.disconnected


def test_losing_one_side_never_closes_the_other_gracefully_behind_the_pumps_back() -> None:
    """Twisted stops a lost transport's producer; that only pauses the other side, so the
    pump, not a stray FIN, decides how it ends."""
    _, _, client, backend_protocol, backend = spliced()
    backend.producer.stopProducing()  # what Twisted does as the backend transport dies
    assert client.producerState == "paused"
    assert not client.disconnecting
    backend_protocol.connectionLost(Failure(ConnectionLost()))
    assert client.disconnected  # the reset, passed on as a reset


class _ErroredSocket(socket.socket):
    """A socket whose reset is still pending (SO_ERROR), as after a bare EPOLLERR."""

    def getsockopt(self, level: int, option: int, *args: int) -> int:  # type: ignore[override]
        return 104  # ECONNRESET, still pending


def test_an_end_of_stream_that_was_a_reset_is_passed_on_as_a_reset() -> None:
    """epoll may report a reset with EPOLLERR alone, which Twisted calls an end of stream;
    the pending socket error makes it a reset again, never a FIN to the client."""
    _, _, client, backend_protocol, backend = spliced()
    with _ErroredSocket() as errored:
        backend.getHandle = lambda: errored  # type: ignore[attr-defined]
        backend_protocol.readConnectionLost()
        assert backend.disconnected  # aborted, which Twisted reports as connection lost
        assert not client.write_closed  # no FIN forwarded
        backend_protocol.connectionLost(Failure(ConnectionLost()))
        assert client.disconnected  # the reset, passed on as one
