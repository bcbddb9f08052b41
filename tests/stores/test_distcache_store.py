"""DistcacheStore: error mapping (fake client) and real dc_server / dc_client processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest

from tests.procs import free_port, running, tool
from tlscache.deadline import Deadline
from tlscache.distcache.client import Client
from tlscache.distcache.protocol import MAX_TIMEOUT_MS, Result
from tlscache.exceptions import (
    ClientError,
    ClientTimeout,
    ConfigurationError,
    ServerUnavailable,
    StoreError,
    StoreTimeout,
)
from tlscache.stores import DistcacheStore


class FakeClient:
    """Records calls; replies from a script."""

    def __init__(self, add_results: list[Result] | None = None) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.add_results = add_results or [Result.OK]
        self.raise_exc: Exception | None = None
        self.closed = False
        self.nowait_failures = 0
        self.nowait_confirmed = 0

    def _maybe_raise(self) -> None:
        if self.raise_exc is not None:
            raise self.raise_exc

    def add(self, sid: bytes, data: bytes, timeout_ms: int, *, deadline: Deadline) -> Result:
        self.calls.append(("add", sid, data, timeout_ms, deadline))
        self._maybe_raise()
        return self.add_results.pop(0) if len(self.add_results) > 1 else self.add_results[0]

    def add_nowait(self, sid: bytes, data: bytes, timeout_ms: int, *, deadline: Deadline) -> None:
        self.calls.append(("add_nowait", sid, data, timeout_ms, deadline))
        self._maybe_raise()

    def get(self, sid: bytes, *, deadline: Deadline) -> bytes | None:
        self.calls.append(("get", sid, deadline))
        self._maybe_raise()
        return None

    def remove(self, sid: bytes, *, deadline: Deadline) -> bool:
        self.calls.append(("remove", sid, deadline))
        self._maybe_raise()
        return True

    def have(self, sid: bytes, *, deadline: Deadline) -> bool:
        self.calls.append(("have", sid, deadline))
        self._maybe_raise()
        return False

    def close(self) -> None:
        self.closed = True


def make(fake: FakeClient, **kw: Any) -> DistcacheStore:
    return DistcacheStore("UNIX:/nonexistent", client=cast(Client, fake), **kw)


@pytest.mark.parametrize("confirm", [False, True], ids=["pipelined", "confirmed"])
def test_ttl_and_deadline_conversion(confirm: bool) -> None:
    fake = FakeClient()
    store = make(fake, confirm_writes=confirm)
    deadline = Deadline.after(0.02)
    store.store(b"id", b"0value", 300.0001, deadline)
    store.store(b"id", b"0value", 30 * 86400, deadline)  # clamped to dc_server's 7-day maximum
    store.store(b"id", b"0value", -5, deadline)
    assert [c[3] for c in fake.calls] == [300001, MAX_TIMEOUT_MS, 0]
    assert {c[0] for c in fake.calls} == {"add" if confirm else "add_nowait"}
    assert all(c[4] is deadline for c in fake.calls)  # handed on, not converted


def test_add_matching_session_policies() -> None:
    fake = FakeClient([Result.ADD_MATCHING_SESSION])
    make(fake, confirm_writes=True).store(b"id", b"v", 10, Deadline.after(0.1))  # keep: success
    assert [c[0] for c in fake.calls] == ["add"]

    fake = FakeClient([Result.ADD_MATCHING_SESSION, Result.OK])
    make(fake, on_exists="replace").store(b"id", b"v", 10, Deadline.after(0.1))
    assert [c[0] for c in fake.calls] == ["add", "remove", "add"]

    fake = FakeClient([Result.ADD_TIMEOUT_RANGE])
    with pytest.raises(StoreError, match="ADD_TIMEOUT_RANGE"):
        make(fake, confirm_writes=True).store(b"id", b"v", 10, Deadline.after(0.1))
    with pytest.raises(ConfigurationError):
        make(FakeClient(), on_exists=cast(Any, "overwrite"))


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ClientTimeout("slow"), StoreTimeout),
        (ServerUnavailable("no server"), StoreError),
        (ClientError("reset"), StoreError),
        (ValueError("too big"), StoreError),
    ],
)
def test_error_mapping(exc: Exception, expected: type[Exception]) -> None:
    fake = FakeClient()
    fake.raise_exc = exc
    store = make(fake)
    for call in (
        lambda: store.store(b"id", b"v", 1, Deadline.after(0.01)),
        lambda: store.fetch(b"id", Deadline.after(0.01)),
        lambda: store.delete(b"id", Deadline.after(0.01)),
        lambda: store.contains(b"id", Deadline.after(0.01)),
    ):
        with pytest.raises(expected):
            call()
    if expected is StoreError:
        with pytest.raises(StoreError) as info:
            store.fetch(b"id", Deadline.after(0.01))
        assert not isinstance(info.value, StoreTimeout)


def test_bad_ids_never_reach_the_server() -> None:
    fake = FakeClient()
    store = make(fake)
    with pytest.raises(StoreError):
        store.store(b"", b"v", 1, Deadline.after(0.01))
    with pytest.raises(StoreError):
        store.store(b"x" * 65, b"v", 1, Deadline.after(0.01))
    assert store.fetch(b"x" * 65, Deadline.after(0.01)) is None
    store.delete(b"", Deadline.after(0.01))
    assert fake.calls == []
    store.close()
    assert fake.closed
    assert not store.supports_take


@pytest.mark.integration
def test_against_dc_server(dc_server: str) -> None:
    with DistcacheStore(dc_server) as store:
        sid, der = b"\x01" * 32, b"\x30" + b"s" * 134
        assert store.fetch(sid, Deadline.after(1.0)) is None
        store.store(sid, der, 60, Deadline.after(1.0))
        store.store(sid, der, 60, Deadline.after(1.0))  # ADD_MATCHING_SESSION: kept, no error
        assert store.fetch(sid, Deadline.after(1.0)) == der
        assert store.contains(sid)
        store.delete(sid, Deadline.after(1.0))
        assert store.fetch(sid, Deadline.after(1.0)) is None
        store.store(b"short", der, 0.001, Deadline.after(1.0))
        time.sleep(0.01)
        assert store.fetch(b"short", Deadline.after(1.0)) is None


@pytest.mark.integration
def test_replace_policy_against_dc_server(dc_server_tcp: str) -> None:
    with DistcacheStore(dc_server_tcp, on_exists="replace") as store:
        store.store(b"k", b"old-value", 60, Deadline.after(1.0))
        store.store(b"k", b"new-value", 60, Deadline.after(1.0))
        assert store.fetch(b"k", Deadline.after(1.0)) == b"new-value"


@pytest.mark.integration
def test_through_dc_client_and_server_down(dc_server_tcp: str, tmp_path: Path) -> None:
    proxy = f"UNIX:{tmp_path / 'dc_client.sock'}"
    argv = tool("dc_client", "-listen", proxy, "-server", dc_server_tcp, "-retry", "100")
    with running(argv, ready=proxy), DistcacheStore(proxy) as store:
        deadline = time.monotonic() + 5
        while True:  # dc_client connects to the server on its first loop pass
            try:
                store.contains(b"via-proxy")
                break
            except StoreError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        store.store(b"via-proxy", b"0value", 60, Deadline.after(1.0))  # pipelined: not waited for
        assert store.fetch(b"via-proxy", Deadline.after(1.0)) == b"0value"  # forwarded in order
    # dc_client with no server answers at once with "no server": a StoreError, not a
    # StoreTimeout after the (30 s) deadline.
    dead = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_client", "-listen", proxy, "-server", dead, "-retry", "60000")
    with running(argv, ready=proxy), DistcacheStore(proxy) as store:
        for _ in range(5):
            with pytest.raises(StoreError) as info:
                store.fetch(b"x", Deadline.after(30.0))
            assert not isinstance(info.value, StoreTimeout), info.value


@pytest.mark.integration
def test_nothing_listening_is_a_store_error(tmp_path: Path) -> None:
    with DistcacheStore(f"UNIX:{tmp_path / 'none.sock'}") as store:
        with pytest.raises(StoreError):
            store.fetch(b"x", Deadline.after(0.05))
        with pytest.raises(StoreError):
            store.store(b"x", b"v", 1, Deadline.after(0.05))


def test_pipelined_write_failures_surface_on_the_next_store() -> None:
    fake = FakeClient()
    fake.nowait_failures = 3  # before the store existed: not this store's to report
    store = make(fake)
    store.store(b"id", b"v", 10, Deadline.after(0.1))
    fake.nowait_failures = 5  # two sent writes turned out not stored
    with pytest.raises(StoreError, match="2 earlier"):
        store.store(b"id2", b"v", 10, Deadline.after(0.1))
    assert [c[1] for c in fake.calls] == [b"id", b"id2"]  # id2 was sent all the same
    store.store(b"id3", b"v", 10, Deadline.after(0.1))  # reported once
    assert store.write_failures == 5


@pytest.mark.integration
def test_pipelined_writes_against_dc_server(dc_server: str) -> None:
    with DistcacheStore(dc_server) as store, Client(dc_server) as other:
        sids = [bytes([i]) * 32 for i in range(1, 101)]
        for sid in sids:  # the deadline only matters when 64 replies are owed: generous
            store.store(sid, b"\x30" + sid, 60, Deadline.after(1.0))
        assert (
            store.fetch(sids[-1], Deadline.after(1.0)) == b"\x30" + sids[-1]
        )  # same connection: in order
        assert all(other.have(sid) for sid in sids)
        for sid in sids[:10]:
            store.store(sid, b"\x30" + sid, 60, Deadline.after(1.0))  # duplicates: kept, no error
        assert store.contains(sids[0])
        assert store.write_failures == 0


@pytest.mark.integration
def test_pipelined_writes_to_dc_client_without_server(tmp_path: Path) -> None:
    from tlscache import SessionCache

    proxy = f"UNIX:{tmp_path / 'dc_client.sock'}"
    dead = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_client", "-listen", proxy, "-server", dead, "-retry", "60000")
    with running(argv, ready=proxy), DistcacheStore(proxy) as store:
        store.store(
            b"lost-1", b"0value", 60, Deadline.after(10.0)
        )  # sent; dc_client answers "no server"
        for _ in range(500):  # 10 ms apart: up to 5 s for the reply on a loaded machine
            try:
                store.store(b"lost-2", b"0value", 60, Deadline.after(10.0))
            except StoreError as exc:
                assert "not stored" in str(exc)
                break
            time.sleep(0.01)
        else:
            pytest.fail("the lost write was never reported")
        # The breaker of a SessionCache over it opens on writes alone.
        cache = SessionCache(store, breaker_threshold=3, breaker_reset_s=60)
        for i in range(2000):
            cache.on_new(b"ctx", b"s%04d" % i, b"\x30" + b"x" * 100, 300)
            if cache.stats().breaker_state == "open":
                break
            time.sleep(0.002)
        stats = cache.stats()
        assert stats.breaker_state == "open", stats
        assert stats.store_errors >= 3, stats
        cache.close()
