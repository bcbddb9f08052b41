"""tlscache: a shared TLS session cache for pyOpenSSL servers.

Typical use (the key ring made once with ``tlscache-keys generate``)::

    store = tlscache.DistcacheStore("UNIX:/run/dc_client.sock")
    cache = tlscache.SessionCache(store, timeout=300, keys="/etc/tlscache/keys.json")
    cache.install(ctx)  # an OpenSSL.SSL.Context
"""

from tlscache.deadline import Deadline
from tlscache.exceptions import (
    AddressError,
    ClientError,
    ClientTimeout,
    ConfigurationError,
    KeyRingError,
    ProtocolError,
    ResolverError,
    SealError,
    ServerUnavailable,
    StoreError,
    StoreTimeout,
    TlsCacheError,
)
from tlscache.keyring import KeyRing, KeyRingFile
from tlscache.sealing import Sealer
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
    "KeyRing",
    "KeyRingError",
    "KeyRingFile",
    "MemoryStore",
    "ProtocolError",
    "ResolverError",
    "SealError",
    "Sealer",
    "ServerUnavailable",
    "SessionCache",
    "SessionStore",
    "StoreError",
    "StoreTimeout",
    "TlsCacheError",
    "WrappingStore",
    "__version__",
]
