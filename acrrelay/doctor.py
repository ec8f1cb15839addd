"""``acrrelay doctor``: the original article's curl checks, hop by hop, with hints.

A pull needs the registry, its token service (the Bearer realm) and OSS. The doctor
walks the same path a client does, through the relay (``--via``) or direct:

1. ``tls``      the TLS handshake with the registry's name as SNI: certificate names, expiry;
2. ``v2``       ``GET /v2/`` answers 401 with ``WWW-Authenticate: Bearer realm=…,service=…``;
3. ``realm``    the realm's host is reachable (through the relay: routed);
4. ``token``    the realm gives a token, anonymously or with credentials;
5. ``manifest`` with ``--image``: the manifest, and a layer to fetch;
6. ``blob``     the layer answers 307 with an OSS ``Location``;
7. ``oss-blob`` the redirect is followed and the first bytes are read;
8. ``oss``      the OSS endpoint's root answers with S3/OSS XML (AccessDenied);
9. ``chart``    with ``--chart NS/REPO`` (Enterprise): the chart API answers.

Each hop gives a result, the time it took, and, when it fails, a hint naming the
likely fix. A hop that needs an earlier one that failed is skipped. The exit status
is 1 if any hop failed.

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
from collections.abc import Callable, Iterator, Mapping
from typing import IO

import attrs

__all__ = ["Doctor", "Hop", "HopFailed", "Options", "derive_oss_endpoint"]

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
    status: str = "skipped"  # ok, failed, skipped
    result: str = ""
    seconds: float = 0.0
    hint: str = ""


@attrs.frozen
class Options:
    registry: str
    via: tuple[str, int] | None = None
    via_http: tuple[str, int] | None = None
    username: str | None = None
    password: str | None = None
    image: str | None = None
    chart: str | None = None
    ca_file: str | None = None
    timeout: float = 15.0


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
    """Runs the hops for :class:`Options`, reporting each as it finishes."""

    def __init__(self, options: Options, report: Callable[[Hop], None] | None = None) -> None:
        self.options = options
        self.hops: list[Hop] = []
        self._report = report or (lambda hop: None)
        self._context = ssl.create_default_context(cafile=options.ca_file)
        self._realm: str | None = None
        self._service: str | None = None
        self._scope_token: str | None = None
        self._layer: str | None = None
        self._location: str | None = None

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
    ) -> _Response:
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
            body = response.read(read) if read is not None else response.read()
            return _Response(
                response.status, {k.lower(): v for k, v in response.getheaders()}, body
            )
        except (OSError, http.client.HTTPException) as e:
            raise HopFailed(f"{method} {url} failed: {e}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def _hop(self, name: str, host: str) -> Iterator[Hop]:
        """A hop to fill in: timed, its HopFailed caught and recorded, then reported."""
        hop = Hop(name, host)
        self.hops.append(hop)
        started = time.monotonic()
        try:
            yield hop
            hop.status = "ok"
        except HopFailed as e:
            hop.status, hop.result, hop.hint = "failed", e.result, e.hint
        hop.seconds = time.monotonic() - started
        self._report(hop)

    def _skip(self, name: str, host: str, why: str) -> None:
        hop = Hop(name, host, "skipped", why)
        self.hops.append(hop)
        self._report(hop)

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
        if self.options.chart:
            with self._hop("chart", registry) as hop:
                hop.result = self._check_chart(registry, self.options.chart)
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
        challenge = response.headers.get("www-authenticate", "")
        if response.status != 401 or not challenge.lower().startswith("bearer"):
            raise HopFailed(
                f"{response.status} with WWW-Authenticate {challenge!r}",
                "expected 401 with a Bearer challenge: is this name routed to the registry?",
            )
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        self._realm, self._service = params.get("realm"), params.get("service")
        if not self._realm:
            raise HopFailed(f"401 but no realm in {challenge!r}")
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
            hop.result = self._get_token()

    def _get_token(self) -> str:
        query = {"service": self._service or ""}
        if self.options.image:
            name = self.options.image.partition(":")[0].partition("@")[0]
            query["scope"] = f"repository:{name}:pull"
        url = f"{self._realm}?{urllib.parse.urlencode(query)}"
        headers = {}
        if self.options.username is not None:
            pair = f"{self.options.username}:{self.options.password or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        response = self._fetch(url, headers=headers)
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
            raise HopFailed(f"the token service answered {_snippet(response.body)}") from None
        token = document.get("token") or document.get("access_token")
        if not token:
            raise HopFailed("the token service's answer has no token")
        self._scope_token = token
        expires = document.get("expires_in")
        who = f"as {self.options.username}" if self.options.username else "anonymously"
        return f"token {who}" + (f", expires in {expires}s" if expires else "")

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
            hop.result = self._blob(registry, image)
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
        url = f"https://{registry}/v2/{name}/manifests/{reference}"
        response = self._fetch(url, headers={"Accept": MANIFEST_TYPES, **self._auth()})
        if response.status != 200:
            raise HopFailed(
                f"{response.status} for the manifest of {image}",
                "check the image name and tag, and that the user may pull it",
            )
        manifest = json.loads(response.body)
        if "manifests" in manifest:  # an index: take the first platform
            digest = manifest["manifests"][0]["digest"]
            url = f"https://{registry}/v2/{name}/manifests/{digest}"
            response = self._fetch(url, headers={"Accept": MANIFEST_TYPES, **self._auth()})
            manifest = json.loads(response.body)
        layers = manifest.get("layers") or []
        if not layers:
            raise HopFailed("the manifest lists no layers")
        self._layer = layers[0]["digest"]
        total = sum(layer.get("size", 0) for layer in layers)
        return f"{len(layers)} layer(s), {total / 1e6:.1f} MB; first {self._layer[:19]}…"

    def _blob(self, registry: str, image: str) -> str:
        url = f"https://{registry}/v2/{self._image_name}/blobs/{self._layer}"
        response = self._fetch(url, headers=self._auth(), read=0)
        if response.status in (307, 302, 301, 303, 308):
            location = response.headers.get("location", "")
            self._location = urllib.parse.urljoin(url, location)
            target = urllib.parse.urlsplit(self._location)
            shown = f"{target.scheme}://{target.hostname}{target.path[:40]}…"
            return f"{response.status} to {shown}"
        if response.status == 200:
            return "200: the registry serves blobs itself (no redirect)"
        raise HopFailed(f"{response.status} for the layer")

    def _follow(self, location: str) -> str:
        target = urllib.parse.urlsplit(location)
        try:
            response = self._fetch(location, headers={"Range": "bytes=0-1023"}, read=1024)
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
        kind = "gzip" if response.body[:2] == b"\x1f\x8b" else "data"
        return f"{response.status}, read {len(response.body)} bytes ({kind})"

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
            code = re.search(rb"<Code>([^<]+)</Code>", response.body)
            if code is not None:
                hop.result = f"{response.status} {code.group(1).decode()} (OSS answers)"
            elif b"ListAllMyBucketsResult" in response.body:
                hop.result = f"{response.status} ListAllMyBucketsResult (S3-style storage answers)"
            else:
                raise HopFailed(
                    f"{response.status} but no OSS XML: {_snippet(response.body)}",
                    f"{endpoint} does not look like OSS: is it routed to the right backend?",
                )

    def _check_chart(self, registry: str, chart: str) -> str:
        response = self._fetch(f"https://{registry}/api/{chart}/charts", headers=self._auth())
        if response.status in (200, 401):
            return f"{response.status} from the chart API"
        raise HopFailed(
            f"{response.status} from /api/{chart}/charts",
            "the chart repository (ChartMuseum) must be enabled on the Enterprise instance; "
            "or use OCI charts (helm push oci://…)",
        )


def _oss_endpoint_of(host: str | None) -> str | None:
    """oss-R.aliyuncs.com from a redirect host, virtual-hosted (bucket.oss-…) or path-style."""
    if not host:
        return None
    if host.startswith("oss-"):
        return host
    rest = host.partition(".")[2]
    return rest if rest.startswith("oss-") else None


def _hp(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _snippet(body: bytes) -> str:
    text = body[:120].decode("utf-8", "replace").replace("\n", " ").strip()
    return repr(text) if text else "an empty body"


def format_table(hops: list[Hop]) -> str:
    """The hops as a table, hints under the row they belong to."""
    header = ["HOP", "HOST", "RESULT", "TIME"]
    rows = [
        [
            hop.name,
            hop.host,
            {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[hop.status]
            + (f": {hop.result}" if hop.result else ""),
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


def progress_printer(stream: IO[str]) -> Callable[[Hop], None]:
    """Report each hop as it finishes (on a terminal: one updating line)."""
    tty = stream.isatty()

    def report(hop: Hop) -> None:
        mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped"}[hop.status]
        line = f"{hop.name:<9} {hop.host}: {mark}"
        if tty:
            stream.write("\r\x1b[K" + line)
        else:
            stream.write(line + "\n")
        stream.flush()

    return report


def main_doctor(options: Options, out: IO[str], *, as_json: bool = False) -> int:
    if not as_json:
        out.write(
            f"checking {options.registry}"
            + (f" through {_hp(*options.via)}" if options.via else " directly")
            + " ...\n"
        )
        out.flush()
    doctor = Doctor(options, progress_printer(sys.stderr) if not as_json else None)
    hops = doctor.run()
    if sys.stderr.isatty() and not as_json:
        sys.stderr.write("\r\x1b[K")
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
