"""MemoryStore: TTL, bounds, LRU eviction, atomic take, thread safety."""

from __future__ import annotations

import threading

import pytest

from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, StoreError
from tlscache.stores import MemoryStore, SessionStore, WrappingStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def soon() -> Deadline:
    """A deadline no in-process store call comes near."""
    return Deadline.after(1.0)


def test_store_fetch_delete() -> None:
    s = MemoryStore()
    assert isinstance(s, SessionStore)
    assert s.fetch(b"a", soon()) is None
    s.store(b"a", b"value", 10, soon())
    assert s.fetch(b"a", soon()) == b"value"
    s.store(b"a", b"other", 10, soon())  # store replaces
    assert s.fetch(b"a", soon()) == b"other"
    s.delete(b"a", soon())
    s.delete(b"a", soon())  # absent: not an error
    assert s.fetch(b"a", soon()) is None


def test_ttl_expiry() -> None:
    clock = Clock()
    s = MemoryStore(clock=clock)
    s.store(b"a", b"v", 5, soon())
    s.store(b"b", b"v", 50, soon())
    clock.now += 5
    assert s.fetch(b"a", soon()) == b"v"  # expired only strictly after ttl
    clock.now += 0.001
    assert s.fetch(b"a", soon()) is None
    assert s.purge_expired() == 0
    clock.now += 100
    assert s.purge_expired() == 1
    assert len(s) == 0


def test_bounded_lru() -> None:
    s = MemoryStore(max_entries=3)
    for k in (b"1", b"2", b"3"):
        s.store(k, k, 60, soon())
    assert s.fetch(b"1", soon()) == b"1"  # 1 is now most recent
    s.store(b"4", b"4", 60, soon())
    assert len(s) == 3
    assert s.fetch(b"2", soon()) is None
    assert {s.fetch(k, soon()) for k in (b"1", b"3", b"4")} == {b"1", b"3", b"4"}
    with pytest.raises(ConfigurationError):
        MemoryStore(max_entries=0)


def test_take_is_atomic() -> None:
    s = MemoryStore()
    assert s.supports_take
    s.store(b"t", b"ticket", 60, soon())
    winners: list[bytes] = []
    barrier = threading.Barrier(8)

    def racer() -> None:
        barrier.wait()
        v = s.take(b"t", soon())
        if v is not None:
            winners.append(v)

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert winners == [b"ticket"]
    assert s.fetch(b"t", soon()) is None


def test_concurrent_use() -> None:
    s = MemoryStore(max_entries=100)

    def worker(n: int) -> None:
        for i in range(500):
            key = f"{n}-{i % 150}".encode()
            s.store(key, key, 60, soon())
            got = s.fetch(key, soon())
            assert got in (None, key)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(s) <= 100


def test_close() -> None:
    with MemoryStore() as s:
        s.store(b"a", b"v", 1, soon())
    with pytest.raises(StoreError):
        s.fetch(b"a", soon())


def test_wrapping_store_forwards() -> None:
    inner = MemoryStore()
    w = WrappingStore(inner)
    assert w.supports_take
    w.store(b"a", b"v", 10, soon())
    assert inner.fetch(b"a", soon()) == b"v"
    assert w.fetch(b"a", soon()) == b"v"
    assert w.take(b"a", soon()) == b"v"
    w.store(b"b", b"v", 10, soon())
    w.delete(b"b", soon())
    assert inner.fetch(b"b", soon()) is None
    w.close()
    with pytest.raises(StoreError):
        inner.fetch(b"a", soon())
