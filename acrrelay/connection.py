"""One connection's life, as one explicit state machine (Automat's typed builder).

The protocol (:mod:`acrrelay.peek`) turns transport events into the inputs of
:class:`Inputs`; the actions are :class:`~acrrelay.session.Session` methods. Every
(state, input) pair is in :data:`TRANSITIONS`, the ones that change nothing included.
The states:

- ``identifying``: a PROXY header from a trusted peer is awaited (its source is the
  client); for anyone else the client is known at once. Under the peek timeout.
- ``peeking``: the front door reads the first message. Under the peek timeout.
- ``authorizing``: the password check runs on the thread pool; the peek timeout goes on,
  and refuses the connection (``auth_timeout``) if the check has not answered.
- ``connecting``: the client is paused while the backend connects, under connect_timeout.
- ``*_eof``: the same, after the client half-closed; the FIN is passed on once spliced.
- ``splicing``: a :class:`~acrrelay.splice.Pump` moves the bytes, under its idle timer.
- ``closing``: the answer is written; a client that does not leave within the peek
  timeout is cut.

Where each input leads, generated from the built machine by :func:`diagram` (a test
checks this text against it; inputs that change nothing are left out)::

    identifying     -> peeking         client_known
    identifying     -> closing         eof kill refuse timeout
    identifying     -> closed          lost
    peeking         -> peeking         data
    peeking         -> authorizing     authorize
    peeking         -> connecting      route
    peeking         -> closing         eof kill refuse timeout
    peeking         -> closed          lost
    authorizing     -> authorizing     data
    authorizing     -> authorizing_eof eof
    authorizing     -> connecting      route
    authorizing     -> closing         kill refuse timeout
    authorizing     -> closed          lost
    authorizing_eof -> connecting_eof  route
    authorizing_eof -> closing         kill refuse timeout
    authorizing_eof -> closed          lost
    connecting      -> connecting      data
    connecting      -> connecting_eof  eof
    connecting      -> splicing        connected
    connecting      -> closing         connect_failed kill refuse timeout
    connecting      -> closed          lost
    connecting_eof  -> splicing        connected
    connecting_eof  -> closing         connect_failed kill refuse timeout
    connecting_eof  -> closed          lost
    splicing        -> splicing        connected data eof kill lost refuse
    splicing        -> closed          spliced
    closing         -> closing         connected kill timeout
    closing         -> closed          lost
    closed          -> closed          connected
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from automat import TypeMachine, TypeMachineBuilder
from automat._core import Automaton
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.python.failure import Failure

from acrrelay.addresses import describe_address, host_port, unmapped_host
from acrrelay.doors import Refused
from acrrelay.proxyproto import ProxyHeader
from acrrelay.routing import Route
from acrrelay.splice import PumpResult  # at run time: Automat reads the inputs' annotations

if TYPE_CHECKING:
    from acrrelay.session import Session

__all__ = [
    "COARSE",
    "TRANSITIONS",
    "IClientTransport",
    "Inputs",
    "State",
    "describe",
    "diagram",
    "host_port",
    "new_machine",
    "unmapped",
]


class IClientTransport(ITCPTransport, IPushProducer):
    """The client's transport as the relay uses it: TCP, and pausable."""


class State(enum.Enum):
    """A connection's state as views show it."""

    PEEKING = "peeking"
    AUTHORIZING = "authorizing"
    CONNECTING = "connecting"
    SPLICING = "splicing"
    CLOSING = "closing"
    CLOSED = "closed"


class Inputs(Protocol):
    """What can happen to a connection: transport events, and the answers of the door,
    the policy, the password check, the backend and the pump."""

    def client_known(self, header: ProxyHeader | None) -> None:
        """The client is known: from the socket, or from a trusted PROXY header."""

    def data(self, data: bytes) -> None:
        """Bytes from the client."""

    def eof(self) -> None:
        """The client half-closed (a FIN, not a reset)."""

    def lost(self, reason: Failure) -> None:
        """The client's connection is gone."""

    def timeout(self) -> None:
        """The timer of the state waited in ran out."""

    def kill(self, reason: str) -> None:
        """Cut now (the admin shell, a drain)."""

    def refuse(self, refusal: Refused) -> None:
        """A door, the policy or the password check said no."""

    def authorize(self, check: Deferred[str | None]) -> None:
        """A password check started for the request's Proxy-Authorization."""

    def route(self, route: Route) -> None:
        """The policy routed the target."""

    def connected(self, backend: Any) -> None:
        """The backend connected (its protocol)."""

    def connect_failed(self, reason: str, detail: str) -> None:
        """The backend did not connect."""

    def spliced(self, result: PumpResult) -> None:
        """The pump finished both directions."""


#: Each state's coarse name in views, the shell and logs.
COARSE: Final = {
    "identifying": State.PEEKING,
    "peeking": State.PEEKING,
    "authorizing": State.AUTHORIZING,
    "authorizing_eof": State.AUTHORIZING,
    "connecting": State.CONNECTING,
    "connecting_eof": State.CONNECTING,
    "splicing": State.SPLICING,
    "closing": State.CLOSING,
    "closed": State.CLOSED,
}

_INPUTS: Final = (
    "client_known",
    "data",
    "eof",
    "lost",
    "timeout",
    "kill",
    "refuse",
    "authorize",
    "route",
    "connected",
    "connect_failed",
    "spliced",
)


