"""SessionCache logic without OpenSSL: writes, lookups, remove policy, breaker, counters."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from pprint import pformat

import pytest
from OpenSSL import SSL

from tests.tlsutil import client_context, handshake_over_memory
from tlscache import BreakerState, Deadline, MemoryStore, SessionCache, SessionStore, WrappingStore
from tlscache.exceptions import (
    ConfigurationError,
    KeyRingError,
    SealError,
    StoreError,
    StoreTimeout,
)
from tlscache.keyring import KeyRing, KeyRingFile
from tlscache.sealing import SEAL_OVERHEAD, Sealer
from tlscache.session_cache import LATENCY_BUCKETS_MS, CacheStats, CircuitBreaker
from tlscache.stores import MAX_VALUE_LEN
from tlscache.stores.base import WriteStatus

DER = b"\x30\x81\x83" + b"s" * 131  # shaped like an i2d_SSL_SESSION value
SID = b"\x07" * 32
CTX = b"test-service"  # the session id context the glue passes to every callback


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def soon() -> Deadline:
    """A deadline no in-process store call comes near."""
    return Deadline.after(1.0)


class FlakyStore(SessionStore):
    """A MemoryStore that can be switched to raise, time out, or block."""

    in_process = True

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.mode = "ok"  # ok | error | timeout | sleep | crash
        self.sleep_s = 0.05
        self.calls = 0
        self.deadlines: list[float] = []  # time left when each call arrived

    def _act(self, deadline: Deadline) -> None:
        self.calls += 1
        self.deadlines.append(deadline.remaining())
        if self.mode == "error":
            raise StoreError("down")
        if self.mode == "timeout":
            raise StoreTimeout("slow")
        if self.mode == "crash":
            raise RuntimeError("bug in a store")
        if self.mode == "sleep":
            time.sleep(self.sleep_s)  # ignores its deadline, as a badly written store might

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> None:
        self._act(deadline)
        self.inner.store(session_id, value, ttl_s, deadline)

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self._act(deadline)
        return self.inner.fetch(session_id, deadline)

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self._act(deadline)
        self.inner.delete(session_id, deadline)


def test_new_then_get_sync() -> None:
    store = MemoryStore()
    cache = SessionCache(store, timeout=300, async_writes=False)
    cache.on_new(CTX, SID, DER, 7200)
    assert store.fetch(SID, soon()) == DER
    assert cache.on_get(CTX, SID) == DER
    assert cache.on_get(CTX, b"\x08" * 32) is None
    s = cache.stats()
    assert (s.stores, s.hits, s.misses, s.lookups) == (1, 1, 1, 2)
    assert s.breaker_state == "closed"


def test_ttl_is_min_of_session_and_cache_timeout() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    cache = SessionCache(store, timeout=300, async_writes=False)
    cache.on_new(CTX, b"a", DER, 7200)
    cache.on_new(CTX, b"b", DER, 60)
    cache.on_new(CTX, b"c", DER, 0)  # unknown: the cache's timeout
    clock.now += 61
    assert [store.fetch(k, soon()) is not None for k in (b"a", b"b", b"c")] == [True, False, True]
    clock.now += 240
    assert store.fetch(b"a", soon()) is None and store.fetch(b"c", soon()) is None


def test_async_writes_and_pending_hits() -> None:
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 1.0
    cache = SessionCache(store, async_writes=True, write_deadline_ms=3000)
    cache.on_new(CTX, SID, DER, 300)
    # The store sleeps 1 s before it stores: had on_new waited, the value would be there.
    assert store.inner.fetch(SID, soon()) is None, "on_new waited for the write"
    # Until the write lands, this process answers from the queued write.
    assert cache.on_get(CTX, SID) == DER
    assert cache.stats().pending_hits == 1, cache.stats()
    assert cache.flush(5.0)
    store.mode = "ok"
    assert store.inner.fetch(SID, soon()) == DER
    assert cache.stats().pending_writes == 0
    cache.close()
    cache.on_new(CTX, b"late", DER, 300)
    assert cache.stats().writes_dropped == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_writer_restarts_in_a_forked_child() -> None:
    """Prefork servers: the parent's writer thread does not exist in the child."""
    store = MemoryStore()
    cache = SessionCache(store, async_writes=True)
    cache.on_new(CTX, b"parent", DER, 300)
    assert cache.flush(2.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = False
        try:
            cache.on_new(CTX, b"child", DER, 300)
            ok = cache.flush(2.0) and store.fetch(b"child", soon()) == DER
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.fetch(b"child", soon()) is None  # the child's store is its own copy
    cache.on_new(CTX, b"parent2", DER, 300)
    assert cache.flush(2.0) and store.fetch(b"parent2", soon()) == DER
    cache.close()


def test_writer_queue_is_bounded() -> None:
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.1
    cache = SessionCache(store, async_writes=True, write_queue_size=4, write_deadline_ms=1000)
    for i in range(20):
        cache.on_new(CTX, bytes([i]) * 8, DER, 300)
    s = cache.stats()
    assert s.writes_dropped >= 10  # 1 being written + 4 queued; a little slack for scheduling
    assert cache.flush(3.0)
    assert cache.stats().stores + cache.stats().writes_dropped == 20
    cache.close()


def test_implausible_values_are_misses() -> None:
    store = MemoryStore()
    cache = SessionCache(store, async_writes=False)
    store.store(b"junk", b"not der at all", 60, soon())
    store.store(b"empty", b"", 60, soon())
    assert cache.on_get(CTX, b"junk") is None
    assert cache.on_get(CTX, b"empty") is None
    s = cache.stats()
    assert (s.misses, s.bad_values, s.hits) == (2, 2, 0)


def test_bytes_like_values_are_accepted() -> None:
    class ArrayStore(MemoryStore):
        def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
            value = super().fetch(session_id, deadline)
            return bytearray(value) if value is not None else None  # type: ignore[return-value]

    store = ArrayStore()
    store.store(SID, DER, 60, soon())
    got = SessionCache(store).on_get(CTX, SID)
    assert got == DER and type(got) is bytes


def test_oversized_inputs_are_dropped() -> None:
    store = MemoryStore()
    cache = SessionCache(store, async_writes=False)
    cache.on_new(CTX, b"", DER, 300)
    cache.on_new(CTX, b"x" * 65, DER, 300)
    cache.on_new(CTX, SID, b"\x30" * 40000, 300)
    assert len(store) == 0
    assert cache.stats().writes_dropped == 3


@pytest.mark.parametrize("async_writes", [False, True])
def test_remove_policy(async_writes: bool) -> None:
    store = MemoryStore()
    ignoring = SessionCache(store, async_writes=async_writes)
    store.store(SID, DER, 60, soon())
    ignoring.on_remove(CTX, SID)
    assert ignoring.flush(1.0)
    assert store.fetch(SID, soon()) == DER
    assert ignoring.stats().removes_ignored == 1

    deleting = SessionCache(store, remove_policy="delete", async_writes=async_writes)
    deleting.on_new(CTX, SID, DER, 60)
    deleting.on_remove(CTX, SID)
    assert SID not in deleting._pending  # a queued delete also cancels the pending write
    assert deleting.flush(1.0)
    assert store.fetch(SID, soon()) is None
    assert deleting.on_get(CTX, SID) is None
    assert deleting.stats().removes == 1
    ignoring.close()
    deleting.close()


@pytest.mark.parametrize("mode", ["error", "timeout", "crash"])
def test_store_failures_are_misses_and_open_the_breaker(mode: str) -> None:
    store = FlakyStore()
    store.mode = mode
    cache = SessionCache(store, breaker_threshold=3, breaker_reset_s=60, async_writes=False)
    for _ in range(10):
        assert cache.on_get(CTX, SID) is None
        cache.on_new(CTX, SID, DER, 300)  # never raises
    s = cache.stats()
    assert store.calls == 3  # after 3 consecutive failures nothing reaches the store
    assert s.breaker_state == "open" and s.breaker_opens == 1
    assert s.skipped == 8 and s.writes_skipped == 9
    if mode == "timeout":
        assert s.timeouts == 2 and s.store_timeouts == 1
    else:
        assert s.errors == 2 and s.store_errors == 1


def test_deadline_reaches_the_store() -> None:
    store = FlakyStore()
    cache = SessionCache(
        store, deadline_ms=15, write_deadline_ms=250, async_writes=False, clock=Clock()
    )
    cache.on_get(CTX, SID)
    cache.on_new(CTX, SID, DER, 300)
    assert store.deadlines == [pytest.approx(0.015), pytest.approx(0.25)]


def test_blocking_store_costs_one_timeout_then_skips_fast() -> None:
    """A store that blocks past its deadline: a few slow lookups, then < 1 ms each."""
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.05
    cache = SessionCache(store, deadline_ms=20, breaker_threshold=2, breaker_reset_s=60)
    for _ in range(2):
        assert cache.on_get(CTX, SID) is None
    assert cache.stats().breaker_state == "open"
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        assert cache.on_get(CTX, SID) is None
    per_call = (time.perf_counter() - start) / n
    stats = cache.stats()
    # The counters prove the skip; the time only that no call slept the store's 50 ms
    # (a few microseconds on an idle machine; the bound is loose for a loaded one).
    assert store.calls == 2, (store.calls, stats)
    assert stats.timeouts == 2 and stats.skipped == n, stats
    assert per_call < 0.01, (per_call, stats)


def test_half_open_probe_and_recovery() -> None:
    clock = Clock()
    store = FlakyStore()
    store.mode = "error"
    cache = SessionCache(
        store, breaker_threshold=2, breaker_reset_s=5, async_writes=False, clock=clock
    )
    cache.on_get(CTX, SID)
    cache.on_get(CTX, SID)
    assert cache.stats().breaker_state == "open"
    clock.now += 4.9
    cache.on_get(CTX, SID)
    assert store.calls == 2
    clock.now += 0.2
    cache.on_get(CTX, SID)  # the probe; fails again -> open for another 5 s
    assert store.calls == 3 and cache.stats().breaker_state == "open"
    assert cache.stats().breaker_opens == 1
    store.mode = "ok"
    cache.on_get(CTX, SID)
    assert store.calls == 3
    clock.now += 5.1
    store.inner.store(SID, DER, 60, soon())
    assert cache.on_get(CTX, SID) == DER  # probe succeeds, breaker closes
    assert cache.stats().breaker_state == "closed"
    assert cache.on_get(CTX, SID) == DER
    assert store.calls == 5


def test_half_open_allows_a_single_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(1, 1.0, clock=clock)
    breaker.failure()
    assert not breaker.allow()
    clock.now += 1.5
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def contend() -> None:
        barrier.wait()
        results.append(breaker.allow())

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1
    assert breaker.state.value == "half_open"
    clock.now += 1.5  # a probe that never reported is replaced after another period
    assert breaker.allow()
    breaker.success()
    assert breaker.state.value == "closed"
    assert breaker.allow()


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(3, 1.0)
    for _ in range(5):
        breaker.failure()
        breaker.failure()
        breaker.success()
    assert breaker.state is BreakerState.CLOSED


def test_latency_histogram_and_percentiles() -> None:
    store = FlakyStore()
    cache = SessionCache(store, deadline_ms=1000)
    for _ in range(50):
        cache.on_get(CTX, SID)
    store.mode = "sleep"
    store.sleep_s = 0.006
    cache.on_get(CTX, SID)
    s = cache.stats()
    assert len(s.latency_counts) == len(LATENCY_BUCKETS_MS) + 1
    assert sum(s.latency_counts) == 51
    assert sum(s.latency_counts[LATENCY_BUCKETS_MS.index(10.0) :]) == 1  # the 6 ms lookup
    assert 0 < s.latency_p50_ms <= 1.0
    assert s.latency_p50_ms <= s.latency_p99_ms <= s.latency_max_ms
    assert s.latency_max_ms >= 6.0
    d = s.as_dict()
    assert d["hits"] == 0 and d["misses"] == 51


def test_counters_are_thread_safe() -> None:
    cache = SessionCache(MemoryStore(), async_writes=False)

    def work() -> None:
        for i in range(500):
            cache.on_new(CTX, bytes([i % 256]) * 4, DER, 300)
            cache.on_get(CTX, bytes([i % 256]) * 4)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s.stores == 2000 and s.hits == 2000


def test_configuration_errors() -> None:
    store = MemoryStore()
    for kwargs in (
        {"timeout": 0},
        {"deadline_ms": 0},
        {"write_deadline_ms": -1},
        {"breaker_threshold": 0},
        {"breaker_reset_s": 0},
        {"remove_policy": "purge"},
        {"write_queue_size": 0},
        {"keys": KeyRing.generate(), "insecure_unsealed_storage": True},
    ):
        with pytest.raises(ConfigurationError):
            SessionCache(store, **kwargs)
    assert "MemoryStore" in repr(SessionCache(store))


# ---------------------------------------------------------------- with real OpenSSL handshakes


def _contexts() -> tuple[Callable[[], SSL.Context], Callable[[str], SSL.Context]]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")

    def server() -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        cert.configure_cert(ctx)
        return ctx

    return server, client_context


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_two_contexts_share_a_store(version: str) -> None:
    server, client = _contexts()
    store = MemoryStore()
    a, b = server(), server()
    caches = [SessionCache(store, async_writes=False) for _ in range(2)]
    caches[0].install(a)
    caches[1].install(b)
    cctx = client(version)
    reused, sess = handshake_over_memory(a, cctx)
    assert not reused and len(store) >= 1
    reused, _ = handshake_over_memory(b, cctx, sess)
    assert reused
    assert caches[1].stats().hits == 1
    store.clear()  # the internal cache is off: without the store, no resumption at all
    reused, _ = handshake_over_memory(a, cctx, sess)
    assert not reused


def test_bad_store_values_mean_full_handshakes() -> None:
    server, client = _contexts()
    store = MemoryStore()
    ctx = server()
    cache = SessionCache(store, async_writes=False)
    cache.install(ctx)
    cctx = client("1.2")
    _, sess = handshake_over_memory(ctx, cctx)
    (sid,) = list(store._data)
    good = store.fetch(sid, soon())
    assert good is not None
    for bad in (b"\x30\x03abc", good[:-7], b"\x30" + bytes(100)):
        store.store(sid, bad, 60, soon())  # the cache is untrusted storage
        assert not handshake_over_memory(ctx, cctx, sess)[0]
    store.store(sid, good, 60, soon())
    assert handshake_over_memory(ctx, cctx, sess)[0]


def test_breaker_open_skips_the_store_on_every_handshake() -> None:
    """Handshakes against a dead store (breaker open) cost what misses on a healthy one cost."""
    server, client = _contexts()
    dead = FlakyStore()
    dead.mode = "timeout"
    dead_ctx, miss_ctx, origin = server(), server(), server()
    dead_cache = SessionCache(dead, breaker_threshold=1, breaker_reset_s=600)
    dead_cache.install(dead_ctx)
    SessionCache(MemoryStore()).install(miss_ctx)
    SessionCache(MemoryStore(), async_writes=False).install(origin)
    cctx = client("1.2")
    # A session neither server knows: a lookup each time.
    _, foreign = handshake_over_memory(origin, cctx)
    handshake_over_memory(dead_ctx, cctx, foreign)
    assert dead_cache.stats().breaker_state == "open"
    times: dict[str, list[float]] = {"dead": [], "miss": []}
    for _ in range(40):
        for name, ctx in (("dead", dead_ctx), ("miss", miss_ctx)):
            start = time.perf_counter()
            assert not handshake_over_memory(ctx, cctx, foreign)[0]
            times[name].append(time.perf_counter() - start)
    added = statistics.median(times["dead"]) - statistics.median(times["miss"])
    print(f"breaker open: {added * 1e6:+.1f} us per handshake vs a healthy miss")
    # Tens of microseconds on an idle machine; the bound (half the default 20 ms lookup
    # deadline) is loose so that a loaded machine's scheduling noise does not fail it.
    assert added < 0.010, (added, dead_cache.stats())
    assert dead.calls == 1  # the first lookup; every later lookup and write was skipped
    assert dead_cache.stats().skipped >= 40


# --------------------------------------------------------------------------- hot path


class CountingLock:
    """A lock that counts acquisitions (to check how often the hot path takes it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired = 0

    def __enter__(self) -> bool:
        self.acquired += 1
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)


@pytest.mark.parametrize("present", [True, False])
def test_a_lookup_takes_the_lock_once(present: bool) -> None:
    store = MemoryStore()
    if present:
        store.store(SID, DER, 300, soon())
    cache = SessionCache(store, async_writes=False)
    lock = CountingLock()
    cache._lock = lock  # type: ignore[assignment]
    assert (cache.on_get(CTX, SID) == DER) is present
    assert lock.acquired == 1
    s = cache.stats()
    assert (s.hits, s.misses, sum(s.latency_counts)) == ((1, 0, 1) if present else (0, 1, 1))


def test_writer_drains_a_batch_per_wake_up_and_keeps_order() -> None:
    """Writes queued while the writer is busy are done in order, without a wake-up each."""
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.05
    cache = SessionCache(store, async_writes=True, remove_policy="delete", write_deadline_ms=1000)
    cache.on_new(CTX, b"first", DER, 300)  # wakes the writer, which then sleeps in the store
    time.sleep(0.01)
    sets = 0
    real_set = cache._wake.set

    def counting_set() -> None:
        nonlocal sets
        sets += 1
        real_set()

    cache._wake.set = counting_set  # type: ignore[method-assign]
    for i in range(5):
        cache.on_new(CTX, bytes([i]) * 8, DER, 300)
    cache.on_remove(CTX, b"\x02" * 8)  # after its write: the id ends up absent
    assert sets == 0  # the busy writer will find them: no wake-up needed
    assert cache.flush(3.0)
    store.mode = "ok"
    assert store.inner.fetch(b"\x01" * 8, soon()) == DER
    assert store.inner.fetch(b"\x02" * 8, soon()) is None
    s = cache.stats()
    assert (s.stores, s.removes, s.pending_writes) == (6, 1, 0)
    cache.close()
    assert cache._writer is not None and not cache._writer.is_alive()


def test_close_stops_an_idle_writer() -> None:
    cache = SessionCache(MemoryStore(), async_writes=True)
    cache.on_new(CTX, SID, DER, 300)
    assert cache.flush(2.0)
    time.sleep(0.01)  # the writer is asleep again
    cache.close()
    assert cache._writer is not None and not cache._writer.is_alive()


def test_default_is_synchronous_writes() -> None:
    store = MemoryStore()
    cache = SessionCache(store)
    assert cache.async_writes is False
    cache.on_new(CTX, SID, DER, 300)
    assert store.fetch(SID, soon()) == DER  # in the store when the callback returns
    assert cache._writer is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_locks_held_at_fork_do_not_deadlock_the_child() -> None:
    """A lock held by another thread when the process forks is replaced in the child."""
    store = MemoryStore()
    store.store(SID, DER, 300, soon())
    cache = SessionCache(store, async_writes=True)
    cache.on_new(CTX, b"queued", DER, 300)
    # As if the writer thread held them at fork time:
    with cache._lock, cache.breaker._lock, store._lock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            ok = False
            try:
                ok = cache.on_get(CTX, SID) == DER and cache.stats().pending_writes == 0
                cache.on_new(CTX, b"child", DER, 300)
                ok = ok and cache.flush(2.0) and store.fetch(b"child", soon()) == DER
            finally:
                os._exit(0 if ok else 1)
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child deadlocked on a lock held at fork time")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    cache.close()


@pytest.mark.parametrize(
    "value",
    [
        DER + b"\x00",  # trailing bytes after the SEQUENCE
        DER[:-1],  # truncated
        b"\x30\x05abc",  # short form, wrong length
        b"\x30\x80" + bytes(10),  # indefinite length (not DER)
        b"\x30\x85" + bytes(10),  # 5 length bytes
        b"\x30",
    ],
)
def test_values_whose_der_length_does_not_fit_are_rejected(value: bytes) -> None:
    store = MemoryStore()
    store.store(SID, value, 300, soon())
    cache = SessionCache(store)
    assert cache.on_get(CTX, SID) is None
    assert cache.stats().bad_values == 1


def test_long_form_der_length_is_accepted() -> None:
    big = b"\x30\x82\x04\x00" + bytes(1024)
    store = MemoryStore()
    store.store(SID, big, 300, soon())
    assert SessionCache(store).on_get(CTX, SID) == big


# --------------------------------------------------------------------------- untrusted store


def test_stored_value_with_trailing_bytes_does_not_resume() -> None:
    """d2i would parse the first SEQUENCE and ignore the rest; the cache refuses such values."""
    server, client = _contexts()
    store = MemoryStore()
    ctx = server()
    cache = SessionCache(store)
    cache.install(ctx)
    cctx = client("1.2")
    _, sess = handshake_over_memory(ctx, cctx)
    (sid,) = list(store._data)
    good = store.fetch(sid, soon())
    assert good is not None
    store.store(sid, good + b"\x00" * 16, 60, soon())
    assert not handshake_over_memory(ctx, cctx, sess)[0]
    assert cache.stats().bad_values == 1


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_of_another_session_id_context_does_not_resume(version: str) -> None:
    """Service A's sessions in a store shared with service B: B finds them but refuses them."""
    server, client = _contexts()
    store = MemoryStore()
    a, b = server(), server()
    SessionCache(store, session_id_context=b"service-a").install(a)
    cache_b = SessionCache(store, session_id_context=b"service-b")
    cache_b.install(b)
    cctx = client(version)
    _, sess = handshake_over_memory(a, cctx)
    assert not handshake_over_memory(b, cctx, sess)[0]
    assert cache_b.stats().hits == 1  # the store answered; OpenSSL refused the context
    assert handshake_over_memory(a, cctx, sess)[0]  # still good for service A


def test_session_of_another_protocol_version_does_not_resume() -> None:
    """A TLS 1.2 session offered to a server that negotiates TLS 1.3 is not resumed."""
    server, _ = _contexts()
    store = MemoryStore()
    a, b = server(), server()
    a.set_max_proto_version(SSL.TLS1_2_VERSION)
    b.set_min_proto_version(SSL.TLS1_3_VERSION)
    cache_a, cache_b = SessionCache(store), SessionCache(store)
    cache_a.install(a)
    cache_b.install(b)
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)  # TLS 1.2 and 1.3
    reused, sess = handshake_over_memory(a, cctx)
    assert not reused and cache_a.stats().stores == 1
    # A TLS 1.2 session, resumable where 1.2 is spoken.
    assert handshake_over_memory(a, cctx, sess)[0]
    assert not handshake_over_memory(b, cctx, sess)[0]


