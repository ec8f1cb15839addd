"""Prometheus metrics for one gateway, read from its counters and store when scraped.

On a registry of the gateway's own, served by the admin metrics page
(:func:`acrrelay.metrics.metrics_site`) like the relay's. Labels stay bounded: outcomes and
sources only, never a digest, repository or client.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from acrrelay.gateway.store import StoreStats

__all__ = ["NAMES", "gateway_registry"]

#: Metric names (without _total), for documentation and tests.
NAMES: Final = (
    "acrrelay_gateway_requests",
    "acrrelay_gateway_bytes",
    "acrrelay_gateway_proofs",
    "acrrelay_gateway_download_failures",
    "acrrelay_gateway_store_evictions",
    "acrrelay_gateway_store_events",
    "acrrelay_gateway_store_bytes",
    "acrrelay_gateway_store_blobs",
    "acrrelay_gateway_store_cap_bytes",
)


class _GatewayCollector(Collector):
    def __init__(self, stats: Counter[str], store: Callable[[], StoreStats]) -> None:
        self._stats = stats
        self._store = store

    def collect(self) -> Iterator[Metric]:
        s = self._stats
        requests = CounterMetricFamily(
            "acrrelay_gateway_requests",
            "Cacheable requests served, by how: hit, miss, coalesced, bypass.",
            labels=["cache"],
        )
        for kind, key in (
            ("hit", "hits"),
            ("miss", "misses"),
            ("coalesced", "coalesced"),
            ("bypass", "bypass"),
        ):
            requests.add_metric([kind], s[key])
        yield requests
        moved = CounterMetricFamily(
            "acrrelay_gateway_bytes",
            "Blob bytes by source: sent from the store, sent from a download in progress, "
            "or received from upstream.",
            labels=["source"],
        )
        for source in ("store", "spool", "upstream"):
            moved.add_metric([source], s[f"bytes_{source}"])
        yield moved
        proofs = CounterMetricFamily(
            "acrrelay_gateway_proofs",
            "Upstream proofs of a client's access: ok, denied (the registry's refusal went to "
            "the client), failed (upstream unreachable).",
            labels=["outcome"],
        )
        for outcome in ("ok", "denied", "failed"):
            proofs.add_metric([outcome], s[f"proofs_{outcome}"])
        yield proofs
        yield CounterMetricFamily(
            "acrrelay_gateway_download_failures",
            "Downloads that failed for good (every waiter was cut).",
            value=s["download_failures"],
        )
        yield from self._store_metrics(self._store())

    def _store_metrics(self, store: StoreStats) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "acrrelay_gateway_store_evictions", "Blobs evicted (LRU).", value=store.evictions
        )
        events = CounterMetricFamily(
            "acrrelay_gateway_store_events",
            "Store events: full (passed through uncached), mismatch (download did not match "
            "its digest), corrupt (a stored blob failed its hash), too_large.",
            labels=["event"],
        )
        for event, value in (
            ("full", store.full),
            ("mismatch", store.mismatches),
            ("corrupt", store.corrupt),
            ("too_large", store.too_large),
        ):
            events.add_metric([event], value)
        yield events
        yield GaugeMetricFamily(
            "acrrelay_gateway_store_bytes", "Bytes of stored blobs.", value=store.size
        )
        yield GaugeMetricFamily("acrrelay_gateway_store_blobs", "Stored blobs.", value=store.count)
        yield GaugeMetricFamily(
            "acrrelay_gateway_store_cap_bytes", "The store's size cap.", value=store.cap
        )


def gateway_registry(stats: Counter[str], store: Callable[[], StoreStats]) -> CollectorRegistry:
    """A registry of its own with the gateway's metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_GatewayCollector(stats, store))
    return registry
