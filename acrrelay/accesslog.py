"""One JSON line per connection.

Each finished connection is one :class:`AccessRecord`, which the relay counts and
emits as one ``twisted.logger`` event in the ``acrrelay.access`` namespace with
named fields (:data:`FIELDS`, the record's fields). The
:class:`AccessLog` observer writes those fields, and nothing else, as one JSON
object per line to a file or to standard output. An embedding program can pass
its own observer instead.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any, Final

import attrs
from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

__all__ = ["FIELDS", "AccessLog", "AccessRecord"]


@attrs.frozen
class AccessRecord:
    """One finished connection, as the access log writes it: its fields *are* the
    access-log fields, in the order they are written. None means "not written"."""

    listener: str
    client: str
    close_reason: str
    closed_first: str
    id: int | None = None
    worker: int | None = None
    peer: str | None = None
    front_door: str | None = None
    target: str | None = None
    sni: str | None = None
    method: str | None = None
    #: The gateway's HTTP answer, and its blob path (hit, miss, coalesced or bypass).
    status: int | None = None
    cache: str | None = None
    user: str | None = None
    alpn: tuple[str, ...] | None = None
    ech: bool | None = None
    hello_bytes: int | None = None
    hello_records: int | None = None
    route: str | None = None
    service: str | None = None
    backend: str | None = None
    backend_address: str | None = None
    bytes_up: int | None = 0
    bytes_down: int | None = 0
    peek_ms: float | None = None
    connect_ms: float | None = None
    total_ms: float | None = None
    paused_up_ms: float | None = None
    paused_down_ms: float | None = None
    zero_copy: str | None = None
    detail: str | None = None

    def fields(self) -> dict[str, Any]:
        """The record as ``twisted.logger`` event fields (ALPN as a JSON-friendly list)."""
        out = {name: getattr(self, name) for name in FIELDS}
        if self.alpn is not None:
            out["alpn"] = list(self.alpn)
        return out

    @property
    def refusal(self) -> str | None:
        """The refusal reason, for a connection that was refused."""
        head, _, reason = self.close_reason.partition(":")
        return reason if head == "refused" and reason else None


#: The fields of an access event, in the order they are written.
FIELDS: Final = (
    "id",
    "worker",
    "listener",
    "client",
    "peer",
    "front_door",
    "target",
    "sni",
    "method",
    "status",  # the gateway's HTTP answer
    "cache",  # the gateway's blob path: hit, miss, coalesced or bypass
    "user",
    "alpn",
    "ech",
    "hello_bytes",
    "hello_records",
    "route",
    "service",
    "backend",
    "backend_address",
    "bytes_up",
    "bytes_down",
    "peek_ms",
    "connect_ms",
    "total_ms",
    "paused_up_ms",
    "paused_down_ms",
    "zero_copy",
    "close_reason",
    "closed_first",
    "detail",
)
assert set(FIELDS) == {field.name for field in attrs.fields(AccessRecord)}


@implementer(ILogObserver)
class AccessLog:
    """Writes access events as JSON lines to ``target``: "-" (stdout) or a file path."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._file: IO[str] | None = None
        self._owned = False

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def reopen(self) -> None:
        """Close and open again: after logrotate moved the file away."""
        self.close()
        self.open()

    def open(self) -> None:
        if self._file is not None:
            return
        if self.target == "-":
            # twist redirects sys.stdout into the log system; write to the real one.
            self._file = sys.__stdout__
            self._owned = False
        else:
            self._file = open(self.target, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owned = True

    def close(self) -> None:
        if self._file is not None and self._owned:
            self._file.close()
        self._file = None

    def __call__(self, event: LogEvent) -> None:
        if self._file is None:
            return
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0.0), UTC).isoformat(
                timespec="milliseconds"
            )
        }
        for field in FIELDS:
            value = event.get(field)
            if value is not None:
                record[field] = value
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
