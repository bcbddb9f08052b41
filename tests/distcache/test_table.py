"""SessionTable semantics: C's expiry, eviction, validation order, plus the byte bound."""

from __future__ import annotations

import json
import random
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.procs import VECTORS
from tlscache.distcache.protocol import MAX_TIMEOUT_MS, Result, add_payload, parse_add_request
from tlscache.distcache.table import (
    MAX_SESSIONS,
    MIN_SESSIONS,
    SessionTable,
    eviction_batch,
)
from tlscache.exceptions import ConfigurationError

T0 = 1_000_000  # an arbitrary server clock reading (ms)


def test_expiry_is_strictly_later() -> None:
    cache = SessionTable()
    assert cache.add(b"id", b"data", 1000, T0) == Result.OK
    assert cache.get(b"id", T0 + 1000) == b"data"  # now == expiry: still valid
    assert cache.have(b"id", T0 + 1000)
    assert cache.get(b"id", T0 + 1001) is None
    assert len(cache) == 0


def test_zero_timeout_expires_at_next_millisecond() -> None:
    cache = SessionTable()
    assert cache.add(b"z", b"data", 0, T0) == Result.OK
    assert cache.have(b"z", T0)
    assert not cache.have(b"z", T0 + 1)


def test_add_never_overwrites_but_expired_entry_is_replaced() -> None:
    cache = SessionTable()
    assert cache.add(b"id", b"one", 10, T0) == Result.OK
    assert cache.add(b"id", b"two", 10, T0 + 5) == Result.ADD_MATCHING_SESSION
    assert cache.get(b"id", T0 + 5) == b"one"
    assert cache.add(b"id", b"two", 10, T0 + 11) == Result.OK
    assert cache.get(b"id", T0 + 11) == b"two"


def test_remove_and_readd() -> None:
    cache = SessionTable()
    assert not cache.remove(b"id", T0)
    cache.add(b"id", b"one", 10_000, T0)
    assert cache.remove(b"id", T0)
    assert not cache.have(b"id", T0)
    assert cache.add(b"id", b"two", 10, T0) == Result.OK
    # The stale heap entry of the first "id" (expiring later) must not evict the new one
    # early, and the new one must expire on its own schedule.
    assert cache.get(b"id", T0 + 10) == b"two"
    assert cache.get(b"id", T0 + 11) is None
    assert cache.total_bytes == 0


def test_eviction_check_vector_n64() -> None:
    """The recorded C behaviour with -sessions 64 (evicts 64 // 30 = 2)."""
    recorded = json.loads(VECTORS.read_text())["eviction_check"]["results"]["evict"]
    cache = SessionTable(64)
    for k in range(64):
        assert cache.add(f"ev-{k:02d}".encode(), b"x" * 20, 100_000 + 1000 * k, T0) == 0
    results = [["add 65th", cache.add(b"ev-new", b"x" * 20, 500_000, T0)]]
    for name in ("ev-00", "ev-01", "ev-02", "ev-03", "ev-new"):
        results.append([f"have {name}", 0 if cache.have(name.encode(), T0) else 1])
    assert results == recorded
    assert len(cache) == 63


@pytest.mark.parametrize(("capacity", "batch"), [(64, 2), (512, 17), (60000, 2000), (100, 3)])
def test_eviction_batch_sizes(capacity: int, batch: int) -> None:
    assert eviction_batch(capacity) == batch
    cache = SessionTable(capacity)
    for k in range(capacity):
        cache.add(k.to_bytes(4, "big"), b"d", 1_000_000 - k, T0)  # later adds expire sooner
    cache.add(b"new", b"d", 5, T0)
    assert len(cache) == capacity - batch + 1
    # The evicted ones are those expiring soonest: the last `batch` added.
    for k in range(capacity - batch, capacity):
        assert not cache.have(k.to_bytes(4, "big"), T0)
    assert cache.have((capacity - batch - 1).to_bytes(4, "big"), T0)
    assert cache.have(b"new", T0)


def test_equal_expiry_evicts_in_insertion_order() -> None:
    cache = SessionTable(64)
    for k in range(64):
        cache.add(bytes([k + 1]), b"d", 1000, T0)
    cache.add(b"new", b"d", 1000, T0)
    assert not cache.have(b"\x01", T0)
    assert not cache.have(b"\x02", T0)
    assert cache.have(b"\x03", T0)


