"""Several processes on the same listening sockets: ``[relay] workers = N``.

One Twisted process uses one core. With ``workers = N`` the process that ``twist``
runs binds the listeners as always and serves as worker 1; it starts N-1 worker
processes that inherit the listening sockets (file descriptors, through
``spawnProcess``'s ``childFDs``) and adopt them with ``adoptStreamPort``, so every
endpoint type works, ``systemd:`` included. The kernel hands each new connection to
one of the processes.

The main process forwards SIGHUP (reload: routes and settings; adding or removing
listeners needs a restart with workers) and SIGTERM (drain) to the workers, waits for
them to finish draining before it exits, and restarts a worker that dies. Limits: the
admin shell and the metrics page run in the main process and see its own connections
only; each process has its own ``max_connections`` and ``max_connections_per_client``.

    python -m acrrelay.workers --fds 3,4 -- [the relay's twist flags]
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["WorkerPool", "main"]

#: The first file descriptor a worker receives listening sockets on.
FIRST_FD: Final = 3
RESTART_DELAY: Final = 1.0


class _Worker(ProcessProtocol):
    def __init__(self, pool: WorkerPool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.ended: defer.Deferred[None] = defer.Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """Starts and watches the worker processes of a relay service."""

    _log = Logger(namespace="acrrelay.workers")

    def __init__(self, reactor: Any, count: int, sockets: Iterable[Any], argv: Sequence[str]):
        self.reactor = reactor
        self.count = count
        self._sockets = sockets  # the main process's listening ports (read at start)
        self._argv = list(argv)  # the relay's own flags, passed on to each worker
        self._workers: dict[int, tuple[_Worker, Any]] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for number in range(2, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        fds = {0: "w", 1: 1, 2: 2}
        inherited = []
        for offset, port in enumerate(self._sockets):
            child_fd = FIRST_FD + offset
            fds[child_fd] = port.fileno()
            inherited.append(f"{child_fd}:{_family(port)}")
        args = [
            sys.executable, "-m", "acrrelay.workers",
            "--worker", str(number), "--fds", ",".join(inherited), "--", *self._argv,
        ]  # fmt: skip
        worker = _Worker(self, number)
        process = self.reactor.spawnProcess(
            worker, sys.executable, args, env=dict(os.environ), childFDs=fds
        )
        self._workers[number] = (worker, process)
        self._log.info("started worker {number} (pid {pid})", number=number, pid=process.pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        self._workers.pop(worker.number, None)
        if self._stopping:
            return
        self._log.error(
            "worker {number} ended ({why}); starting it again",
            number=worker.number,
            why=reason.getErrorMessage(),
        )
        self.reactor.callLater(RESTART_DELAY, self._respawn, worker.number)

    def _respawn(self, number: int) -> None:
        if not self._stopping and number not in self._workers:
            self._spawn(number)

    def signal(self, signum: int) -> None:
        """Pass a signal (SIGHUP, SIGTERM) on to every worker."""
        for _, process in list(self._workers.values()):
            with contextlib.suppress(OSError, ProcessExitedAlready):
                process.signalProcess(signum)

    def stopService(self) -> defer.Deferred[None]:
        """Ask every worker to drain, and wait for them all."""
        super().stopService()
        self._stopping = True
        waits = [worker.ended for worker, _ in self._workers.values()]
        self.signal(signal.SIGTERM)
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _family(port: Any) -> str:
    host = port.getHost()
    kind = type(host).__name__
    return {"IPv4Address": "inet", "IPv6Address": "inet6", "UNIXAddress": "unix"}.get(kind, "inet")


_FAMILIES: Final = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


def main(argv: Sequence[str] | None = None) -> None:
    """A worker: the relay on inherited listening sockets, under its own reactor."""
    import argparse

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from acrrelay.config import ConfigError, load_config
    from acrrelay.tap import Options, _ExitingRelayService

    parser = argparse.ArgumentParser(prog="python -m acrrelay.workers")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--fds", required=True)
    parser.add_argument("relay", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    relay_argv = [a for a in args.relay if a != "--"]
    options = Options()
    options.parseOptions(relay_argv)
    adopted = []
    for item in args.fds.split(","):
        fd, _, family = item.partition(":")
        adopted.append((int(fd), _FAMILIES[family]))
    path, overlay = options["config"], options.overlay()
    try:
        config = load_config(path, overlay)
    except ConfigError as e:
        raise SystemExit(f"acrrelay worker {args.worker}: {e}") from None
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = _ExitingRelayService(
        config,
        reactor,
        config_loader=lambda: load_config(path, overlay),
        adopt=adopted,
        worker=args.worker,
    )
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
