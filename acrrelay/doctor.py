"""``acrrelay doctor``: the original article's curl checks, hop by hop, with hints.

A pull needs the registry, its token service (the Bearer realm) and OSS. The doctor
walks the same path a client does, through the relay (``--via``) or direct:

1. ``tls``      the TLS handshake with the registry's name as SNI: certificate names, expiry;
2. ``v2``       ``GET /v2/`` answers 401 with ``WWW-Authenticate: Bearer realm=…,service=…``;
3. ``realm``    the realm's host is reachable (through the relay: routed);
4. ``token``    the realm gives a token, anonymously or with credentials;
5. ``manifest`` with ``--image``: the manifest (the first platform of an index), a layer;
6. ``blob``     the layer answers 307 with an OSS ``Location`` (or the registry serves it);
7. ``oss-blob`` the redirect is followed and the first bytes are read;
8. ``oss``      the OSS endpoint's root answers 403 AccessDenied XML, as OSS does;
9. ``chart``    with ``--chart NS/REPO`` (Enterprise): the chart API answers 200, on the
   registry host or on ``--chart-host``.

Each hop gives a result, the time it took, and, when it fails, a hint naming the
likely fix. A hop that needs an earlier one that failed is skipped. The exit status
is 1 if any hop failed. A :class:`Reporter` hears when each hop starts, how a long
read is going, and when each hop ends (the command prints that on stderr).

This is client code: blocking sockets, no reactor.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import re
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import IO, Any, Protocol

import attrs

from acrrelay import reasons
from acrrelay.addresses import host_port

__all__ = [
    "Doctor",
    "Hop",
    "HopFailed",
    "Options",
    "ProgressPrinter",
    "Reporter",
    "derive_oss_endpoint",
    "realm_url",
]

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_REGION = re.compile(
    r"\.((?:cn|ap|us|eu|me|na)-[a-z0-9-]+?)\.(?:cr\.|personal\.cr\.)?aliyuncs\.com\Z"
)
#: How much of a blob the doctor reads: enough to see data flow, not a download.
FIRST_BYTES = 1024
#: A read that has taken this long reports its bytes so far (and again this often).
PROGRESS_EVERY = 1.0
#: The first line of the relay's own HTTP error bodies (acrrelay.httphead.error_response).
_RELAY_REFUSAL = re.compile(rb"\Aacrrelay: ([a-z_]+): ?([^\n]*)")
_CHART_CREDENTIALS = "the chart repository needs credentials: pass --username, --password-stdin"
_NOT_THE_REGISTRY = (
    "something other than the registry answered (a captive portal or a web proxy?): "
    "check that the name is routed to the registry"
)


class HopFailed(Exception):
    """A hop failed: ``result`` says what was seen, ``hint`` what to do about it."""

    def __init__(self, result: str, hint: str = "") -> None:
        super().__init__(result)
        self.result = result
        self.hint = hint


@attrs.define
class Hop:
    name: str
    host: str
    status: str = "skipped"  # running, ok, failed, skipped
    result: str = ""
    seconds: float = 0.0
    hint: str = ""


class Reporter(Protocol):
    """Hears about the hops as they run, so a slow one is visibly in progress."""

    def started(self, hop: Hop) -> None: ...

    def progress(self, hop: Hop, text: str) -> None: ...

    def finished(self, hop: Hop) -> None: ...


class _Silent:
    def started(self, hop: Hop) -> None:
        pass

    def progress(self, hop: Hop, text: str) -> None:
        pass

    def finished(self, hop: Hop) -> None:
        pass


@attrs.frozen
class Options:
    registry: str
    via: tuple[str, int] | None = None
    via_http: tuple[str, int] | None = None
    username: str | None = None
    password: str | None = None
    image: str | None = None
    chart: str | None = None
    #: Where the chart API is served (default: the registry host).
    chart_host: str | None = None
    ca_file: str | None = None
    timeout: float = 15.0


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


@attrs.define
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


class Doctor:
    """Runs the hops for :class:`Options`, telling ``reporter`` as they start and end."""

    def __init__(self, options: Options, reporter: Reporter | None = None) -> None:
        self.options = options
        self.hops: list[Hop] = []
        self._reporter: Reporter = reporter or _Silent()
        self._context = ssl.create_default_context(cafile=options.ca_file)
        self._current: Hop | None = None
        self._realm: str | None = None
        self._service: str | None = None
        self._scope_token: str | None = None
        self._image_name: str | None = None
        self._layer: str | None = None
        self._location: str | None = None
        self._served_by_registry = False

    # -- plumbing

    def _address(self, host: str, port: int, scheme: str) -> tuple[str, int]:
        via = self.options.via_http if scheme == "http" else self.options.via
        if via is None and scheme == "http" and self.options.via is not None:
            via = (self.options.via[0], 80)
        return via if via is not None else (host, port)

    def _open(self, host: str, port: int, scheme: str = "https") -> socket.socket:
        address = self._address(host, port, scheme)
        try:
            sock = socket.create_connection(address, timeout=self.options.timeout)
        except TimeoutError:
            raise HopFailed(
                f"no TCP connection to {_hp(*address)} in {self.options.timeout:g}s",
                f"is {_hp(*address)} reachable from here (firewall, VPN, security group)?",
            ) from None
        except OSError as e:
            raise HopFailed(
                f"cannot connect to {_hp(*address)}: {e.strerror or e}",
                f"is the relay running and listening on {_hp(*address)}?"
                if self.options.via is not None
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
                if self.options.via is not None
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

    def _fetch(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        read: int | None = None,
        progress: bool = False,
    ) -> _Response:
        """One request on a fresh connection; the body in full, or its first ``read`` bytes.

        With ``progress``, a read that takes long reports its bytes so far. A plain-HTTP
        answer written by the relay itself (a refusal) raises HopFailed with its hint.
        """
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        sock = self._open(host, port, parts.scheme)
        # The class sets the default port, so Host carries no ":443" (or ":80"): presigned
        # OSS URLs sign the Host header, and S3-style servers read "name:443" as a bucket.
        kind = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = kind(host, port, timeout=self.options.timeout)
        conn.sock = sock  # already connected (and TLS-wrapped) through the relay
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request(method, path, headers={"User-Agent": "acrrelay-doctor", **(headers or {})})
            response = conn.getresponse()
            body = self._read(response, read, progress)
            answer = _Response(
                response.status, {k.lower(): v for k, v in response.getheaders()}, body
            )
        except (OSError, http.client.HTTPException) as e:
            raise HopFailed(f"{method} {url} failed: {e}") from None
        finally:
            conn.close()
        if parts.scheme == "http":
            # Through TLS the relay refuses with an alert; on plain HTTP it answers itself.
            _raise_for_relay(answer, host, port)
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
            if progress and now - last >= PROGRESS_EVERY and self._current is not None:
                last = now
                self._reporter.progress(
                    self._current,
                    f"read {len(body)} of {limit} bytes so far ({now - started:.0f}s)",
                )
        return bytes(body)

    @contextlib.contextmanager
    def _hop(self, name: str, host: str) -> Iterator[Hop]:
        """A hop to fill in: announced, timed, its HopFailed caught and recorded, reported."""
        hop = Hop(name, host, "running")
        self.hops.append(hop)
        self._current = hop
        self._reporter.started(hop)
        started = time.monotonic()
        try:
            yield hop
            hop.status = "ok"
        except HopFailed as e:
            hop.status, hop.result, hop.hint = "failed", e.result, e.hint
        finally:
            self._current = None
        hop.seconds = time.monotonic() - started
        self._reporter.finished(hop)

    def _skip(self, name: str, host: str, why: str) -> None:
        hop = Hop(name, host, "skipped", why)
        self.hops.append(hop)
        self._reporter.finished(hop)

    def _ok(self, name: str) -> bool:
        return any(h.name == name and h.status == "ok" for h in self.hops)

    # -- the hops

    def run(self) -> list[Hop]:
        registry = self.options.registry
        with self._hop("tls", registry) as hop:
            hop.result = self._check_tls(registry, 443)
        if self._ok("tls"):
            with self._hop("v2", registry) as hop:
                hop.result = self._check_v2(registry)
        else:
            self._skip("v2", registry, "needs tls")
        self._token_hops()
        self._image_hops()
        self._oss_root()
        self._chart_hop()
        return self.hops

    def _check_tls(self, host: str, port: int) -> str:
        with self._open(host, port) as sock:
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

    def _check_v2(self, registry: str) -> str:
        response = self._fetch(f"https://{registry}/v2/")
        if response.status == 200:
            return "200: the registry needs no token"
        challenge = _bearer_challenge(response)
        if response.status != 401 or challenge is None:
            raise HopFailed(
                f"{response.status} with WWW-Authenticate "
                f"{response.headers.get('www-authenticate', '')!r}",
                "expected 401 with a Bearer challenge: is this name routed to the registry?",
            )
        self._realm, self._service = challenge.get("realm"), challenge.get("service")
        if not self._realm:
            raise HopFailed(f"401 but no realm in {response.headers['www-authenticate']!r}")
        return f"401 Bearer realm={self._realm} service={self._service}"

    def _token_hops(self) -> None:
        realm_host = urllib.parse.urlsplit(self._realm or "").hostname or ""
        if self._realm is None:
            why = "no realm" if self._ok("v2") else "needs v2"
            self._skip("realm", realm_host or "-", why)
            self._skip("token", realm_host or "-", why)
            return
        port = urllib.parse.urlsplit(self._realm).port or 443
        with self._hop("realm", realm_host) as hop:
            try:
                hop.result = self._check_tls(realm_host, port)
            except HopFailed as e:
                if "not routed by the relay" in e.hint:
                    e.hint = (
                        f"the realm host {realm_host} is not routed by the relay: add it "
                        "(or --acr REGION), and point clients' hosts at the relay for it too"
                    )
                raise
        if not self._ok("realm"):
            self._skip("token", realm_host, "needs realm")
            return
        with self._hop("token", realm_host) as hop:
            hop.result = self._get_token(self._realm)

    def _get_token(self, realm: str) -> str:
        scope = None
        if self.options.image:
            name = self.options.image.partition(":")[0].partition("@")[0]
            scope = f"repository:{name}:pull"
        token, expires = self._request_token(realm, self._service, scope)
        self._scope_token = token
        who = f"as {self.options.username}" if self.options.username else "anonymously"
        return f"token {who}" + (f", expires in {expires}s" if expires else "")

    def _request_token(
        self, realm: str, service: str | None, scope: str | None
    ) -> tuple[str, object]:
        """A token from ``realm`` for ``scope``, and its ``expires_in``; HopFailed if none."""
        query = {}
        if service is not None:
            query["service"] = service
        if scope is not None:
            query["scope"] = scope
        headers = {}
        if self.options.username is not None:
            pair = f"{self.options.username}:{self.options.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        response = self._fetch(realm_url(realm, query), headers=headers)
        if response.status == 401:
            raise HopFailed(
                "401 from the token service",
                "wrong user or password (Personal Edition needs them even to pull)"
                if self.options.username
                else "anonymous access is not allowed: pass --username and --password-stdin",
            )
        if response.status != 200:
            raise HopFailed(f"{response.status} from the token service: {_snippet(response.body)}")
        try:
            document = json.loads(response.body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise HopFailed(f"the token service answered {_snippet(response.body)}")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise HopFailed("the token service's answer has no token")
        return token, document.get("expires_in")

    def _image_hops(self) -> None:
        registry = self.options.registry
        image = self.options.image
        if image is None:
            return
        if self._scope_token is None and not (self._ok("v2") and self._realm is None):
            self._skip("manifest", registry, "needs a token")
            self._skip("blob", registry, "needs a token")
            self._skip("oss-blob", "-", "needs a token")
            return
        with self._hop("manifest", registry) as hop:
            hop.result = self._manifest(registry, image)
        if self._layer is None:
            self._skip("blob", registry, "needs manifest")
            self._skip("oss-blob", "-", "needs manifest")
            return
        with self._hop("blob", registry) as hop:
            hop.result = self._blob(registry)
        if self._served_by_registry:
            self._skip("oss-blob", "-", "no redirect: the registry served the blob itself")
            return
        if self._location is None:
            self._skip("oss-blob", "-", "needs blob")
            return
        location = urllib.parse.urlsplit(self._location)
        with self._hop("oss-blob", location.hostname or "-") as hop:
            hop.result = self._follow(self._location)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._scope_token}"} if self._scope_token else {}

    def _manifest(self, registry: str, image: str) -> str:
        name, _, reference = image.rpartition("@") if "@" in image else image.rpartition(":")
        if not name:
            name, reference = image, "latest"
        self._image_name = name
        manifest = self._manifest_document(
            registry,
            name,
            reference,
            f"the manifest of {image}",
            "check the image name and tag, and that the user may pull it",
        )
        if "manifests" in manifest:  # an index: take the first platform
            entries = manifest["manifests"]
            first = entries[0] if isinstance(entries, list) and entries else None
            digest = first.get("digest") if isinstance(first, dict) else None
            if not isinstance(digest, str) or not digest:
                raise HopFailed(
                    f"the index of {image} lists no platform manifest with a digest",
                    "the image index is empty or malformed: push the image again",
                )
            manifest = self._manifest_document(
                registry,
                name,
                digest,
                f"the platform manifest {digest[:19]}… of {image}",
                "the index names a platform manifest the registry does not have: "
                "push the image again",
            )
        layers = manifest.get("layers")
        if not isinstance(layers, list) or not layers:
            raise HopFailed("the manifest lists no layers")
        digest = layers[0].get("digest") if isinstance(layers[0], dict) else None
        if not isinstance(digest, str) or not digest:
            raise HopFailed(
                "the manifest's first layer has no digest",
                "the manifest is malformed: push the image again",
            )
        self._layer = digest
        total = sum(
            layer["size"]
            for layer in layers
            if isinstance(layer, dict) and isinstance(layer.get("size"), int)
        )
        return f"{len(layers)} layer(s), {total / 1e6:.1f} MB; first {digest[:19]}…"

    def _manifest_document(
        self, registry: str, name: str, reference: str, what: str, missing_hint: str
    ) -> dict[str, Any]:
        """One manifest (or index) as a JSON object; anything else is a failed hop."""
        url = f"https://{registry}/v2/{name}/manifests/{reference}"
        response = self._fetch(url, headers={"Accept": MANIFEST_TYPES, **self._auth()})
        if response.status != 200:
            raise HopFailed(f"{response.status} for {what}", missing_hint)
        try:
            document = json.loads(response.body)
        except ValueError:  # UnicodeDecodeError too
            kind = response.headers.get("content-type", "no Content-Type")
            raise HopFailed(
                f"{what} is not JSON ({kind}): {_snippet(response.body)}", _NOT_THE_REGISTRY
            ) from None
        if not isinstance(document, dict):
            raise HopFailed(f"{what} is not a JSON object: {_snippet(response.body)}")
        return document

    def _blob(self, registry: str) -> str:
        url = f"https://{registry}/v2/{self._image_name}/blobs/{self._layer}"
        response = self._fetch(url, headers=self._auth(), read=FIRST_BYTES, progress=True)
        if response.status in (307, 302, 301, 303, 308):
            location = response.headers.get("location")
            if not location:
                raise HopFailed(f"{response.status} without a Location header")
            self._location = urllib.parse.urljoin(url, location)
            target = urllib.parse.urlsplit(self._location)
            shown = f"{target.scheme}://{target.hostname}{target.path[:40]}…"
            return f"{response.status} to {shown}"
        if response.status in (200, 206):
            # Some registries (and ACR for some blobs) serve the bytes themselves; then
            # OSS is not on this blob's path, and the table must say so, not pass quietly.
            self._served_by_registry = True
            return (
                f"{response.status}: the registry served the blob itself (no OSS redirect); "
                f"read {len(response.body)} bytes ({_kind(response.body)})"
            )
        raise HopFailed(
            f"{response.status} for the layer {self._layer}",
            "the token may not pull this repository"
            if response.status in (401, 403)
            else "the manifest names a layer the registry does not serve",
        )

    def _follow(self, location: str) -> str:
        target = urllib.parse.urlsplit(location)
        try:
            response = self._fetch(
                location,
                headers={"Range": f"bytes=0-{FIRST_BYTES - 1}"},
                read=FIRST_BYTES,
                progress=True,
            )
        except HopFailed as e:
            if target.scheme == "http" and "cannot connect" in e.result:
                e.hint = (
                    f"the blob redirect goes to http://{target.hostname}:{target.port or 80} "
                    "but nothing answers there: configure a plain-HTTP listener "
                    '(protocols = ["http"]) on port 80'
                )
            elif "not routed by the relay" in e.hint:
                e.hint = (
                    f"the OSS host {target.hostname} is not routed by the relay: add "
                    f"*.{(target.hostname or '').partition('.')[2]} (or --acr REGION)"
                )
            raise
        if response.status not in (200, 206):
            raise HopFailed(
                f"{response.status} from OSS: {_snippet(response.body)}",
                "an expired or altered signed URL gives 403: the relay must pass it unchanged",
            )
        return f"{response.status}, read {len(response.body)} bytes ({_kind(response.body)})"

    def _oss_root(self) -> None:
        endpoint = _oss_endpoint_of(urllib.parse.urlsplit(self._location or "").hostname)
        endpoint = endpoint or derive_oss_endpoint(self.options.registry)
        if endpoint is None:
            self._skip("oss", "-", "cannot tell the OSS endpoint from the registry name")
            return
        with self._hop("oss", endpoint) as hop:
            try:
                response = self._fetch(f"https://{endpoint}/")
            except HopFailed as e:
                if "not routed by the relay" in e.hint:
                    e.hint = (
                        f"the OSS endpoint {endpoint} is not routed by the relay: blob "
                        "downloads will fail; add it (or --acr REGION)"
                    )
                raise
            hop.result = _judge_oss_root(endpoint, response)

    def _chart_hop(self) -> None:
        chart = self.options.chart
        if chart is None:
            return
        host = self.options.chart_host or self.options.registry
        if host == self.options.registry and not self._ok("tls"):
            self._skip("chart", host, "needs tls")
            return
        with self._hop("chart", host) as hop:
            try:
                hop.result = self._check_chart(host, chart)
            except HopFailed as e:
                if "not routed by the relay" in e.hint and e.result.endswith(
                    f"refused {host} (TLS alert unrecognized_name)"
                ):
                    # --acr does not cover chart hosts: their name form is unverified.
                    e.hint = (
                        f"the chart host {host} is not routed by the relay: add a route "
                        "for it (--acr REGION does not include chart hosts)"
                    )
                raise

    def _check_chart(self, host: str, chart: str) -> str:
        """ChartMuseum's list API for ``chart``, after the Bearer dance helm-acr does."""
        url = f"https://{host}/api/{chart}/charts"
        response = self._fetch(url)
        challenge = _bearer_challenge(response)
        if response.status == 401 and challenge is not None and challenge.get("realm"):
            try:
                token, _ = self._request_token(
                    challenge["realm"], challenge.get("service"), challenge.get("scope")
                )
            except HopFailed as e:
                if e.result.startswith("401 "):
                    e.result = f"401 from the chart API for {chart}, and no token for it"
                    if not self.options.username:
                        e.hint = _CHART_CREDENTIALS
                raise
            response = self._fetch(url, headers={"Authorization": f"Bearer {token}"})
        status = response.status
        if status == 200:
            try:
                document = json.loads(response.body)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise HopFailed(
                    f"200 but not the chart API's JSON: {_snippet(response.body)}",
                    f"is {host} routed to the Enterprise instance?",
                )
            return f"200 from the chart API: {len(document)} chart(s) in {chart}"
        if status in (401, 403):
            who = self.options.username
            hint = (
                f"check that {who} may read the chart repository {chart}"
                if who
                else _CHART_CREDENTIALS
            )
            raise HopFailed(f"{status} from the chart API for {chart}", hint)
        if status == 404:
            raise HopFailed(
                f"404: no chart repository {chart} on {host}",
                f"check the namespace/repository {chart!r}; the Charts component (ChartMuseum) "
                "must be enabled on the Enterprise instance, or use OCI charts "
                "(helm push oci://…)",
            )
        raise HopFailed(
            f"{status} from /api/{chart}/charts: {_snippet(response.body)}",
            "the chart repository (ChartMuseum) must be enabled on the Enterprise instance; "
            "or use OCI charts (helm push oci://…)",
        )


