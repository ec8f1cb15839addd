"""The doctor's client side: connecting (through the relay or direct), TLS, one HTTP request.

Every hop of :mod:`acrrelay.doctor` talks to a server the same way: a fresh TCP
connection to the relay (or the host itself), TLS with the host's name as SNI, one
request, and a bounded read. :class:`Probe` does that and turns each way it can go
wrong (no TCP, an untrusted certificate, the relay's TLS alerts, the relay's own
plain-HTTP refusal) into a :class:`HopFailed` with its hint; it also sums up a
certificate and asks a Bearer realm for a token, the exchanges more than one hop makes.
The small readers of answers (a Bearer challenge, the OSS root, body snippets) live
here too, beside the :class:`Response` they read. It is kept apart so that ``doctor``
reads as the hop sequence alone.

This is client code: blocking sockets, no reactor.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping

import attrs

from acrrelay import reasons
from acrrelay.addresses import host_port

__all__ = [
    "PROGRESS_EVERY",
    "HopFailed",
    "Probe",
    "Response",
    "bearer_challenge",
    "body_kind",
    "derive_oss_endpoint",
    "judge_oss_root",
    "oss_endpoint_of",
    "realm_url",
    "snippet",
]

_REGION = re.compile(
    r"\.((?:cn|ap|us|eu|me|na)-[a-z0-9-]+?)\.(?:cr\.|personal\.cr\.)?aliyuncs\.com\Z"
)
#: A read that has taken this long reports its bytes so far (and again this often).
PROGRESS_EVERY = 1.0
#: The first line of the relay's own HTTP error bodies (acrrelay.httphead.error_response).
_RELAY_REFUSAL = re.compile(rb"\Aacrrelay: ([a-z_]+): ?([^\n]*)")
_hp = host_port


class HopFailed(Exception):
    """A hop failed: ``result`` says what was seen, ``hint`` what to do about it."""

    def __init__(self, result: str, hint: str = "") -> None:
        super().__init__(result)
        self.result = result
        self.hint = hint


@attrs.define
class Response:
    """One HTTP answer: the status, the headers (names in lower case), the body as read."""

    status: int
    headers: Mapping[str, str]
    body: bytes


def realm_url(realm: str, query: Mapping[str, str]) -> str:
    """The token request URL: ``query`` added to the realm's own query string, if any."""
    parts = urllib.parse.urlsplit(realm)
    # The realm's own query is kept byte for byte: it is the token service's to read.
    joined = "&".join(q for q in (parts.query, urllib.parse.urlencode(query)) if q)
    return urllib.parse.urlunsplit(parts._replace(query=joined, fragment=""))


def derive_oss_endpoint(registry: str) -> str | None:
    """The OSS endpoint a registry host's blobs most likely redirect to."""
    match = _REGION.search(registry)
    if match is None:
        return None
    region = match.group(1)
    internal = "-vpc." in registry or registry.split(".")[0].endswith("-vpc")
    return f"oss-{region}{'-internal' if internal else ''}.aliyuncs.com"


