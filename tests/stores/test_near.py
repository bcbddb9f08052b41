"""NearCache: local answers within ttl_s, bounds, pass-through deletes and takes, refusals."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, StoreError
from tlscache.stores import MemoryStore, ServerHealth, SessionStore, WrappingStore
from tlscache.stores.base import WriteStatus
from tlscache.stores.near import NearCache, NearStats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Remote(WrappingStore):
    """A MemoryStore that says it is shared, counts every call, and can be made to fail."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(MemoryStore(clock=clock))
        self.in_process = False
        self.calls: dict[str, int] = {"store": 0, "fetch": 0, "delete": 0, "take": 0}
        self.fail = False

    def _count(self, op: str) -> None:
        self.calls[op] += 1
        if self.fail:
            raise StoreError(f"{op} failed")

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        self._count("store")
        return super().store(session_id, value, ttl_s, deadline)

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self._count("fetch")
        return super().fetch(session_id, deadline)

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self._count("delete")
        super().delete(session_id, deadline)

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self._count("take")
        return super().take(session_id, deadline)

    def servers(self) -> Sequence[ServerHealth]:
        return (ServerHealth("127.0.0.1:1", True, 0, None),)

    def server_for(self, session_id: bytes) -> str | None:
        return "127.0.0.1:1"


def soon() -> Deadline:
    return Deadline.after(1.0)


def make(max_entries: int = 4, ttl_s: float = 2.0) -> tuple[NearCache, Remote, Clock]:
    clock = Clock()
    remote = Remote(clock)
    return NearCache(remote, max_entries=max_entries, ttl_s=ttl_s, clock=clock), remote, clock


def test_own_write_answers_locally_until_ttl() -> None:
    near, remote, clock = make()
    near.store(b"a", b"v", 300, soon())
    assert near.fetch(b"a", soon()) == b"v"
    assert (remote.calls, near.stats()) == (
        {"store": 1, "fetch": 0, "delete": 0, "take": 0},
        NearStats(hits=1, misses=0, entries=1, evictions=0),
    )
    clock.now += 2.01  # past ttl_s: asked again
    assert near.fetch(b"a", soon()) == b"v"
    assert (remote.calls["fetch"], near.stats()) == (1, NearStats(1, 1, 1, 0))


def test_session_lifetime_shorter_than_ttl_wins() -> None:
    near, remote, clock = make(ttl_s=10.0)
    near.store(b"a", b"v", 1, soon())
    clock.now += 1.5  # the session expired, the near entry must not outlive it
    assert near.fetch(b"a", soon()) is None
    assert (remote.calls["fetch"], near.stats()) == (1, NearStats(0, 1, 0, 0))


def test_fetched_values_are_kept_misses_are_not() -> None:
    near, remote, _ = make()
    assert near.fetch(b"x", soon()) is None
    remote.inner.store(b"x", b"other-host", 300, soon())  # written by another backend
    assert near.fetch(b"x", soon()) == b"other-host"
    assert near.fetch(b"x", soon()) == b"other-host"
    assert (remote.calls["fetch"], near.stats()) == (2, NearStats(1, 2, 1, 0))


def test_bounded_lru() -> None:
    near, remote, _ = make(max_entries=2)
    for key in (b"a", b"b"):
        near.store(key, key, 300, soon())
    near.fetch(b"a", soon())  # a is now the most recent
    near.store(b"c", b"c", 300, soon())  # b goes
    before = remote.calls["fetch"]
    assert [near.fetch(k, soon()) for k in (b"a", b"c", b"b")] == [b"a", b"c", b"b"]
    assert (remote.calls["fetch"] - before, near.stats().evictions) == (1, 2), near.stats()
    assert near.stats().entries == 2


def test_delete_and_take_go_through_and_evict() -> None:
    near, remote, _ = make()
    near.store(b"a", b"v", 300, soon())
    near.delete(b"a", soon())
    assert near.fetch(b"a", soon()) is None
    near.store(b"b", b"w", 300, soon())
    assert near.take(b"b", soon()) == b"w"  # the inner store's atomic take
    assert near.fetch(b"b", soon()) is None
    assert remote.calls == {"store": 2, "fetch": 2, "delete": 1, "take": 1}, remote.calls


def test_no_take_support_so_single_use_refuses_it() -> None:
    near, remote, _ = make()
    assert remote.supports_take is True
    assert near.supports_take is False
    assert near.in_process is False


def test_failures_pass_through_and_leave_nothing_trusted() -> None:
    near, remote, _ = make()
    near.store(b"a", b"old", 300, soon())
    remote.fail = True
    with pytest.raises(StoreError):
        near.store(b"a", b"new", 300, soon())
    with pytest.raises(StoreError):  # not answered with "old" from the near cache
        near.fetch(b"a", soon())
    with pytest.raises(StoreError):
        near.delete(b"a", soon())
    assert near.stats() == NearStats(0, 1, 0, 0), near.stats()


def test_servers_follow_the_inner_store() -> None:
    near, _, _ = make()
    assert near.servers() == (ServerHealth("127.0.0.1:1", True, 0, None),)
    assert near.server_for(b"a") == "127.0.0.1:1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_entries": 0}, "max_entries"), ({"ttl_s": 0.0}, "ttl_s")],
)
def test_bad_arguments(kwargs: dict[str, float], message: str) -> None:
    remote = Remote(Clock())
    with pytest.raises(ConfigurationError, match=message):
        NearCache(remote, **kwargs)  # type: ignore[arg-type]


def test_refuses_an_in_process_store() -> None:
    inner: SessionStore = MemoryStore()
    with pytest.raises(ConfigurationError, match="in-process"):
        NearCache(inner)


def test_threads_see_consistent_values() -> None:
    """Many threads writing and reading distinct keys: every read is its own last write."""
    near, _, _ = make(max_entries=64)
    errors: list[str] = []

    def worker(n: int) -> None:
        for i in range(200):
            key = f"{n}-{i % 10}".encode()
            near.store(key, key + b"=" + str(i).encode(), 300, soon())
            got = near.fetch(key, soon())
            if got != key + b"=" + str(i).encode():
                errors.append(f"{key!r}: {got!r} after write {i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and near.stats().entries <= 64, (errors[:5], near.stats())