def _bearer_challenge(response: _Response) -> dict[str, str] | None:
    """The parameters of a ``WWW-Authenticate: Bearer …`` header, or None."""
    challenge = response.headers.get("www-authenticate", "")
    if not challenge.lower().startswith("bearer"):
        return None
    return dict(re.findall(r'(\w+)="([^"]*)"', challenge))


def _judge_oss_root(endpoint: str, response: _Response) -> str:
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
            f"{response.status} {code}: {_snippet(response.body)}",
            f"OSS answers an anonymous request to its root with 403 AccessDenied; "
            f"{code} means {endpoint} or its backend is not healthy: check the route's backend",
        )
    raise HopFailed(
        f"{response.status} but no OSS XML: {_snippet(response.body)}",
        f"{endpoint} does not look like OSS: is it routed to the right backend?",
    )


def _raise_for_relay(response: _Response, host: str, port: int) -> None:
    """HopFailed if ``response`` is the relay's own refusal (``acrrelay: <reason>: …``)."""
    match = _RELAY_REFUSAL.match(response.body)
    if match is None:
        return
    reason = match.group(1).decode()
    detail = match.group(2).decode("utf-8", "replace").strip()
    result = f"{response.status} from the relay: {reason}: {detail}"
    name = host
    if _oss_endpoint_of(host) not in (None, host):  # a bucket host: route the bucket wildcard
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


