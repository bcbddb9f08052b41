"""A session store on a group of memcached servers, spoken to in the meta protocol.

Each session id lives on one server, chosen by a placement:

* ``rendezvous`` (default): pymemcache's ``RendezvousHash`` (murmur3, highest random
  weight) over the configured address strings, as pymemcache's ``HashClient`` places ``str``
  keys on the same ``host:port`` servers;
* ``ketama``: ``uhashring``'s ketama-compatible ring (libmemcached and friends);
* ``apache``: apr-util's ``crc32`` formula, ``servers[((crc32(key) >> 16) & 0x7fff or 1) % N]``
  in configuration order, as Apache's mod_socache_memcache places keys.

Dead servers. A server that fails a call (connect refused, timeout, reset, a reply that is
not memcached's) is marked down for ``retry_s`` (:class:`~tlscache.stores.health.DownPeriod`,
shared with the Redis stores): while down, its sessions are misses and writes to it are
skipped without touching the network. After ``retry_s`` the next call to it is the probe
(one at a time; the others still skip it); success puts it back. So a dead server costs one
bounded wait per retry period, not one per handshake. With ``rendezvous``
and ``ketama`` a dead server's keys do not move to another server: moving them would send
each host's lookups to a different place while the hosts' views of the dead server differ,
and a recovered server would then hold stale copies beside the moved ones; a miss costs a
full handshake, nothing more. With ``apache`` they do move to the next index, as Apache
does, so that a mixed farm of Apache and tlscache servers finds the same server.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast

from tlscache.deadline import Clock, Deadline
from tlscache.exceptions import ConfigurationError, StoreError, StoreTimeout
from tlscache.forksafe import repair_after_fork
from tlscache.memcache import protocol
from tlscache.memcache.connection import MemcacheConnection, ReplyLost
from tlscache.memcache.protocol import Reply, ReplyKind, ServerAddress

from .base import MAX_ID_LEN, MAX_VALUE_LEN, ServerHealth, SessionStore, WriteStatus
from .health import Admission, DownPeriod
from .options import RemoteOptions, WithRemoteOptions

__all__ = ["APACHE_KEY_PREFIX", "MemcachedStore", "Placement", "ServerStats", "apache_index"]

Placement = Literal["rendezvous", "ketama", "apache"]

#: The key prefix of Apache mod_ssl's session cache.
APACHE_KEY_PREFIX: Final = "mod_ssl-sess:"

T = TypeVar("T")


class ServerStats(NamedTuple):
    """What one server of the store has cost, for tests and status pages."""

    address: str
    calls: int  #: calls that went to the network (the probes of a down server included)
    skipped: int  #: calls answered without the network because the server was down
    errors: int  #: calls that failed and marked the server down


class _Skip(Exception):
    """The server is down: answer without the network (miss, skipped write)."""


class _ErrorReply(StoreError):
    """memcached answered ERROR, CLIENT_ERROR or SERVER_ERROR: it is alive, the call failed."""


def apache_index(key: bytes, servers: int) -> int:
    """The index apr-util's memcache client starts at for ``key`` among ``servers`` servers."""
    h = (zlib.crc32(key) >> 16) & 0x7FFF
    return (h or 1) % servers


class _Server:
    """One server: its idle connections (under ``lock``), its counts and its health."""

    __slots__ = ("address", "calls", "errors", "health", "idle", "lock", "skipped")

    def __init__(self, address: ServerAddress, health: DownPeriod) -> None:
        self.address = address
        self.lock = threading.Lock()
        self.idle: list[MemcacheConnection] = []
        self.health = health
        self.calls = self.skipped = self.errors = 0


