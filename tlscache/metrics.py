"""Prometheus metrics of a :class:`~tlscache.SessionCache` and its store.

:class:`SessionCacheCollector` is a custom prometheus_client collector: at each scrape it reads
:meth:`SessionCache.stats` (and what the store reports about itself) and turns the snapshot into
metric families, so the cache keeps one set of counters and the exporter keeps none. Counters of
:class:`~tlscache.CacheStats` that this module has no row for still appear, named after their
field (``tlscache_session_<field>_total`` for an int, a gauge for a float), so a counter added
to the cache is scraped without a change here.

Needs the ``metrics`` extra (prometheus_client); nothing else in tlscache imports this module.

    registry = prometheus_client.CollectorRegistry()
    tlscache.metrics.register(cache, registry)
    body = tlscache.metrics.render(registry)  # text format 0.0.4; serve with CONTENT_TYPE
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final, NamedTuple

from prometheus_client import exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
from prometheus_client.samples import Sample

from tlscache.session_cache import BreakerState, CacheStats
from tlscache.stores.base import SessionStore
from tlscache.stores.distcache import DistcacheStore
from tlscache.stores.memcached import MemcachedStore
from tlscache.stores.near import NearCache

if TYPE_CHECKING:
    from tlscache.session_cache import SessionCache

__all__ = [
    "CACHE_METRICS",
    "CONTENT_TYPE",
    "CacheMetric",
    "SessionCacheCollector",
    "register",
    "render",
]

#: The content type of :func:`render`'s output (Prometheus text format 0.0.4).
CONTENT_TYPE: Final[str] = getattr(
    exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST
)

_PREFIX: Final = "tlscache_session_"


class CacheMetric(NamedTuple):
    """Where one :class:`CacheStats` field goes: a family, and its label if the family has one.

    Fields sharing a ``name`` become one family with one sample per label value, so that
    ``sum()`` over the family is meaningful (every lookup has exactly one outcome).
    """

    name: str  #: without the ``tlscache_session_`` prefix and the ``_total`` suffix
    kind: str  #: ``counter`` or ``gauge``
    help: str
    label: tuple[str, str] | None = None  #: (label name, value) within the family


def _lookup(outcome: str) -> CacheMetric:
    return CacheMetric(
        "lookups",
        "counter",
        "Session lookups (OpenSSL get callbacks), by outcome.",
        ("outcome", outcome),
    )


def _sealed(reason: str) -> CacheMetric:
    return CacheMetric(
        "sealed_refused",
        "counter",
        "Stored values that did not open with the key ring, by reason (each is also a "
        "bad value and a miss).",
        ("reason", reason),
    )


def _write(outcome: str) -> CacheMetric:
    return CacheMetric(
        "writes",
        "counter",
        "New sessions to write to the store, by outcome (failed includes timeouts; "
        "skipped: breaker open; dropped: writer queue full or cache closed).",
        ("outcome", outcome),
    )


def _remove(outcome: str) -> CacheMetric:
    return CacheMetric(
        "removes",
        "counter",
        "Session deletes, by outcome (ignored: by the remove policy; failed includes "
        "deletes not attempted with the breaker open).",
        ("outcome", outcome),
    )


def _counter(name: str, help_text: str) -> CacheMetric:
    return CacheMetric(name, "counter", help_text)


#: The :class:`CacheStats` fields this module knows, and their metrics.
CACHE_METRICS: Final[Mapping[str, CacheMetric]] = {
    "hits": _lookup("hit"),
    "misses": _lookup("miss"),
    "errors": _lookup("error"),
    "timeouts": _lookup("timeout"),
    "skipped": _lookup("skipped"),
    "pending_hits": _counter(
        "pending_hits", "Hits answered from a write still queued in this process (part of hits)."
    ),
    "bad_values": _counter(
        "bad_values",
        "Values from the store rejected: implausible or refused by the seal (part of misses).",
    ),
    "sealed_malformed": _sealed("malformed"),
    "sealed_unknown_key": _sealed("unknown_key"),
    "sealed_retired_key": _sealed("retired_key"),
    "sealed_tampered": _sealed("tampered"),
    "sealed_expired": _sealed("expired"),
    "stores": _write("stored"),
    "store_errors": _write("failed"),
    "writes_skipped": _write("skipped"),
    "writes_dropped": _write("dropped"),
    "store_timeouts": _counter("write_timeouts", "Writes that timed out (part of failed)."),
    "pending_writes": CacheMetric(
        "pending_writes", "gauge", "Writes queued in this process and not yet done."
    ),
    "removes": _remove("removed"),
    "removes_ignored": _remove("ignored"),
    "remove_errors": _remove("failed"),
    "alerts_invalidated": _counter(
        "alert_invalidations", "Sessions deleted because their connection had a fatal alert."
    ),
    "breaker_opens": _counter("breaker_opens", "Times the circuit breaker opened."),
    "takes": _counter(
        "takes", "Single use: TLS 1.3 sessions handed out and removed from the store."
    ),
    "take_misses": _counter(
        "take_misses", "Single use: takes that found nothing (absent, expired or used)."
    ),
    "take_fallbacks": _counter(
        "take_fallbacks", "Single use: takes made by GET then DELETE (a store without take)."
    ),
    "put_back": _counter(
        "put_back", "Single use: TLS 1.2 sessions taken, then stored again (reusable)."
    ),
}

#: Fields exported in another shape (histogram, state set) or derivable from other metrics.
_NOT_COUNTERS: Final = frozenset(
    {
        "sealed_refused",  # the sum of tlscache_session_sealed_refused_total by reason
        "breaker_state",
        "latency_buckets_ms",
        "latency_counts",
        "latency_sum_ms",
        "latency_p50_ms",  # quantiles come from the histogram (histogram_quantile)
        "latency_p99_ms",
        "latency_max_ms",
    }
)


class _Families:
    """Builds families whose samples all carry the collector's constant labels first."""

    def __init__(self, labels: Mapping[str, str]) -> None:
        self.names = tuple(labels)
        self.values = tuple(labels.values())

    def counter(
        self, name: str, help_text: str, samples: Iterable[tuple[Sequence[str], float]], *label: str
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(name, help_text, labels=[*self.names, *label])
        for values, value in samples:
            family.add_metric([*self.values, *values], value)
        return family

    def gauge(
        self, name: str, help_text: str, samples: Iterable[tuple[Sequence[str], float]], *label: str
    ) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, help_text, labels=[*self.names, *label])
        for values, value in samples:
            family.add_metric([*self.values, *values], value)
        return family

    def histogram(
        self,
        name: str,
        help_text: str,
        bounds_s: Sequence[float],
        counts: Sequence[int],
        sum_s: float | None,
    ) -> HistogramMetricFamily:
        """A histogram from per-bucket counts (the last one past every bound), made cumulative."""
        family = HistogramMetricFamily(name, help_text, labels=list(self.names))
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*bounds_s, float("inf")], counts, strict=True):
            running += count
            buckets.append(("+Inf" if math.isinf(bound) else repr(bound), running))
        family.add_metric(list(self.values), buckets, sum_s)
        if sum_s is None:
            # prometheus_client writes _count only along with _sum; the count is known anyway.
            family.samples.append(
                Sample(name + "_count", dict(zip(self.names, self.values, strict=True)), running)
            )
        return family


