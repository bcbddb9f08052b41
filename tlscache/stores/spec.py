"""A session store in one line, as Apache's ``SSLSessionCache`` names its cache.

::

    memory:                                   in-process (one per process, not shared)
    distcache:UNIX:/run/dc_client.sock        a dc_client (or dc_server) at a distcache address
    distcache:IP:127.0.0.1:9000
    memcached:10.0.0.1:11211,10.0.0.2:11211   memcached servers (port 11211 if left out)
    memcached:sessions=10.0.0.1,[::1]:11211   the same, as a group named ``sessions``
    redis://10.0.0.1:6379/2                   one Redis server, database 2 (port 6379 if left out)
    rediss://cache.example:6380               the same over TLS
    redis-cluster://10.0.0.1:7000,10.0.0.2:7000   a Redis Cluster (its startup nodes)

Options follow a ``?``, URL-query style (``&`` between them, ``%XX`` escapes in values):
``prefix``, ``placement``, ``timeout_ms``, ``retry``, ``pool``, ``near``, ``near_ttl``; for
``memory:``, ``max``; for ``distcache:IP:...``, mutual TLS on the link with ``tls_cert``,
``tls_key``, ``tls_ca`` (all three or none) and ``tls_name``. :data:`OPTIONS` lists which kind
takes which. :func:`parse_store_spec` reads a string into a :class:`StoreSpec`, whose ``str()``
is the canonical string (parsing it again gives the same record); :func:`open_store` builds the
store. The memcached and Redis options are the fields of
:class:`~tlscache.stores.options.RemoteOptions`, which names each one's option here
(:data:`~tlscache.stores.options.SPEC_OPTIONS`).

Hand-written rather than ``urllib.parse.urlsplit``: memcached and cluster lists hold several
``host:port`` pairs, which a URL's netloc cannot, and every error must name the part at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Final, Literal, NamedTuple, cast, get_args
from urllib.parse import quote, unquote

from tlscache.distcache.address import connectable
from tlscache.exceptions import AddressError, ConfigurationError

from .base import SessionStore
from .options import SPEC_OPTIONS, RemoteOptions

__all__ = [
    "OPTIONS",
    "Placement",
    "StoreKind",
    "StoreOptions",
    "StoreSpec",
    "open_store",
    "parse_store_spec",
    "remote_options",
]

StoreKind = Literal["memory", "distcache", "memcached", "redis", "rediss", "redis-cluster"]
Placement = Literal["rendezvous", "ketama", "apache"]

DEFAULT_PORTS: Final = {"memcached": 11211, "redis": 6379, "rediss": 6379, "redis-cluster": 6379}

_NETWORK: Final = (*SPEC_OPTIONS, "near", "near_ttl")
#: Options whose values are text, and those that are whole numbers (the others are numbers).
_TEXT: Final = {"tls_cert", "tls_key", "tls_ca", "tls_name"} | {
    n for n, o in SPEC_OPTIONS.items() if o.kind == "text"
}
_INTEGER: Final = {"near", "max"} | {n for n, o in SPEC_OPTIONS.items() if o.kind == "integer"}
#: The options each kind of store takes.
OPTIONS: Final[dict[StoreKind, tuple[str, ...]]] = {
    "memory": ("max",),
    "distcache": ("pool", "near", "near_ttl", "tls_cert", "tls_key", "tls_ca", "tls_name"),
    "memcached": ("placement", *_NETWORK),
    "redis": _NETWORK,
    "rediss": _NETWORK,
    "redis-cluster": _NETWORK,
}

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9_.-]{1,253}")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]{2,45}(%[A-Za-z0-9_.-]+)?")


@dataclass(frozen=True)
class StoreOptions:
    """The options of a store string; None: not given (the store's own default)."""

    prefix: str | None = None  #: key prefix (``tlscache:``; Apache's is ``mod_ssl-sess:``)
    placement: Placement | None = None  #: memcached: which server holds a key
    timeout_ms: float | None = None  #: connect timeout, ms (calls are bound by deadlines)
    retry: float | None = None  #: seconds a failed server is skipped before it is tried again
    pool: int | None = None  #: connections kept per server
    near: int | None = None  #: entries of a :class:`~tlscache.stores.near.NearCache` in front
    near_ttl: float | None = None  #: seconds a near-cache entry is trusted
    max: int | None = None  #: ``memory:``: most entries kept
    db: int | None = None  #: ``redis://host/DB``: the database (written in the path, not after ?)
    tls_cert: str | None = None  #: distcache: this end's certificate for mutual TLS on the link
    tls_key: str | None = None  #: distcache: its private key
    tls_ca: str | None = None  #: distcache: the CA the server's certificate must chain to
    tls_name: str | None = None  #: distcache: the name expected in the server's certificate

    def query(self) -> str:
        """The options after ``?`` in canonical order (``db`` is not one of them)."""
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name == "db":
                continue
            text = _number_text(value) if isinstance(value, int | float) else str(value)
            parts.append(f"{f.name}={quote(text, safe=':-_.')}")
        return "&".join(parts)


class StoreSpec(NamedTuple):
    """A parsed store string. ``servers`` are ``host:port`` (``[v6]:port``), or the one
    distcache address; ``name`` labels a memcached group in logs and status pages."""

    kind: StoreKind
    servers: tuple[str, ...] = ()
    name: str | None = None
    options: StoreOptions = StoreOptions()

    def __str__(self) -> str:
        if self.kind == "memory":
            text = "memory:"
        elif self.kind == "distcache":
            text = f"distcache:{self.servers[0]}"
        elif self.kind == "memcached":
            label = f"{self.name}=" if self.name else ""
            text = f"memcached:{label}{','.join(self.servers)}"
        else:
            db = f"/{self.options.db}" if self.options.db is not None else ""
            text = f"{self.kind}://{','.join(self.servers)}{db}"
        query = self.options.query()
        return f"{text}?{query}" if query else text

    @property
    def label(self) -> str:
        """How logs and status pages name this store: the group name, else the string."""
        return self.name or str(self)


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _fail(text: str, part: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"store string {text!r}: {part}: {why}")


def _port(text: str, port: str, where: str) -> int:
    if not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _fail(text, where, f"port {port!r} is not a number 1..65535")
    return int(port)


def _server(text: str, item: str, default_port: int) -> str:
    """One ``host[:port]`` of a list, canonical: ``host:port`` or ``[v6]:port``."""
    where = f"server {item!r}"
    if not item:
        raise _fail(text, where, "empty (two commas, or a comma at an end?)")
    if item.startswith("["):
        host, bracket, tail = item[1:].partition("]")
        if not bracket or not _IPV6.fullmatch(host) or ":" not in host:
            raise _fail(text, where, "an IPv6 address goes in brackets: [::1]:11211")
        if tail and not tail.startswith(":"):
            raise _fail(text, where, "expected ':port' after ']'")
        port = _port(text, tail[1:], where) if tail else default_port
        return f"[{host}]:{port}"
    host, sep, port_text = item.rpartition(":")
    if not sep:
        host, port_text = item, ""
    if ":" in host:
        raise _fail(text, where, "an IPv6 address goes in brackets: [::1]:11211")
    if not _HOST.fullmatch(host):
        raise _fail(text, where, f"host {host!r} is not a host name or address")
    port = _port(text, port_text, where) if sep else default_port
    return f"{host}:{port}"


def _servers(text: str, body: str, kind: str, many: bool) -> tuple[str, ...]:
    if not body:
        raise _fail(text, kind, "no server given")
    items = body.split(",")
    if not many and len(items) > 1:
        raise _fail(text, kind, "takes one server (for several, use redis-cluster://)")
    servers = tuple(_server(text, item, DEFAULT_PORTS[kind]) for item in items)
    if len(set(servers)) != len(servers):
        raise _fail(text, kind, "a server is listed twice")
    return servers


def _positive(text: str, key: str, value: str, integer: bool) -> float:
    try:
        number = int(value) if integer else float(value)
    except ValueError:
        number = 0
    if not 0 < number < float("inf"):
        kind = "a whole number" if integer else "a number"
        raise _fail(text, f"option {key}={value!r}", f"must be {kind} above 0")
    return number


def _options(text: str, kind: StoreKind, query: str, db: int | None) -> StoreOptions:
    allowed = OPTIONS[kind]
    found: dict[str, object] = {"db": db}
    for item in query.split("&") if query else ():
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise _fail(text, f"option {item!r}", "expected name=value")
        if key not in allowed:
            known = ", ".join(allowed)
            raise _fail(text, f"option {key!r}", f"unknown for {kind} (it takes: {known})")
        if key in found:
            raise _fail(text, f"option {key!r}", "given twice")
        value = unquote(raw)
        if key == "placement":
            if value not in get_args(Placement):
                choices = ", ".join(get_args(Placement))
                raise _fail(text, f"option placement={value!r}", f"must be one of {choices}")
            found[key] = value
        elif key in _TEXT:
            if not value or any(c.isspace() or not c.isprintable() for c in value):
                raise _fail(text, f"option {key}", "must be printable, without spaces")
            found[key] = value
        elif key in _INTEGER:
            found[key] = int(_positive(text, key, value, integer=True))
        else:
            found[key] = _positive(text, key, value, integer=False)
    tls = [found.get(k) is not None for k in ("tls_cert", "tls_key", "tls_ca")]
    if any(tls) and not all(tls):
        raise _fail(text, "options tls_cert, tls_key, tls_ca", "go together: give all three")
    if found.get("tls_name") is not None and not all(tls):
        raise _fail(text, "option tls_name", "needs tls_cert, tls_key and tls_ca")
    return StoreOptions(**found)  # type: ignore[arg-type]


def parse_store_spec(text: str) -> StoreSpec:
    """Read a store string; raise :class:`ConfigurationError` naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError("store string is empty")
    if text != text.strip():
        raise _fail(text, "whitespace", "not allowed around the string")
    base, _, query = text.partition("?")
    if base in ("memory", "memory:"):
        return StoreSpec("memory", options=_options(text, "memory", query, None))
    scheme, sep, body = base.partition("://")
    if sep:
        if scheme not in ("redis", "rediss", "redis-cluster"):
            raise _fail(text, f"scheme {scheme!r}", "expected redis, rediss or redis-cluster")
        kind = cast(StoreKind, scheme)
        if "@" in body:
            raise _fail(text, "user or password", "not supported in a store string")
        hosts, slash, path = body.partition("/")
        db = None
        if slash:
            if kind == "redis-cluster":
                raise _fail(text, f"database /{path}", "a Redis Cluster has only database 0")
            if not path.isascii() or not path.isdigit() or int(path) > 15:
                raise _fail(text, f"database /{path}", "must be a number 0..15")
            db = int(path)
        servers = _servers(text, hosts, kind, many=kind == "redis-cluster")
        return StoreSpec(kind, servers, None, _options(text, kind, query, db))
    kind_text, colon, body = base.partition(":")
    if not colon or kind_text not in ("distcache", "memcached"):
        raise _fail(
            text,
            f"kind {kind_text!r}",
            "expected memory:, distcache:, memcached:, redis://, rediss:// or redis-cluster://",
        )
    if kind_text == "distcache":
        try:
            address = str(connectable(body))
        except AddressError as exc:
            raise _fail(text, f"distcache address {body!r}", str(exc)) from None
        return StoreSpec("distcache", (address,), None, _options(text, "distcache", query, None))
    name = None
    if "=" in body:
        name, _, body = body.partition("=")
        if not _NAME.fullmatch(name):
            raise _fail(text, f"group name {name!r}", "letters, digits, '_', '.', '-' (1..64)")
    servers = _servers(text, body, "memcached", many=True)
    return StoreSpec("memcached", servers, name, _options(text, "memcached", query, None))


def remote_options(options: StoreOptions) -> RemoteOptions:
    """The memcached and Redis stores' options from a store string's (defaults where absent)."""
    return RemoteOptions.from_spec({name: getattr(options, name) for name in SPEC_OPTIONS})


def open_store(spec: str | StoreSpec) -> SessionStore:
    """The store a string (or a parsed spec) names, with a near cache in front if ``near``.

    The memcached and Redis stores are imported here, so that their client libraries are
    needed only by those who use them.
    """
    if isinstance(spec, str):
        spec = parse_store_spec(spec)
    o = spec.options
    store: SessionStore
    if spec.kind == "memory":
        from .memory import MemoryStore

        return MemoryStore(o.max) if o.max is not None else MemoryStore()
    if spec.kind == "distcache":
        from .distcache import DistcacheStore

        tls = None
        if o.tls_cert is not None and o.tls_key is not None and o.tls_ca is not None:
            from tlscache.distcache.linktls import LinkTLS

            tls = LinkTLS(Path(o.tls_cert), Path(o.tls_key), Path(o.tls_ca), server_name=o.tls_name)
        if o.pool is None:
            store = DistcacheStore(spec.servers[0], tls=tls)
        else:
            store = DistcacheStore(spec.servers[0], pool_size=o.pool, tls=tls)
    elif spec.kind == "memcached":
        from .memcached import MemcachedStore

        placement = o.placement or "rendezvous"
        store = MemcachedStore(spec.servers, placement=placement, options=remote_options(o))
    elif spec.kind == "redis-cluster":
        from .redis import RedisClusterStore

        store = RedisClusterStore(spec.servers, options=remote_options(o))
    else:
        from .redis import RedisStore

        db = f"/{o.db}" if o.db is not None else ""
        store = RedisStore(f"{spec.kind}://{spec.servers[0]}{db}", options=remote_options(o))
    if o.near is None:
        return store
    from .near import NearCache

    if o.near_ttl is None:
        return NearCache(store, max_entries=o.near)
    return NearCache(store, max_entries=o.near, ttl_s=o.near_ttl)
