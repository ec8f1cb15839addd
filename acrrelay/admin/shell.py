"""The ``relay`` object of the admin shell: look at the relay and steer it.

Every method returns a :class:`Text`, whose ``repr`` is the text itself, so the
shell shows a readable table rather than a Python repr::

    >>> relay.connections()
    ID  CLIENT           DOOR  TARGET            ROUTE  BACKEND  UP    DOWN  AGE  STATE     PAUSED
     7  10.8.0.12:52754  tls   bkt.oss-…:443     *.oss  …:443    1.2K  812M  41s  splicing  client
    1 connection(s)
    >>> relay.kill(7)
    killed 7 (10.8.0.12:52754 -> bkt.oss-cn-beijing.aliyuncs.com:443)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from acrrelay.config import format_duration
from acrrelay.connection import State

if TYPE_CHECKING:
    from acrrelay.service import RelayService

__all__ = ["RelayShell", "Text", "human_bytes"]


class Text(str):
    """A string that shows as itself in the shell."""

    def __repr__(self) -> str:
        return str(self)


def human_bytes(count: float) -> str:
    """1234567 -> '1.2M'."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(count) < 1024 or unit == "T":
            return f"{count:.0f}{unit}" if not unit else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}T"  # pragma: no cover


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


class RelayShell:
    """What the admin shell offers as ``relay``. Each method says what it does."""

    def __init__(self, service: RelayService) -> None:
        self._service = service

    def __repr__(self) -> str:
        return (
            "relay: connections(), kill(id), routes(), stats(), reload(), drain(seconds); "
            "help(relay) for more"
        )

    def connections(self) -> Text:
        """Live connections: id, client, front door, target, route, backend, bytes each way,
        age, state, and which side back-pressure is holding back."""
        relay = self._service.relay
        now = relay.reactor.seconds()
        rows = []
        for view in relay.views():
            held = [
                side
                for side, paused in (
                    ("client", view.client_paused),
                    ("backend", view.backend_paused),
                )
                if paused
            ]
            rows.append(
                [
                    str(view.id),
                    view.client,
                    view.door or "-",
                    view.target_text,
                    view.route or "-",
                    view.backend_address or "-",
                    human_bytes(view.bytes_up),
                    human_bytes(view.bytes_down),
                    format_duration(round(now - view.started)),
                    view.state.value,
                    ",".join(held) or "-",
                ]
            )
        header = [
            "ID", "CLIENT", "DOOR", "TARGET", "ROUTE", "BACKEND",
            "UP", "DOWN", "AGE", "STATE", "PAUSED",
        ]  # fmt: skip
        summary = f"{len(rows)} connection(s)"
        if not rows:
            return Text(summary)
        return Text(_table(header, rows, right={0, 6, 7, 8}) + "\n" + summary)

    def kill(self, connection_id: int) -> Text:
        """Cut one connection at once, both sides (it is logged as killed)."""
        view = self._service.relay.kill(connection_id, "killed")
        if view is None:
            return Text(f"no connection {connection_id}")
        return Text(f"killed {connection_id} ({view.client} -> {view.target_text})")

    def routes(self) -> Text:
        """The route table in force: name, backend, service, ports, and where it came from."""
        rows = [
            [
                route.name,
                route.backend,
                route.service,
                ",".join(str(p) for p in sorted(route.ports)),
                route.origin,
            ]
            for route in self._service.relay.policy.table.routes
        ]
        return Text(
            _table(["NAME", "BACKEND", "SERVICE", "PORTS", "FROM"], rows, right=set())
            + f"\n{len(rows)} route(s) from {self._service.relay.config.source}"
        )

    def stats(self) -> Text:
        """Counters since start: connections, bytes, refusals and failures by reason."""
        relay = self._service.relay
        stats = relay.stats
        lines = [
            f"accepted      {stats.accepted}",
            f"open now      {len(relay.connections)} (limit {relay.max_connections}"
            f"{', paused' if not relay.accepting else ''})",
            f"bytes up      {human_bytes(stats.bytes_up)}",
            f"bytes down    {human_bytes(stats.bytes_down)}",
            f"reloads       {stats.reloads.get('ok', 0)} ok, "
            f"{stats.reloads.get('failed', 0)} failed",
        ]
        for title, counts in (
            ("refused", stats.refused),
            ("backend failures", stats.backend_failures),
            ("closed", stats.closed),
        ):
            if counts:
                detail = ", ".join(f"{reason} {n}" for reason, n in counts.most_common())
                lines.append(f"{title:<13} {detail}")
        return Text("\n".join(lines))

    def reload(self) -> Text:
        """Re-read the configuration; new connections use it, established ones are untouched.
        An invalid configuration is refused and the old one stays; so is any reload while the
        relay drains."""
        return Text(self._service.reload())

    def drain(self, seconds: float | None = None) -> Text:
        """Stop accepting, let connections finish for up to ``seconds`` (the configured
        drain_timeout by default), cut the rest, then stop the relay."""
        deadline = self._service.start_shutdown(seconds)
        return Text(
            f"draining: {len(self._service.relay.connections)} connection(s), "
            f"deadline {format_duration(deadline)}; the relay stops afterwards"
        )


def namespace(service: RelayService) -> dict[str, Any]:
    """The admin shell's globals."""
    return {"relay": RelayShell(service), "State": State}
