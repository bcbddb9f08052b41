"""``SessionStore.add``: add-if-absent on every real store (what shared ticket keys rely on)."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator

import pytest

from tests.memcache.servers import memcached_servers
from tests.procs import free_port, running, tool
from tests.redisutil import REDIS_SERVER, redis_server
from tlscache.deadline import Deadline
from tlscache.memcache import protocol
from tlscache.stores.base import SessionStore
from tlscache.stores.distcache import DistcacheStore
from tlscache.stores.memcached import MemcachedStore
from tlscache.stores.memory import MemoryStore
from tlscache.stores.near import NearCache
from tlscache.stores.redis import RedisStore

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def distcache() -> Iterator[SessionStore]:
    address = f"IP:127.0.0.1:{free_port()}"
    with (
        running(tool("dc_server", "-listen", address), ready=address),
        DistcacheStore(address) as store,
    ):
        yield store


@contextlib.contextmanager
def memcached() -> Iterator[SessionStore]:
    if shutil.which("memcached") is None:
        pytest.skip("memcached is not installed")
    with (
        memcached_servers(1) as servers,
        MemcachedStore([s.address for s in servers], key_prefix="a:") as store,
    ):
        yield store


@contextlib.contextmanager
def redis() -> Iterator[SessionStore]:
    if REDIS_SERVER is None or shutil.which(REDIS_SERVER) is None:
        pytest.skip("redis-server is not installed")
    with redis_server() as srv, RedisStore(srv.url) as store:
        yield store


@contextlib.contextmanager
def near() -> Iterator[SessionStore]:
    with distcache() as inner, NearCache(inner) as store:
        yield store


@contextlib.contextmanager
def memory() -> Iterator[SessionStore]:
    with MemoryStore() as store:
        yield store


MAKERS: dict[str, Callable[[], contextlib.AbstractContextManager[SessionStore]]] = {
    "distcache": distcache,
    "memcached": memcached,
    "redis": redis,
    "near+distcache": near,
    "memory": memory,
}


@pytest.mark.parametrize("kind", list(MAKERS))
def test_add_never_overwrites(kind: str) -> None:
    with MAKERS[kind]() as store:
        sid = time.monotonic_ns().to_bytes(8, "big") * 4
        first = store.add(sid, b"first", 60, Deadline.after(5))
        second = store.add(sid, b"second", 60, Deadline.after(5))
        value = store.fetch(sid, Deadline.after(5))
        assert (first, second, value) == (True, False, b"first")
        store.delete(sid, Deadline.after(5))
        third = store.add(sid, b"third", 60, Deadline.after(5))
        assert third and store.fetch(sid, Deadline.after(5)) == b"third"


def test_memcached_add_request_uses_add_mode() -> None:
    assert protocol.set_request(b"k", b"v", 5, add=True) == b"ms k 1 T5 ME\r\nv\r\n"
    assert protocol.set_request(b"k", b"v", 5) == b"ms k 1 T5\r\nv\r\n"
