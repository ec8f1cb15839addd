"""A user-space line: a TCP forwarder on 127.0.0.1 that limits throughput and counts bytes.

These machines have no netem, so the data centre's leased line is this process: every
connection accepted on ``--listen`` is forwarded to ``--target``, and all connections share
one token bucket per direction (the line is full duplex: ``--rate`` bytes/s each way), so
sixteen clients through it get 1/16 of the line each, as on a real line. It counts the bytes
it carried each way; ``--control PORT`` answers one JSON line with the counts to any
connection (``{"up": ..., "down": ..., "connections": ...}``): "up" is client to target.

It runs as its own process (``python -m bench.shaper``) so its CPU is not the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

#: What one read may take from a socket: small enough that the bucket stays smooth.
CHUNK = 64 * 1024


class Bucket:
    """A token bucket as a virtual clock: each ``take(n)`` books ``n / rate`` seconds of the
    line after the last booking (at most ``burst`` bytes' worth of idle time is credited), and
    sleeps until its turn. ``rate`` 0 means no limit."""

    def __init__(self, rate: float, burst: int = CHUNK) -> None:
        self.rate = rate
        self.burst = burst
        self._booked = 0.0

    def delay(self, n: int, now: float) -> float:
        """Book ``n`` bytes at time ``now``; how long to wait before sending them."""
        if self.rate <= 0:
            return 0.0
        self._booked = max(self._booked, now - self.burst / self.rate) + n / self.rate
        return max(0.0, self._booked - now)

    async def take(self, n: int) -> None:
        wait = self.delay(n, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)


class Shaper:
    def __init__(self, target: tuple[str, int], rate: float) -> None:
        self.target = target
        self.up = Bucket(rate)
        self.down = Bucket(rate)
        self.counts = {"up": 0, "down": 0, "connections": 0}

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        bucket: Bucket,
        key: str,
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                await bucket.take(len(data))
                writer.write(data)
                self.counts[key] += len(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.transport.abort()

    async def handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.counts["connections"] += 1
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.transport.abort()
            return
        try:
            await asyncio.gather(
                self._pump(c_reader, t_writer, self.up, "up"),
                self._pump(t_reader, c_writer, self.down, "down"),
            )
        finally:
            for w in (c_writer, t_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def report(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(json.dumps(self.counts).encode() + b"\n")
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()


async def serve(listen: int, control: int, target: tuple[str, int], rate: float) -> None:
    shaper = Shaper(target, rate)
    line = await asyncio.start_server(shaper.handle, "127.0.0.1", listen, backlog=1024)
    counts = await asyncio.start_server(shaper.report, "127.0.0.1", control)
    async with line, counts:
        await asyncio.gather(line.serve_forever(), counts.serve_forever())


def read_counts(control: int, timeout: float = 10.0) -> dict[str, int]:
    """The shaper's counts, asked on its control port."""
    import socket

    with socket.create_connection(("127.0.0.1", control), timeout=timeout) as sock:
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    counts: dict[str, int] = json.loads(data)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shaper", description=__doc__)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--control", type=int, required=True, help="counts port on 127.0.0.1")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rate", type=float, default=50e6, help="bytes/s each way (0: none)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.control, (host, int(port)), args.rate))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
