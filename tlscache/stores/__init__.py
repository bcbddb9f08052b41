"""Session stores: where a :class:`~tlscache.SessionCache` keeps serialized sessions.

A store implements :class:`SessionStore` (store/fetch/delete with a
:class:`~tlscache.deadline.Deadline`, optional atomic take). Wrappers derive from
:class:`WrappingStore`. ``MAX_ID_LEN`` and ``MAX_VALUE_LEN`` are the longest id
and value every store must accept (distcache's limits). :func:`open_store` opens
any of them from one line (``memcached:h1:11211,h2:11211``, ``redis://h:6379``, ...).

The memcached and Redis stores are imported on first use, so that their client
libraries (the ``memcached`` and ``redis`` extras) are needed only by those who use them.
"""

from typing import TYPE_CHECKING, Any

from tlscache.stores.base import (
    MAX_ID_LEN,
    MAX_VALUE_LEN,
    ServerHealth,
    SessionStore,
    WrappingStore,
)
from tlscache.stores.distcache import DistcacheStore
from tlscache.stores.memory import MemoryStore
from tlscache.stores.near import NearCache
from tlscache.stores.spec import StoreSpec, open_store, parse_store_spec

if TYPE_CHECKING:
    from tlscache.stores.aio import AsyncDistcacheStore, AsyncMemoryStore, AsyncSessionStore
    from tlscache.stores.aio_redis import AsyncRedisStore
    from tlscache.stores.memcached import MemcachedStore
    from tlscache.stores.redis import RedisClusterStore, RedisStore

__all__ = [
    "MAX_ID_LEN",
    "MAX_VALUE_LEN",
    "AsyncDistcacheStore",
    "AsyncMemoryStore",
    "AsyncRedisStore",
    "AsyncSessionStore",
    "DistcacheStore",
    "MemcachedStore",
    "MemoryStore",
    "NearCache",
    "RedisClusterStore",
    "RedisStore",
    "ServerHealth",
    "SessionStore",
    "StoreSpec",
    "WrappingStore",
    "open_store",
    "parse_store_spec",
]

_LAZY = {
    "AsyncDistcacheStore": "tlscache.stores.aio",
    "AsyncMemoryStore": "tlscache.stores.aio",
    "AsyncRedisStore": "tlscache.stores.aio_redis",
    "AsyncSessionStore": "tlscache.stores.aio",
    "MemcachedStore": "tlscache.stores.memcached",
    "RedisStore": "tlscache.stores.redis",
    "RedisClusterStore": "tlscache.stores.redis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