def test_session_past_its_own_timeout_does_not_resume() -> None:
    """A store that keeps an entry longer than the session's lifetime cannot extend it."""
    server, client = _contexts()
    store = MemoryStore()
    ctx = server()
    cache = SessionCache(store, timeout=1)
    cache.install(ctx)
    cctx = client("1.2")
    _, sess = handshake_over_memory(ctx, cctx)
    (sid,) = list(store._data)
    value = store.fetch(sid, soon())
    assert value is not None
    time.sleep(2.2)  # OpenSSL's session clock has a resolution of one second
    store.store(sid, value, 300, soon())  # a misbehaving store: still there
    assert not handshake_over_memory(ctx, cctx, sess)[0]
    assert cache.stats().hits == 1


def test_a_late_success_does_not_close_an_open_breaker() -> None:
    """A call that started before the breaker opened and succeeds late is not the probe."""
    clock = Clock()
    breaker = CircuitBreaker(2, 5.0, clock=clock)
    assert breaker.allow()  # a slow call starts while the breaker is closed
    breaker.failure()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    breaker.success()  # ... and returns now
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 5.1
    assert breaker.allow()  # the single probe
    assert not breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED


class LeakyStore(MemoryStore):
    """A store whose errors quote the value (as a careless store might)."""

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> None:
        raise ValueError(f"cannot store {value!r} ({value.hex()})")

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        raise ValueError(f"bad entry {DER!r} ({DER.hex()})")


