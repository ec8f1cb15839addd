"""Listening ports as child services: each binds at start, at once, or says why not.

A :class:`ListeningService` binds in ``privilegedStartService`` (so ``twistd`` can bind
443 before dropping privileges) or, failing that, in ``startService``, and stops
listening in ``stopService``. Binding is synchronous: a port that cannot be bound
raises :class:`ListenError` there, naming the endpoint and the reason, so the owner
can release what it bound before and leave nothing half-bound.

Twisted's ``StreamServerEndpointService`` binds asynchronously and logs a failure;
the relay wants the failure as the start-up's one-line error instead.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any, Final

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.python.failure import Failure

__all__ = ["DEFAULT_BACKLOG", "ListenError", "ListeningService", "listen_now", "with_backlog"]

#: The listen backlog unless an endpoint string sets one (the kernel caps it at somaxconn).
#: Twisted's default of 50 overflows under a burst, and connections the kernel has
#: completed but nobody accepted escape the peek timeout.
DEFAULT_BACKLOG: Final = 4096


class ListenError(Exception):
    """A listener could not be bound. The message names the endpoint and the reason."""


class ExitsOnListenError(Service):
    """For a service a process runs (``twist``): a listener that cannot bind is one line on
    stderr and a non-zero exit, not a traceback. Mixed in before the service class."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenError as e:
            raise SystemExit(f"acrrelay: {e}") from None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenError as e:
            raise SystemExit(f"acrrelay: {e}") from None


class ListeningService(Service):
    """One listening port, bound by ``bind`` (which raises :class:`ListenError`)."""

    def __init__(self, bind: Callable[[], IListeningPort]) -> None:
        self._bind = bind
        self.port: IListeningPort | None = None

    def listen(self) -> IListeningPort:
        """Bind now unless bound already; the port."""
        if self.port is None:
            self.port = self._bind()
        return self.port

    def privilegedStartService(self) -> None:
        self.listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self.listen()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.unbind()

    def unbind(self) -> defer.Deferred[None]:
        """Stop listening (established connections go on); fires once the port is closed."""
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening).addCallback(lambda _: None)


def listen_now(reactor: Any, description: str, factory: IProtocolFactory) -> IListeningPort:
    """Listen on the server endpoint ``description`` at once, or raise :class:`ListenError`."""
    endpoint = serverFromString(reactor, with_backlog(description))
    outcome: list[IListeningPort | Failure] = []
    d = endpoint.listen(factory)
    d.addBoth(outcome.append)
    if not outcome:
        # Standard endpoints bind synchronously; anything else must not leave us guessing.
        d.cancel()
        raise ListenError(f"cannot listen on {description}: it did not bind at once")
    result = outcome[0]
    if isinstance(result, Failure):
        raise ListenError(f"cannot listen on {description}: {_why(result)}")
    mismatch = adopted_family_mismatch(description, result)
    if mismatch is not None:
        result.stopListening()
        raise ListenError(f"cannot listen on {description}: {mismatch}")
    return result


def with_backlog(description: str) -> str:
    """``description``, with ``backlog=`` added for tcp, tcp6 and unix endpoints."""
    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


_DOMAIN: Final = re.compile(r"(?:^|:)domain=([A-Za-z0-9]+)(?::|$)")


def adopted_family_mismatch(description: str, port: Any) -> str | None:
    """Why an inherited ``systemd:`` socket does not match its ``domain=``, or None.

    Twisted believes ``domain=``: an IPv6 socket adopted as INET reads every peer address
    as garbage, and the client ACLs, per-client limits and logs with it. systemd makes an
    IPv6 (dual-stack) socket for a bare ``ListenStream=443``, so this is an easy mistake.
    """
    if not description.startswith("systemd:"):
        return None
    declared = _DOMAIN.search(description)
    sock = getattr(port, "socket", None)
    option = getattr(socket, "SO_DOMAIN", None)  # Linux; elsewhere, trust the string
    if declared is None or sock is None or option is None:
        return None
    actual = sock.getsockopt(socket.SOL_SOCKET, option)
    if actual == getattr(socket, f"AF_{declared.group(1)}", None):
        return None
    try:
        actual_domain = socket.AddressFamily(actual).name.removeprefix("AF_")
    except ValueError:
        actual_domain = str(actual)
    why = (
        f"the socket systemd passed is {actual_domain}, not {declared.group(1)}, and Twisted "
        f"reads client addresses by domain=: write domain={actual_domain}"
    )
    if actual_domain == "INET6" and declared.group(1) == "INET":
        why += ", or ListenStream=0.0.0.0:PORT in the .socket unit for an IPv4 socket"
    return why


def _why(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, error.CannotListenError) and isinstance(value.socketError, OSError):
        return (value.socketError.strerror or str(value.socketError)).lower()
    return failure.getErrorMessage().strip() or type(value).__name__
