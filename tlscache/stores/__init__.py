"""Session stores: where a :class:`~tlscache.SessionCache` keeps serialized sessions.

A store implements :class:`SessionStore` (store/fetch/delete with a deadline,
optional atomic take). Wrappers derive from :class:`WrappingStore`.
"""

from tlscache.stores.base import MAX_ID_LEN, MAX_VALUE_LEN, SessionStore, WrappingStore
from tlscache.stores.distcache import DistcacheStore
from tlscache.stores.memory import MemoryStore

__all__ = [
    "MAX_ID_LEN",
    "MAX_VALUE_LEN",
    "DistcacheStore",
    "MemoryStore",
    "SessionStore",
    "WrappingStore",
]