class SessionCacheCollector(Collector):
    """Metric families of caches and their stores, made from fresh snapshots at each scrape.

    ``labels`` are added to every sample of the cache. Several caches share one collector
    (:meth:`add`, each with its own label values), and so one registry: a registry refuses two
    collectors that make the same metric names.
    """

    def __init__(self, cache: SessionCache, *, labels: Mapping[str, str] | None = None) -> None:
        self._caches: list[tuple[_Families, SessionCache]] = []
        self._label_names = tuple(labels or {})
        self.add(cache, labels=labels)

    def add(self, cache: SessionCache, *, labels: Mapping[str, str] | None = None) -> None:
        """Scrape ``cache`` too; ``labels`` must have the same names as the first cache's."""
        families = _Families(labels or {})
        if families.names != self._label_names:
            raise ValueError(f"labels must be named {self._label_names}, not {families.names}")
        if any(f.values == families.values for f, _ in self._caches):
            raise ValueError(f"a cache with labels {dict(labels or {})} is scraped already")
        self._caches.append((families, cache))

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for families, cache in self._caches:
            for family in itertools.chain(
                self._cache_families(cache.stats(), families),
                self._store_families(cache.store, families),
            ):
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    merged[family.name] = family
        yield from merged.values()

    # ------------------------------------------------------------ the cache

    @staticmethod
    def _cache_families(stats: CacheStats, f: _Families) -> Iterator[Metric]:
        grouped: dict[str, tuple[CacheMetric, list[tuple[Sequence[str], float]]]] = {}
        for field in dataclasses.fields(stats):
            value = getattr(stats, field.name)
            metric = CACHE_METRICS.get(field.name)
            if metric is None:
                if field.name in _NOT_COUNTERS:
                    continue
                metric = _unknown_field(field.name, value)
                if metric is None:
                    continue
            label_values = () if metric.label is None else (metric.label[1],)
            entry = grouped.setdefault(metric.name, (metric, []))
            entry[1].append((label_values, float(value)))
        for metric, samples in grouped.values():
            name = _PREFIX + metric.name
            label_names = () if metric.label is None else (metric.label[0],)
            if metric.kind == "gauge":
                yield f.gauge(name, metric.help, samples, *label_names)
            else:
                yield f.counter(name, metric.help, samples, *label_names)
        yield f.gauge(
            _PREFIX + "breaker_state",
            "Circuit breaker state: 1 for the current state, 0 for the others.",
            (((s.value,), float(s.value == stats.breaker_state)) for s in BreakerState),
            "state",
        )
        sum_ms = getattr(stats, "latency_sum_ms", None)
        yield f.histogram(
            _PREFIX + "store_lookup_duration_seconds",
            "Time of the lookups that reached the store (not the breaker's skips nor hits on "
            "queued writes).",
            [round(ms / 1000.0, 9) for ms in stats.latency_buckets_ms],
            stats.latency_counts,
            None if sum_ms is None else float(sum_ms) / 1000.0,
        )
        yield f.gauge(
            _PREFIX + "store_lookup_duration_max_seconds",
            "The slowest lookup since the cache started.",
            [((), stats.latency_max_ms / 1000.0)],
        )

    # ------------------------------------------------------------ the store

    @staticmethod
    def _store_families(store: SessionStore, f: _Families) -> Iterator[Metric]:
        servers = list(store.servers())  # wrappers forward: ask the outermost store only
        if servers:
            yield f.gauge(
                "tlscache_store_server_up",
                "1 if the store sends calls to the server, 0 while it skips it after failures.",
                (((s.address,), float(s.up)) for s in servers),
                "server",
            )
            yield f.gauge(
                "tlscache_store_server_failures",
                "Consecutive failed calls to the server (0 when healthy).",
                (((s.address,), float(s.failures)) for s in servers),
                "server",
            )
        for part in _store_chain(store):
            if isinstance(part, MemcachedStore):
                per_server = part.stats()
                for attr, help_text in (
                    ("calls", "Calls that went to the server (probes of a down server included)."),
                    ("skipped", "Calls answered without the network: the server was down."),
                    ("errors", "Calls that failed and marked the server down."),
                ):
                    yield f.counter(
                        f"tlscache_store_server_{attr}",
                        help_text,
                        (((s.address,), float(getattr(s, attr))) for s in per_server),
                        "server",
                    )
            elif isinstance(part, NearCache):
                near = part.stats()
                yield f.counter(
                    "tlscache_near_cache_hits",
                    "Fetches answered by the near cache.",
                    [((), near.hits)],
                )
                yield f.counter(
                    "tlscache_near_cache_misses",
                    "Fetches the near cache passed to the store behind it.",
                    [((), near.misses)],
                )
                yield f.gauge(
                    "tlscache_near_cache_entries",
                    "Entries the near cache holds.",
                    [((), near.entries)],
                )
                yield f.counter(
                    "tlscache_near_cache_evictions",
                    "Entries dropped to stay within the near cache's size.",
                    [((), near.evictions)],
                )
            elif isinstance(part, DistcacheStore):
                yield f.counter(
                    "tlscache_distcache_write_failures",
                    "Pipelined writes that turned out not stored (refused, no server, lost).",
                    [((), float(part.write_failures))],
                )


def _unknown_field(name: str, value: object) -> CacheMetric | None:
    """A metric for a :class:`CacheStats` field without a row in :data:`CACHE_METRICS`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    help_text = f"CacheStats.{name} (see docs/session-cache.md)."
    if isinstance(value, int):
        return CacheMetric(name, "counter", help_text)
    return CacheMetric(name, "gauge", help_text)


def _store_chain(store: SessionStore) -> Iterator[SessionStore]:
    """``store`` and the stores it wraps (``inner``), outermost first."""
    seen: set[int] = set()
    current: object = store
    while isinstance(current, SessionStore) and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "inner", None)


def register(
    cache: SessionCache,
    registry: CollectorRegistry = REGISTRY,
    *,
    labels: Mapping[str, str] | None = None,
) -> SessionCacheCollector:
    """Add ``cache``'s collector to ``registry`` (the global one by default) and return it."""
    collector = SessionCacheCollector(cache, labels=labels)
    registry.register(collector)
    return collector


def render(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry's metrics in the Prometheus text format (serve with :data:`CONTENT_TYPE`)."""
    return exposition.generate_latest(registry)
