"""A TCP forwarder for the gateway's upstream hop that counts, slows and cuts on command.

The gateway's backend points at it (``127.0.0.1:<port>``) and it forwards each connection
to the region relay, unchanged (TLS passes through). A test can:

- ``rate``: cap the bytes per second from upstream (all connections together), so a
  download lasts long enough to be interrupted;
- ``cut_after(n)``: reset every connection (TCP RST both ways, ``SO_LINGER`` 0) once
  ``n`` more bytes have come down, decided in the forwarding thread itself, so the cut
  falls mid-download at that byte and never depends on timing;
- ``refuse``: reset every new connection at once (an upstream that stays unreachable);
- read ``down`` (bytes from upstream so far) and ``cuts``.

Threads only, on loopback; ``close()`` stops the listener and every connection.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time

CHUNK = 64 * 1024


def _reset(sock: socket.socket) -> None:
    """Send a TCP RST: linger 0, then close. A thread blocked in recv() on the socket
    would keep it open (so no RST), so SHUT_RD wakes it first; it sends nothing."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """Listens on 127.0.0.1 (``port``) and forwards to ``target``; see the module docstring."""

    def __init__(self, target: tuple[str, int], *, rate: float | None = None) -> None:
        self.target = target
        self.rate = rate
        self.refuse = False
        self.down = 0
        self.cuts = 0
        #: ``down`` when the last cut happened.
        self.cut_down = 0
        self._cut_at: int | None = None
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._started = time.monotonic()
        self._budget_down = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def cut_after(self, more: int) -> None:
        """Reset every connection once ``more`` further bytes have come down."""
        with self._lock:
            self._cut_at = self.down + more

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refuse:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pace(self, size: int) -> None:
        if self.rate is None:
            return
        with self._lock:
            self._budget_down += size
            due = self._started + self._budget_down / self.rate
        time.sleep(max(0.0, due - time.monotonic()))

    def _pump(self, source: socket.socket, sink: socket.socket, down: bool) -> None:
        try:
            while data := source.recv(CHUNK):
                if down:
                    self._pace(len(data))
                    with self._lock:
                        self.down += len(data)
                        cut = self._cut_at is not None and self.down >= self._cut_at
                        if cut:
                            self._cut_at = None
                            self.cut_down = self.down
                    if cut:
                        self.reset_all()
                        return
                sink.sendall(data)
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
        except OSError:
            _reset(sink)

    def reset_all(self) -> None:
        """Reset every open connection, both sides."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.cuts += 1
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.reset_all()


__all__ = ["FaultProxy"]
