"""What the doctor says about its hops: the hop record, progress as it runs, the final report.

:class:`Hop` is what each hop of :mod:`acrrelay.doctor` fills in; a :class:`Reporter`
hears about it as it starts, progresses and ends (:class:`ProgressPrinter` writes that
on stderr); :func:`render` turns the finished hops into the table, hints under their
rows, or JSON. It is kept apart from the hops so that the wording a person reads and
the checks that produce it can each be read on their own.
"""

from __future__ import annotations

import json
from typing import IO, Protocol

import attrs

__all__ = ["MARKS", "Hop", "ProgressPrinter", "Reporter", "Silent", "format_table", "render"]


@attrs.define
class Hop:
    """One hop's record: what was checked, on which host, how it went and how long it took."""

    name: str
    host: str
    status: str = "skipped"  # running, ok, failed, skipped
    result: str = ""
    seconds: float = 0.0
    hint: str = ""


class Reporter(Protocol):
    """Hears about the hops as they run, so a slow one is visibly in progress."""

    def started(self, hop: Hop) -> None: ...

    def progress(self, hop: Hop, text: str) -> None: ...

    def finished(self, hop: Hop) -> None: ...


class Silent:
    """The reporter when nobody listens."""

    def started(self, hop: Hop) -> None:
        pass

    def progress(self, hop: Hop, text: str) -> None:
        pass

    def finished(self, hop: Hop) -> None:
        pass


def format_table(hops: list[Hop]) -> str:
    """The hops as a table, hints under the row they belong to."""
    header = ["HOP", "HOST", "RESULT", "TIME"]
    rows = [
        [
            hop.name,
            hop.host,
            MARKS[hop.status] + (f": {hop.result}" if hop.result else ""),
            f"{hop.seconds * 1000:.0f} ms" if hop.status != "skipped" else "",
        ]
        for hop in hops
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = []
    for row, hop in zip([header, *rows], [None, *hops], strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
        if hop is not None and hop.hint:
            lines.append(f"{'':<{widths[0]}}  hint: {hop.hint}")
    return "\n".join(lines)


MARKS = {"running": "...", "ok": "ok", "failed": "FAILED", "skipped": "skipped"}


class ProgressPrinter:
    """Reports hops on ``stream`` as they start, progress and end; a terminal gets one
    updating line, anything else a line per event (so a log shows what hung)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._tty = stream.isatty()

    def _line(self, hop: Hop, text: str) -> None:
        line = f"{hop.name:<9} {hop.host}: {text}"
        self._stream.write("\r\x1b[K" + line if self._tty else line + "\n")
        self._stream.flush()

    def started(self, hop: Hop) -> None:
        self._line(hop, "checking ...")

    def progress(self, hop: Hop, text: str) -> None:
        self._line(hop, text)

    def finished(self, hop: Hop) -> None:
        self._line(hop, MARKS[hop.status])

    def clear(self) -> None:
        """Wipe the updating line before the table (a terminal only)."""
        if self._tty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def render(hops: list[Hop], *, as_json: bool = False) -> str:
    """The report on ``hops``: JSON, or the table and a line saying how many failed."""
    failed = [hop for hop in hops if hop.status == "failed"]
    if as_json:
        return (
            json.dumps({"hops": [attrs.asdict(h) for h in hops], "ok": not failed}, indent=2) + "\n"
        )
    return (
        format_table(hops)
        + "\n"
        + (f"\n{len(failed)} of {len(hops)} hops failed\n" if failed else "\nevery hop passed\n")
    )
