"""Run a command as systemd socket activation would, for the end-to-end tests.

Run as its own process::

    python tests/systemd_activate.py FAMILY HOST COMMAND [ARG...]

It binds one listening TCP socket on ``HOST`` port 0, puts it on file descriptor 3 (the
first that systemd passes), sets ``LISTEN_FDS=1``, ``LISTEN_FDNAMES`` and ``LISTEN_PID``
(this process's own PID, which ``exec`` keeps), prints one line ``ACTIVATE port=PORT``
and execs ``COMMAND``: what Twisted's ``systemd:`` endpoint reads, as under systemd.

``FAMILY`` is ``inet`` (what ``ListenStream=0.0.0.0:443`` makes) or ``inet6``: an IPv6
socket with ``IPV6_V6ONLY`` off, which is what systemd makes for a bare
``ListenStream=443`` (``BindIPv6Only=default`` on Linux's default ``bindv6only=0``). Bound
to ``::ffff:127.0.0.1``, it takes IPv4 loopback clients as a dual-stack ``[::]:443`` would,
without listening beyond loopback.
"""

from __future__ import annotations

import os
import socket
import sys

#: The first descriptor systemd passes (SD_LISTEN_FDS_START).
FIRST_FD = 3


def listening_socket(family: str, host: str) -> socket.socket:
    """A listening socket as systemd's ``ListenStream=`` makes it, on ``host`` port 0."""
    if family == "inet6":
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    elif family == "inet":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    else:
        raise SystemExit(f"systemd_activate: FAMILY is inet or inet6, not {family!r}")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def main(argv: list[str]) -> None:
    if len(argv) < 4:
        raise SystemExit(__doc__)
    family, host, command = argv[1], argv[2], argv[3:]
    sock = listening_socket(family, host)
    port = sock.getsockname()[1]
    fd = sock.detach()
    if fd != FIRST_FD:
        os.dup2(fd, FIRST_FD)  # inheritable, unlike the socket's own descriptor
        os.close(fd)
    else:
        os.set_inheritable(FIRST_FD, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="acrrelay.socket", LISTEN_PID=str(os.getpid()))
    print(f"ACTIVATE port={port}", flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv)
