"""The two-way byte pump between a client and its backend.

Once a connection is routed and its backend is connected, :class:`Pump` moves
bytes both ways:

- **the peeked bytes first**, byte-exact;
- **flow control**: each transport is registered as a streaming producer on the
  other (through a :class:`Valve` that accounts for pauses), and each transport's
  ``bufferSize`` is the high-water mark, so a slow reader stops the fast side
  from reading and nothing piles up in memory;
- **half-close**: a FIN from one side becomes ``loseWriteConnection()`` on the
  other; the pair closes when both directions are done;
- **resets stay resets, after the bytes already read**: when one side is lost
  abnormally, what it sent before is still delivered to the other side (Twisted's
  buffer written and the kernel's queue acknowledged, for at most
  :data:`RESET_FLUSH_SECONDS`), and only then is the other side reset, so a client
  never mistakes a cut transfer for a complete one, nor loses its last bytes;
- an **activity-based idle timeout**: bytes in either direction reset it; there
  is no absolute lifetime.

The pump learns about its two sides through plain method calls, so it can be
driven by real transports or by ``StringTransport`` in tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from acrrelay import zerocopy
from acrrelay.transports import (
    TCPTransport,
    linger_zero,
    peer_gone,
    reset_not_eof,
    send_now,
    tune,
    unsent_bytes,
)
from acrrelay.twistedinternals import is_connected

__all__ = ["BackendProtocol", "IdleTimer", "Pump", "PumpResult", "Valve", "reset_not_eof"]

_PROMOTE: Final = zerocopy.PROMOTE_AFTER

#: How long a reset waits for the bytes read before it to reach the other side.
RESET_FLUSH_SECONDS: Final = 0.5
FLUSH_POLL_SECONDS: Final = 0.001
FLUSH_POLL_MAX_SECONDS: Final = 0.05

CLIENT: Final = "client"
BACKEND: Final = "backend"
RELAY: Final = "relay"


@implementer(IPushProducer)
class Valve:
    """A transport seen as the producer for the opposite side, with pause accounting."""

    def __init__(self, transport: TCPTransport, clock: IReactorTime) -> None:
        self._transport = transport
        self._clock = clock
        self.paused = False
        self._paused_at = 0.0
        self._paused_total = 0.0

    def paused_seconds(self) -> float:
        """Total time this side was held back, including a pause still in progress."""
        if self.paused:
            return self._paused_total + self._clock.seconds() - self._paused_at
        return self._paused_total

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self._paused_at = self._clock.seconds()
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self._paused_total += self._clock.seconds() - self._paused_at
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        # Twisted calls this when the opposite transport is lost. The pump decides how
        # this side ends (a FIN, or a reset after its bytes are out); here it only stops
        # reading. Passing it on would close this side gracefully at once, turning a
        # reset into a clean end and dropping what was still to be written.
        self._transport.pauseProducing()


class IdleTimer:
    """Calls ``on_idle`` once ``probe()`` has not changed for ``timeout`` seconds.

    It polls a cheap counter a few times per timeout instead of being reset on
    every chunk, so the data path pays nothing for it. It fires between
    ``timeout`` and ``timeout * 1.25`` after the last activity.
    """

    TICKS_PER_TIMEOUT: Final = 4

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        probe: Callable[[], int],
        on_idle: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._timeout = timeout
        self._probe = probe
        self._on_idle = on_idle
        self._last_value = probe()
        self._last_change = clock.seconds()
        self._call: IDelayedCall | None = clock.callLater(self._interval(), self._tick)

    def _interval(self) -> float:
        return self._timeout / self.TICKS_PER_TIMEOUT

    def _tick(self) -> None:
        self._call = None
        now = self._clock.seconds()
        value = self._probe()
        if value != self._last_value:
            self._last_value = value
            self._last_change = now
        elif now - self._last_change >= self._timeout:
            self._on_idle()
            return
        remaining = self._timeout - (now - self._last_change)
        self._call = self._clock.callLater(min(self._interval(), remaining), self._tick)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


@attrs.frozen
class PumpResult:
    """How a spliced pair ended."""

    #: done (both sides sent FIN), client_reset, backend_reset, idle_timeout, or killed.
    reason: str
    #: Which side ended its half first: client, backend, or relay.
    closed_first: str
    bytes_up: int
    bytes_down: int
    #: Seconds the client was held back because the backend could not take more, and back.
    paused_up: float
    paused_down: float
    #: Which directions moved by splice(2): "up", "down", "both", or None.
    zero_copy: str | None = None


class Pump:
    """Moves bytes between a client transport and a backend transport until both are done."""

    def __init__(
        self,
        clock: IReactorTime,
        client: TCPTransport,
        *,
        idle_timeout: float,
        buffer_size: int,
        on_done: Callable[[PumpResult], None],
        zero_copy: bool = False,
        zero_copy_up: bool = True,
    ) -> None:
        self._clock = clock
        self.client = client
        self.backend: TCPTransport | None = None
        self._idle_timeout = idle_timeout
        self._buffer_size = buffer_size
        self._on_done = on_done
        self.bytes_up = 0
        self.bytes_down = 0
        self._client_eof = False
        self._backend_eof = False
        self._client_lost = False
        self._backend_lost = False
        self._reason: str | None = None
        self._closed_first: str | None = None
        self._idle: IdleTimer | None = None
        self._up: Valve | None = None  # the client, as producer for the backend
        self._down: Valve | None = None  # the backend, as producer for the client
        self.finished = False
        # splice(2) per direction, once it has carried PROMOTE_AFTER bytes (see zerocopy).
        self._zero_copy = zero_copy and zerocopy.AVAILABLE
        # Off where the client's bytes must still be seen (plain HTTP's later requests).
        self._zero_copy_up = self._zero_copy and zero_copy_up
        self._spliced_up: zerocopy.SpliceDirection | None = None
        self._spliced_down: zerocopy.SpliceDirection | None = None

    # -- set-up

    def start(self, backend: TCPTransport, replay: bytes) -> None:
        """Attach the connected backend, send the peeked bytes, and open both ways."""
        self.backend = backend
        for transport in (self.client, backend):
            tune(transport, self._buffer_size)
        if replay:
            self.bytes_up += len(replay)
            send_now(backend, replay)
        self._up = Valve(self.client, self._clock)
        self._down = Valve(backend, self._clock)
        backend.registerProducer(self._up, True)
        self.client.registerProducer(self._down, True)
        self._idle = IdleTimer(self._clock, self._idle_timeout, self._activity, self._went_idle)
        # The client was paused while the backend connected.
        self.client.resumeProducing()
        if self._client_eof:
            self._forward_eof(backend)

    # -- the data path: no allocation, no timers, one write each

    def client_data(self, data: bytes) -> None:
        backend = self.backend
        assert backend is not None, "client data before the pump started"
        self.bytes_up += len(data)
        send_now(backend, data)
        if self._zero_copy_up and self._spliced_up is None and self.bytes_up >= _PROMOTE:
            self._spliced_up = zerocopy.promote(
                self.client, backend, self._count_up, self._buffer_size, self._clock
            )

    def backend_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        send_now(self.client, data)
        if self._zero_copy and self._spliced_down is None and self.bytes_down >= _PROMOTE:
            assert self.backend is not None, "backend data before the pump started"
            self._spliced_down = zerocopy.promote(
                self.backend, self.client, self._count_down, self._buffer_size, self._clock
            )

    def _count_up(self, moved: int) -> None:
        self.bytes_up += moved

    def _count_down(self, moved: int) -> None:
        self.bytes_down += moved

    @property
    def zero_copy(self) -> tuple[bool, bool]:
        """(client to backend, backend to client) moving by splice(2) now."""
        return (self._spliced_up is not None, self._spliced_down is not None)

    # -- ends

    def client_eof(self) -> None:
        """The client sent FIN: pass it on as a half-close."""
        self._client_eof = True
        self._mark_first(CLIENT)
        if self.backend is not None:
            self._forward_eof(self.backend)
        self._maybe_close()

    def backend_eof(self) -> None:
        self._backend_eof = True
        self._mark_first(BACKEND)
        self._forward_eof(self.client)
        self._maybe_close()

    def client_lost(self, reason: Failure) -> None:
        self._client_lost = True
        if not (self._client_eof and self._backend_eof) and self._reason is None:
            self._reason = "client_closed" if reason.check(ConnectionDone) else "client_reset"
            self._mark_first(CLIENT)
            if self.backend is not None and not self._backend_lost:
                self._pass_on(reason, self.backend)
        self._maybe_finish()

    def backend_lost(self, reason: Failure) -> None:
        self._backend_lost = True
        if not (self._client_eof and self._backend_eof) and self._reason is None:
            self._reason = "backend_closed" if reason.check(ConnectionDone) else "backend_reset"
            self._mark_first(BACKEND)
            if not self._client_lost:
                self._pass_on(reason, self.client)
        self._maybe_finish()

    def abort(self, reason: str) -> None:
        """Cut both sides now, for a relay-side reason (idle_timeout, killed)."""
        if self._reason is None:
            self._reason = reason
            self._mark_first(RELAY)
        if not self._client_lost:
            self.client.abortConnection()
        if self.backend is not None and not self._backend_lost:
            self.backend.abortConnection()

    # -- state for admin views

    def paused_seconds(self) -> tuple[float, float]:
        """(client held back, backend held back) in seconds so far, on either path."""
        return (
            (self._up.paused_seconds() if self._up else 0.0)
            + (self._spliced_up.held_seconds() if self._spliced_up else 0.0),
            (self._down.paused_seconds() if self._down else 0.0)
            + (self._spliced_down.held_seconds() if self._spliced_down else 0.0),
        )

    @property
    def paused(self) -> tuple[bool, bool]:
        """(client held back, backend held back) by back-pressure right now."""
        return (
            (self._up is not None and self._up.paused)
            or (self._spliced_up is not None and self._spliced_up.held),
            (self._down is not None and self._down.paused)
            or (self._spliced_down is not None and self._spliced_down.held),
        )

    # -- internals

    def _pass_on(self, reason: Failure, transport: TCPTransport) -> None:
        """End ``transport`` as its opposite ended: a clean close as a FIN, a reset as a reset,
        either way after the bytes already read."""
        if reason.check(ConnectionDone):
            transport.unregisterProducer()
            transport.loseConnection()
        else:
            self._reset_after_flush(transport)

    def _reset_after_flush(self, transport: TCPTransport) -> None:
        """Deliver what was already read to ``transport``'s peer, then reset it."""
        # The side that was lost produces nothing more; this side's input has nowhere to go.
        transport.unregisterProducer()
        transport.pauseProducing()
        deadline = self._clock.seconds() + RESET_FLUSH_SECONDS
        wait = FLUSH_POLL_SECONDS

        def step() -> None:
            nonlocal wait
            if not is_connected(transport):
                return
            # A peer that is gone (its reset arrived, the socket is closed) will never
            # take the rest: stop waiting for it.
            pending = self._unsent_to(transport) and not peer_gone(transport)
            if pending and self._clock.seconds() < deadline:
                self._clock.callLater(wait, step)
                wait = min(wait * 2, FLUSH_POLL_MAX_SECONDS)
                return
            linger_zero(transport)
            transport.abortConnection()

        step()

    def _unsent_to(self, transport: TCPTransport) -> int:
        """Bytes on their way to ``transport``'s peer: in a pipe, in Twisted, in the kernel."""
        piped = sum(
            direction.pending
            for direction in (self._spliced_up, self._spliced_down)
            if direction is not None and direction.destination is transport
        )
        return piped + unsent_bytes(transport)

    def _activity(self) -> int:
        return self.bytes_up + self.bytes_down

    def _went_idle(self) -> None:
        self._idle = None
        self.abort("idle_timeout")

    def _mark_first(self, side: str) -> None:
        if self._closed_first is None:
            self._closed_first = side

    def _forward_eof(self, to: TCPTransport) -> None:
        # A registered producer keeps a transport from closing its write side,
        # and the side that sent FIN will produce nothing more.
        to.unregisterProducer()
        to.loseWriteConnection()

    def _maybe_close(self) -> None:
        if self._client_eof and self._backend_eof:
            self._reason = self._reason or "done"
            self.client.loseConnection()
            if self.backend is not None:
                self.backend.loseConnection()

    def _maybe_finish(self) -> None:
        if self.finished or not self._client_lost:
            return
        if self.backend is not None and not self._backend_lost:
            return
        self.finished = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        paused_up, paused_down = self.paused_seconds()
        for direction in (self._spliced_up, self._spliced_down):
            if direction is not None:
                direction.close()
        self._on_done(
            PumpResult(
                reason=self._reason or "done",
                closed_first=self._closed_first or RELAY,
                bytes_up=self.bytes_up,
                bytes_down=self.bytes_down,
                paused_up=paused_up,
                paused_down=paused_down,
                zero_copy={(True, True): "both", (True, False): "up", (False, True): "down"}.get(
                    self.zero_copy
                ),
            )
        )


@implementer(IHalfCloseableProtocol)
class BackendProtocol(Protocol):
    """The relay's connection to a backend: everything goes to the pump."""

    pump: Pump | None = None

    def dataReceived(self, data: bytes) -> None:
        pump = self.pump
        if pump is not None:  # None only for a backend the relay has just aborted
            pump.backend_data(data)

    def readConnectionLost(self) -> None:
        if reset_not_eof(self.transport):
            return
        if self.pump is not None:
            self.pump.backend_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self.pump is not None:
            self.pump.backend_lost(reason)