def test_get_does_not_refresh() -> None:
    cache = SessionTable(64)
    for k in range(64):
        cache.add(bytes([k + 1]), b"d", 1000 + k, T0)
    assert cache.get(b"\x01", T0) == b"d"
    cache.add(b"new", b"d", 5000, T0)
    assert not cache.have(b"\x01", T0)


def test_expired_entries_make_room_before_eviction() -> None:
    cache = SessionTable(64)
    for k in range(64):
        cache.add(bytes([k + 1]), b"d", 10 if k == 40 else 10_000, T0)
    cache.add(b"new", b"d", 10_000, T0 + 11)  # entry 41 expired: no eviction needed
    assert len(cache) == 64
    assert cache.have(b"\x01", T0 + 11)


def test_capacity_limits() -> None:
    with pytest.raises(ConfigurationError):
        SessionTable(MIN_SESSIONS - 1)
    with pytest.raises(ConfigurationError):
        SessionTable(MAX_SESSIONS + 1)
    assert SessionTable(MAX_SESSIONS + 1, allow_large=True).capacity == MAX_SESSIONS + 1
    with pytest.raises(ConfigurationError):
        SessionTable(100, max_bytes=0)


def test_byte_capacity() -> None:
    cache = SessionTable(1000, max_bytes=1000)
    for k in range(9):
        assert cache.add(bytes([k + 1]) * 10, b"d" * 90, 1000 + k, T0) == Result.OK
    assert cache.total_bytes == 900
    assert cache.add(b"big", b"x" * 300, 5000, T0) == Result.OK
    # 900 + 303 > 1000: the three soonest-expiring entries had to go.
    assert cache.total_bytes == 600 + 303
    assert [cache.have(bytes([k + 1]) * 10, T0) for k in range(9)] == [False] * 3 + [True] * 6
    assert cache.add(b"huge", b"x" * 1000, 5000, T0) == Result.ADD_DATA_RANGE
    assert cache.remove(b"big", T0)
    assert cache.total_bytes == 600


def payload(timeout: int, id_len: int, body: bytes) -> bytes:
    return timeout.to_bytes(4, "big") + id_len.to_bytes(4, "big") + body


@pytest.mark.parametrize(
    ("raw", "result"),
    [
        (payload(MAX_TIMEOUT_MS + 1, 1000, b"abc"), Result.ADD_TIMEOUT_RANGE),  # 102 first
        (payload(MAX_TIMEOUT_MS + 1, 0, b""), Result.ADD_TIMEOUT_RANGE),
        (payload(1000, 1000, b"abc"), Result.ADD_CORRUPT),  # 100 before 103
        (payload(1000, 3, b"abc"), Result.ADD_CORRUPT),  # no session data
        (payload(1000, 0, b"abc"), Result.ADD_ID_RANGE),
        (payload(1000, 65, b"i" * 65 + b"d"), Result.ADD_ID_RANGE),
        (payload(1000, 64, b"i" * 64 + b"d"), Result.OK),
        (payload(MAX_TIMEOUT_MS, 2, b"idd"), Result.OK),
    ],
)
def test_add_validation_order(raw: bytes, result: Result) -> None:
    assert add_raw(SessionTable(), raw, T0) == result


def add_raw(cache: SessionTable, raw: bytes, now: int) -> Result:
    """An ADD payload as dc_server handles it: parsed by the protocol, applied by the table."""
    return cache.add_request(parse_add_request(raw), now)


def test_duplicate_checked_after_validation_and_flush() -> None:
    cache = SessionTable()
    add_raw(cache, add_payload(b"id", b"d", 5), T0)
    assert add_raw(cache, payload(MAX_TIMEOUT_MS + 1, 2, b"idd"), T0) == 102
    assert add_raw(cache, add_payload(b"id", b"d", 5), T0) == Result.ADD_MATCHING_SESSION
    assert add_raw(cache, add_payload(b"id", b"e", 5), T0 + 6) == Result.OK


