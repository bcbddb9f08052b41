"""SessionCache logic without OpenSSL: writes, lookups, remove policy, breaker, counters."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable

import pytest
from OpenSSL import SSL

from tlscache import BreakerState, MemoryStore, SessionCache, SessionStore
from tlscache.exceptions import ConfigurationError, StoreError, StoreTimeout
from tlscache.session_cache import LATENCY_BUCKETS_MS, CircuitBreaker

DER = b"\x30\x81\x83" + b"s" * 131  # shaped like an i2d_SSL_SESSION value
SID = b"\x07" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(SessionStore):
    """A MemoryStore that can be switched to raise, time out, or block."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.mode = "ok"  # ok | error | timeout | sleep | crash
        self.sleep_s = 0.05
        self.calls = 0
        self.deadlines: list[float] = []

    def _act(self, deadline_s: float) -> None:
        self.calls += 1
        self.deadlines.append(deadline_s)
        if self.mode == "error":
            raise StoreError("down")
        if self.mode == "timeout":
            raise StoreTimeout("slow")
        if self.mode == "crash":
            raise RuntimeError("bug in a store")
        if self.mode == "sleep":
            time.sleep(self.sleep_s)  # ignores its deadline, as a badly written store might

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline_s: float) -> None:
        self._act(deadline_s)
        self.inner.store(session_id, value, ttl_s, deadline_s)

    def fetch(self, session_id: bytes, deadline_s: float) -> bytes | None:
        self._act(deadline_s)
        return self.inner.fetch(session_id, deadline_s)

    def delete(self, session_id: bytes, deadline_s: float) -> None:
        self._act(deadline_s)
        self.inner.delete(session_id, deadline_s)


def test_new_then_get_sync() -> None:
    store = MemoryStore()
    cache = SessionCache(store, timeout=300, async_writes=False)
    cache.on_new(SID, DER, 7200)
    assert store.fetch(SID, 1) == DER
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
    assert [store.fetch(k, 1) is not None for k in (b"a", b"b", b"c")] == [True, False, True]
    clock.now += 240
    assert store.fetch(b"a", 1) is None and store.fetch(b"c", 1) is None


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
    assert store.inner.fetch(SID, 1) == DER
    assert cache.stats().pending_writes == 0
    cache.close()
    cache.on_new(b"late", DER, 300)
    assert cache.stats().writes_dropped == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_writer_restarts_in_a_forked_child() -> None:
    """Prefork servers: the parent's writer thread does not exist in the child."""
    store = MemoryStore()
    cache = SessionCache(store)
    cache.on_new(b"parent", DER, 300)
    assert cache.flush(2.0)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        ok = False
        try:
            cache.on_new(b"child", DER, 300)
            ok = cache.flush(2.0) and store.fetch(b"child", 1) == DER
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.fetch(b"child", 1) is None  # the child's store is its own copy
    cache.on_new(b"parent2", DER, 300)
    assert cache.flush(2.0) and store.fetch(b"parent2", 1) == DER
    cache.close()


def test_writer_queue_is_bounded() -> None:
    store = FlakyStore()
    store.mode = "sleep"
    store.sleep_s = 0.1
    cache = SessionCache(store, write_queue_size=4, write_deadline_ms=1000)
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
    store.store(b"junk", b"not der at all", 60, 1)
    store.store(b"empty", b"", 60, 1)
    assert cache.on_get(b"junk") is None
    assert cache.on_get(b"empty") is None
    s = cache.stats()
    assert (s.misses, s.bad_values, s.hits) == (2, 2, 0)