class Probe:
    """Connects and asks for the doctor: through ``via`` (``via_http`` for plain HTTP) or
    direct, trusting ``ca_file`` (default: the system's), within ``timeout`` seconds.

    ``on_progress`` hears how a long read is going (see :meth:`fetch`).
    """

    def __init__(
        self,
        via: tuple[str, int] | None,
        via_http: tuple[str, int] | None,
        timeout: float,
        ca_file: str | None,
        on_progress: Callable[[str], None],
    ) -> None:
        self._via = via
        self._via_http = via_http
        self._timeout = timeout
        self._on_progress = on_progress
        self._context = ssl.create_default_context(cafile=ca_file)

    def _address(self, host: str, port: int, scheme: str) -> tuple[str, int]:
        via = self._via_http if scheme == "http" else self._via
        if via is None and scheme == "http" and self._via is not None:
            via = (self._via[0], 80)
        return via if via is not None else (host, port)

    def open(self, host: str, port: int, scheme: str = "https") -> socket.socket:
        address = self._address(host, port, scheme)
        try:
            sock = socket.create_connection(address, timeout=self._timeout)
        except TimeoutError:
            raise HopFailed(
                f"no TCP connection to {_hp(*address)} in {self._timeout:g}s",
                f"is {_hp(*address)} reachable from here (firewall, VPN, security group)?",
            ) from None
        except OSError as e:
            raise HopFailed(
                f"cannot connect to {_hp(*address)}: {e.strerror or e}",
                f"is the relay running and listening on {_hp(*address)}?"
                if self._via is not None
                else f"{host} is not reachable from here: use --via RELAY:443",
            ) from None
        if scheme == "http":
            return sock
        try:
            return self._context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            sock.close()
            raise HopFailed(
                f"certificate not trusted for {host}: {e.verify_message}",
                "pass --ca-file for a private CA; a relay never changes certificates, so the "
                "name may be routed to the wrong backend"
                if self._via is not None
                else "pass --ca-file for a private CA",
            ) from None
        except ssl.SSLError as e:
            sock.close()
            if "UNRECOGNIZED_NAME" in str(e).upper():
                raise HopFailed(
                    f"the relay refused {host} (TLS alert unrecognized_name)",
                    f"{host} is not routed by the relay: add a route for it (or --acr REGION)",
                ) from None
            if "INTERNAL_ERROR" in str(e).upper():
                raise HopFailed(
                    f"the relay could not reach the backend of {host} (TLS alert internal_error)",
                    "the relay routes the name but its backend did not answer: see the relay's "
                    "log for connect_failed / connect_timeout / address_denied",
                ) from None
            raise HopFailed(f"TLS handshake with {host} failed: {e}") from None
        except OSError as e:
            sock.close()
            raise HopFailed(
                f"the connection closed during the TLS handshake with {host}: {e}",
                "a relay closes without an answer when the client is denied or over a limit",
            ) from None

    def fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        read: int | None = None,
        progress: bool = False,
    ) -> Response:
        """One request on a fresh connection; the body in full, or its first ``read`` bytes.

        With ``progress``, a read that takes long reports its bytes so far. A plain-HTTP
        answer written by the relay itself (a refusal) raises HopFailed with its hint.
        """
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        sock = self.open(host, port, parts.scheme)
        # The class sets the default port, so Host carries no ":443" (or ":80"): presigned
        # OSS URLs sign the Host header, and S3-style servers read "name:443" as a bucket.
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(host, port, timeout=self._timeout)
        conn.sock = sock  # already connected (and TLS-wrapped) through the relay
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request(method, path, headers={"User-Agent": "acrrelay-doctor", **(headers or {})})
            response = conn.getresponse()
            body = self._read(response, read, progress)
            answer = Response(
                response.status, {k.lower(): v for k, v in response.getheaders()}, body
            )
        except (OSError, http.client.HTTPException) as e:
            raise HopFailed(f"{method} {url} failed: {e}") from None
        finally:
            conn.close()
        if parts.scheme == "http":
            # Through TLS the relay refuses with an alert; on plain HTTP it answers itself.
            raise_for_relay(answer, host, port)
        return answer

    def _read(self, response: http.client.HTTPResponse, limit: int | None, progress: bool) -> bytes:
        if limit is None:
            return response.read()
        body = bytearray()
        started = last = time.monotonic()
        while len(body) < limit:
            chunk = response.read1(limit - len(body))
            if not chunk:
                break
            body += chunk
            now = time.monotonic()
            if progress and now - last >= PROGRESS_EVERY:
                last = now
                self._on_progress(
                    f"read {len(body)} of {limit} bytes so far ({now - started:.0f}s)"
                )
        return bytes(body)

    def tls(self, host: str, port: int) -> str:
        """The TLS hop's result: the version, the certificate's names and its expiry."""
        with self.open(host, port) as sock:
            assert isinstance(sock, ssl.SSLSocket)
            cert = sock.getpeercert() or {}
            version = sock.version()
        names = [
            str(entry[1])
            for entry in cert.get("subjectAltName", ())
            if isinstance(entry, tuple) and entry[0] == "DNS"
        ]
        expires = cert.get("notAfter")
        days = ""
        if isinstance(expires, str):
            left = ssl.cert_time_to_seconds(expires) - time.time()
            days = f", expires in {left / 86400:.0f} days"
            if left < 14 * 86400:
                days += " (soon!)"
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"{version}, certificate for {shown or 'no DNS names'}{days}"

    def token(
        self,
        realm: str,
        service: str | None,
        scope: str | None,
        user: str | None,
        password: str | None,
    ) -> tuple[str, object]:
        """A token from ``realm`` for ``scope``, and its ``expires_in``; HopFailed if none.

        With a ``user``, the request carries Basic credentials; without, it is anonymous.
        """
        query = {}
        if service is not None:
            query["service"] = service
        if scope is not None:
            query["scope"] = scope
        headers = {}
        if user is not None:
            pair = f"{user}:{password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        response = self.fetch(realm_url(realm, query), headers=headers)
        if response.status == 401:
            raise HopFailed(
                "401 from the token service",
                "wrong user or password (Personal Edition needs them even to pull)"
                if user
                else "anonymous access is not allowed: pass --username and --password-stdin",
            )
        if response.status != 200:
            raise HopFailed(f"{response.status} from the token service: {snippet(response.body)}")
        try:
            document = json.loads(response.body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise HopFailed(f"the token service answered {snippet(response.body)}")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise HopFailed("the token service's answer has no token")
        return token, document.get("expires_in")


def bearer_challenge(response: Response) -> dict[str, str] | None:
    """The parameters of a ``WWW-Authenticate: Bearer …`` header, or None."""
    challenge = response.headers.get("www-authenticate", "")
    if not challenge.lower().startswith("bearer"):
        return None
    return dict(re.findall(r'(\w+)="([^"]*)"', challenge))


def judge_oss_root(endpoint: str, response: Response) -> str:
    """The oss hop's result for the endpoint root's answer, or HopFailed.

    OSS answers an anonymous ``GET /`` with 403 AccessDenied. S3-compatible stores
    (moto in the tests, MinIO) list buckets instead: a pass, but named for what it is.
    """
    code_match = re.search(rb"<Code>([^<]+)</Code>", response.body)
    code = code_match.group(1).decode("utf-8", "replace") if code_match else None
    if response.status == 403 and code == "AccessDenied":
        return "403 AccessDenied (OSS answers)"
    if response.status == 200 and b"<ListAllMyBucketsResult" in response.body:
        return "200 ListAllMyBucketsResult: S3-compatible storage, not OSS, answers"
    if code is not None:
        raise HopFailed(
            f"{response.status} {code}: {snippet(response.body)}",
            f"OSS answers an anonymous request to its root with 403 AccessDenied; "
            f"{code} means {endpoint} or its backend is not healthy: check the route's backend",
        )
    raise HopFailed(
        f"{response.status} but no OSS XML: {snippet(response.body)}",
        f"{endpoint} does not look like OSS: is it routed to the right backend?",
    )


def raise_for_relay(response: Response, host: str, port: int) -> None:
    """HopFailed if ``response`` is the relay's own refusal (``acrrelay: <reason>: …``)."""
    match = _RELAY_REFUSAL.match(response.body)
    if match is None:
        return
    reason = match.group(1).decode()
    detail = match.group(2).decode("utf-8", "replace").strip()
    result = f"{response.status} from the relay: {reason}: {detail}"
    name = host
    if oss_endpoint_of(host) not in (None, host):  # a bucket host: route the bucket wildcard
        name = f"*.{host.partition('.')[2]}"
    if reason == reasons.NOT_ALLOWED:
        hint = f"the relay does not route {host}: add {name} to its routes (or --acr REGION)"
    elif reason == reasons.PORT_NOT_ALLOWED:
        hint = (
            f"the relay does not route {host} on port {port}: add {port} to the ports of "
            f"its route for {name}"
        )
    elif reason == reasons.PROTOCOL_NOT_ALLOWED:
        hint = 'the relay\'s listener does not take plain HTTP: add "http" to its protocols'
    elif reason in reasons.BACKEND_FAILURES:
        hint = (
            f"the relay routes {host} but could not reach its backend ({reason}): check "
            "that route's backend and the relay's log"
        )
    else:
        hint = f"the relay refused the request ({reason}): see the relay's log"
    raise HopFailed(result, hint)


def oss_endpoint_of(host: str | None) -> str | None:
    """oss-R.aliyuncs.com from a redirect host, virtual-hosted (bucket.oss-…) or path-style."""
    if not host:
        return None
    if host.startswith("oss-"):
        return host
    rest = host.partition(".")[2]
    return rest if rest.startswith("oss-") else None


def snippet(body: bytes) -> str:
    text = body[:120].decode("utf-8", "replace").replace("\n", " ").strip()
    return repr(text) if text else "an empty body"


def body_kind(body: bytes) -> str:
    return "gzip" if body[:2] == b"\x1f\x8b" else "data"
