"""Shared pieces of the gateway's HTTP-side tests: a test CA as a leaf issuer, a policy for a
few ``.test`` names, and a loopback TLS upstream served by Twisted with certificates for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import ssl as tssl

from acrrelay.routing import (
    Door,
    ListenerPolicy,
    Policy,
    Refusal,
    Route,
    RouteTable,
    parse_pattern,
)
from tests.e2e_support import TestCA

REGISTRY = "registry.gw.test"
AUTH = "auth.gw.test"
OSS = "bucket.oss.gw.test"
UNROUTED = "elsewhere.example.test"
NAMES = (REGISTRY, AUTH, OSS, UNROUTED, "127.0.0.1")


class FilesIssuer:
    """The leaf issuer the TLS side asks, backed by a :class:`TestCA`'s files."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.issued: list[str] = []

    def leaf(self, name: str) -> tuple[bytes, bytes]:
        self.issued.append(name)
        directory = self.ca.directory
        return (directory / f"{name}.pem").read_bytes(), (directory / f"{name}.key").read_bytes()


def routes(backend: str = "resolve", names: tuple[str, ...] = (REGISTRY, AUTH)) -> list[Route]:
    """Routes for ``names``, plus ``*.oss.gw.test``, all to ``backend``."""
    out = [Route(parse_pattern(name), backend) for name in names]
    out.append(Route(parse_pattern("*.oss.gw.test"), backend, service="oss"))
    return out


def policy(backend: str = "resolve") -> Policy:
    return Policy(RouteTable(routes(backend)), {"main": ListenerPolicy(frozenset({"tls"}))})


def decider(p: Policy, listener: str = "main") -> Any:
    def decide(name: str | None, client: str) -> Route | Refusal:
        return p.decide(Door(listener, "tls"), name, 443, client)

    return decide


def make_ca(directory: Path) -> TestCA:
    return TestCA(directory, NAMES)


def upstream_tls_options(ca: TestCA, name: str) -> Any:
    """Twisted server TLS options for a loopback upstream presenting ``name``'s certificate."""
    pem = (ca.directory / f"{name}.pem").read_bytes() + (ca.directory / f"{name}.key").read_bytes()
    certificate = tssl.PrivateCertificate.loadPEM(pem)
    return certificate.options()