def test_direct_add_checks() -> None:
    cache = SessionTable()
    assert cache.add(b"", b"d", 1, T0) == Result.ADD_ID_RANGE
    assert cache.add(b"x" * 65, b"d", 1, T0) == Result.ADD_ID_RANGE
    assert cache.add(b"x", b"d", -1, T0) == Result.ADD_TIMEOUT_RANGE
    assert cache.add(b"x", b"", 1, T0) == Result.ADD_DATA_RANGE
    # More than one message can carry: the wire cannot deliver it, so neither may the API.
    assert cache.add(b"x", b"d" * 32769, 1, T0) == Result.ADD_DATA_RANGE
    assert cache.expiry_of(b"x") is None
    assert cache.add(b"x", b"d", 7, T0) == Result.OK
    assert cache.expiry_of(b"x") == T0 + 7
    assert list(cache.ids()) == [b"x"]


def test_any_lookup_id_length() -> None:
    cache = SessionTable()
    for sid in (b"", b"y" * 100):
        assert cache.get(sid, T0) is None
        assert not cache.have(sid, T0)
        assert not cache.remove(sid, T0)


def test_periodic_expire_and_clear() -> None:
    cache = SessionTable()
    for k in range(10):
        cache.add(bytes([k + 1]), b"d", k, T0)
    assert cache.expire(T0 + 4) == 4
    assert len(cache) == 6
    cache.clear()
    assert len(cache) == 0 and cache.total_bytes == 0


class Model:
    """The C array, literally: a list ordered by expiry, linear scans."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple[int, bytes, bytes]] = []

    def flush(self, now: int) -> None:
        while self.entries and now > self.entries[0][0]:
            self.entries.pop(0)

    def find(self, sid: bytes) -> int:
        return next((i for i, e in enumerate(self.entries) if e[1] == sid), -1)

    def add(self, sid: bytes, data: bytes, timeout: int, now: int) -> int:
        self.flush(now)
        if self.find(sid) >= 0:
            return 101
        if len(self.entries) >= self.capacity:
            del self.entries[: max(1, self.capacity // 30)]
        expiry = now + timeout
        pos = len(self.entries)
        while pos and self.entries[pos - 1][0] > expiry:
            pos -= 1
        self.entries.insert(pos, (expiry, sid, data))
        return 0

    def get(self, sid: bytes, now: int) -> bytes | None:
        self.flush(now)
        i = self.find(sid)
        return None if i < 0 else self.entries[i][2]

    def remove(self, sid: bytes, now: int) -> bool:
        self.flush(now)
        i = self.find(sid)
        if i >= 0:
            del self.entries[i]
        return i >= 0


OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "get", "remove", "tick"]),
        st.integers(min_value=0, max_value=90),  # id
        st.integers(min_value=0, max_value=50),  # timeout or tick
    ),
    max_size=400,
)


@settings(max_examples=60, deadline=None)
@given(OPS)
def test_matches_the_c_array_model(ops: list[tuple[str, int, int]]) -> None:
    cache = SessionTable(64)
    model = Model(64)
    now = T0
    for op, k, arg in ops:
        sid = k.to_bytes(2, "big")
        if op == "add":
            data = bytes([k]) * (k + 1)
            assert cache.add(sid, data, arg, now) == model.add(sid, data, arg, now)
        elif op == "get":
            assert cache.get(sid, now) == model.get(sid, now)
        elif op == "remove":
            assert cache.remove(sid, now) == model.remove(sid, now)
        else:
            now += arg
        assert len(cache) == len(model.entries)


def test_heap_stays_bounded_under_remove_churn() -> None:
    cache = SessionTable(64)
    for k in range(10_000):
        cache.add(b"churn", b"d", 1000, T0 + k)
        cache.remove(b"churn", T0 + k)
    assert len(cache._heap) <= 2 * len(cache) + 65


def test_memory_per_session() -> None:
    """About id + data + 170 bytes per entry (C: id + data + ~50)."""
    rng = random.Random(1)
    ids = [rng.randbytes(32) for _ in range(5000)]
    data = [rng.randbytes(100) for _ in range(5000)]
    tracemalloc.start()
    try:
        cache = SessionTable(5000)
        before = tracemalloc.get_traced_memory()[0]
        for k, (sid, blob) in enumerate(zip(ids, data, strict=True)):
            cache.add(sid, blob, 600_000, T0 + k)
        per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(cache)
    finally:
        tracemalloc.stop()
    overhead: Any = per_entry - 132
    assert overhead < 220, overhead