@pytest.mark.parametrize("async_writes", [False, True])
def test_store_errors_never_log_session_bytes(
    async_writes: bool, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SessionCache(LeakyStore(), async_writes=async_writes)
    with caplog.at_level(logging.DEBUG, logger="tlscache"):
        cache.on_new(CTX, SID, DER, 300)
        cache.flush(2.0)
        assert cache.on_get(CTX, SID) is None
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert caplog.records and not any(r.exc_info for r in caplog.records)
    assert "ValueError at test_session_cache.py:" in text
    for secret in (DER.hex(), repr(DER), "sss"):
        assert secret not in text
    cache.close()


class SealingStore(WrappingStore):
    """A stand-in for a sealing wrapper: values carry a tag; a wrong tag fails to open."""

    TAG = b"sealed:"

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> None:
        self.inner.store(session_id, self.TAG + value, ttl_s, deadline)

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        value = self.inner.fetch(session_id, deadline)
        if value is None:
            return None
        if not value.startswith(self.TAG):
            raise SealError("tampered", "value does not authenticate")
        return value[len(self.TAG) :]


def test_a_sealing_wrapper_slots_in_and_its_rejections_are_bad_values() -> None:
    inner = MemoryStore()
    cache = SessionCache(SealingStore(inner), breaker_threshold=1)
    cache.on_new(CTX, SID, DER, 300)
    assert inner.fetch(SID, soon()) == SealingStore.TAG + DER  # the store only sees sealed values
    assert cache.on_get(CTX, SID) == DER
    for _ in range(3):
        inner.store(SID, DER, 300, soon())  # planted without the seal
        assert cache.on_get(CTX, SID) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.bad_values, s.errors) == (1, 3, 3, 0)
    assert (s.sealed_refused, s.sealed_tampered) == (3, 3)  # the wrapper's verdict, by failure
    assert s.breaker_state == "closed"  # planted garbage does not open the breaker