class MemcachedStore(WithRemoteOptions, SessionStore):
    """Sessions on memcached servers; ``supports_take`` through compare-and-delete.

    ``servers`` are ``host:port``, ``[v6addr]:port`` or unix socket paths. A session id is
    stored under ``key_prefix`` + its lowercase hex; with ``key_prefix="mod_ssl-sess:"``
    and ``placement="apache"`` the keys, values (raw bytes, flags 0), TTLs and placement
    are Apache mod_ssl's. ``options`` (:class:`~tlscache.stores.options.RemoteOptions`)
    holds the key prefix, the connect timeout (within the call's deadline), the down period
    ``retry_s`` and ``pool_size``, the idle connections kept per server; the keywords of the
    same names replace its fields. ``clock`` (monotonic) times the down periods;
    ``wall_clock`` turns TTLs over 30 days into memcached's absolute times.
    """

    supports_take = True

    def __init__(
        self,
        servers: Sequence[str],
        *,
        placement: Placement = "rendezvous",
        options: RemoteOptions | None = None,
        key_prefix: str | None = None,
        connect_timeout_s: float | None = None,
        retry_s: float | None = None,
        pool_size: int | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        opts = (options or RemoteOptions()).merged(
            key_prefix=key_prefix,
            connect_timeout_s=connect_timeout_s,
            retry_s=retry_s,
            pool_size=pool_size,
        )
        if isinstance(servers, str) or not servers:
            raise ConfigurationError("servers must be a non-empty list of addresses")
        try:
            addresses = [protocol.parse_server(s) for s in servers]
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc
        if len({a.text for a in addresses}) != len(addresses):
            raise ConfigurationError("a server is listed twice")
        prefix = opts.key_prefix.encode("ascii", "replace")
        try:
            protocol.check_key(prefix + b"00" * MAX_ID_LEN)
        except ValueError as exc:
            raise ConfigurationError(f"key_prefix: {exc}") from exc
        self.placement: Placement = placement
        self.options = opts
        self._prefix = prefix
        self._clock = clock
        self._wall_clock = wall_clock
        self._servers = [_Server(a, DownPeriod(opts.retry_s, clock)) for a in addresses]
        self._by_text = {s.address.text: s for s in self._servers}
        self._ring = _ring(placement, [a.text for a in addresses])
        self._closed = False
        repair_after_fork(self)

    # ------------------------------------------------------------ the store contract

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        key = self._key(session_id)
        if not value or len(value) > MAX_VALUE_LEN:
            raise StoreError(f"session value length {len(value)} outside 1..{MAX_VALUE_LEN}")
        if ttl_s <= 0:
            return None  # already expired: nothing worth keeping
        expires = protocol.expiry(ttl_s, self._wall_clock())
        payload = protocol.set_request(key, bytes(value), expires)

        def op(conn: MemcacheConnection, dl: Deadline) -> WriteStatus:
            reply = _one(conn.request(payload, 1, dl))
            if reply.kind is not ReplyKind.HEADER:
                raise StoreError(f"memcached did not store: {reply.kind.value}")
            return WriteStatus.CONFIRMED

        try:
            return self._run(key, deadline, op)
        except _Skip:
            return WriteStatus.SENT  # no server answered: no verdict on the store's health

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        """``ms <key> <len> T<ttl> ME`` (add mode): ``HD`` added, ``NS`` already there."""
        key = self._key(session_id)
        if not value or len(value) > MAX_VALUE_LEN:
            raise StoreError(f"value length {len(value)} outside 1..{MAX_VALUE_LEN}")
        if ttl_s <= 0:
            raise StoreError("an added value needs a positive ttl")
        expires = protocol.expiry(ttl_s, self._wall_clock())
        payload = protocol.set_request(key, bytes(value), expires, add=True)

        def op(conn: MemcacheConnection, dl: Deadline) -> bool:
            reply = _one(conn.request(payload, 1, dl))
            if reply.kind is ReplyKind.HEADER:
                return True
            if reply.kind is ReplyKind.NOT_STORED:
                return False
            raise StoreError(f"unexpected memcached reply to ms add: {reply.kind.value}")

        try:
            return self._run(key, deadline, op)
        except _Skip:
            raise StoreError("no memcached server is available for this key") from None

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None  # such an id can never have been stored
        key = self._key(session_id)
        payload = protocol.get_request(key)

        def op(conn: MemcacheConnection, dl: Deadline) -> bytes | None:
            reply = _one(conn.request(payload, 1, dl))
            if reply.kind is ReplyKind.VALUE:
                return reply.value
            if reply.kind is ReplyKind.MISS:
                return None
            raise StoreError(f"unexpected memcached reply to mg: {reply.kind.value}")

        try:
            return self._run(key, deadline, op)
        except _Skip:
            return None

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return
        key = self._key(session_id)
        payload = protocol.delete_request(key)

        def op(conn: MemcacheConnection, dl: Deadline) -> None:
            reply = _one(conn.request(payload, 1, dl))
            if reply.kind not in (ReplyKind.HEADER, ReplyKind.NOT_FOUND):
                raise StoreError(f"unexpected memcached reply to md: {reply.kind.value}")

        try:
            self._run(key, deadline, op)
        except _Skip:
            return

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """``mg <key> v c`` then ``md <key> C<cas>``: only the caller whose delete
        answers ``HD`` gets the value; ``NF``/``EX`` mean another caller took it."""
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None
        key = self._key(session_id)
        get = protocol.get_request(key, cas=True)

        def op(conn: MemcacheConnection, dl: Deadline) -> bytes | None:
            reply = _one(conn.request(get, 1, dl))
            if reply.kind is ReplyKind.MISS:
                return None
            if reply.kind is not ReplyKind.VALUE or reply.cas is None:
                raise StoreError(f"unexpected memcached reply to mg: {reply.kind.value}")
            deleted = _one(conn.request(protocol.delete_request(key, cas=reply.cas), 1, dl))
            if deleted.kind is ReplyKind.HEADER:
                return reply.value
            if deleted.kind in (ReplyKind.NOT_FOUND, ReplyKind.EXISTS):
                return None
            raise StoreError(f"unexpected memcached reply to md: {deleted.kind.value}")

        try:
            return self._run(key, deadline, op)
        except _Skip:
            return None

    def servers(self) -> Sequence[ServerHealth]:
        return [s.health.snapshot(s.address.text) for s in self._servers]

    def server_for(self, session_id: bytes) -> str | None:
        server = self._place(self._key(session_id))
        return None if server is None else server.address.text

    def stats(self) -> Sequence[ServerStats]:
        """Per-server counts of network calls, skipped calls and failures."""
        out = []
        for s in self._servers:
            with s.lock:
                out.append(ServerStats(s.address.text, s.calls, s.skipped, s.errors))
        return out

    def close(self) -> None:
        self._closed = True
        for s in self._servers:
            with s.lock:
                idle, s.idle = s.idle, []
            for conn in idle:
                conn.close()

    # ------------------------------------------------------------ internals

    def _key(self, session_id: bytes) -> bytes:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            raise StoreError(f"session id length {len(session_id)} outside 1..{MAX_ID_LEN}")
        return self._prefix + session_id.hex().encode()

    def _place(self, key: bytes) -> _Server | None:
        """The server for ``key`` now (None: every candidate is down)."""
        if self._ring is not None:
            return self._by_text[self._ring(key.decode())]
        start, n = apache_index(key, len(self._servers)), len(self._servers)
        for i in range(n):
            server = self._servers[(start + i) % n]
            if server.health.available():
                return server
        return None

    def _run(
        self, key: bytes, deadline: Deadline, op: Callable[[MemcacheConnection, Deadline], T]
    ) -> T:
        if self._closed:
            raise StoreError("store is closed")
        if deadline.expired:
            raise StoreTimeout("memcached call started after its deadline")
        server = self._place(key)
        if server is None:
            raise _Skip
        conn, probe = self._acquire(server, deadline)
        try:
            try:
                result = op(conn, deadline)
            except ReplyLost:
                if not conn.used:
                    raise
                # A reused connection the server closed while idle: once more on a fresh one.
                conn.close()
                conn = MemcacheConnection.open(server.address, deadline, self.connect_timeout_s)
                result = op(conn, deadline)
        except _ErrorReply:
            conn.close()
            self._settle(server, ok=True)
            raise
        except StoreError:
            conn.close()
            self._settle(server, ok=False)
            raise
        except BaseException:
            conn.close()
            if probe:
                server.health.abandoned()
            raise
        self._settle(server, ok=True)
        self._checkin(server, conn)
        return result

    def _acquire(self, server: _Server, deadline: Deadline) -> tuple[MemcacheConnection, bool]:
        """A connection to ``server`` and whether this call is its probe; _Skip while down."""
        admission = server.health.admit()
        with server.lock:
            if admission is Admission.SKIP:
                server.skipped += 1
                raise _Skip
            server.calls += 1
            conn = server.idle.pop() if server.idle else None
        probe = admission is Admission.PROBE
        if conn is not None:
            return conn, probe
        try:
            return MemcacheConnection.open(server.address, deadline, self.connect_timeout_s), probe
        except StoreError:
            self._settle(server, ok=False)
            raise
        except BaseException:
            if probe:
                server.health.abandoned()
            raise

    def _settle(self, server: _Server, *, ok: bool) -> None:
        """Record a call's outcome: a failure marks the server down for ``retry_s``."""
        if ok:
            server.health.succeeded()
            return
        server.health.failed()
        with server.lock:
            server.errors += 1
            stale, server.idle = server.idle, []
        for conn in stale:
            conn.close()

    def _checkin(self, server: _Server, conn: MemcacheConnection) -> None:
        with server.lock:
            if not self._closed and len(server.idle) < self.pool_size:
                server.idle.append(conn)
                return
        conn.close()

    def _after_fork_in_child(self) -> None:
        """Forget the parent's sockets (its connections stay its own) and locks."""
        for s in self._servers:
            s.lock = threading.Lock()
            s.health.after_fork()
            idle, s.idle = s.idle, []
            for conn in idle:
                conn.close()


def _one(replies: list[Reply]) -> Reply:
    reply = replies[0]
    if reply.is_error:
        raise _ErrorReply(f"memcached answered {reply.kind.value}")
    return reply


def _murmur3() -> Callable[[str, int], int]:
    """murmur3_32 as pymemcache computes it: ``mmh3``'s C code when installed (the same
    numbers for ASCII text, about 100 times faster), else pymemcache's pure Python."""
    try:
        import mmh3
    except ImportError:
        from pymemcache.client.murmur3 import murmur3_32  # type: ignore[import-untyped]

        return cast(Callable[[str, int], int], murmur3_32)

    def murmur3(text: str, seed: int) -> int:
        return mmh3.hash(text, seed, signed=False)

    return murmur3


def _ring(placement: str, nodes: list[str]) -> Callable[[str], str] | None:
    """The key -> node function of a consistent placement (None for ``apache``)."""
    if placement == "apache":
        return None
    if placement == "rendezvous":
        try:
            from pymemcache.client.rendezvous import RendezvousHash  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ConfigurationError("placement 'rendezvous' needs pymemcache") from exc
        ring: Any = RendezvousHash(nodes=list(nodes), hash_function=_murmur3())
    elif placement == "ketama":
        try:
            from uhashring import HashRing  # type: ignore[import-untyped]
        except ImportError as exc:
            raise ConfigurationError("placement 'ketama' needs uhashring") from exc
        ring = HashRing(nodes=list(nodes), hash_fn="ketama")
    else:
        raise ConfigurationError("placement must be 'rendezvous', 'ketama' or 'apache'")

    def node(key: str) -> str:
        return str(ring.get_node(key))

    return node
