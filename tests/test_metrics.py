"""The Prometheus collector: what a scrape shows equals what ``SessionCache.stats()`` says."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pprint import pformat
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.memcache.servers import MEMCACHED, memcached_servers
from tests.procs import free_port
from tlscache import Deadline, MemoryStore, SessionCache, WrappingStore
from tlscache.exceptions import StoreError
from tlscache.metrics import CONTENT_TYPE, register, render
from tlscache.session_cache import LATENCY_BUCKETS_MS, CacheStats
from tlscache.stores.memcached import MemcachedStore
from tlscache.stores.near import NearCache

DER = b"\x30\x81\x83" + b"s" * 131  # shaped like an i2d_SSL_SESSION value
CTX = b"test-service"
HIST = "tlscache_session_store_lookup_duration_seconds"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> tuple[Samples, dict[str, str]]:
    """Every sample of a scrape, keyed by name and sorted labels; and each family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def one(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def expected_from(s: CacheStats) -> Samples:
    """The samples a scrape must show for the snapshot ``s``, written out by hand."""
    p = "tlscache_session_"
    return {
        one(p + "lookups_total", outcome="hit"): s.hits,
        one(p + "lookups_total", outcome="miss"): s.misses,
        one(p + "lookups_total", outcome="error"): s.errors,
        one(p + "lookups_total", outcome="timeout"): s.timeouts,
        one(p + "lookups_total", outcome="skipped"): s.skipped,
        one(p + "pending_hits_total"): s.pending_hits,
        one(p + "bad_values_total"): s.bad_values,
        one(p + "sealed_refused_total", reason="malformed"): s.sealed_malformed,
        one(p + "sealed_refused_total", reason="unknown_key"): s.sealed_unknown_key,
        one(p + "sealed_refused_total", reason="retired_key"): s.sealed_retired_key,
        one(p + "sealed_refused_total", reason="tampered"): s.sealed_tampered,
        one(p + "sealed_refused_total", reason="expired"): s.sealed_expired,
        one(p + "writes_total", outcome="stored"): s.stores,
        one(p + "writes_total", outcome="failed"): s.store_errors,
        one(p + "writes_total", outcome="skipped"): s.writes_skipped,
        one(p + "writes_total", outcome="dropped"): s.writes_dropped,
        one(p + "write_timeouts_total"): s.store_timeouts,
        one(p + "pending_writes"): s.pending_writes,
        one(p + "removes_total", outcome="removed"): s.removes,
        one(p + "removes_total", outcome="ignored"): s.removes_ignored,
        one(p + "removes_total", outcome="failed"): s.remove_errors,
        one(p + "alert_invalidations_total"): s.alerts_invalidated,
        one(p + "breaker_opens_total"): s.breaker_opens,
        one(p + "takes_total"): s.takes,
        one(p + "take_misses_total"): s.take_misses,
        one(p + "take_fallbacks_total"): s.take_fallbacks,
        one(p + "put_back_total"): s.put_back,
        one(p + "breaker_state", state="closed"): s.breaker_state == "closed",
        one(p + "breaker_state", state="open"): s.breaker_state == "open",
        one(p + "breaker_state", state="half_open"): s.breaker_state == "half_open",
        one(p + "store_lookup_duration_max_seconds"): s.latency_max_ms / 1000.0,
    }


def assert_matches(samples: Samples, s: CacheStats) -> None:
    wrong = {
        key: (samples.get(key), float(value))
        for key, value in expected_from(s).items()
        if samples.get(key) != pytest.approx(float(value))
    }
    assert not wrong, f"(scraped, stats) differ:\n{pformat(wrong)}\nstats: {pformat(s)}"


class SnapshotCache(SessionCache):
    """A real cache whose stats() returns a given snapshot: every counter can differ."""

    snapshot: CacheStats | None = None

    def stats(self) -> CacheStats:
        return self.snapshot if self.snapshot is not None else super().stats()


@dataclasses.dataclass(frozen=True, slots=True)
class NewerStats(CacheStats):
    """CacheStats as a later version might have it: one counter more."""

    tickets_reissued: int = 0


def test_every_counter_has_its_own_sample() -> None:
    """Each counter gets a different value, so a field sent to the wrong sample shows."""
    cache = SnapshotCache(MemoryStore())
    counters = [
        f.name
        for f in dataclasses.fields(CacheStats)
        if isinstance(getattr(cache.stats(), f.name), int)
    ]
    distinct: dict[str, Any] = {name: 10 + i for i, name in enumerate(counters)}
    cache.snapshot = dataclasses.replace(
        cache.stats(),
        breaker_state="half_open",
        latency_max_ms=12.5,
        **distinct,
    )
    registry = CollectorRegistry()
    register(cache, registry)
    samples, types = scrape(registry)
    assert_matches(samples, cache.snapshot)
    # The sum of the reasons is the cache's own sum: one family, no sample counted twice.
    refused = [v for (n, _), v in samples.items() if n == "tlscache_session_sealed_refused_total"]
    assert len(refused) == 5
    assert types["tlscache_session_lookups"] == "counter", types
    assert types["tlscache_session_pending_writes"] == "gauge", types
    assert types[HIST] == "histogram", types


def test_a_new_counter_is_scraped_under_its_field_name() -> None:
    cache = SnapshotCache(MemoryStore())
    base = cache.stats()
    cache.snapshot = NewerStats(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(CacheStats)},
        tickets_reissued=7,
    )
    registry = CollectorRegistry()
    register(cache, registry)
    samples, types = scrape(registry)
    assert samples.get(one("tlscache_session_tickets_reissued_total")) == 7, pformat(samples)
    assert types["tlscache_session_tickets_reissued"] == "counter"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedStore(WrappingStore):
    """A MemoryStore whose fetches take ``delay_s`` on the cache's clock (no real waiting)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(MemoryStore(clock=clock))
        self.clock = clock
        self.delay_s = 0.0

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        value = self.inner.fetch(session_id, deadline)
        self.clock.now += self.delay_s
        return value


def test_real_lookups_fill_counters_and_a_cumulative_histogram() -> None:
    clock = Clock()
    store = TimedStore(clock)
    cache = SessionCache(store, deadline_ms=20.0, clock=clock)
    cache.on_new(CTX, b"A" * 32, DER, 300)
    cache.on_new(CTX, b"B" * 32, DER, 300)
    # (session, store time in ms): hits spread over the buckets, a miss, and a lookup far
    # past its 20 ms budget (counted as a timeout, timed in the last bucket).
    for sid, ms in [(b"A", 0.05), (b"B", 0.3), (b"C", 0.0), (b"A", 3.0), (b"B", 30.0), (b"A", 100)]:
        store.delay_s = ms / 1000.0
        cache.on_get(CTX, sid * 32)
    cache.on_remove(CTX, b"B" * 32)  # ignored by the default remove policy
    cache.on_fatal_alert(CTX, [b"A" * 32])
    registry = CollectorRegistry()
    register(cache, registry)
    samples, _ = scrape(registry)
    s = cache.stats()
    assert (s.hits, s.misses, s.timeouts, s.lookups, s.stores) == (4, 1, 1, 6, 2), s
    assert_matches(samples, s)

    buckets = [
        samples[one(HIST + "_bucket", le=le)]
        for le in [repr(ms / 1000.0) for ms in LATENCY_BUCKETS_MS] + ["+Inf"]
    ]
    state = f"buckets {buckets}\nstats {pformat(s)}"
    # At or below 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 50 ms, and in all.
    assert buckets == [2, 2, 3, 3, 3, 4, 4, 4, 5, 6], state
    assert buckets == list(itertools.accumulate(s.latency_counts)), state
    assert samples[one(HIST + "_count")] == s.lookups == buckets[-1], state
    if (HIST + "_sum", ()) in samples:  # with a CacheStats that keeps the sum
        assert samples[one(HIST + "_sum")] == pytest.approx(0.13335), state


class FailingStore(MemoryStore):
    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        raise StoreError("down")


def test_breaker_state_and_skipped_lookups() -> None:
    cache = SessionCache(FailingStore(), breaker_threshold=2, breaker_reset_s=60.0)
    for n in range(5):
        cache.on_get(CTX, bytes([n]) * 32)
    registry = CollectorRegistry()
    register(cache, registry)
    samples, _ = scrape(registry)
    s = cache.stats()
    assert (s.errors, s.skipped, s.breaker_opens, s.breaker_state) == (2, 3, 1, "open"), s
    assert_matches(samples, s)
    # Only the lookups that reached the store are timed.
    assert samples[one(HIST + "_count")] == s.errors, pformat(samples)


def test_labels_let_two_caches_share_a_registry() -> None:
    registry = CollectorRegistry(auto_describe=True)
    web, api = SessionCache(MemoryStore()), SessionCache(MemoryStore())
    collector = register(web, registry, labels={"cache": "web"})
    collector.add(api, labels={"cache": "api"})
    web.on_get(CTX, b"x" * 32)
    samples, _ = scrape(registry)
    lookups = "tlscache_session_lookups_total"
    assert samples[one(lookups, cache="web", outcome="miss")] == 1, pformat(samples)
    assert samples[one(lookups, cache="api", outcome="miss")] == 0, pformat(samples)
    with pytest.raises(ValueError, match="scraped already"):
        collector.add(SessionCache(MemoryStore()), labels={"cache": "web"})
    with pytest.raises(ValueError, match="must be named"):
        collector.add(SessionCache(MemoryStore()), labels={"service": "mail"})


def test_render_is_text_format_0_0_4() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


@pytest.fixture()
def memcached_address() -> Iterator[str]:
    if MEMCACHED is None:
        pytest.skip("memcached is not installed")
    with memcached_servers(1) as servers:
        yield servers[0].address


@pytest.mark.integration
def test_store_servers_memcached_and_near_cache(memcached_address: str) -> None:
    """One live memcached and one closed port behind a near cache, all on loopback."""
    closed = f"127.0.0.1:{free_port()}"
    memcached = MemcachedStore([memcached_address, closed], retry_s=60.0)
    store = NearCache(memcached)
    cache = SessionCache(store, insecure_unsealed_storage=True, deadline_ms=2000.0)
    try:
        for n in range(20):  # sessions on both servers: those placed on the closed one fail
            sid = bytes([n]) * 32
            cache.on_new(CTX, sid, DER, 300)
            cache.on_get(CTX, sid)
        registry = CollectorRegistry()
        register(cache, registry)
        samples, types = scrape(registry)
        near, per_server = store.stats(), {s.address: s for s in memcached.stats()}
        state = pformat((near, per_server, memcached.servers(), samples))
        assert samples[one("tlscache_store_server_up", server=memcached_address)] == 1, state
        assert samples[one("tlscache_store_server_up", server=closed)] == 0, state
        assert samples[one("tlscache_store_server_failures", server=closed)] >= 1, state
        for address, counts in per_server.items():
            for attr in ("calls", "skipped", "errors"):
                key = one(f"tlscache_store_server_{attr}_total", server=address)
                assert samples[key] == getattr(counts, attr), state
        assert per_server[closed].errors >= 1 and per_server[memcached_address].calls > 0, state
        assert samples[one("tlscache_near_cache_hits_total")] == near.hits > 0, state
        assert samples[one("tlscache_near_cache_misses_total")] == near.misses, state
        assert samples[one("tlscache_near_cache_entries")] == near.entries > 0, state
        assert samples[one("tlscache_near_cache_evictions_total")] == near.evictions, state
        assert types["tlscache_store_server_up"] == "gauge"
        assert_matches(samples, cache.stats())
    finally:
        cache.close()
        store.close()