@pytest.mark.parametrize("async_writes", [False, True])
def test_writes_after_close_are_dropped_lookups_still_work(async_writes: bool) -> None:
    store = MemoryStore()
    cache = SessionCache(store, async_writes=async_writes, remove_policy="delete")
    cache.on_new(CTX, SID, DER, 300)
    cache.close()
    cache.on_new(CTX, b"late", DER, 300)
    cache.on_remove(CTX, SID)
    assert store.fetch(b"late", soon()) is None and store.fetch(SID, soon()) == DER
    assert cache.on_get(CTX, SID) == DER
    s = cache.stats()
    assert (s.stores, s.writes_dropped, s.remove_errors, s.hits) == (1, 1, 1, 1)


def test_cipher_policy_is_bound_by_the_session_id_context() -> None:
    """OpenSSL resumes a TLS 1.2 session whose cipher the resuming server no longer allows;
    only a different session id context per cipher policy stops it (documented)."""
    server, client = _contexts()
    store = MemoryStore()
    old, new_same_ctx, new_own_ctx = server(), server(), server()
    old.set_cipher_list(b"ECDHE-ECDSA-AES128-GCM-SHA256")
    for ctx in (new_same_ctx, new_own_ctx):
        ctx.set_cipher_list(b"ECDHE-ECDSA-AES256-GCM-SHA384")
    SessionCache(store, session_id_context=b"svc/policy-1").install(old)
    SessionCache(store, session_id_context=b"svc/policy-1").install(new_same_ctx)
    SessionCache(store, session_id_context=b"svc/policy-2").install(new_own_ctx)
    cctx = client("1.2")
    _, sess = handshake_over_memory(old, cctx)
    # OpenSSL's behaviour, pinned here because the documentation relies on it:
    assert handshake_over_memory(new_same_ctx, cctx, sess)[0]
    assert not handshake_over_memory(new_own_ctx, cctx, sess)[0]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resumption_is_not_bound_to_the_server_name(version: str) -> None:
    """OpenSSL resumes a session made for one SNI name under another on the same Context
    (pinned because the documentation relies on it: vhosts need their own context)."""
    server, client = _contexts()
    ctx = server()
    SessionCache(MemoryStore()).install(ctx)
    cctx = client(version)
    _, sess = handshake_over_memory(ctx, cctx, sni=b"a.example")
    assert handshake_over_memory(ctx, cctx, sess, sni=b"b.example")[0]


