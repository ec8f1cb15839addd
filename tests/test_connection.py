"""Layer 2: the connection's state machine, its table, and the diagrams drawn from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from acrrelay import connection
from acrrelay.connection import COARSE, TRANSITIONS, State, diagram
from acrrelay.relay import ConnectionView
from acrrelay.testing import RelayHarness, client_hello_bytes

README = Path(__file__).resolve().parent.parent / "README.md"
REGISTRY = "registry.cn-beijing.aliyuncs.com"
INPUTS = [name for name in vars(connection.Inputs) if not name.startswith("_")]
WAITING = ["identifying", "peeking", "authorizing", "authorizing_eof", "connecting"]


def test_every_state_and_input_pair_is_written_down() -> None:
    """The table has one entry for each (state, input) pair, and the built machine one
    transition for each entry: no input can meet an unhandled state."""
    assert set(TRANSITIONS) == {(state, name) for state in COARSE for name in INPUTS}
    built = connection._MACHINE.__automat_automaton__.allTransitions()
    assert {(old.name, symbol) for old, symbol, _, _ in built} == set(TRANSITIONS)


@pytest.mark.parametrize("state", [*WAITING, "connecting_eof", "closing"])
def test_every_waiting_state_times_out(state: str) -> None:
    """A timeout in any state that waits on someone else moves on (refuses, fails the
    backend, or cuts the client): none of them ignores its timer."""
    new, action = TRANSITIONS[(state, "timeout")]
    assert action != "ignore"
    assert new == "closing"


def test_splicing_leaves_its_timeout_to_the_pump() -> None:
    """Splicing has no timer of the connection's own: the pump's idle timer is it."""
    assert TRANSITIONS[("splicing", "timeout")] == ("splicing", "ignore")


def test_the_module_docstring_shows_the_machine() -> None:
    """The diagram in acrrelay.connection's docstring is the one generated from the machine."""
    doc = connection.__doc__ or ""
    block = "\n".join(
        line[4:] for line in doc.split("::\n\n", 1)[1].splitlines() if line.startswith("    ")
    )
    assert block == diagram()


def test_the_readme_shows_the_machine() -> None:
    """The README's "How it works" has the same generated diagram."""
    text = README.read_text()
    section = text.split("## How it works", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```\n(identifying .*?)\n```", section, re.DOTALL)
    assert match is not None
    assert match.group(1) == diagram()


def test_views_follow_a_connection_through_its_states() -> None:
    """Relay.views shows a connection as peeking, connecting and splicing, with its door,
    target, route and bytes, and not once it has ended; when_empty fires then."""
    h = RelayHarness()
    protocol, client = h.accept()
    [view] = h.relay.views()
    assert isinstance(view, ConnectionView)
    assert (view.state, view.door, view.client) == (State.PEEKING, None, "192.0.2.7:40000")
    emptied = h.relay.when_empty()
    protocol.dataReceived(client_hello_bytes(REGISTRY))
    [view] = h.relay.views()
    assert (view.state, view.door, view.target) == (State.CONNECTING, "tls", (REGISTRY, 443))
    backend, _ = h.connect_backend()
    backend.dataReceived(b"x" * 10)
    [view] = h.relay.views()
    assert (view.state, view.route, view.bytes_down) == (State.SPLICING, REGISTRY, 10)
    assert not emptied.called
    assert h.relay.kill(view.id, "killed") == view
    backend.connectionLost(Failure(ConnectionDone()))
    h.close(client)
    assert h.relay.views() == [] and emptied.called
    assert h.events[-1]["close_reason"] == "killed"
    assert h.relay.when_empty().called


def test_counters_come_from_access_records() -> None:
    """Refusals, closes, routes and bytes are counted once each connection's record is in."""
    h = RelayHarness()
    protocol, client = h.accept()
    protocol.dataReceived(client_hello_bytes("unknown.example.com"))
    assert h.relay.stats.refused == {}  # still closing
    h.close(client)
    assert h.relay.stats.refused == {"not_allowed": 1}
    assert h.relay.stats.closed == {"refused": 1}


def test_the_indexed_lookup_finds_every_transition_automat_built() -> None:
    """The dict the machine looks transitions up in gives, for every pair, the next state
    and the action the table names (it replaces Automat's scan, not its table)."""
    automaton = connection._MACHINE.__automat_automaton__
    states = {state.name: state for state in automaton.states()}
    for (old, symbol), (new, action) in TRANSITIONS.items():
        found, outputs = automaton.outputForInput(states[old], symbol)
        assert (found.name, [output.name for output in outputs]) == (new, [action])
