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

Each worker is ``python -m acrrelay.worker_main`` (see :mod:`acrrelay.worker_main`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from acrrelay.drain import Clock

__all__ = ["WorkerPool"]

#: The first file descriptor a worker receives listening sockets on.
FIRST_FD: Final = 3
RESTART_DELAY: Final = 1.0


class PoolReactor(Clock, Protocol):
    """What the pool uses of its reactor: processes, and time to restart them."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport: ...


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

    def __init__(
        self,
        reactor: PoolReactor,
        count: int,
        sockets: Iterable[Any],
        argv: Sequence[str],
    ) -> None:
        self.reactor = reactor
        self.count = count
        self._sockets = sockets  # the main process's listening ports, with fileno() (read at start)
        self._argv = list(argv)  # the relay's own flags, passed on to each worker
        self._workers: dict[int, tuple[_Worker, IProcessTransport]] = {}
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        for number in range(2, self.count + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        inherited = []
        for offset, port in enumerate(self._sockets):
            child_fd = FIRST_FD + offset
            fds[child_fd] = port.fileno()
            inherited.append(f"{child_fd}:{_family(port)}")
        args = [
            sys.executable, "-m", "acrrelay.worker_main",
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