# --------------------------------------------------------------------------- sealed mode

T0 = 1_700_000_000.0


class SharedStore(MemoryStore):
    """A MemoryStore standing in for a store other hosts reach (distcache)."""

    in_process = False

    def __init__(self) -> None:
        super().__init__()
        self.fetches = 0

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self.fetches += 1
        return super().fetch(session_id, deadline)


def sealed_cache(
    store: SessionStore | None = None, ring: KeyRing | None = None, **kwargs: object
) -> tuple[SessionCache, SharedStore, KeyRing]:
    shared = SharedStore()
    ring = ring or KeyRing.generate()
    cache = SessionCache(store or shared, keys=ring, **kwargs)  # type: ignore[arg-type]
    return cache, shared, ring


def test_install_refuses_a_shared_store_without_keys() -> None:
    server, _ = _contexts()
    with pytest.raises(ConfigurationError) as info:
        SessionCache(SharedStore()).install(server())
    text = str(info.value)
    for needed in ("tlscache-keys generate PATH", "keys=PATH", "insecure_unsealed_storage=True"):
        assert needed in text
    assert "docs/security.md" in text
    with pytest.raises(ConfigurationError):
        SessionCache(WrappingStore(SharedStore())).install(server())  # wrappers delegate
    # In-process stores need no keys; shared ones take keys or the explicit opt-in.
    SessionCache(MemoryStore()).install(server())
    SessionCache(WrappingStore(MemoryStore())).install(server())
    SessionCache(SharedStore(), keys=KeyRing.generate()).install(server())


