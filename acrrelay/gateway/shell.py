"""The admin shell's view of the gateway: ``cache.stats()``, ``cache.list()``,
``cache.evict(digest)``, served by the same SSH manhole as the relay's shell."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from acrrelay.gateway.service import GatewayService

__all__ = ["CacheShell", "gateway_namespace"]


class CacheShell:
    """What an operator may look at and do to the store from the shell."""

    def __init__(self, service: GatewayService) -> None:
        self._service = service

    def stats(self) -> dict[str, Any]:
        """The store's figures and the blob path's counters (hits, misses, bytes, proofs)."""
        out: dict[str, Any] = attrs.asdict(self._service.store.stats())
        out.update(sorted(self._service.blobs.stats.items()))
        out["downloads"] = len(self._service.blobs.downloads)
        out["proofs_remembered"] = len(self._service.proofs)
        return out

    def list(self, limit: int = 50) -> list[tuple[str, int, float]]:
        """(digest, size, last used) of the most recently used blobs first."""
        entries = self._service.store.entries()[::-1][:limit]
        return [(e.digest, e.size, e.last_used) for e in entries]

    def evict(self, digest: str) -> bool:
        """Remove one blob now, unless a client is reading it. True if it was removed."""
        return self._service.store.evict(digest)

    def forget_proofs(self) -> None:
        """Forget every remembered proof: the next request of each client is proven again."""
        self._service.proofs.clear()

    def __repr__(self) -> str:
        return "<cache: stats(), list(limit=50), evict(digest), forget_proofs()>"


def gateway_namespace(service: GatewayService) -> dict[str, Any]:
    """The admin shell's globals for the gateway role."""
    return {"cache": CacheShell(service), "gateway": service}
