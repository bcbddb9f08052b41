"""Sharing sessions with Apache httpd (mod_ssl with ``SSLSessionCache memcache:`` or ``redis:``).

A tlscache server and an Apache server resume each other's sessions only if both write
exactly what mod_ssl writes, where mod_ssl reads it:

* the key is ``mod_ssl-sess:`` + the lowercase hex of the session id (TLS 1.3: of the
  stateful ticket id), placed on one of several memcached servers by apr-util's crc32 rule;
* the value is the raw ``i2d_SSL_SESSION`` DER, with no header: **unsealed**. Whoever can read
  memcached or Redis reads every session's master secret and can decrypt recorded traffic;
  whoever can write it can plant sessions. This mode exists for mixed farms that cannot
  avoid it; a farm of tlscache servers alone should seal (``SessionCache(keys=...)``);
* the entry lives ``SSLSessionCacheTimeout`` seconds (default 300);
* the session id context is mod_ssl's: the 32 ASCII bytes of the lowercase hex MD5 of
  ``"<ServerName>:<port>"`` (:func:`apache_session_id_context`); a session stored under
  another context is a silent miss on both sides;
* session tickets are off (``SSLSessionTickets off`` there, ``SSL_OP_NO_TICKET`` here), so that
  TLS 1.2 resumes by session id and TLS 1.3 issues stateful tickets that are looked up in the
  shared cache rather than encrypted with a key the other server does not have.

:class:`ApacheCompat` holds those settings, read from the two mod_ssl directives a
farm shares (:meth:`ApacheCompat.from_directives`), opens the store with Apache's key and
placement, and installs a :class:`~tlscache.SessionCache` that stores unsealed (see
``docs/apache.md``). The memcached and Redis stores are imported only when used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from tlscache.exceptions import ConfigurationError

if TYPE_CHECKING:
    from OpenSSL import SSL

    from tlscache.session_cache import SessionCache
    from tlscache.stores.base import SessionStore

__all__ = [
    "APACHE_DEFAULT_TIMEOUT",
    "APACHE_KEY_PREFIX",
    "ApacheCompat",
    "ApacheSessionCache",
    "CacheServers",
    "apache_key",
    "apache_session_id_context",
    "parse_session_cache",
]

#: What mod_ssl puts before the hex session id in memcached and Redis keys.
APACHE_KEY_PREFIX: Final = "mod_ssl-sess:"
#: ``SSLSessionCacheTimeout``'s default, seconds.
APACHE_DEFAULT_TIMEOUT: Final = 300
#: The port mod_ssl puts in the session id context when ``ServerName`` has none.
_DEFAULT_HTTPS_PORT: Final = 443
_DEFAULT_HTTP_PORT: Final = 80
#: Port used for a ``host`` of ``SSLSessionCache`` without one (apr-util's defaults).
_DEFAULT_CACHE_PORTS: Final = {"memcache": 11211, "redis": 6379}

CacheKind = Literal["memcache", "redis"]


def apache_session_id_context(server_name: str, port: int, *, ssl_engine: bool = True) -> bytes:
    """mod_ssl's session id context for a virtual host: ``md5hex("<ServerName>:<port>")``.

    ``server_name`` is the ``ServerName`` host exactly as configured (mod_ssl does not
    lower-case it); ``port`` the port of ``ServerName host:port``, or 0 when it names none: then
    mod_ssl uses 443 (80 if ``SSLEngine`` is off for the host), whatever port it listens on.
    """
    if not server_name or any(c.isspace() for c in server_name):
        raise ConfigurationError(f"not a ServerName host: {server_name!r}")
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"port must be 0..65535, not {port}")
    if port == 0:
        port = _DEFAULT_HTTPS_PORT if ssl_engine else _DEFAULT_HTTP_PORT
    return hashlib.md5(f"{server_name}:{port}".encode(), usedforsecurity=False).hexdigest().encode()


def apache_key(session_id: bytes) -> str:
    """The memcached/Redis key under which mod_ssl keeps ``session_id`` (for tests and tools)."""
    return APACHE_KEY_PREFIX + session_id.hex()


@dataclass(frozen=True, slots=True)
class CacheServers:
    """The argument of ``SSLSessionCache memcache:...`` or ``redis:...``, parsed."""

    kind: CacheKind
    servers: tuple[tuple[str, int], ...]  #: in configuration order (placement depends on it)

    @property
    def addresses(self) -> tuple[str, ...]:
        """``host:port`` per server (IPv6 hosts in brackets), in configuration order."""
        return tuple(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.servers)

    @property
    def directive(self) -> str:
        """The ``SSLSessionCache`` argument that names these servers."""
        return f"{self.kind}:{','.join(self.addresses)}"


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"bad server address {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ConfigurationError(f"IPv6 address without brackets: {text!r}")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigurationError(f"bad server address {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ConfigurationError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_session_cache(value: str) -> CacheServers:
    """``memcache:h1:11211,h2:11211`` or ``redis:h:6379`` (mod_ssl's syntax) as a record."""
    kind, sep, rest = value.strip().partition(":")
    if not sep or kind not in _DEFAULT_CACHE_PORTS:
        raise ConfigurationError(
            f"SSLSessionCache {value!r}: only memcache:HOST:PORT,... and redis:HOST:PORT,... "
            "are shared caches tlscache can reach"
        )
    parts = [p.strip() for p in rest.split(",")]
    if not parts or not all(parts):
        raise ConfigurationError(f"SSLSessionCache {value!r}: empty server list or entry")
    default = _DEFAULT_CACHE_PORTS[kind]
    servers = tuple(_split_host_port(p, default) for p in parts)
    return CacheServers(kind, servers)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ApacheCompat:
    """The mod_ssl settings a tlscache server must share with the Apache servers of its farm.

    ``server_name`` and ``port`` are Apache's ``ServerName host:port`` (``port`` 0: no port
    given, so 443); ``session_cache`` its ``SSLSessionCache`` argument; ``timeout`` its
    ``SSLSessionCacheTimeout``. Every server must list the cache servers in the same order.
    """

    server_name: str
    port: int
    session_cache: str
    timeout: int = APACHE_DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        apache_session_id_context(self.server_name, self.port)  # checks both
        parse_session_cache(self.session_cache)
        if not 1 <= self.timeout <= 30 * 24 * 3600:
            # memcached reads a TTL above 30 days as an absolute time: the entry would
            # vanish at once, for Apache and for us.
            raise ConfigurationError("SSLSessionCacheTimeout must be 1 s .. 30 days")

    @classmethod
    def from_directives(
        cls,
        server_name: str,
        ssl_session_cache: str,
        ssl_session_cache_timeout: int = APACHE_DEFAULT_TIMEOUT,
    ) -> ApacheCompat:
        """From the directives' text: ``ServerName`` (``host`` or ``host:port``) and
        ``SSLSessionCache``, ``SSLSessionCacheTimeout``."""
        host, port = _split_host_port(server_name.strip(), 0)
        return cls(host, port, ssl_session_cache, ssl_session_cache_timeout)

    @property
    def servers(self) -> CacheServers:
        return parse_session_cache(self.session_cache)

    @property
    def session_id_context(self) -> bytes:
        return apache_session_id_context(self.server_name, self.port)

    def open_store(self, **options: Any) -> SessionStore:
        """A store over Apache's cache servers, with mod_ssl's key prefix and placement.

        ``options`` go to the store's constructor (timeouts and the like).
        """
        servers = self.servers
        if servers.kind == "memcache":
            from tlscache.stores.memcached import MemcachedStore

            return MemcachedStore(
                list(servers.addresses),
                placement="apache",
                key_prefix=APACHE_KEY_PREFIX,
                **options,
            )
        if len(servers.servers) != 1:
            raise ConfigurationError(
                "SSLSessionCache redis: with several servers places keys by apr-util's crc32 "
                "rule, which the Redis store does not follow: use one Redis server"
            )
        from tlscache.stores.redis import RedisStore

        (address,) = servers.addresses
        return RedisStore(f"redis://{address}/0", key_prefix=APACHE_KEY_PREFIX, **options)

    def session_cache_for(self, store: SessionStore, **options: Any) -> ApacheSessionCache:
        """A SessionCache that stores as mod_ssl does: unsealed DER, Apache's TTL and session
        id context, stateful TLS 1.3 tickets. ``options``: the cache's other settings
        (deadlines, breaker, ``async_writes``)."""
        from tlscache.session_cache import SessionCache

        for fixed in ("keys", "insecure_unsealed_storage", "session_id_context", "timeout"):
            if fixed in options:
                raise ConfigurationError(f"{fixed} is set by the Apache-compatible mode")
        options.setdefault("stateful_tls13_tickets", True)
        if not options["stateful_tls13_tickets"]:
            raise ConfigurationError("Apache-compatible mode needs stateful TLS 1.3 tickets")
        cache: SessionCache = SessionCache(
            store,
            self.timeout,
            insecure_unsealed_storage=True,
            session_id_context=self.session_id_context,
            **options,
        )
        return ApacheSessionCache(self, cache)

    def install(self, ctx: SSL.Context, **options: Any) -> ApacheSessionCache:
        """Open the store, make the cache (:meth:`session_cache_for`) and install it on
        ``ctx``. The caller closes it (:meth:`ApacheSessionCache.close`)."""
        store = self.open_store()
        try:
            result = self.session_cache_for(store, **options)
            result.install(ctx)
        except BaseException:
            store.close()
            raise
        return result


@dataclass(frozen=True, slots=True)
class ApacheSessionCache:
    """A SessionCache configured by :class:`ApacheCompat`, with the settings it came from."""

    compat: ApacheCompat
    cache: SessionCache

    def install(self, ctx: SSL.Context) -> bytes:
        """Install the cache on ``ctx``; returns the session id context (mod_ssl's)."""
        context = self.cache.install(ctx)
        if context != self.compat.session_id_context:  # pragma: no cover - defensive
            raise ConfigurationError("the session id context set is not mod_ssl's")
        return context

    def close(self) -> None:
        """Finish queued writes, then close the store."""
        self.cache.close()
        self.cache.store.close()
