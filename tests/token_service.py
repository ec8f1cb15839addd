"""A registry token service (the Bearer realm) for the end-to-end world: stdlib only.

It does what ACR's ``dockerauth`` does for docker-registry's ``auth: token``: checks a
user and password, and grants of the asked scope what that user's rights allow, as a JWT
that distribution 2.8 accepts (``registry/auth/token``):

- header ``alg`` ES256 (the signature is ``r || s``, not DER), ``x5c`` = [the signer's
  certificate] (verified against ``rootcertbundle``), ``kid`` = the libtrust key ID;
- claims ``iss`` = the issuer, ``aud`` = the service (one string: 2.8 compares a
  string), ``exp``/``nbf``/``iat``, ``sub``, ``jti``, and ``access`` =
  ``[{"type", "name", "actions"}]``: each requested scope cut down to the user's rights
  (a scope with no action left is dropped, so the registry answers 401
  ``insufficient_scope``, as ACR's does for a repository the user may not read).

**Users** live in a JSON file (:class:`Users` writes it) that the service reads again on
every request, so a test changes rights, lifetimes or revokes a user by writing it, and
the very next token request sees the change:
``{"token_seconds": 600, "users": {NAME: {"password", "rights": {PATTERN: [ACTION...]},
"token_seconds"?, "revoked"?}}}``. ``PATTERN`` is an ``fnmatch`` pattern on the
repository name (``acrrelay-e2e/*``); ``"*"`` as an action grants every asked action. A
revoked or unknown user, or a wrong password, gets 401; so does a revoked user's refresh
token. ``token_seconds`` (per user, else the file's) is ``expires_in`` and ``exp - iat``.

``GET /auth?service=…&scope=…`` with Basic auth is docker's and skopeo's way;
``POST /auth`` with an OAuth2 form (``grant_type=password|refresh_token``) is
containerd's and buildkit's. Both answer ``token`` and ``access_token`` (equal) and
``expires_in``; an offline request also gets a ``refresh_token``. A test mints a token
itself (expired, or for any access) with :class:`TokenSigner` and the signer's key.

Run as a script: ``token_service.py CERT KEY SIGNING_KEY SIGNING_CERT ISSUER SERVICE
USERS_FILE``. It serves TLS on 127.0.0.1 port 0, prints ``READY <port>``, then one
``REQUEST <method> <path> <status> <user> <scopes>`` line per request, and stops when
its standard input closes (or on SIGTERM).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import os
import secrets
import ssl
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

#: Default token lifetime (ACR's tokens live 600 s) and how far ``nbf`` reaches back (ACR:
#: 300 s).
TOKEN_SECONDS = 600
NOT_BEFORE_SLACK = 300


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """docker/libtrust's key ID: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits,
    base32, in twelve colon-separated groups of four."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``type:name:actions`` -> a token ``access`` entry; the name may hold colons."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and kind and name):
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


class Users:
    """The users file: the test side writes it, the service reads it on every request.

    Every write replaces the file whole (a temporary file, then ``os.replace``), so the
    service never reads half of one; once a method returns, the next token request sees it.
    """

    def __init__(self, path: Path, token_seconds: int = TOKEN_SECONDS) -> None:
        self.path = path
        if not path.exists():
            self._write({"token_seconds": token_seconds, "users": {}})

    def read(self) -> dict[str, Any]:
        return dict(json.loads(self.path.read_text()))

    def _write(self, document: dict[str, Any]) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(document, indent=2))
        os.replace(partial, self.path)

    def _change(self, name: str, **fields: Any) -> None:
        document = self.read()
        assert name in document["users"], f"no user {name!r} in {self.path}"
        document["users"][name].update(fields)
        self._write(document)

    def add(
        self,
        name: str,
        password: str,
        rights: dict[str, list[str]],
        *,
        token_seconds: int | None = None,
    ) -> None:
        """Add (or replace) a user with ``rights``: repository pattern -> actions."""
        document = self.read()
        user: dict[str, Any] = {"password": password, "rights": rights}
        if token_seconds is not None:
            user["token_seconds"] = token_seconds
        document["users"][name] = user
        self._write(document)

    def set_rights(self, name: str, rights: dict[str, list[str]]) -> None:
        self._change(name, rights=rights)

    def set_token_seconds(self, name: str, seconds: int) -> None:
        self._change(name, token_seconds=seconds)

    def revoke(self, name: str) -> None:
        """The user can no longer get a token (nor refresh one); tokens issued live on."""
        self._change(name, revoked=True)

    def restore(self, name: str) -> None:
        self._change(name, revoked=False)


def granted(rights: dict[str, list[str]], scope: dict[str, Any]) -> dict[str, Any] | None:
    """``scope`` (a parsed access entry) cut down to ``rights``; None if nothing is left."""
    allowed: set[str] = set()
    for pattern, actions in rights.items():
        kind, _, name = pattern.rpartition(":") if ":" in pattern else ("repository", "", pattern)
        if kind == scope["type"] and fnmatch.fnmatchcase(scope["name"], name):
            allowed.update(actions)
    asked = scope["actions"]
    actions = list(asked) if "*" in allowed else [a for a in asked if a in allowed]
    return {**scope, "actions": actions} if actions else None


