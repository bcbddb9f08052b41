"""SessionCache logic without OpenSSL: writes, lookups, remove policy, breaker, counters."""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable

import pytest
from OpenSSL import SSL

from tests.tlsutil import client_context, handshake_over_memory
from tlscache import BreakerState, Deadline, MemoryStore, SessionCache, SessionStore, WrappingStore
from tlscache.exceptions import ConfigurationError, SealError, StoreError, StoreTimeout
from tlscache.session_cache import LATENCY_BUCKETS_MS, CircuitBreaker

DER = b"\x30\x81\x83" + b"s" * 131  # shaped like an i2d_SSL_SESSION value
SID = b"\x07" * 32


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
    cache.on_new(SID, DER, 7200)
    assert store.fetch(SID, soon()) == DER
    assert cache.on_get(SID) == DER
    assert cache.on_get(b"\x08" * 32) is None
    s = cache.stats()
    assert (s.stores, s.hits, s.misses, s.lookups) == (1, 1, 1, 2)
    assert s.breaker_state == "closed"


def test_ttl_is_min_of_session_and_cache_timeout() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    cache = SessionCache(store, timeout=300, async_writes=False)
    cache.on_new(b"a", DER, 7200)
    cache.on_new(b"b", DER, 60)
    cache.on_new(b"c", DER, 0)  # unknown: the cache's timeout
    clock.now += 61
    assert [store.fetch(k, soon()) is not None for k in (b"a", b"b", b"c")] == [True, False, True]
    clock.now += 240
    assert store.fetch(b"a", soon()) is None and store.fetch(b"c", soon()) is None


