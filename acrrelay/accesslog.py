"""One JSON line per connection.

Each finished connection emits one ``twisted.logger`` event in the
``acrrelay.access`` namespace with named fields (:data:`FIELDS`). The
:class:`AccessLog` observer writes those fields, and nothing else, as one JSON
object per line to a file or to standard output. An embedding program can pass
its own observer instead.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any, Final

from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer

__all__ = ["FIELDS", "AccessLog"]

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