def test_insecure_unsealed_storage_warns_once_at_install(caplog: pytest.LogCaptureFixture) -> None:
    server, _ = _contexts()
    store = SharedStore()
    cache = SessionCache(store, insecure_unsealed_storage=True)
    with caplog.at_level(logging.WARNING, logger="tlscache"):
        cache.install(server())
        cache.install(server())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "INSECURE" in warnings[0] and "security.md" in warnings[0]
    cache.on_new(CTX, SID, DER, 300)
    assert store.fetch(SID, soon()) == DER  # exactly the unsealed behaviour
    assert not cache.sealed


def test_keys_as_a_path_follow_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    KeyRing.generate().save(path)
    for keys in (str(path), path):
        cache = SessionCache(SharedStore(), keys=keys)
        assert cache.sealer is not None and isinstance(cache.sealer.keys, KeyRingFile)
    with pytest.raises(KeyRingError, match="tlscache-keys generate"):
        SessionCache(SharedStore(), keys=path.with_name("missing.json"))


def test_sealed_round_trip_store_sees_neither_ids_nor_sessions() -> None:
    cache, store, ring = sealed_cache()
    cache.on_new(CTX, SID, DER, 300)
    ((key, (_, value)),) = store._data.items()
    assert len(key) == 32 and key != SID and SID not in key
    assert DER not in value and b"sss" not in value
    assert len(value) == len(DER) + SEAL_OVERHEAD
    assert key == Sealer(ring).lookup_key(CTX, SID)
    assert cache.on_get(CTX, SID) == DER
    # Offered on the wire, the real id finds nothing; another context finds nothing.
    store.store(SID, DER, 300, soon())  # even if someone plants the DER under it
    assert cache.on_get(b"other-service", SID) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.sealed_refused, s.bad_values) == (1, 1, 0, 0)
    assert "sealed" in repr(cache)


def test_a_sealed_lookup_is_one_round_trip_misses_included() -> None:
    cache, store, _ = sealed_cache()
    cache.on_new(CTX, SID, DER, 300)
    assert cache.on_get(CTX, SID) == DER
    assert cache.on_get(CTX, b"\x08" * 32) is None
    assert store.fetches == 2


def test_another_ring_finds_nothing() -> None:
    """Servers with a different lookup secret neither find nor overwrite each other's."""
    store = SharedStore()
    a = SessionCache(store, keys=KeyRing.generate())
    b = SessionCache(store, keys=KeyRing.generate())
    a.on_new(CTX, SID, DER, 300)
    assert b.on_get(CTX, SID) is None
    assert b.stats().misses == 1 and b.stats().sealed_refused == 0


def sealed_failure_counts(cache: SessionCache) -> tuple[int, ...]:
    s = cache.stats()
    return (
        s.sealed_malformed,
        s.sealed_unknown_key,
        s.sealed_retired_key,
        s.sealed_tampered,
        s.sealed_expired,
    )


def test_planted_values_are_refused_by_failure_and_never_open_the_breaker() -> None:
    ring = KeyRing.generate()
    cache, store, _ = sealed_cache(ring=ring, breaker_threshold=1)
    sealer = Sealer(ring)
    key = sealer.lookup_key(CTX, SID)
    other_key = sealer.lookup_key(CTX, b"\x09" * 32)
    other = sealer.seal(other_key, CTX, DER, 300)
    newer = KeyRing(ring.lookup_secret, (*ring.rotated().keys,))
    old_clock = Sealer(ring, clock=lambda: T0)  # sealed long ago
    planted = [
        DER,  # an unsealed session, e.g. a forged one with alice's identity: malformed
        Sealer(newer).seal(key, CTX, DER, 300),  # sealed under a key this ring lacks
        other,  # a genuine value moved from another session's entry: tampered
        old_clock.seal(key, CTX, DER, 300),  # expired
    ]
    for value in planted:
        store.store(key, value, 300, soon())
        assert cache.on_get(CTX, SID) is None
    assert sealed_failure_counts(cache) == (1, 1, 0, 1, 1)
    s = cache.stats()
    assert (s.misses, s.bad_values, s.sealed_refused, s.hits, s.errors) == (4, 4, 4, 0, 0)
    assert s.breaker_state == "closed" and s.breaker_opens == 0
    # Retired: sealed under key 1, read by a cache whose ring has retired it.
    retired_cache, _, _ = sealed_cache(store=store, ring=ring.rotated().retire(1))
    store.store(key, sealer.seal(key, CTX, DER, 300), 300, soon())
    assert retired_cache.on_get(CTX, SID) is None
    assert sealed_failure_counts(retired_cache) == (0, 0, 1, 0, 0)


