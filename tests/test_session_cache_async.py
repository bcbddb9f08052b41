"""SessionCache.on_get_async: the same decisions and counters as on_get, the store awaited.

Each scenario runs twice, once through the blocking lookup (``on_get`` on a store) and once
through the async one (``on_get_async`` on an async store over the same data), and the two
caches' counters must be equal: the paths share every step but the round trip.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tlscache import Deadline, MemoryStore, SessionCache, WrappingStore
from tlscache.exceptions import StoreError, StoreTimeout
from tlscache.keyring import KeyRing
from tlscache.stores.aio import AsyncMemoryStore, AsyncSessionStore

CTX = b"ctx"
SID = b"s" * 32
#: Smallest session DERs single use can tell apart: SEQUENCE { INTEGER 1, INTEGER version }.
DER13 = bytes.fromhex("300702010102020304")
DER12 = bytes.fromhex("300702010102020303")
#: Latency counts differ by nature; everything else must match.
TIMING = {"latency_counts", "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "latency_sum_ms"}


class NoTake(WrappingStore):
    """A store without an atomic take (single use falls back to GET then DELETE)."""

    def __init__(self, inner: MemoryStore) -> None:
        super().__init__(inner)
        self.supports_take = False

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self.inner.delete(session_id, deadline)


class AsyncNoTake(AsyncMemoryStore):
    supports_take = False


class Broken(WrappingStore):
    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        raise StoreError("down")


class AsyncBroken(AsyncMemoryStore):
    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        raise StoreError("down")


class Stalled(AsyncMemoryStore):
    """Never answers (until cancelled): the cache's own deadline must end the lookup."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return None  # pragma: no cover


@dataclass
class Pair:
    """Two caches over the same kind of data: one looks up blocking, one async."""

    blocking: SessionCache
    aio: SessionCache
    inner_b: MemoryStore
    inner_a: MemoryStore

    def plant(self, value: bytes, *, sealed_der: bytes | None = None) -> None:
        """Store ``value`` (or, with ``sealed_der``, a sealed session) under SID in both."""
        for cache, inner in ((self.blocking, self.inner_b), (self.aio, self.inner_a)):
            key, stored = SID, value
            if cache.sealer is not None:
                key = cache.sealer.lookup_key(CTX, SID)
                if sealed_der is not None:
                    stored = cache.sealer.seal(key, CTX, sealed_der, 300)
            inner.store(key, stored, 300, Deadline.after(1))

    def lookup(self, tls13: bool | None = None) -> tuple[bytes | None, bytes | None]:
        got_b = self.blocking.on_get(CTX, SID, tls13)
        got_a = asyncio.run(self.aio.on_get_async(CTX, SID, tls13))
        return got_b, got_a

    def same_counts(self) -> dict[str, object]:
        b = {k: v for k, v in self.blocking.stats().as_dict().items() if k not in TIMING}
        a = {k: v for k, v in self.aio.stats().as_dict().items() if k not in TIMING}
        assert a == b, f"blocking={b}\nasync={a}"
        return a


def pair(
    *,
    keys: KeyRing | None = None,
    take: bool = True,
    broken: bool = False,
    **options: object,
) -> Pair:
    inner_b, inner_a = MemoryStore(), MemoryStore()
    store_b: MemoryStore | WrappingStore = inner_b
    async_store: AsyncSessionStore = AsyncMemoryStore(inner_a)
    if not take:
        store_b, async_store = NoTake(inner_b), AsyncNoTake(inner_a)
    if broken:
        store_b, async_store = Broken(inner_b), AsyncBroken(inner_a)
    kw: dict[str, object] = {"keys": keys, "deadline_ms": 5000.0, **options}
    blocking = SessionCache(store_b, **kw)  # type: ignore[arg-type]
    store_a = inner_a if take else NoTake(inner_a)  # writes (put back) reach the same data
    aio = SessionCache(store_a, async_store=async_store, **kw)  # type: ignore[arg-type]
    return Pair(blocking, aio, inner_b, inner_a)


