"""The admin shell over SSH: a Twisted manhole, public keys only, keys per instance.

- Users log in with a key listed in an ``authorized_keys`` file; there are no
  passwords, so a password is never even offered as a method.
- The host key is created at first start if missing (Ed25519, file mode 0600).
- conch's ``ConchFactory`` keeps keys in class dicts, shared by every factory in
  the process; here each factory gets its own, as buildbot's manhole does.
- ``ssh -t relay`` opens the interactive manhole (a Python prompt with ``relay``);
  ``ssh relay 'relay.stats()'`` runs one expression and exits with 0, or 1 if it
  raised, which suits scripts.
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.insults import insults
from twisted.conch.ssh import keys
from twisted.cred import portal
from twisted.cred.portal import IRealm
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure

__all__ = [
    "KeyFileError",
    "host_key",
    "make_ssh_factory",
    "read_authorized_keys",
    "run_command",
    "ssh_portal",
]


class KeyFileError(ValueError):
    """An authorized_keys or host key file that cannot be used."""


def host_key(path: str) -> keys.Key:
    """The SSH host key at ``path``, created (Ed25519, mode 0600) if it does not exist."""
    target = Path(path)
    if not target.exists():
        private = keys.Key(ed25519.Ed25519PrivateKey.generate())
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as f:
            f.write(private.toString("OPENSSH"))
        return private
    mode = target.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"host key {path} is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key: keys.Key = keys.Key.fromFile(str(target))
    except (keys.BadKeyError, ValueError, OSError) as e:
        raise KeyFileError(f"host key {path} cannot be read: {e}") from None
    if key.isPublic():
        raise KeyFileError(f"host key {path} is a public key; it must be the private key")
    return key


def read_authorized_keys(path: str) -> list[keys.Key]:
    """Public keys from an OpenSSH ``authorized_keys`` file (options before a key are ignored)."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as e:
        raise KeyFileError(f"authorized keys {path} cannot be read: {e.strerror or e}") from None
    found: list[keys.Key] = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        words = line.split()
        for start in range(len(words) - 1):
            try:
                found.append(keys.Key.fromString(b" ".join(words[start : start + 2])))
                break
            except (keys.BadKeyError, ValueError, IndexError):
                continue
        else:
            raise KeyFileError(f"{path} line {number}: no public key found")
    if not found:
        raise KeyFileError(f"authorized keys {path} lists no keys")
    return found


def run_command(namespace: dict[str, Any], source: str) -> tuple[str, int]:
    """Run one expression or statement as the shell would; (output, exit status)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            try:
                code = compile(source, "<ssh>", "eval")
            except SyntaxError:
                exec(compile(source, "<ssh>", "exec"), namespace)
            else:
                value = eval(code, namespace)
                if value is not None:
                    print(repr(value))
    except Exception:
        return out.getvalue() + traceback.format_exc(), 1
    return out.getvalue(), 0


def _session_class(namespace: dict[str, Any]) -> type[manhole_ssh.TerminalSession]:
    class RelaySession(manhole_ssh.TerminalSession):
        def execCommand(self, proto: Any, cmd: bytes) -> None:
            output, status = run_command(namespace, cmd.decode("utf-8", "replace"))
            newline = "\r\n" if getattr(self, "height", None) else "\n"  # a pty wants CRLF
            proto.write(output.replace("\n", newline).encode())
            reason = ProcessDone(None) if status == 0 else ProcessTerminated(exitCode=status)
            proto.processEnded(Failure(reason))

        def openShell(self, proto: Any) -> None:
            # conch closes an interactive session without an exit status, which ssh(1)
            # reports as 255, a failure; a logout with Ctrl-D is a clean exit.
            proto.loseConnection = lambda: proto.processEnded(Failure(ProcessDone(None)))
            super().openShell(proto)

        def windowChanged(self, newWindowSize: Any) -> None:
            pass  # the manhole redraws on its own

        def eofReceived(self) -> None:
            pass

    return RelaySession


class _ManholeFactory(manhole_ssh.ConchFactory):
    noisy = False


def ssh_portal(
    namespace: dict[str, Any], authorized: Mapping[bytes, list[keys.Key]]
) -> portal.Portal:
    """A portal that logs ``authorized`` users' keys into a manhole on ``namespace``."""
    realm = manhole_ssh.TerminalRealm()
    realm.sessionFactory = _session_class(namespace)

    def chained_protocol() -> insults.ServerProtocol:
        return insults.ServerProtocol(manhole.ColoredManhole, namespace)

    # conch annotates this as a class, but calls it as any factory of protocols.
    realm.chainedProtocolFactory = chained_protocol  # type: ignore[assignment]
    checker = SSHPublicKeyChecker(InMemorySSHKeyDB(authorized))
    return portal.Portal(cast(IRealm, realm), [checker])


def make_ssh_factory(
    namespace: dict[str, Any],
    *,
    authorized: Mapping[bytes, list[keys.Key]],
    server_key: keys.Key,
) -> manhole_ssh.ConchFactory:
    """An SSH factory serving a manhole on ``namespace`` to the ``authorized`` users' keys.
    Replace its ``portal`` (see :func:`ssh_portal`) to change the keys for new logins."""
    factory = _ManholeFactory(ssh_portal(namespace, authorized))
    key_type = server_key.sshType()
    # Instance attributes: ConchFactory's class-level dicts would be shared process-wide.
    # (conch annotates the values as bytes; they are Key objects, as conch uses them.)
    factory.publicKeys = {key_type: server_key.public()}
    factory.privateKeys = {key_type: server_key}  # type: ignore[dict-item]
    return factory
