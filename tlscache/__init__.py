"""tlscache: a shared TLS session cache for pyOpenSSL servers.

Typical use::

    store = tlscache.DistcacheStore("UNIX:/run/dc_client.sock")
    cache = tlscache.SessionCache(store, timeout=300)
    cache.install(ctx)  # an OpenSSL.SSL.Context
"""

from tlscache.deadline import Deadline
from tlscache.exceptions import (
    AddressError,
    ClientError,
    ClientTimeout,
    ConfigurationError,
    ProtocolError,
    ResolverError,
    SealError,
    ServerUnavailable,
    StoreError,
    StoreTimeout,
    TlsCacheError,
)
from tlscache.session_cache import BreakerState, CacheStats, SessionCache
from tlscache.stores import DistcacheStore, MemoryStore, SessionStore, WrappingStore

__version__ = "0.1.0"

__all__ = [
    "AddressError",
    "BreakerState",
    "CacheStats",
    "ClientError",
    "ClientTimeout",
    "ConfigurationError",
    "Deadline",
    "DistcacheStore",
    "MemoryStore",
    "ProtocolError",
    "ResolverError",
    "SealError",
    "ServerUnavailable",
    "SessionCache",
    "SessionStore",
    "StoreError",
    "StoreTimeout",
    "TlsCacheError",
    "WrappingStore",
    "__version__",
]
