"""A backend's Prometheus registry: its session cache's collector and its own handshake counts,
the same for every backend kind (threaded, Twisted, stdlib).

Imports prometheus_client (the ``metrics`` extra); :mod:`.metrics` imports this module only
when ``/metrics`` is asked for, so a farm without the package still runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from tlscache import metrics as cache_metrics

from .records import BackendStatus

if TYPE_CHECKING:
    from tlscache import SessionCache

__all__ = ["CONTENT_TYPE", "BackendCollector", "backend_registry", "render"]

CONTENT_TYPE = cache_metrics.CONTENT_TYPE
render = cache_metrics.render


class BackendCollector(Collector):
    """The backend's handshakes, connections and requests, read from its status at each scrape."""

    def __init__(self, status: Callable[[], BackendStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        handshakes = CounterMetricFamily(
            "tlscache_farm_handshakes_total",
            "TLS handshakes on this backend, by result (full, resumed, failed).",
            labels=["result"],
        )
        handshakes.add_metric(["full"], s.handshakes.full)
        handshakes.add_metric(["resumed"], s.handshakes.resumed)
        handshakes.add_metric(["failed"], s.handshakes.failed)
        yield handshakes
        yield CounterMetricFamily(
            "tlscache_farm_connections_total", "TCP connections accepted.", value=s.connections
        )
        yield GaugeMetricFamily(
            "tlscache_farm_active_connections", "Connections open now.", value=s.active
        )
        yield CounterMetricFamily(
            "tlscache_farm_requests_total",
            "HTTP requests answered on the TLS port.",
            value=s.requests,
        )
        made_by = CounterMetricFamily(
            "tlscache_farm_resumed_from_total",
            "Resumed handshakes by the backend that made the session, as the client named it "
            "(made_by=unknown: it named none).",
            labels=["made_by"],
        )
        for maker, count in sorted(s.resumed_from.items()):
            made_by.add_metric([maker], count)
        yield made_by
        if s.store_servers:
            sessions = CounterMetricFamily(
                "tlscache_farm_store_server_sessions_total",
                "Sessions this backend stored on each server of its store.",
                labels=["server"],
            )
            for server in s.store_servers:
                sessions.add_metric([server.address], server.keys)
            yield sessions


def backend_registry(
    status: Callable[[], BackendStatus], cache: SessionCache | None
) -> CollectorRegistry:
    """A registry of the backend's own: the cache's collector (if it has a cache) and its own."""
    registry = CollectorRegistry(auto_describe=True)
    if cache is not None:
        cache_metrics.register(cache, registry)
    registry.register(BackendCollector(status))
    return registry