def test_async_writes_and_pending_hits() -> None:
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.2
    cache = SessionCache(store, async_writes=True, write_deadline_ms=1000)
    start = time.perf_counter()
    cache.on_new(SID, DER, 300)
    assert time.perf_counter() - start < 0.15  # the handshake thread does not wait
    # Until the write lands, this process answers from the queued write.
    assert cache.on_get(SID) == DER
    assert cache.stats().pending_hits == 1
    assert cache.flush(2.0)
    store.mode = "ok"
    assert store.inner.fetch(SID, soon()) == DER
    assert cache.stats().pending_writes == 0
    cache.close()
    cache.on_new(b"late", DER, 300)
    assert cache.stats().writes_dropped == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_writer_restarts_in_a_forked_child() -> None:
    """Prefork servers: the parent's writer thread does not exist in the child."""
    store = MemoryStore()
    cache = SessionCache(store, async_writes=True)
    cache.on_new(b"parent", DER, 300)
    assert cache.flush(2.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = False
        try:
            cache.on_new(b"child", DER, 300)
            ok = cache.flush(2.0) and store.fetch(b"child", soon()) == DER
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.fetch(b"child", soon()) is None  # the child's store is its own copy
    cache.on_new(b"parent2", DER, 300)
    assert cache.flush(2.0) and store.fetch(b"parent2", soon()) == DER
    cache.close()


def test_writer_queue_is_bounded() -> None:
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.1
    cache = SessionCache(store, async_writes=True, write_queue_size=4, write_deadline_ms=1000)
    for i in range(20):
        cache.on_new(bytes([i]) * 8, DER, 300)
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
    assert cache.on_get(b"junk") is None
    assert cache.on_get(b"empty") is None
    s = cache.stats()
    assert (s.misses, s.bad_values, s.hits) == (2, 2, 0)


def test_bytes_like_values_are_accepted() -> None:
    class ArrayStore(MemoryStore):
        def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
            value = super().fetch(session_id, deadline)
            return bytearray(value) if value is not None else None  # type: ignore[return-value]

    store = ArrayStore()
    store.store(SID, DER, 60, soon())
    got = SessionCache(store).on_get(SID)
    assert got == DER and type(got) is bytes


def test_oversized_inputs_are_dropped() -> None:
    store = MemoryStore()
    cache = SessionCache(store, async_writes=False)
    cache.on_new(b"", DER, 300)
    cache.on_new(b"x" * 65, DER, 300)
    cache.on_new(SID, b"\x30" * 40000, 300)
    assert len(store) == 0
    assert cache.stats().writes_dropped == 3


@pytest.mark.parametrize("async_writes", [False, True])
def test_remove_policy(async_writes: bool) -> None:
    store = MemoryStore()
    ignoring = SessionCache(store, async_writes=async_writes)
    store.store(SID, DER, 60, soon())
    ignoring.on_remove(SID)
    assert ignoring.flush(1.0)
    assert store.fetch(SID, soon()) == DER
    assert ignoring.stats().removes_ignored == 1

    deleting = SessionCache(store, remove_policy="delete", async_writes=async_writes)
    deleting.on_new(SID, DER, 60)
    deleting.on_remove(SID)
    assert SID not in deleting._pending  # a queued delete also cancels the pending write
    assert deleting.flush(1.0)
    assert store.fetch(SID, soon()) is None
    assert deleting.on_get(SID) is None
    assert deleting.stats().removes == 1
    ignoring.close()
    deleting.close()


@pytest.mark.parametrize("mode", ["error", "timeout", "crash"])
def test_store_failures_are_misses_and_open_the_breaker(mode: str) -> None:
    store = FlakyStore()
    store.mode = mode
    cache = SessionCache(store, breaker_threshold=3, breaker_reset_s=60, async_writes=False)
    for _ in range(10):
        assert cache.on_get(SID) is None
        cache.on_new(SID, DER, 300)  # never raises
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
    cache.on_get(SID)
    cache.on_new(SID, DER, 300)
    assert store.deadlines == [pytest.approx(0.015), pytest.approx(0.25)]


def test_blocking_store_costs_one_timeout_then_skips_fast() -> None:
    """A store that blocks past its deadline: a few slow lookups, then < 1 ms each."""
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.05
    cache = SessionCache(store, deadline_ms=20, breaker_threshold=2, breaker_reset_s=60)
    for _ in range(2):
        assert cache.on_get(SID) is None
    assert cache.stats().breaker_state == "open"
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        assert cache.on_get(SID) is None
    per_call = (time.perf_counter() - start) / n
    assert per_call < 0.001, per_call
    assert store.calls == 2
    assert cache.stats().timeouts == 2


def test_half_open_probe_and_recovery() -> None:
    clock = Clock()
    store = FlakyStore()
    store.mode = "error"
    cache = SessionCache(
        store, breaker_threshold=2, breaker_reset_s=5, async_writes=False, clock=clock
    )
    cache.on_get(SID)
    cache.on_get(SID)
    assert cache.stats().breaker_state == "open"
    clock.now += 4.9
    cache.on_get(SID)
    assert store.calls == 2
    clock.now += 0.2
    cache.on_get(SID)  # the probe; fails again -> open for another 5 s
    assert store.calls == 3 and cache.stats().breaker_state == "open"
    assert cache.stats().breaker_opens == 1
    store.mode = "ok"
    cache.on_get(SID)
    assert store.calls == 3
    clock.now += 5.1
    store.inner.store(SID, DER, 60, soon())
    assert cache.on_get(SID) == DER  # probe succeeds, breaker closes
    assert cache.stats().breaker_state == "closed"
    assert cache.on_get(SID) == DER
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
        cache.on_get(SID)
    store.mode = "sleep"
    store.sleep_s = 0.006
    cache.on_get(SID)
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
            cache.on_new(bytes([i % 256]) * 4, DER, 300)
            cache.on_get(bytes([i % 256]) * 4)

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


def test_breaker_open_adds_under_a_millisecond_per_handshake() -> None:
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
    assert added < 0.001, added
    print(f"breaker open: {added * 1e6:+.1f} us per handshake vs a healthy miss")
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
    assert (cache.on_get(SID) == DER) is present
    assert lock.acquired == 1
    s = cache.stats()
    assert (s.hits, s.misses, sum(s.latency_counts)) == ((1, 0, 1) if present else (0, 1, 1))


def test_writer_drains_a_batch_per_wake_up_and_keeps_order() -> None:
    """Writes queued while the writer is busy are done in order, without a wake-up each."""
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.05
    cache = SessionCache(store, async_writes=True, remove_policy="delete", write_deadline_ms=1000)
    cache.on_new(b"first", DER, 300)  # wakes the writer, which then sleeps in the store
    time.sleep(0.01)
    sets = 0
    real_set = cache._wake.set

    def counting_set() -> None:
        nonlocal sets
        sets += 1
        real_set()

    cache._wake.set = counting_set  # type: ignore[method-assign]
    for i in range(5):
        cache.on_new(bytes([i]) * 8, DER, 300)
    cache.on_remove(b"\x02" * 8)  # after its write: the id ends up absent
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
    cache.on_new(SID, DER, 300)
    assert cache.flush(2.0)
    time.sleep(0.01)  # the writer is asleep again
    cache.close()
    assert cache._writer is not None and not cache._writer.is_alive()


def test_default_is_synchronous_writes() -> None:
    store = MemoryStore()
    cache = SessionCache(store)
    assert cache.async_writes is False
    cache.on_new(SID, DER, 300)
    assert store.fetch(SID, soon()) == DER  # in the store when the callback returns
    assert cache._writer is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_locks_held_at_fork_do_not_deadlock_the_child() -> None:
    """A lock held by another thread when the process forks is replaced in the child."""
    store = MemoryStore()
    store.store(SID, DER, 300, soon())
    cache = SessionCache(store, async_writes=True)
    cache.on_new(b"queued", DER, 300)
    # As if the writer thread held them at fork time:
    with cache._lock, cache.breaker._lock, store._lock:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            ok = False
            try:
                ok = cache.on_get(SID) == DER and cache.stats().pending_writes == 0
                cache.on_new(b"child", DER, 300)
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
    assert cache.on_get(SID) is None
    assert cache.stats().bad_values == 1


def test_long_form_der_length_is_accepted() -> None:
    big = b"\x30\x82\x04\x00" + bytes(1024)
    store = MemoryStore()
    store.store(SID, big, 300, soon())
    assert SessionCache(store).on_get(SID) == big


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
        cache.on_new(SID, DER, 300)
        cache.flush(2.0)
        assert cache.on_get(SID) is None
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
    cache.on_new(SID, DER, 300)
    assert inner.fetch(SID, soon()) == SealingStore.TAG + DER  # the store only sees sealed values
    assert cache.on_get(SID) == DER
    for _ in range(3):
        inner.store(SID, DER, 300, soon())  # planted without the seal
        assert cache.on_get(SID) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.bad_values, s.errors) == (1, 3, 3, 0)
    assert s.breaker_state == "closed"  # planted garbage does not open the breaker


@pytest.mark.parametrize("async_writes", [False, True])
def test_writes_after_close_are_dropped_lookups_still_work(async_writes: bool) -> None:
    store = MemoryStore()
    cache = SessionCache(store, async_writes=async_writes, remove_policy="delete")
    cache.on_new(SID, DER, 300)
    cache.close()
    cache.on_new(b"late", DER, 300)
    cache.on_remove(SID)
    assert store.fetch(b"late", soon()) is None and store.fetch(SID, soon()) == DER
    assert cache.on_get(SID) == DER
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
