"""Lookups of a Redis store's sessions on an event loop, over ``redis.asyncio``.

The async twin of :class:`~tlscache.stores.redis.RedisStore` for
:meth:`~tlscache.SessionCache.on_get_async`: the same keys (built by that store's own
:meth:`~tlscache.stores.redis.RedisStore.key` when made with :meth:`AsyncRedisStore.for_store`),
``GET``, ``DEL`` and ``GETDEL`` (Redis 6.2 or later) for the atomic take. The wire work and
the connection pool are redis-py's; each call is bounded by its deadline here
(``asyncio.timeout``), and redis-py's own retries are off, so one call is one attempt, as
on the blocking store. The blocking store's down periods are not repeated: a stalled server
costs each lookup its deadline, and the cache's circuit breaker stops the calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from tlscache.deadline import Deadline
from tlscache.exceptions import StoreError, StoreTimeout, describe_error
from tlscache.stores.aio import AsyncSessionStore
from tlscache.stores.base import MAX_ID_LEN
from tlscache.stores.options import RemoteOptions

if TYPE_CHECKING:
    from tlscache.stores.redis import RedisStore

__all__ = ["AsyncRedisStore"]


class AsyncRedisStore(AsyncSessionStore):
    """Sessions on one Redis server at ``url``, read on the running event loop.

    ``key_prefix`` must be the writing :class:`~tlscache.stores.redis.RedisStore`'s (by
    default the same default); :meth:`for_store` takes the URL and the keys from that
    store itself. At most ``max_connections`` connections per event loop; a client
    belongs to one loop, and a new loop gets a new one.
    """

    supports_take = True

    def __init__(
        self, url: str, *, key_prefix: str | None = None, max_connections: int = 8
    ) -> None:
        prefix = RemoteOptions().key_prefix if key_prefix is None else key_prefix
        self.url = url
        self.max_connections = max_connections
        encoded = prefix.encode()
        self._key: Callable[[bytes], bytes] = lambda sid: encoded + sid.hex().encode()
        self._client: Redis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_store(cls, store: RedisStore, *, max_connections: int = 8) -> AsyncRedisStore:
        """The async reader of what ``store`` writes: its URL, its keys."""
        reader = cls(store.url, max_connections=max_connections)
        reader._key = store.key
        return reader

    def key(self, session_id: bytes) -> bytes:
        """The Redis key of ``session_id`` (the writing store's)."""
        return self._key(session_id)

    def _current(self) -> Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = Redis.from_url(
                self.url, max_connections=self.max_connections, retry=Retry(NoBackoff(), 0)
            )
            self._loop = loop
        return self._client

    async def _call(self, op: str, deadline: Deadline, *args: Any) -> Any:
        client = self._current()
        left = deadline.remaining()
        if left <= 0.0:
            raise StoreTimeout(f"redis {op}: no time left")
        try:
            async with asyncio.timeout(left):
                return await client.execute_command(*args)  # type: ignore[no-untyped-call]
        except TimeoutError:
            raise StoreTimeout(f"redis {op} timed out") from None
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis {op} failed: {describe_error(exc)}") from exc

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None
        return _value(await self._call("get", deadline, "GET", self.key(session_id)))

    async def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None
        return _value(await self._call("getdel", deadline, "GETDEL", self.key(session_id)))

    async def delete(self, session_id: bytes, deadline: Deadline) -> None:
        if 0 < len(session_id) <= MAX_ID_LEN:
            await self._call("del", deadline, "DEL", self.key(session_id))

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()

    def __repr__(self) -> str:
        return f"<AsyncRedisStore {self.url}>"


def _value(reply: object) -> bytes | None:
    """A GET/GETDEL reply as bytes (anything else is b"", which the cache rejects)."""
    if reply is None or type(reply) is bytes:
        return reply
    return b""
