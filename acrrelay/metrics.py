"""Prometheus metrics for one relay, on a registry of its own (never the global one).

Counters and gauges are read when scraped from the relay's own
:class:`~acrrelay.relay.RelayStats` (counted from finished connections' access records)
and its connection views (the live ones), so the admin shell and Prometheus always
agree, and connections and bytes still in flight are counted. Histograms are observed
as connections read their hello, are routed and connect.

Labels stay bounded: ``route`` is the route's *pattern* (``*.oss-cn-beijing…``), never
the name a client asked for, and refusals carry only their reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from acrrelay.relay import ConnectionView, Relay, RelayStats

__all__ = ["NAMES", "RelayMetrics", "metrics_site"]

#: Metric names (without _total/_bucket suffixes), for documentation and tests.
NAMES: Final = (
    "acrrelay_connections_active",
    "acrrelay_connections",
    "acrrelay_bytes",
    "acrrelay_refusals",
    "acrrelay_backend_failures",
    "acrrelay_backpressure_seconds",
    "acrrelay_reloads",
    "acrrelay_accepting",
    "acrrelay_client_hello_bytes",
    "acrrelay_peek_seconds",
    "acrrelay_connect_seconds",
)

_HELLO_BUCKETS: Final = (256, 512, 1024, 1536, 2048, 4096, 8192, 16384, 32768, 65536)
_SECONDS_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class RelayMetrics:
    """The histograms a relay observes, and a collector for everything else."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.hello_bytes = Histogram(
            "acrrelay_client_hello_bytes",
            "Size of TLS ClientHello messages, header included.",
            buckets=_HELLO_BUCKETS,
            registry=self.registry,
        )
        self.peek_seconds = Histogram(
            "acrrelay_peek_seconds",
            "Time from accept to a routing decision (PROXY header, hello or request head).",
            ["front_door"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.connect_seconds = Histogram(
            "acrrelay_connect_seconds",
            "Time to connect the backend.",
            ["route"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        # labels() takes a lock and builds a key on every call; a connection observes
        # each histogram once, so the children are kept, per door and per route pattern.
        self._peek: dict[str, Any] = {}
        self._connect: dict[str, Any] = {}

    def observe_peek(self, door: str, seconds: float) -> None:
        child = self._peek.get(door)
        if child is None:
            child = self._peek[door] = self.peek_seconds.labels(door)
        child.observe(seconds)

    def observe_connect(self, route: str, seconds: float) -> None:
        child = self._connect.get(route)
        if child is None:
            child = self._connect[route] = self.connect_seconds.labels(route)
        child.observe(seconds)

    def bind(self, relay: Relay) -> None:
        """Export ``relay``'s counters and gauges from now on."""
        self.registry.register(_StatsCollector(relay))


class _StatsCollector(Collector):
    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def collect(self) -> Iterator[Metric]:
        relay = self._relay
        stats = relay.stats
        live = relay.views()
        yield from _connections(stats, live)
        yield _bytes(stats, live)
        yield _by_reason("acrrelay_refusals", "Connections refused, by reason.", stats.refused)
        yield _by_reason(
            "acrrelay_backend_failures",
            "Backend connections that failed, by reason.",
            stats.backend_failures,
        )
        paused = CounterMetricFamily(
            "acrrelay_backpressure_seconds",
            "Time a side was held back because the other could not take more "
            "(up: the client waited for the backend; down: the backend for the client).",
            labels=["direction"],
        )
        for direction in ("up", "down"):
            seconds = stats.paused_seconds.get(direction, 0.0)
            for view in live:
                seconds += view.paused_up if direction == "up" else view.paused_down
            paused.add_metric([direction], seconds)
        yield paused

        reloads = CounterMetricFamily(
            "acrrelay_reloads", "Configuration reloads, by result.", labels=["result"]
        )
        for result in ("ok", "failed"):
            reloads.add_metric([result], stats.reloads.get(result, 0))
        yield reloads

        accepting = GaugeMetricFamily(
            "acrrelay_accepting",
            "1 while the relay accepts new connections, 0 while paused at max_connections "
            "or draining.",
        )
        accepting.add_metric([], 1 if relay.accepting else 0)
        yield accepting


def _connections(stats: RelayStats, live: list[ConnectionView]) -> Iterator[Metric]:
    active = GaugeMetricFamily(
        "acrrelay_connections_active",
        "Connections open now, by route and front door (route is empty before routing).",
        labels=["route", "front_door"],
    )
    current: Counter[tuple[str, str]] = Counter(
        (view.route or "", view.door or "") for view in live
    )
    for (route, door), count in sorted(current.items()):
        active.add_metric([route, door], count)
    yield active

    total = CounterMetricFamily(
        "acrrelay_connections",
        "Connections routed to a backend (connected or not), by route and front door.",
        labels=["route", "front_door"],
    )
    # Finished ones from their records, and the live ones that have a route.
    routed = stats.routed + Counter(
        (view.route, view.door or "") for view in live if view.route is not None
    )
    for (route, door), count in sorted(routed.items()):
        total.add_metric([route, door], count)
    yield total


def _bytes(stats: RelayStats, live: list[ConnectionView]) -> Metric:
    moved = CounterMetricFamily(
        "acrrelay_bytes",
        "Bytes relayed: up is client to backend, down is backend to client.",
        labels=["route", "direction"],
    )
    in_flight: dict[tuple[str, str], int] = dict(stats.route_bytes)
    for view in live:
        if view.route is not None:
            for direction, count in (("up", view.bytes_up), ("down", view.bytes_down)):
                key = (view.route, direction)
                in_flight[key] = in_flight.get(key, 0) + count
    for (route, direction), count in sorted(in_flight.items()):
        moved.add_metric([route, direction], count)
    return moved


class _MetricsPage(Resource):
    """/metrics, rendered in the reactor thread: the relay's tables are not thread-safe
    (prometheus_client's own Twisted resource renders in a thread pool)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = request.getHeader("accept")
        encode, content_type = choose_encoder(accept or "")
        request.setHeader("Content-Type", content_type)
        return encode(self._registry)


def metrics_site(registry: CollectorRegistry) -> Site:
    """A web site serving ``registry`` at /metrics."""
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(registry))
    site = Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


def _by_reason(name: str, documentation: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["reason"])
    for reason, count in sorted(counts.items()):
        family.add_metric([reason], count)
    return family