def _state_table() -> dict[tuple[str, str], tuple[str, str]]:
    """(state, input) -> (next state, the Session's action). Pairs that cannot happen in
    a state are written down too: they stay put and ``ignore`` (a late Deferred, a second
    signal), except a backend that connects too late, which is dropped."""
    waiting = {
        "eof": ("closing", "client_gone"),
        "lost": ("closed", "lost"),
        "kill": ("closing", "killed"),
        "refuse": ("closing", "refused"),
    }
    rows: dict[str, dict[str, tuple[str, str]]] = {
        "identifying": {
            **waiting,
            "client_known": ("peeking", "admit"),
            "timeout": ("closing", "peek_timed_out"),
        },
        "peeking": {
            **waiting,
            "data": ("peeking", "peek"),
            "timeout": ("closing", "peek_timed_out"),
            "authorize": ("authorizing", "authorizing"),
            "route": ("connecting", "connect"),
        },
    }
    for state, later in (("authorizing", "authorizing_eof"), ("connecting", "connecting_eof")):
        for name, eof in ((state, False), (later, True)):
            rows[name] = {
                **waiting,
                "eof": (name, "ignore") if eof else (later, "ignore"),
                "data": (name, "ignore") if eof else (name, "hold"),
            }
    for name in ("authorizing", "authorizing_eof"):
        rows[name]["timeout"] = ("closing", "auth_timed_out")
        rows[name]["route"] = (name.replace("authorizing", "connecting"), "connect")
    for name, eof in (("connecting", False), ("connecting_eof", True)):
        rows[name]["timeout"] = ("closing", "connect_timed_out")
        rows[name]["connect_failed"] = ("closing", "backend_failed")
        rows[name]["connected"] = ("splicing", "splice_after_eof" if eof else "splice")
    rows["splicing"] = {
        "data": ("splicing", "forward"),
        "eof": ("splicing", "pump_eof"),
        "lost": ("splicing", "pump_lost"),
        "kill": ("splicing", "pump_abort"),
        "refuse": ("splicing", "cut_off"),
        "spliced": ("closed", "spliced"),
        "connected": ("splicing", "drop_backend"),
    }
    rows["closing"] = {
        "lost": ("closed", "finish"),
        "timeout": ("closing", "abort"),
        "kill": ("closing", "abort_killed"),
        "connected": ("closing", "drop_backend"),
    }
    rows["closed"] = {"connected": ("closed", "drop_backend")}
    return {
        (state, input_name): rows[state].get(input_name, (state, "ignore"))
        for state in COARSE
        for input_name in _INPUTS
    }


#: Every (state, input) pair: the next state and the action that runs.
TRANSITIONS: Final = _state_table()


def _build() -> Any:
    builder = TypeMachineBuilder(Inputs, _Core)
    states = {name: builder.state(name) for name in COARSE}  # identifying is the first
    for (old, input_name), (new, action) in TRANSITIONS.items():
        registrar = states[old].upon(getattr(Inputs, input_name)).to(states[new])
        registrar(_action(new, action))
    built = builder.build()
    return TypeMachine(built.__automat_type__, _IndexedAutomaton(built.__automat_automaton__))


class _IndexedAutomaton(Automaton[Any, str, Any]):
    """The built automaton, with its transitions found by a dict lookup.

    Automat finds each transition by scanning all of them, comparing states field by
    field: with every pair written down (108) that cost a connection more than its
    bytes did. The transitions are the same ones (a test compares them)."""

    def __init__(self, built: Automaton[Any, str, Any]) -> None:
        super().__init__(built.initialState)
        self._index: dict[tuple[int, str], tuple[Any, list[Any]]] = {}
        for old, symbol, new, outputs in built.allTransitions():
            self.addTransition(old, symbol, new, tuple(outputs))
            self._index[(id(old), symbol)] = (new, list(outputs))

    def outputForInput(self, inState: Any, inputSymbol: str) -> tuple[Any, list[Any]]:
        return self._index[(id(inState), inputSymbol)]


class _Core:
    """What the machine's actions run on (a Session; its own module imports this one)."""

    phase: str


def _action(new: str, action: str) -> Callable[..., None]:
    def run(inputs: Inputs, core: Any, *args: Any) -> None:
        core.previous, core.phase = core.phase, new
        getattr(core, action)(inputs, *args)

    run.__name__ = action
    return run


_MACHINE: Final = _build()


def new_machine(session: Session) -> Inputs:
    """A machine in its first state, acting on ``session``."""
    machine: Inputs = _MACHINE(session)
    return machine


def diagram() -> str:
    """Each state and where each input takes it, from the built machine (ignored pairs
    left out): the text the module docstring's table and the README are checked against."""
    moves: dict[str, dict[str, set[str]]] = {}
    for old, symbol, new, outputs in _MACHINE.__automat_automaton__.allTransitions():
        if [output.name for output in outputs] == ["ignore"] and old == new:
            continue
        moves.setdefault(old.name, {}).setdefault(new.name, set()).add(symbol)
    lines = []
    for state in COARSE:
        for new, symbols in sorted(moves.get(state, {}).items(), key=lambda item: _ORDER[item[0]]):
            lines.append(f"{state:<16}-> {new:<16}{' '.join(sorted(symbols))}")
    return "\n".join(lines)


_ORDER: Final = {state: i for i, state in enumerate(COARSE)}


#: Address text for logs and views: one helper each, in :mod:`acrrelay.addresses`.
describe = describe_address
unmapped = unmapped_host