def test_hit_and_miss() -> None:
    p = pair()
    assert p.lookup() == (None, None)
    p.plant(DER12)
    assert p.lookup() == (DER12, DER12)
    s = p.same_counts()
    assert (s["hits"], s["misses"]) == (1, 1), s


def test_implausible_value_is_a_miss() -> None:
    p = pair()
    p.plant(b"not a session")
    assert p.lookup() == (None, None)
    s = p.same_counts()
    assert (s["bad_values"], s["misses"], s["hits"]) == (1, 1, 0), s


def test_sealed_value_opens_and_tampered_is_refused() -> None:
    keys = KeyRing.generate()
    p = pair(keys=keys)
    p.plant(b"", sealed_der=DER12)
    assert p.lookup() == (DER12, DER12)
    for cache, inner in ((p.blocking, p.inner_b), (p.aio, p.inner_a)):
        assert cache.sealer is not None
        key = cache.sealer.lookup_key(CTX, SID)
        sealed = inner.fetch(key, Deadline.after(1))
        assert sealed is not None
        inner.store(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), 300, Deadline.after(1))
    assert p.lookup() == (None, None)
    s = p.same_counts()
    assert (s["hits"], s["sealed_tampered"], s["sealed_refused"]) == (1, 1, 1), s


def test_store_error_counts_and_opens_the_breaker() -> None:
    p = pair(broken=True, breaker_threshold=2, breaker_reset_s=600)
    for _ in range(3):
        assert p.lookup() == (None, None)
    s = p.same_counts()
    assert (s["errors"], s["skipped"], s["breaker_state"]) == (2, 1, "open"), s


@pytest.mark.parametrize("tls13", [True, None])
def test_single_use_takes_a_tls13_session_once(tls13: bool | None) -> None:
    p = pair(single_use=True)
    p.plant(DER13)
    assert p.lookup(tls13) == (DER13, DER13)
    assert p.lookup(tls13) == (None, None)
    s = p.same_counts()
    assert (s["takes"], s["take_misses"], s["hits"], s["misses"]) == (1, 1, 1, 1), s
    assert len(p.inner_a) == 0, "the async take left the session in the store"


def test_single_use_puts_back_a_tls12_session() -> None:
    p = pair(single_use=True)
    p.plant(DER12)
    assert p.lookup(None) == (DER12, DER12)  # version unknown: taken, then stored again
    assert p.lookup(None) == (DER12, DER12)
    s = p.same_counts()
    assert (s["put_back"], s["takes"], s["hits"]) == (2, 0, 2), s


def test_single_use_without_take_gets_then_deletes() -> None:
    p = pair(single_use=True, take=False)
    p.plant(DER13)
    assert p.lookup(True) == (DER13, DER13)
    assert p.lookup(True) == (None, None)
    s = p.same_counts()
    assert (s["take_fallbacks"], s["takes"], s["removes"]) == (1, 1, 1), s


def test_a_session_still_queued_for_writing_answers_at_once() -> None:
    """A write queued in this process answers the lookup (``pending_hits``), async too."""
    store = MemoryStore()
    cache = SessionCache(store, async_store=AsyncMemoryStore(store), async_writes=True)
    cache._pending[SID] = DER12  # as _enqueue leaves it, without racing the writer thread
    assert asyncio.run(cache.on_get_async(CTX, SID)) == DER12
    s = cache.stats()
    assert (s.hits, s.pending_hits, s.lookups) == (1, 1, 1), s.as_dict()