def test_an_opened_value_still_gets_the_der_check() -> None:
    """A holder of the keys who seals garbage still does not reach d2i with it."""
    cache, store, ring = sealed_cache()
    sealer = Sealer(ring)
    key = sealer.lookup_key(CTX, SID)
    store.store(key, sealer.seal(key, CTX, DER + b"\x00", 300), 300, soon())
    assert cache.on_get(CTX, SID) is None
    s = cache.stats()
    assert (s.bad_values, s.sealed_refused, s.misses) == (1, 0, 1)


def test_sealed_lifetime_is_the_shorter_of_the_sessions_and_the_caches() -> None:
    cache, store, _ = sealed_cache(timeout=300)
    for sid, timeout_s in ((b"a" * 8, 7200), (b"b" * 8, 60), (b"c" * 8, 0)):
        cache.on_new(CTX, sid, DER, timeout_s)
    lifetimes = sorted(int.from_bytes(v[13:17], "big") for _, v in store._data.values())
    assert lifetimes == [60, 300, 300]


def test_oversized_sessions_are_dropped_before_sealing() -> None:
    cache, store, _ = sealed_cache()
    cache.on_new(CTX, SID, b"\x30" * (MAX_VALUE_LEN - SEAL_OVERHEAD + 1), 300)
    assert len(store) == 0 and cache.stats().writes_dropped == 1
    fits = b"\x30\x82" + (MAX_VALUE_LEN - SEAL_OVERHEAD - 4).to_bytes(2, "big")
    fits += bytes(MAX_VALUE_LEN - SEAL_OVERHEAD - 4)
    cache.on_new(CTX, SID, fits, 300)
    assert cache.on_get(CTX, SID) == fits


def test_sealed_async_writes_answer_pending_lookups_with_the_session() -> None:
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.2
    ring = KeyRing.generate()
    cache = SessionCache(store, keys=ring, async_writes=True, write_deadline_ms=1000)
    cache.on_new(CTX, SID, DER, 300)
    assert cache.on_get(CTX, SID) == DER  # from the queue, by lookup key
    assert cache.on_get(b"other-service", SID) is None  # never another context's
    assert cache.flush(2.0)
    store.mode = "ok"
    key = Sealer(ring).lookup_key(CTX, SID)
    value = store.inner.fetch(key, soon())
    assert value is not None and value != DER
    assert cache.on_get(CTX, SID) == DER
    cache.close()


