"""Session stores: where a :class:`~tlscache.SessionCache` keeps serialized sessions.

A store implements :class:`SessionStore` (store/fetch/delete with a
:class:`~tlscache.deadline.Deadline`, optional atomic take). Wrappers derive from
:class:`WrappingStore`. ``MAX_ID_LEN`` and ``MAX_VALUE_LEN`` are the longest id
and value every store must accept (distcache's limits).
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