def test_a_stalled_async_store_times_out_at_the_deadline() -> None:
    """The cache ends a lookup the store never answers: a timeout, the store's call
    cancelled, and far sooner than the 30 s the test would wait."""
    stalled = Stalled()
    cache = SessionCache(MemoryStore(), async_store=stalled, deadline_ms=50)

    async def main() -> tuple[bytes | None, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        found = await asyncio.wait_for(cache.on_get_async(CTX, SID), 30)
        return found, loop.time() - start

    found, took = asyncio.run(main())
    s = cache.stats()
    assert found is None and s.timeouts == 1 and stalled.cancelled == 1, s.as_dict()
    assert took < 15, (took, s.as_dict())  # did not wait for the 30 s guard


def test_without_async_store_an_async_lookup_is_a_miss_that_touches_nothing() -> None:
    cache = SessionCache(MemoryStore())
    assert asyncio.run(cache.on_get_async(CTX, SID)) is None
    assert cache.stats().lookups == 0


def test_cancelled_lookup_leaves_the_breaker_undecided() -> None:
    stalled = Stalled()
    cache = SessionCache(MemoryStore(), async_store=stalled, deadline_ms=60_000)

    async def main() -> None:
        task = asyncio.create_task(cache.on_get_async(CTX, SID))
        for _ in range(100):
            await asyncio.sleep(0)
            if stalled.cancelled or task.done():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    s = cache.stats()
    assert (s.breaker_state, s.errors, s.timeouts) == ("closed", 0, 0), s.as_dict()


class Clock:
    """A clock the store moves: how long the loop took to come back to the lookup."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Slow(AsyncMemoryStore):
    """Answers (or raises StoreTimeout) once the clock has moved ``lag`` seconds."""

    def __init__(self, clock: Clock, lag: float, *, timeout: bool) -> None:
        super().__init__()
        self.clock, self.lag, self.timeout = clock, lag, timeout

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self.clock.now += self.lag
        if self.timeout:
            raise StoreTimeout("no reply in time")
        return DER12


@pytest.mark.parametrize(
    ("lag_budgets", "opens"),
    [(1.0, 1), (1.4, 1), (1.6, 0), (5.0, 0)],
)
def test_a_timeout_noticed_late_does_not_open_the_breaker(lag_budgets: float, opens: int) -> None:
    """A store timeout seen within half a budget of its deadline is the store's; one seen
    later was held up by a busy loop: still a timeout, but the breaker is not told."""
    clock = Clock()
    store = Slow(clock, lag_budgets * 0.05, timeout=True)
    cache = SessionCache(
        MemoryStore(), async_store=store, deadline_ms=50, breaker_threshold=1, clock=clock
    )
    assert asyncio.run(cache.on_get_async(CTX, SID)) is None
    s = cache.stats()
    assert (s.timeouts, s.breaker_opens) == (1, opens), s.as_dict()


def test_a_late_answer_is_used_on_the_loop_but_is_a_timeout_when_blocking() -> None:
    """Three budgets late: on the loop (the cache would have cut a stalled store off) the
    lateness is the loop's, so the answer counts as a hit; the blocking path, where only
    the store can be late, counts a timeout and tells the breaker."""
    clock = Clock()
    inner = MemoryStore()
    inner.store(SID, DER12, 300, Deadline.after(1))

    class LateBlocking(WrappingStore):
        def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
            clock.now += 0.15
            return self.inner.fetch(session_id, deadline)

    aio = SessionCache(
        MemoryStore(),
        async_store=Slow(clock, 0.15, timeout=False),
        deadline_ms=50,
        breaker_threshold=1,
        clock=clock,
    )
    blocking = SessionCache(LateBlocking(inner), deadline_ms=50, breaker_threshold=1, clock=clock)
    assert asyncio.run(aio.on_get_async(CTX, SID)) == DER12
    assert blocking.on_get(CTX, SID) == DER12
    a, b = aio.stats(), blocking.stats()
    assert (a.hits, a.timeouts, a.breaker_opens) == (1, 0, 0), a.as_dict()
    assert (b.hits, b.timeouts, b.breaker_opens) == (0, 1, 1), b.as_dict()
