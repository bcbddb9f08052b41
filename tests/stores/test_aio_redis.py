"""AsyncRedisStore against a real redis-server: reads what RedisStore writes, takes with
GETDEL, times out against a stopped server, and serves SessionCache.on_get_async."""

from __future__ import annotations

import asyncio

import pytest

from tests.redisutil import REDIS_SERVER, redis_server
from tests.stores.aioutil import fetch_while_stopped, soon
from tlscache import SessionCache
from tlscache.exceptions import StoreTimeout
from tlscache.keyring import KeyRing
from tlscache.stores.aio_redis import AsyncRedisStore
from tlscache.stores.redis import RedisStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

SID = b"r" * 32
DER12 = bytes.fromhex("300702010102020303")


def test_reads_and_takes_what_the_blocking_store_wrote() -> None:
    with redis_server() as srv, RedisStore(srv.url, key_prefix="t:") as writer:
        writer.store(SID, b"value-1", 60, soon())
        writer.store(SID[:-1] + b"s", b"value-2", 60, soon())
        reader = AsyncRedisStore.for_store(writer)
        same_prefix = AsyncRedisStore(srv.url, key_prefix="t:")
        assert reader.key(SID) == same_prefix.key(SID) == writer.key(SID)

        async def main() -> list[object]:
            seen: list[object] = [await reader.fetch(SID, soon())]
            seen.append(await reader.take(SID, soon()))
            seen.append(await reader.fetch(SID, soon()))
            await reader.delete(SID[:-1] + b"s", soon())
            seen.append(writer.fetch(SID[:-1] + b"s", soon()))
            seen.append(await reader.fetch(b"", soon()))  # never stored: no round trip
            await reader.aclose()
            return seen

        assert asyncio.run(main()) == [b"value-1", b"value-1", None, None, None]


def test_a_stopped_server_times_out_at_the_deadline() -> None:
    with redis_server() as srv:
        store = AsyncRedisStore(srv.url)

        async def main() -> tuple[type[BaseException] | None, float]:
            await store.fetch(SID, soon())  # a warm connection
            return await fetch_while_stopped(store, srv.proc.pid, SID)

        error, took = asyncio.run(main())
        assert error is StoreTimeout and took < 15, (error, took)


def test_serves_the_cache_async_lookups_sealed_and_single_use() -> None:
    """Sealed values written by the blocking path, opened by the cache on the async one;
    with single use a TLS 1.3 lookup takes (GETDEL), a TLS 1.2 one reads."""
    keys = KeyRing.generate()
    with redis_server() as srv, RedisStore(srv.url) as store:
        cache = SessionCache(
            store, keys=keys, single_use=True, async_store=AsyncRedisStore.for_store(store)
        )
        cache.on_new(b"ctx", SID, DER12, 300)

        async def main() -> list[bytes | None]:
            return [
                await cache.on_get_async(b"ctx", SID, tls13=False),
                await cache.on_get_async(b"ctx", SID, tls13=False),
                await cache.on_get_async(b"ctx", SID, tls13=True),  # taken: a 1.2 session,
                await cache.on_get_async(b"ctx", SID, tls13=True),  # so it is put back
            ]

        assert asyncio.run(main()) == [DER12] * 4, cache.stats().as_dict()
        s = cache.stats()
        assert (s.hits, s.put_back, s.takes, s.sealed_refused) == (4, 2, 0, 0), s.as_dict()