def test_bytes_like_values_are_accepted() -> None:
    class ArrayStore(MemoryStore):
        def fetch(self, session_id: bytes, deadline_s: float) -> bytes | None:
            value = super().fetch(session_id, deadline_s)
            return bytearray(value) if value is not None else None  # type: ignore[return-value]

    store = ArrayStore()
    store.store(SID, DER, 60, 1)
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
    store.store(SID, DER, 60, 1)
    ignoring.on_remove(SID)
    assert ignoring.flush(1.0)
    assert store.fetch(SID, 1) == DER
    assert ignoring.stats().removes_ignored == 1

    deleting = SessionCache(store, remove_policy="delete", async_writes=async_writes)
    deleting.on_new(SID, DER, 60)
    deleting.on_remove(SID)
    assert SID not in deleting._pending  # a queued delete also cancels the pending write
    assert deleting.flush(1.0)
    assert store.fetch(SID, 1) is None
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
    cache = SessionCache(store, deadline_ms=15, write_deadline_ms=250, async_writes=False)
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
    store.inner.store(SID, DER, 60, 1)
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

    def client(version: str) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        v = SSL.TLS1_2_VERSION if version == "1.2" else SSL.TLS1_3_VERSION
        ctx.set_min_proto_version(v)
        ctx.set_max_proto_version(v)
        return ctx

    return server, client


def _handshake(
    server_ctx: SSL.Context, client_ctx: SSL.Context, session: SSL.Session | None = None
) -> tuple[bool, SSL.Session]:
    """One in-memory handshake; (the server resumed, the client's session afterwards)."""
    from OpenSSL._util import lib

    s = SSL.Connection(server_ctx, None)
    s.set_accept_state()
    c = SSL.Connection(client_ctx, None)
    c.set_connect_state()
    if session is not None:
        c.set_session(session)
    done = [False, False]
    for _ in range(20):
        for i, conn in enumerate((c, s)):
            if not done[i]:
                try:
                    conn.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((c, s), (s, c)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
        if all(done):
            break
    assert all(done)
    s.send(b"x")  # lets the client read any TLS 1.3 ticket
    c.bio_write(s.bio_read(65536))
    assert c.recv(1) == b"x"
    reused = bool(lib.SSL_session_reused(s._ssl))
    sess = c.get_session()
    assert sess is not None
    for conn in (c, s):  # a clean shutdown keeps the session valid
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
    return reused, sess


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_two_contexts_share_a_store(version: str) -> None:
    server, client = _contexts()
    store = MemoryStore()
    a, b = server(), server()
    caches = [SessionCache(store, async_writes=False) for _ in range(2)]
    caches[0].install(a)
    caches[1].install(b)
    cctx = client(version)
    reused, sess = _handshake(a, cctx)
    assert not reused and len(store) >= 1
    reused, _ = _handshake(b, cctx, sess)
    assert reused
    assert caches[1].stats().hits == 1
    store.clear()  # the internal cache is off: without the store, no resumption at all
    reused, _ = _handshake(a, cctx, sess)
    assert not reused


def test_bad_store_values_mean_full_handshakes() -> None:
    server, client = _contexts()
    store = MemoryStore()
    ctx = server()
    cache = SessionCache(store, async_writes=False)
    cache.install(ctx)
    cctx = client("1.2")
    _, sess = _handshake(ctx, cctx)
    (sid,) = list(store._data)
    good = store.fetch(sid, 1)
    assert good is not None
    for bad in (b"\x30\x03abc", good[:-7], b"\x30" + bytes(100)):
        store.store(sid, bad, 60, 1)  # the cache is untrusted storage
        assert not _handshake(ctx, cctx, sess)[0]
    store.store(sid, good, 60, 1)
    assert _handshake(ctx, cctx, sess)[0]


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
    _, foreign = _handshake(origin, cctx)  # a session neither server knows: a lookup each time
    _handshake(dead_ctx, cctx, foreign)
    assert dead_cache.stats().breaker_state == "open"
    times: dict[str, list[float]] = {"dead": [], "miss": []}
    for _ in range(40):
        for name, ctx in (("dead", dead_ctx), ("miss", miss_ctx)):
            start = time.perf_counter()
            assert not _handshake(ctx, cctx, foreign)[0]
            times[name].append(time.perf_counter() - start)
    added = statistics.median(times["dead"]) - statistics.median(times["miss"])
    assert added < 0.001, added
    print(f"breaker open: {added * 1e6:+.1f} us per handshake vs a healthy miss")
    assert dead.calls == 1  # the first lookup; every later lookup and write was skipped
    assert dead_cache.stats().skipped >= 40