def _oss_endpoint_of(host: str | None) -> str | None:
    """oss-R.aliyuncs.com from a redirect host, virtual-hosted (bucket.oss-…) or path-style."""
    if not host:
        return None
    if host.startswith("oss-"):
        return host
    rest = host.partition(".")[2]
    return rest if rest.startswith("oss-") else None


_hp = host_port


def _snippet(body: bytes) -> str:
    text = body[:120].decode("utf-8", "replace").replace("\n", " ").strip()
    return repr(text) if text else "an empty body"


def _kind(body: bytes) -> str:
    return "gzip" if body[:2] == b"\x1f\x8b" else "data"


def format_table(hops: list[Hop]) -> str:
    """The hops as a table, hints under the row they belong to."""
    header = ["HOP", "HOST", "RESULT", "TIME"]
    rows = [
        [
            hop.name,
            hop.host,
            _MARKS[hop.status] + (f": {hop.result}" if hop.result else ""),
            f"{hop.seconds * 1000:.0f} ms" if hop.status != "skipped" else "",
        ]
        for hop in hops
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = []
    for row, hop in zip([header, *rows], [None, *hops], strict=True):
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
        if hop is not None and hop.hint:
            lines.append(f"{'':<{widths[0]}}  hint: {hop.hint}")
    return "\n".join(lines)


_MARKS = {"running": "...", "ok": "ok", "failed": "FAILED", "skipped": "skipped"}


class ProgressPrinter:
    """Reports hops on ``stream`` as they start, progress and end; a terminal gets one
    updating line, anything else a line per event (so a log shows what hung)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._tty = stream.isatty()

    def _line(self, hop: Hop, text: str) -> None:
        line = f"{hop.name:<9} {hop.host}: {text}"
        self._stream.write("\r\x1b[K" + line if self._tty else line + "\n")
        self._stream.flush()

    def started(self, hop: Hop) -> None:
        self._line(hop, "checking ...")

    def progress(self, hop: Hop, text: str) -> None:
        self._line(hop, text)

    def finished(self, hop: Hop) -> None:
        self._line(hop, _MARKS[hop.status])

    def clear(self) -> None:
        """Wipe the updating line before the table (a terminal only)."""
        if self._tty:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def main_doctor(options: Options, out: IO[str], *, as_json: bool = False) -> int:
    """Run the doctor: progress on stderr, the table (or JSON) on ``out``; 1 if a hop failed."""
    if not as_json:
        out.write(
            f"checking {options.registry}"
            + (f" through {_hp(*options.via)}" if options.via else " directly")
            + " ...\n"
        )
        out.flush()
    printer = ProgressPrinter(sys.stderr) if not as_json else None
    hops = Doctor(options, printer).run()
    if printer is not None:
        printer.clear()
    failed = [hop for hop in hops if hop.status == "failed"]
    if as_json:
        out.write(
            json.dumps({"hops": [attrs.asdict(h) for h in hops], "ok": not failed}, indent=2) + "\n"
        )
    else:
        out.write(format_table(hops) + "\n")
        out.write(
            f"\n{len(failed)} of {len(hops)} hops failed\n" if failed else "\nevery hop passed\n"
        )
    return 1 if failed else 0
