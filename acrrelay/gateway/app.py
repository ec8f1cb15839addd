"""What the gateway does with each request: classify it, then pass it through or take the
blob path. One object per running gateway, shared by every connection."""

from __future__ import annotations

from typing import Any

from acrrelay.gateway.cache import BlobPath
from acrrelay.gateway.passthrough import pass_through
from acrrelay.gateway.registryapi import classify
from acrrelay.gateway.server import Exchange
from acrrelay.gateway.upstream import Upstream

__all__ = ["GatewayHandler"]


class GatewayHandler:
    """The :class:`~acrrelay.gateway.server.Handler` of every gateway connection."""

    def __init__(self, upstream: Upstream, blobs: BlobPath) -> None:
        self.upstream = upstream
        self.blobs = blobs

    def __call__(self, exchange: Exchange) -> Any:
        api = classify(exchange.method, exchange.target)
        if api.cacheable:
            return self.blobs(exchange, api)
        return pass_through(exchange, self.upstream)
