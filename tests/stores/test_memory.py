"""MemoryStore: TTL, bounds, LRU eviction, atomic take, thread safety."""

from __future__ import annotations

import threading

import pytest

from tlscache.exceptions import ConfigurationError, StoreError
from tlscache.stores import MemoryStore, SessionStore, WrappingStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_store_fetch_delete() -> None:
    s = MemoryStore()
    assert isinstance(s, SessionStore)
    assert s.fetch(b"a", 1.0) is None
    s.store(b"a", b"value", 10, 1.0)
    assert s.fetch(b"a", 1.0) == b"value"
    s.store(b"a", b"other", 10, 1.0)  # store replaces
    assert s.fetch(b"a", 1.0) == b"other"
    s.delete(b"a", 1.0)
    s.delete(b"a", 1.0)  # absent: not an error
    assert s.fetch(b"a", 1.0) is None


def test_ttl_expiry() -> None:
    clock = Clock()
    s = MemoryStore(clock=clock)
    s.store(b"a", b"v", 5, 1.0)
    s.store(b"b", b"v", 50, 1.0)
    clock.now += 5
    assert s.fetch(b"a", 1.0) == b"v"  # expired only strictly after ttl
    clock.now += 0.001
    assert s.fetch(b"a", 1.0) is None
    assert s.purge_expired() == 0
    clock.now += 100
    assert s.purge_expired() == 1
    assert len(s) == 0


def test_bounded_lru() -> None:
    s = MemoryStore(max_entries=3)
    for k in (b"1", b"2", b"3"):
        s.store(k, k, 60, 1.0)
    assert s.fetch(b"1", 1.0) == b"1"  # 1 is now most recent
    s.store(b"4", b"4", 60, 1.0)
    assert len(s) == 3
    assert s.fetch(b"2", 1.0) is None
    assert {s.fetch(k, 1.0) for k in (b"1", b"3", b"4")} == {b"1", b"3", b"4"}
    with pytest.raises(ConfigurationError):
        MemoryStore(max_entries=0)


def test_take_is_atomic() -> None:
    s = MemoryStore()
    assert s.supports_take
    s.store(b"t", b"ticket", 60, 1.0)
    winners: list[bytes] = []
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        v = s.take(b"t", 1.0)
        if v is not None:
            winners.append(v)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert winners == [b"ticket"]
    assert s.fetch(b"t", 1.0) is None


def test_concurrent_use() -> None:
    s = MemoryStore(max_entries=100)

    def worker(n: int) -> None:
        for i in range(500):
            key = f"{n}-{i % 150}".encode()
            s.store(key, key, 60, 1.0)
            got = s.fetch(key, 1.0)
            assert got in (None, key)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(s) <= 100


def test_close() -> None:
    with MemoryStore() as s:
        s.store(b"a", b"v", 1, 1.0)
    with pytest.raises(StoreError):
        s.fetch(b"a", 1.0)


def test_wrapping_store_forwards() -> None:
    inner = MemoryStore()
    w = WrappingStore(inner)
    assert w.supports_take
    w.store(b"a", b"v", 10, 1.0)
    assert inner.fetch(b"a", 1.0) == b"v"
    assert w.fetch(b"a", 1.0) == b"v"
    assert w.take(b"a", 1.0) == b"v"
    w.store(b"b", b"v", 10, 1.0)
    w.delete(b"b", 1.0)
    assert inner.fetch(b"b", 1.0) is None
    w.close()
    with pytest.raises(StoreError):
        inner.fetch(b"a", 1.0)
