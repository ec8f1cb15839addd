"""A worker process: the relay on listening sockets inherited from the main process.

The main process (see :mod:`acrrelay.workers`) starts each worker as::

    python -m acrrelay.worker_main --worker 2 --fds 3:inet,4:inet6 -- [the relay's twist flags]

The worker reads the same configuration, adopts the sockets in listener order, and
runs a :class:`~acrrelay.service.SignalledRelayService` under its own reactor: SIGHUP
reloads, SIGTERM drains and exits 0, as in the main process.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from typing import Final

__all__ = ["main"]

_FAMILIES: Final = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m acrrelay.worker_main")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--fds", required=True, help="FD:FAMILY,... in listener order")
    parser.add_argument("relay", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def adopted_sockets(fds: str) -> list[tuple[int, int]]:
    """``"3:inet,4:inet6"`` -> [(3, AF_INET), (4, AF_INET6)]."""
    adopted = []
    for item in fds.split(","):
        fd, _, family = item.partition(":")
        adopted.append((int(fd), int(_FAMILIES[family])))
    return adopted


def main(argv: Sequence[str] | None = None) -> None:
    """A worker: the relay on inherited listening sockets, under its own reactor."""
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from acrrelay.config import ConfigError, load_config
    from acrrelay.service import SignalledRelayService
    from acrrelay.tap import Options, global_reactor

    args = _arguments(argv)
    options = Options()
    options.parseOptions([a for a in args.relay if a != "--"])
    path, overlay = options["config"], options.overlay()
    try:
        config = load_config(path, overlay)
    except ConfigError as e:
        raise SystemExit(f"acrrelay worker {args.worker}: {e}") from None
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    reactor = global_reactor()
    service = SignalledRelayService(
        config,
        reactor,
        config_loader=lambda: load_config(path, overlay),
        adopt=adopted_sockets(args.fds),
        worker=args.worker,
    )
    service.startService()
    from twisted.internet import reactor as running  # the same reactor, typed for running

    running.addSystemEventTrigger("before", "shutdown", service.stopService)
    running.run()


if __name__ == "__main__":
    main()
