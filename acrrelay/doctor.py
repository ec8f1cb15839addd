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

This module holds the hop sequence and the command's entry point. How a hop connects
and asks is in :mod:`acrrelay.doctor_http`; the hop record and the report (progress,
table, JSON) are in :mod:`acrrelay.doctor_report`. The names other code imports from
here (the hop record, :class:`HopFailed`, the printer) are re-exported.

This is client code: blocking sockets, no reactor.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any

import attrs

from acrrelay.addresses import host_port
from acrrelay.doctor_http import (
    PROGRESS_EVERY as PROGRESS_EVERY,
)
from acrrelay.doctor_http import (
    HopFailed,
    Probe,
    bearer_challenge,
    body_kind,
    derive_oss_endpoint,
    judge_oss_root,
    oss_endpoint_of,
    realm_url,
    snippet,
)
from acrrelay.doctor_report import Hop, ProgressPrinter, Reporter, Silent, render
from acrrelay.doctor_report import format_table as format_table

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
#: How much of a blob the doctor reads: enough to see data flow, not a download.
FIRST_BYTES = 1024
_CHART_CREDENTIALS = "the chart repository needs credentials: pass --username, --password-stdin"
_NOT_THE_REGISTRY = (
    "something other than the registry answered (a captive portal or a web proxy?): "
    "check that the name is routed to the registry"
)


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


class Doctor:
    """Runs the hops for :class:`Options`, telling ``reporter`` as they start and end."""

    def __init__(self, options: Options, reporter: Reporter | None = None) -> None:
        self.options = options
        self.hops: list[Hop] = []
        self._reporter: Reporter = reporter or Silent()
        self._http = Probe(
            options.via, options.via_http, options.timeout, options.ca_file, self._progress
        )
        self._current: Hop | None = None
        self._realm: str | None = None
        self._service: str | None = None
        self._scope_token: str | None = None
        self._image_name: str | None = None
        self._layer: str | None = None
        self._location: str | None = None
        self._served_by_registry = False

    # -- plumbing

    def _progress(self, text: str) -> None:
        """A long read's progress, told as the running hop's."""
        if self._current is not None:
            self._reporter.progress(self._current, text)

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
            hop.result = self._http.tls(registry, 443)
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

    def _check_v2(self, registry: str) -> str:
        response = self._http.fetch(f"https://{registry}/v2/")
        if response.status == 200:
            return "200: the registry needs no token"
        challenge = bearer_challenge(response)
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
                hop.result = self._http.tls(realm_host, port)
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
        token, expires = self._http.token(
            realm, self._service, scope, self.options.username, self.options.password
        )
        self._scope_token = token
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
        response = self._http.fetch(url, headers={"Accept": MANIFEST_TYPES, **self._auth()})
        if response.status != 200:
            raise HopFailed(f"{response.status} for {what}", missing_hint)
        try:
            document = json.loads(response.body)
        except ValueError:  # UnicodeDecodeError too
            kind = response.headers.get("content-type", "no Content-Type")
            raise HopFailed(
                f"{what} is not JSON ({kind}): {snippet(response.body)}", _NOT_THE_REGISTRY
            ) from None
        if not isinstance(document, dict):
            raise HopFailed(f"{what} is not a JSON object: {snippet(response.body)}")
        return document

    def _blob(self, registry: str) -> str:
        url = f"https://{registry}/v2/{self._image_name}/blobs/{self._layer}"
        response = self._http.fetch(url, headers=self._auth(), read=FIRST_BYTES, progress=True)
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
                f"read {len(response.body)} bytes ({body_kind(response.body)})"
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
            response = self._http.fetch(
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
                f"{response.status} from OSS: {snippet(response.body)}",
                "an expired or altered signed URL gives 403: the relay must pass it unchanged",
            )
        return f"{response.status}, read {len(response.body)} bytes ({body_kind(response.body)})"

    def _oss_root(self) -> None:
        endpoint = oss_endpoint_of(urllib.parse.urlsplit(self._location or "").hostname)
        endpoint = endpoint or derive_oss_endpoint(self.options.registry)
        if endpoint is None:
            self._skip("oss", "-", "cannot tell the OSS endpoint from the registry name")
            return
        with self._hop("oss", endpoint) as hop:
            try:
                response = self._http.fetch(f"https://{endpoint}/")
            except HopFailed as e:
                if "not routed by the relay" in e.hint:
                    e.hint = (
                        f"the OSS endpoint {endpoint} is not routed by the relay: blob "
                        "downloads will fail; add it (or --acr REGION)"
                    )
                raise
            hop.result = judge_oss_root(endpoint, response)

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
        response = self._http.fetch(url)
        challenge = bearer_challenge(response)
        if response.status == 401 and challenge is not None and challenge.get("realm"):
            try:
                token, _ = self._http.token(
                    challenge["realm"],
                    challenge.get("service"),
                    challenge.get("scope"),
                    self.options.username,
                    self.options.password,
                )
            except HopFailed as e:
                if e.result.startswith("401 "):
                    e.result = f"401 from the chart API for {chart}, and no token for it"
                    if not self.options.username:
                        e.hint = _CHART_CREDENTIALS
                raise
            response = self._http.fetch(url, headers={"Authorization": f"Bearer {token}"})
        status = response.status
        if status == 200:
            try:
                document = json.loads(response.body)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise HopFailed(
                    f"200 but not the chart API's JSON: {snippet(response.body)}",
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
            f"{status} from /api/{chart}/charts: {snippet(response.body)}",
            "the chart repository (ChartMuseum) must be enabled on the Enterprise instance; "
            "or use OCI charts (helm push oci://…)",
        )


_hp = host_port


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
    out.write(render(hops, as_json=as_json))
    return 1 if any(hop.status == "failed" for hop in hops) else 0
