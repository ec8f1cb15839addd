"""The public in-memory harness (acrrelay.testing) as an embedder uses it: the README's
example runs exactly as written."""

from __future__ import annotations

from pathlib import Path

from acrrelay.testing import RelayHarness

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    section = README.read_text().split("### Testing against a relay in memory", 1)[1]
    return section.split("```python\n", 1)[1].split("\n```", 1)[0]


def test_the_readme_harness_example_runs() -> None:
    """The README's RelayHarness example runs, and its assertions hold."""
    namespace: dict[str, object] = {}
    exec(compile(_example(), "README.md", "exec"), namespace)
    harness = namespace["harness"]
    assert isinstance(harness, RelayHarness)
    assert len(harness.events) == 1  # the refused one; the silent one is still closing


def test_the_harness_records_what_an_embedder_needs() -> None:
    """A refused client leaves one access event and no connection behind."""
    harness = RelayHarness()
    protocol, client = harness.accept()
    protocol.dataReceived(b"\x00junk")
    harness.close(client)
    assert harness.relay.views() == []
    assert harness.events[-1]["close_reason"] == "refused:not_tls"