def test_a_rotation_of_the_key_file_reaches_a_running_cache(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    KeyRing.generate().save(path)
    clock = Clock()
    cache = SessionCache(SharedStore(), keys=KeyRingFile(path, clock=clock))
    cache.on_new(CTX, b"old" * 8, DER, 300)
    KeyRing.load(path).rotated().save(path)
    clock.now += 5
    cache.on_new(CTX, b"new" * 8, DER, 300)
    values = [v for _, v in cache.store._data.values()]  # type: ignore[attr-defined]
    assert [int.from_bytes(v[1:5], "big") for v in values] == [1, 2]
    assert cache.on_get(CTX, b"old" * 8) == DER and cache.on_get(CTX, b"new" * 8) == DER


# --------------------------------------------------------------------------- remove policies


@pytest.mark.parametrize("sealed", [False, True])
@pytest.mark.parametrize("async_writes", [False, True])
def test_alerts_policy_ignores_removes_and_deletes_on_fatal_alerts(
    sealed: bool, async_writes: bool
) -> None:
    store = MemoryStore()
    keys = KeyRing.generate() if sealed else None
    cache = SessionCache(store, keys=keys, async_writes=async_writes)
    assert cache.remove_policy == "alerts"
    ids = [bytes([i]) * 32 for i in range(3)]
    for sid in ids:
        cache.on_new(CTX, sid, DER, 300)
    assert cache.flush(2.0)
    cache.on_remove(CTX, ids[0])  # e.g. a connection closed without close_notify
    assert cache.on_get(CTX, ids[0]) == DER
    cache.on_fatal_alert(CTX, [ids[1], ids[2], ids[1]])
    assert cache.flush(2.0)
    assert [cache.on_get(CTX, sid) is not None for sid in ids] == [True, False, False]
    assert len(store) == 1  # deleted by their lookup keys when sealed
    s = cache.stats()
    assert (s.removes_ignored, s.alerts_invalidated, s.removes, s.remove_errors) == (1, 2, 2, 0)
    cache.close()


class GatedStore(MemoryStore):
    """A MemoryStore whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> None:
        assert self.gate.wait(10.0)
        super().store(session_id, value, ttl_s, deadline)


def test_an_alert_cancels_a_queued_write() -> None:
    store = GatedStore()
    cache = SessionCache(store, async_writes=True, write_deadline_ms=20_000)
    cache.on_new(CTX, b"first" * 4, DER, 300)  # the writer waits at the gate with it
    cache.on_new(CTX, SID, DER, 300)
    assert cache.on_get(CTX, SID) == DER  # answered from the queue
    cache.on_fatal_alert(CTX, [SID])
    assert cache.on_get(CTX, SID) is None  # no longer answered from the queue
    store.gate.set()
    assert cache.flush(5.0)
    assert store.fetch(SID, soon()) is None and store.fetch(b"first" * 4, soon()) == DER
    s = cache.stats()
    assert (s.alerts_invalidated, s.removes, s.pending_hits) == (1, 1, 1)
    cache.close()


def test_delete_policy_deletes_on_removes_and_alerts() -> None:
    store = MemoryStore()
    cache = SessionCache(store, keys=KeyRing.generate(), remove_policy="delete")
    for sid in (b"a" * 32, b"b" * 32):
        cache.on_new(CTX, sid, DER, 300)
    cache.on_remove(CTX, b"a" * 32)
    cache.on_fatal_alert(CTX, [b"b" * 32])
    assert len(store) == 0
    s = cache.stats()
    assert (s.removes, s.alerts_invalidated, s.removes_ignored) == (2, 1, 0)


def test_ignore_policy_never_deletes() -> None:
    store = MemoryStore()
    cache = SessionCache(store, remove_policy="ignore")
    cache.on_new(CTX, SID, DER, 300)
    cache.on_remove(CTX, SID)
    cache.on_fatal_alert(CTX, [SID, b"\x08" * 32])
    assert cache.on_get(CTX, SID) == DER
    s = cache.stats()
    assert (s.removes, s.alerts_invalidated, s.removes_ignored) == (0, 0, 3)


def test_alert_deletes_go_through_the_breaker() -> None:
    store = FlakyStore()
    store.mode = "error"
    cache = SessionCache(store, breaker_threshold=2, breaker_reset_s=60)
    cache.on_fatal_alert(CTX, [b"a" * 32, b"b" * 32, b"c" * 32, b"", b"x" * 65])
    s = cache.stats()
    assert store.calls == 2  # the third delete found the breaker open
    assert (s.alerts_invalidated, s.remove_errors, s.breaker_state) == (3, 3, "open")
    cache.close()
    cache.on_fatal_alert(CTX, [SID])
    assert cache.stats().remove_errors == 4


def test_new_counters_are_in_the_snapshot() -> None:
    d = SessionCache(MemoryStore()).stats().as_dict()
    for name in (
        "sealed_refused",
        "sealed_malformed",
        "sealed_unknown_key",
        "sealed_retired_key",
        "sealed_tampered",
        "sealed_expired",
        "alerts_invalidated",
    ):
        assert d[name] == 0


# --------------------------------------------------------------- sealed, with real handshakes


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_sealed_sessions_resume_across_contexts(version: str) -> None:
    server, client = _contexts()
    store = SharedStore()
    ring = KeyRing.generate()
    a, b = server(), server()
    caches = [SessionCache(store, keys=ring, session_id_context=b"svc") for _ in range(2)]
    caches[0].install(a)
    caches[1].install(b)
    cctx = client(version)
    reused, sess = handshake_over_memory(a, cctx)
    assert not reused and len(store) >= 1
    assert all(len(k) == 32 for k in store._data)
    assert handshake_over_memory(b, cctx, sess)[0]
    assert caches[1].stats().hits == 1


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_sealed_sessions_of_another_context_are_not_even_found(version: str) -> None:
    server, client = _contexts()
    store = SharedStore()
    ring = KeyRing.generate()
    a, b = server(), server()
    SessionCache(store, keys=ring, session_id_context=b"service-a").install(a)
    cache_b = SessionCache(store, keys=ring, session_id_context=b"service-b")
    cache_b.install(b)
    cctx = client(version)
    _, sess = handshake_over_memory(a, cctx)
    assert not handshake_over_memory(b, cctx, sess)[0]
    s = cache_b.stats()
    assert (s.hits, s.sealed_refused) == (0, 0) and s.misses >= 1


def test_a_sealed_value_swapped_into_a_victims_entry_does_not_resume() -> None:
    server, client = _contexts()
    store = SharedStore()
    ctx = server()
    cache = SessionCache(store, keys=KeyRing.generate(), session_id_context=b"svc")
    cache.install(ctx)
    cctx = client("1.2")
    _, victim = handshake_over_memory(ctx, cctx)
    handshake_over_memory(ctx, client("1.2"))  # the attacker's own session
    (victim_key, attacker_key) = list(store._data)
    attacker_value = store.fetch(attacker_key, soon())
    assert attacker_value is not None
    store.store(victim_key, attacker_value, 300, soon())
    assert not handshake_over_memory(ctx, cctx, victim)[0]
    assert cache.stats().sealed_tampered == 1


def expect(ok: bool, s: CacheStats) -> None:
    """Fail showing every counter (pytest would shorten an assertion's message)."""
    if not ok:
        pytest.fail("counters:\n" + pformat(s.as_dict(), width=100))


class PipeliningStore(FlakyStore):
    """Writes are sent, never confirmed (``WriteStatus.SENT``), as a pipelining store's are
    while its server is stopped; lookups fail when the mode says so."""

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus:
        self.calls += 1
        self.inner.store(session_id, value, ttl_s, deadline)
        return WriteStatus.SENT


def test_a_sent_write_is_neither_a_success_nor_a_failure() -> None:
    """TLS 1.3 order against a stalled store: a lookup that fails, then two sent tickets."""
    store = PipeliningStore()
    store.mode = "timeout"
    cache = SessionCache(store, breaker_threshold=3, breaker_reset_s=60, clock=Clock())
    for _ in range(10):
        assert cache.on_get(CTX, SID) is None
        cache.on_new(CTX, SID, DER, 300)
        cache.on_new(CTX, SID, DER, 300)
    s = cache.stats()
    expect(s.breaker_opens == 1 and s.breaker_state == "open", s)
    expect(s.timeouts == 3 and s.skipped == 7, s)
    expect(s.stores == 4 and s.writes_skipped == 16, s)  # a sent write counts as sent


def test_a_probe_that_is_only_sent_hands_its_turn_to_the_next_call() -> None:
    clock = Clock()
    store = PipeliningStore()
    store.mode = "error"
    cache = SessionCache(store, breaker_threshold=1, breaker_reset_s=5, clock=clock)
    cache.on_get(CTX, SID)
    assert cache.stats().breaker_state == "open"
    store.mode = "ok"
    clock.now += 5.1
    cache.on_new(CTX, SID, DER, 300)  # the probe: sent, no verdict
    s = cache.stats()
    expect(s.stores == 1 and s.breaker_state == "half_open", s)
    assert cache.on_get(CTX, SID) == DER  # the next call probes at once, and closes it
    s = cache.stats()
    expect(s.breaker_state == "closed" and s.skipped == 0, s)


def test_undecided_leaves_a_closed_breaker_alone() -> None:
    breaker = CircuitBreaker(3, 1.0)
    for _ in range(2):
        breaker.failure()
        breaker.undecided()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