class TokenSigner:
    """Signs registry tokens with an EC P-256 key and its certificate."""

    def __init__(self, key_pem: bytes, cert_pem: bytes, issuer: str, service: str) -> None:
        key = serialization.load_pem_private_key(key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey), "the signing key must be EC P-256"
        self.key = key
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.kid = libtrust_key_id(key.public_key())
        self.issuer = issuer
        self.service = service

    @classmethod
    def from_files(cls, key: Path, cert: Path, issuer: str, service: str) -> TokenSigner:
        return cls(key.read_bytes(), cert.read_bytes(), issuer, service)

    def token(
        self,
        subject: str,
        access: list[dict[str, Any]],
        now: float | None = None,
        lifetime: int = TOKEN_SECONDS,
    ) -> str:
        """A signed token for ``access``, issued at ``now``, valid ``lifetime`` seconds (a
        negative lifetime gives a token that expired already)."""
        issued = int(time.time() if now is None else now)
        header = {"typ": "JWT", "alg": "ES256", "kid": self.kid, "x5c": self.x5c}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": issued + lifetime,
            "nbf": issued - NOT_BEFORE_SLACK,
            "iat": issued,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        der = self.key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return signing_input + "." + _b64url(signature)


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], signer: TokenSigner, users: Users) -> None:
        super().__init__(address, _Handler)
        self.signer = signer
        self.users = users
        self.refresh_tokens: dict[str, str] = {}
        self.lock = threading.Lock()
        self.tls: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake happens here, on the connection's own thread, so a stalled client
        # never holds up the accept loop.
        if self.tls is not None:
            request.settimeout(30)
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                print(f"HANDSHAKE-FAILED {client_address} {e}", flush=True)
                return
            try:
                super().finish_request(request, client_address)
            finally:
                request.close()
        else:
            super().finish_request(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: TokenServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one REQUEST line per request instead, in _reply

    def _reply(
        self, status: int, body: dict[str, Any], user: str = "-", scopes: str = "-", **headers: str
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(data)
        path = self.path.split("?")[0]
        print(f"REQUEST {self.command} {path} {status} {user} {scopes}", flush=True)

    def _denied(self, why: str) -> None:
        self._reply(
            401,
            {"errors": [{"code": "UNAUTHORIZED", "message": why}]},
            WWW_Authenticate='Basic realm="acrrelay e2e token service"',
        )

    def _basic(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization", "")
        scheme, _, encoded = value.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user, password

    def _grant(self, user: str, service: str, scopes: list[str], offline: bool) -> None:
        if service != self.server.signer.service:
            self._reply(400, {"errors": [{"code": "DENIED", "message": f"service {service!r}"}]})
            return
        document = self.server.users.read()
        entry = document["users"][user]
        asked = [scope for scope in map(parse_scope, scopes) if scope is not None]
        access = [a for a in (granted(entry["rights"], scope) for scope in asked) if a]
        lifetime = int(entry.get("token_seconds", document["token_seconds"]))
        token = self.server.signer.token(user, access, lifetime=lifetime)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": lifetime,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if offline:
            refresh = secrets.token_urlsafe(24)
            with self.server.lock:
                self.server.refresh_tokens[refresh] = user
            body["refresh_token"] = refresh
        self._reply(200, body, user, ",".join(scopes) or "-")

    def _known(self, user: str, password: str | None) -> bool:
        """The user exists and is not revoked, and (unless None) the password is theirs."""
        entry = self.server.users.read()["users"].get(user)
        if entry is None or entry.get("revoked"):
            return False
        return password is None or secrets.compare_digest(
            password.encode(), str(entry["password"]).encode()
        )

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/auth":
            self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return
        query = urllib.parse.parse_qs(url.query)
        credentials = self._basic()
        if credentials is None or not self._known(*credentials):
            self._denied("a user name and password are needed")
            return
        self._grant(
            credentials[0],
            query.get("service", [""])[0],
            query.get("scope", []),
            query.get("offline_token", ["false"])[0] == "true",
        )

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        if url.path != "/auth":
            self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]})
            return

        def field(name: str) -> str:
            return form.get(name, [""])[0]

        grant = field("grant_type")
        if grant == "password":
            if not self._known(field("username"), field("password")):
                self._denied("wrong user name or password")
                return
            user = field("username")
        elif grant == "refresh_token":
            with self.server.lock:
                found = self.server.refresh_tokens.get(field("refresh_token"))
            if found is None or not self._known(found, None):
                self._denied("unknown refresh token")
                return
            user = found
        else:
            self._reply(400, {"error": "unsupported_grant_type"})
            return
        self._grant(
            user, field("service"), field("scope").split(), field("access_type") == "offline"
        )


def main(argv: list[str]) -> None:
    cert, key, signing_key, signing_cert, issuer, service, users_file = argv
    signer = TokenSigner.from_files(Path(signing_key), Path(signing_cert), issuer, service)
    server = TokenServer(("127.0.0.1", 0), signer, Users(Path(users_file)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.tls = context
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"READY {server.server_address[1]}", flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    server.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
