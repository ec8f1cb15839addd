"""Draining a relay: stop accepting, let connections finish, report, cut at the deadline.

A drain ends when the relay's connection table empties (:meth:`Relay.when_empty`);
meanwhile it logs what is left every :data:`REPORT_EVERY` seconds, and at the
deadline it cuts the rest, logging each cut with its bytes.

Connections are read in one place, :func:`live_connections`, and cut in one,
:func:`cut`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from acrrelay.config import format_duration

if TYPE_CHECKING:
    from acrrelay.relay import Relay

__all__ = [
    "Clock",
    "Drain",
    "LiveConnection",
    "cut",
    "cut_all",
    "describe_remaining",
    "live_connections",
]

#: While draining, how often the connections still open are logged, and how many by name.
REPORT_EVERY: Final = 10.0
REPORT_NAMES: Final = 10
#: After the deadline's cut, how long to wait for the cut connections to close.
CUT_GRACE: Final = 5.0


class Clock(Protocol):
    """The time a drain needs (IReactorTime's part it uses)."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall: ...


@attrs.frozen
class LiveConnection:
    """One open connection, as a drain reports it."""

    id: int
    client: str
    target: str
    state: str
    started: float
    bytes_up: int
    bytes_down: int

    def fields(self, now: float) -> dict[str, object]:
        """The fields a log event about it carries."""
        return {
            "id": self.id,
            "client": self.client,
            "target": self.target,
            "up": self.bytes_up,
            "down": self.bytes_down,
            "age": format_duration(round(now - self.started)),
            "state": self.state,
        }


def live_connections(relay: Relay) -> list[LiveConnection]:
    """The relay's open connections, oldest id first, from its connection views."""
    return [
        LiveConnection(
            id=view.id,
            client=view.client,
            target=view.target_text,
            state=view.state.value,
            started=view.started,
            bytes_up=view.bytes_up,
            bytes_down=view.bytes_down,
        )
        for view in relay.views()
    ]


def cut(relay: Relay, connection_id: int, reason: str) -> None:
    """Close one connection at once, both sides."""
    relay.kill(connection_id, reason)


def describe_remaining(
    connections: Iterable[LiveConnection], now: float, limit: int = REPORT_NAMES
) -> str:
    """The connections a drain still waits for: the first ``limit`` by name (id,
    client -> target, bytes each way, age), the rest as a count."""
    ordered = list(connections)
    shown = [
        "{id} {client} -> {target} ({up} up, {down} down, {age})".format(**c.fields(now))
        for c in ordered[:limit]
    ]
    rest = len(ordered) - len(shown)
    return "; ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def cut_all(relay: Relay, clock: Clock, log: Logger, why: str) -> None:
    """Cut every connection at once, each logged after ``why``."""
    now = clock.seconds()
    for connection in live_connections(relay):
        log.warn(
            why + " {id} {client} -> {target} ({up} up, {down} down, {state})",
            **connection.fields(now),
        )
        cut(relay, connection.id, "drained")


class Drain:
    """One drain of ``relay``: :attr:`done` fires once no connection is left, or
    :data:`CUT_GRACE` after the deadline's cut if cut connections will not even close."""

    def __init__(self, relay: Relay, clock: Clock, deadline: float, log: Logger) -> None:
        self._relay = relay
        self._clock = clock
        self._deadline = deadline
        self._log = log
        self._started = clock.seconds()
        self._cut = False
        self._timer: IDelayedCall | None = None
        self._report = LoopingCall(self._report_left)
        self._report.clock = cast(IReactorTime, clock)
        self.done: defer.Deferred[None] = defer.Deferred()

    def start(self) -> defer.Deferred[None]:
        count = len(live_connections(self._relay))
        if count:
            self._log.info(
                "draining {count} connections for up to {deadline}",
                count=count,
                deadline=format_duration(self._deadline),
            )
            self._report.start(REPORT_EVERY, now=False)
            self._timer = self._clock.callLater(self._deadline, self._cut_the_rest)
        self._relay.when_empty().addCallback(self._emptied)
        return self.done

    def _emptied(self, _: object) -> None:
        if not self._cut and self._timer is not None:
            self._log.info("drained: every connection finished")
        # The table empties inside the last connection's connectionLost, before it writes
        # its access record: finish (and close the access log) on the next turn.
        self._clock.callLater(0, self._finish)

    def _finish(self) -> None:
        if self.done.called:
            return
        if self._report.running:
            self._report.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.done.callback(None)

    def _report_left(self) -> None:
        now = self._clock.seconds()
        left = live_connections(self._relay)
        self._log.info(
            "draining: {count} connections left, {left} to go: {remaining}",
            count=len(left),
            left=format_duration(max(0.0, self._deadline - (now - self._started))),
            remaining=describe_remaining(left, now),
        )

    def _cut_the_rest(self) -> None:
        self._cut = True
        self._report.stop()
        cut_all(self._relay, self._clock, self._log, "drain deadline: cutting")
        self._timer = self._clock.callLater(CUT_GRACE, self._finish)
