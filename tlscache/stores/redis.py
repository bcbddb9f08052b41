"""Session stores on Redis: one server (:class:`RedisStore`) or a Redis Cluster
(:class:`RedisClusterStore`).

The wire work (RESP framing, AUTH, SELECT, TLS, unix sockets, URL parsing, the cluster's
key slot) is redis-py's. Two small parts are written here on purpose, because redis-py's
own ones cannot keep a handshake's time budget:

* the connection pool: ``BlockingConnectionPool`` waits a fixed time for a free
  connection and connects with a fixed timeout; here the wait, the connect, the send and
  the read of each call all spend from that call's :class:`~tlscache.deadline.Deadline`;
* the cluster's slot map: ``RedisCluster`` retries, follows redirections and reloads its
  topology on errors, with its own timeouts, so one dead master could cost several
  timeouts per handshake. Here the map is one ``CLUSTER SLOTS`` reply, reloaded at most
  once per down period, and a dead master costs one bounded timeout per period.

Each server has a *down period* (:class:`~tlscache.stores.health.DownPeriod`, shared with
the memcached store): after a failure (refused, reset, timed out) no call touches it for
``retry_s`` seconds. The one call that met the failure raises; during the
period the server's sessions are misses and writes to it are skipped (``WriteStatus.SENT``:
no verdict), as in the memcached store, so that one dead master of a cluster costs only its
own share and does not trip the ``SessionCache``'s breaker for the others. Then one call
probes it, the others keep being skipped until that probe answers. No redis-py retries.
"""

from __future__ import annotations

import contextlib
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast

from redis.connection import Connection, parse_url
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import MovedError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tlscache.deadline import Clock, Deadline
from tlscache.exceptions import ConfigurationError, StoreError, StoreTimeout, describe_error
from tlscache.forksafe import repair_after_fork

from .base import MAX_ID_LEN, ServerHealth, SessionStore, WriteStatus
from .health import Admission, DownPeriod
from .options import RemoteOptions, WithRemoteOptions

__all__ = ["APACHE_KEY_PREFIX", "RedisClusterStore", "RedisStore"]

#: The key prefix of Apache's mod_socache_redis (with mod_ssl): use it to share sessions.
APACHE_KEY_PREFIX: Final = "mod_ssl-sess:"
#: The longest expiry sent (ten years): ``PX`` needs a finite positive number.
_MAX_TTL_MS: Final = 10 * 365 * 86_400_000
#: GETDEL, which :meth:`SessionStore.take` needs, appeared in Redis 6.2.0.
_GETDEL_SINCE: Final = (6, 2)


class _Conn(Protocol):
    """The part of a redis-py connection this module uses."""

    _sock: socket.socket | None
    socket_timeout: float | None
    socket_connect_timeout: float | None

    def connect(self) -> None: ...
    def disconnect(self, *args: Any, **kwargs: Any) -> None: ...
    def send_command(self, *args: Any, **kwargs: Any) -> None: ...
    def read_response(self, disable_decoding: bool = False) -> Any: ...


def _connection_kwargs(url: str) -> dict[str, Any]:
    """redis-py's reading of a ``redis://``, ``rediss://`` or ``unix://`` URL, with our
    settings: no retries, no CLIENT SETINFO round trips, bytes in and out."""
    try:
        kwargs: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise ConfigurationError(f"not a Redis URL: {exc}") from exc
    kwargs.setdefault("connection_class", Connection)
    for name in ("socket_timeout", "socket_connect_timeout", "max_connections", "timeout"):
        kwargs.pop(name, None)  # every call sets its own from its deadline
    kwargs.update(retry=None, retry_on_timeout=False, driver_info=None, decode_responses=False)
    return kwargs


def _address_of(kwargs: dict[str, Any]) -> str:
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    host = str(kwargs.get("host", "localhost"))
    port = int(kwargs.get("port", 6379))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Skip(StoreError):
    """The server is in its down period: answer without the network (miss, skipped write)."""


class _Server:
    """One Redis server: a pool of at most ``pool_size`` connections and its health."""

    def __init__(self, kwargs: dict[str, Any], options: RemoteOptions, clock: Clock) -> None:
        self.kwargs = kwargs
        self.address = _address_of(kwargs)
        self.connect_timeout_s = options.connect_timeout_s
        self.pool_size = options.pool_size
        self.health = DownPeriod(options.retry_s, clock)
        self.attempts = 0  # calls that reached for the network
        self.version: tuple[int, ...] | None = None
        self.closed = False
        self._new_pool()
        repair_after_fork(self)

    def _new_pool(self) -> None:
        # None marks a slot for a connection not made yet (LIFO: warm ones first).
        self.idle: queue.LifoQueue[_Conn | None] = queue.LifoQueue(self.pool_size)
        for _ in range(self.pool_size):
            self.idle.put_nowait(None)

    def _after_fork_in_child(self) -> None:
        # The parent's sockets stay the parent's: forget them (never shut them down).
        self._new_pool()
        self.health.after_fork()

    def _acquire(self, deadline: Deadline) -> _Conn:
        try:
            conn = self.idle.get(timeout=deadline.socket_timeout())
        except queue.Empty:
            raise StoreTimeout(
                f"redis {self.address}: all {self.pool_size} connections busy until the deadline"
            ) from None
        if conn is None:
            conn = cast(_Conn, self.kwargs["connection_class"](**_without_class(self.kwargs)))
        return conn

    def _release(self, conn: _Conn) -> None:
        if self.closed:
            conn.disconnect()
        self.idle.put_nowait(conn)

    def call(self, op: str, deadline: Deadline, *args: Any) -> Any:
        """Send one command and read its reply, all within ``deadline``.

        Raises StoreTimeout / StoreError (never quoting what the server sent); a
        failure of the server (not an error reply) starts its down period.
        """
        if self.closed:
            raise StoreError("store is closed")
        if deadline.expired:
            raise StoreTimeout(f"redis {op}: deadline passed before the call")
        probe = self._admit()
        try:
            conn = self._acquire(deadline)
        except BaseException:
            if probe:
                self.health.abandoned()  # it never reached the server: no verdict
            raise
        try:
            self.attempts += 1
            timeout = deadline.socket_timeout()
            sock = conn._sock
            if sock is None:
                conn.socket_timeout = timeout
                conn.socket_connect_timeout = min(timeout, self.connect_timeout_s)
                conn.connect()
                timeout = deadline.socket_timeout()
                sock = conn._sock
            if sock is not None:
                sock.settimeout(timeout)
            conn.send_command(*args, check_health=False)
            if sock is not None:
                sock.settimeout(deadline.socket_timeout())
            reply = conn.read_response()
        except ResponseError:
            self.health.succeeded()  # an answer: the server is up
            raise
        except (TimeoutError, RedisTimeoutError) as exc:
            conn.disconnect()
            self.health.failed()
            raise StoreTimeout(
                f"redis {op} on {self.address} timed out: {describe_error(exc)}"
            ) from None
        except (RedisError, OSError) as exc:
            conn.disconnect()
            self.health.failed()
            raise StoreError(
                f"redis {op} on {self.address} failed: {describe_error(exc)}"
            ) from None
        except BaseException:
            if probe:
                self.health.abandoned()
            raise
        finally:
            self._release(conn)
        self.health.succeeded()
        return reply

    def _admit(self) -> bool:
        """Whether this call is the server's probe; raise _Skip at once while it is down."""
        admission = self.health.admit()
        if admission is Admission.SKIP:
            h = self.health.snapshot(self.address)
            raise _Skip(
                f"redis {self.address} is down (retry in {h.retry_in_s or 0.0:.1f} s, "
                f"{h.failures} failure(s))"
            )
        return admission is Admission.PROBE

    def check_getdel(self, deadline: Deadline) -> None:
        """Once per server: refuse clearly if it is older than Redis 6.2 (no GETDEL)."""
        if self.version is None:
            info = self.call("info", deadline, "INFO", "server")
            self.version = _parse_version(info)
        if self.version < _GETDEL_SINCE:
            found = ".".join(map(str, self.version)) or "unknown"
            raise StoreError(
                f"redis {self.address} runs version {found}: atomic take needs GETDEL "
                "(Redis 6.2 or later)"
            )

    def close(self) -> None:
        self.closed = True
        while True:
            try:
                conn = self.idle.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                conn.disconnect()


def _without_class(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "connection_class"}


def _parse_version(info: object) -> tuple[int, ...]:
    """``redis_version`` from an ``INFO server`` reply, as numbers (empty if absent)."""
    if not isinstance(info, bytes):
        return ()
    for line in info.splitlines():
        if line.startswith(b"redis_version:"):
            parts = line.split(b":", 1)[1].strip().split(b".")
            numbers: list[int] = []
            for part in parts:
                if not part.isdigit():
                    break
                numbers.append(int(part))
            return tuple(numbers)
    return ()


def _ttl_ms(ttl_s: float) -> int:
    """``PX`` milliseconds: at least 1 (Redis refuses 0 and negative expiries)."""
    if math.isnan(ttl_s):
        raise StoreError("session lifetime is not a number")
    if ttl_s * 1000.0 >= _MAX_TTL_MS:
        return _MAX_TTL_MS
    return max(1, math.ceil(ttl_s * 1000.0))


def _valid_id(session_id: bytes) -> bool:
    return 0 < len(session_id) <= MAX_ID_LEN


class _RedisBase(WithRemoteOptions, SessionStore):
    """store/fetch/delete/take as SET PX, GET, DEL, GETDEL on the server that owns the key."""

    supports_take = True

    def __init__(self, options: RemoteOptions, clock: Clock) -> None:
        if options.pool_size < 1:
            raise ConfigurationError("pool_size must be at least 1")
        if options.retry_s <= 0:
            raise ConfigurationError("retry_s must be positive")
        self.options = options
        self._prefix = options.key_prefix.encode()
        self._clock = clock

    def _server(self, kwargs: dict[str, Any]) -> _Server:
        return _Server(kwargs, self.options, self._clock)

    def key(self, session_id: bytes) -> bytes:
        """The Redis key of ``session_id``: the prefix and the id in lowercase hex."""
        return self._prefix + session_id.hex().encode()

    def _run(self, op: str, key: bytes, deadline: Deadline, *args: Any) -> Any:
        """Run one command about ``key`` on the server that owns it."""
        raise NotImplementedError

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus:
        if not _valid_id(session_id):
            raise StoreError(f"session id length {len(session_id)} outside 1..{MAX_ID_LEN}")
        if not value:
            raise StoreError("empty session value")
        key = self.key(session_id)
        try:
            self._run("set", key, deadline, "SET", key, bytes(value), "PX", _ttl_ms(ttl_s))
        except _Skip:
            return WriteStatus.SENT
        return WriteStatus.CONFIRMED

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        """``SET key val PX ms NX``: OK when added, nil when the key exists."""
        if not _valid_id(session_id):
            raise StoreError(f"session id length {len(session_id)} outside 1..{MAX_ID_LEN}")
        if not value:
            raise StoreError("empty value")
        key = self.key(session_id)
        try:
            reply = self._run(
                "set", key, deadline, "SET", key, bytes(value), "PX", _ttl_ms(ttl_s), "NX"
            )
        except _Skip:
            raise StoreError("redis: no server is available for this key") from None
        return reply is not None

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not _valid_id(session_id):
            return None
        key = self.key(session_id)
        try:
            return _value(self._run("get", key, deadline, "GET", key))
        except _Skip:
            return None

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        if _valid_id(session_id):
            key = self.key(session_id)
            with contextlib.suppress(_Skip):  # down: nothing to delete there now
                self._run("del", key, deadline, "DEL", key)

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not _valid_id(session_id):
            return None
        key = self.key(session_id)
        try:
            return _value(self._run("getdel", key, deadline, "GETDEL", key))
        except _Skip:
            return None

    @property
    def network_attempts(self) -> int:
        """Calls that reached for a server (not those refused during a down period)."""
        return sum(s.attempts for s in self._all_servers())

    def _all_servers(self) -> Sequence[_Server]:
        raise NotImplementedError

    def close(self) -> None:
        for server in self._all_servers():
            server.close()


def _value(reply: object) -> bytes | None:
    if reply is None or isinstance(reply, bytes):
        return reply
    raise StoreError(f"redis replied with {type(reply).__name__}, not a string")


def _reply_error(op: str, address: str, exc: ResponseError) -> StoreError:
    """An error reply as a StoreError: its kind (class, first word such as WRONGTYPE), never
    its text."""
    word = str(exc).split(" ", 1)[0]
    kind = word if word.isalpha() and word.isupper() and len(word) <= 20 else "error"
    return StoreError(f"redis {op} on {address}: {type(exc).__name__} {kind} reply")


class RedisStore(_RedisBase):
    """Sessions on one Redis server, reached at ``url``.

    ``url`` is ``redis://host:port[/db]``, ``rediss://host:port`` (TLS, redis-py's
    ``ssl_*`` query options) or ``unix:///path``; a user and password in the URL are
    sent with AUTH. Keys are ``key_prefix`` + the id in lowercase hex: with
    :data:`APACHE_KEY_PREFIX` and unsealed values Apache's mod_socache_redis shares them.
    Writes are ``SET key value PX ms``; :meth:`take` is ``GETDEL`` (Redis 6.2 or later,
    checked at the first take).

    ``options`` (:class:`~tlscache.stores.options.RemoteOptions`; the keywords of the same
    names replace its fields) sets the key prefix, ``pool_size``, ``connect_timeout_s`` and
    ``retry_s``. Each call spends from its deadline: waiting for one of ``pool_size``
    connections, connecting (at most ``connect_timeout_s``), sending and reading. After a
    failure the server is left alone for ``retry_s`` seconds (its sessions are misses,
    writes are skipped), then probed by one call. ``clock`` is injectable so that tests
    move time.
    """

    def __init__(
        self,
        url: str,
        *,
        options: RemoteOptions | None = None,
        key_prefix: str | None = None,
        connect_timeout_s: float | None = None,
        pool_size: int | None = None,
        retry_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        opts = (options or RemoteOptions()).merged(
            key_prefix=key_prefix,
            connect_timeout_s=connect_timeout_s,
            pool_size=pool_size,
            retry_s=retry_s,
        )
        super().__init__(opts, clock)
        self.url = url
        self._one = self._server(_connection_kwargs(url))

    @property
    def address(self) -> str:
        return self._one.address

    def _run(self, op: str, key: bytes, deadline: Deadline, *args: Any) -> Any:
        server = self._one
        if op == "getdel":
            server.check_getdel(deadline)
        try:
            return server.call(op, deadline, *args)
        except ResponseError as exc:
            raise _reply_error(op, server.address, exc) from None

    def _all_servers(self) -> Sequence[_Server]:
        return (self._one,)

    def servers(self) -> Sequence[ServerHealth]:
        return (self._one.health.snapshot(self._one.address),)

    def server_for(self, session_id: bytes) -> str:
        return self._one.address


class RedisClusterStore(_RedisBase):
    """Sessions on a Redis Cluster; each key goes to the master that owns its slot.

    ``nodes`` are a few of the cluster's nodes (``host:port`` or ``redis://host:port``;
    a password or TLS of the first one applies to every node). The slot map is one
    ``CLUSTER SLOTS`` reply, read at the first call from the first node that answers, and
    read again (at most once per ``retry_s``) after a master fails or answers ``MOVED``.
    A ``MOVED`` reply also sends that one call to the named master, if time is left.
    Each master has its own pool and down period (see :class:`RedisStore`): a dead
    master costs the keys of its slots, not the others'. Replicas are not read.
    Keep ``cluster-require-full-coverage no`` on the servers so that the live masters
    keep answering once the cluster has marked a master as failed.
    """

    def __init__(
        self,
        nodes: Sequence[str],
        *,
        options: RemoteOptions | None = None,
        key_prefix: str | None = None,
        connect_timeout_s: float | None = None,
        pool_size: int | None = None,
        retry_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        opts = (options or RemoteOptions()).merged(
            key_prefix=key_prefix,
            connect_timeout_s=connect_timeout_s,
            pool_size=pool_size,
            retry_s=retry_s,
        )
        super().__init__(opts, clock)
        if not nodes:
            raise ConfigurationError("a Redis Cluster needs at least one node")
        seeds = [_connection_kwargs(n if "://" in n else f"redis://{n}") for n in nodes]
        self._template = {k: v for k, v in seeds[0].items() if k not in ("host", "port")}
        self._lock = threading.Lock()
        self._servers: dict[str, _Server] = {}
        self._seeds = [self._node(kw) for kw in seeds]
        self._slots: list[_Server | None] | None = None
        self._masters: tuple[_Server, ...] = ()
        self._stale = False  # a master failed or a slot moved since the map was read
        self._next_reload = 0.0  # the map is not read again before this time
        repair_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def _node(self, kwargs: dict[str, Any]) -> _Server:
        address = _address_of(kwargs)
        with self._lock:
            server = self._servers.get(address)
            if server is None:
                server = self._servers[address] = self._server(kwargs)
            return server

    def _node_at(self, host: str, port: int) -> _Server:
        return self._node({**self._template, "host": host, "port": port})

    def _load_slots(self, deadline: Deadline) -> list[_Server | None]:
        """Read the slot map from the first known node that answers."""
        known = dict.fromkeys([*self._masters, *self._seeds])
        candidates = sorted(known, key=lambda n: n.health.failures)  # healthy ones first
        last: StoreError | None = None
        for node in candidates:
            try:
                reply = node.call("cluster slots", deadline, "CLUSTER", "SLOTS")
            except ResponseError as exc:
                last = _reply_error("cluster slots", node.address, exc)
                continue
            except StoreTimeout:
                raise  # the call's budget is spent
            except StoreError as exc:
                last = exc
                continue
            slots = self._parse_slots(reply, node)
            if slots is not None:
                return slots
            last = StoreError(f"redis {node.address}: unusable CLUSTER SLOTS reply")
        raise last or StoreError("no cluster node to ask for the slot map")

    def _parse_slots(self, reply: object, asked: _Server) -> list[_Server | None] | None:
        if not isinstance(reply, list):
            return None
        table: list[_Server | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        masters: dict[str, _Server] = {}
        for entry in reply:
            try:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode("ascii") if master[0] else asked.kwargs.get("host")
                port = int(master[1])
            except (TypeError, ValueError, IndexError, UnicodeDecodeError, AttributeError):
                return None
            if not 0 <= start <= end < REDIS_CLUSTER_HASH_SLOTS or not host:
                return None
            node = self._node_at(str(host), port)
            masters[node.address] = node
            table[start : end + 1] = [node] * (end - start + 1)
        self._masters = tuple(masters.values())
        return table  # an uncovered slot is refused at its first use, as the cluster does

    def _map(self, deadline: Deadline) -> list[_Server | None]:
        """The slot map; read again if it may be stale, at most once per ``retry_s``."""
        slots = self._slots
        if slots is not None and not (self._stale and self._clock() >= self._next_reload):
            return slots
        self._stale = False
        self._next_reload = self._clock() + self.retry_s
        try:
            fresh = self._load_slots(deadline)
        except StoreError:
            if slots is None:
                raise
            return slots  # keep the old map; the masters' own down periods still apply
        self._slots = fresh
        return fresh

    def _run(self, op: str, key: bytes, deadline: Deadline, *args: Any) -> Any:
        slot = key_slot(key)
        server = self._map(deadline)[slot]
        if server is None:
            raise StoreError(f"redis cluster: no master serves slot {slot}")
        for _ in range(2):  # the second time only after MOVED
            if op == "getdel":
                server.check_getdel(deadline)
            try:
                return server.call(op, deadline, *args)
            except ResponseError as exc:
                moved = _moved_to(exc)
                if moved is None:
                    raise _reply_error(op, server.address, exc) from None
                self._stale = True
                server = self._node_at(*moved)
                slots = self._slots
                if slots is not None:
                    slots[slot] = server
            except StoreError:
                self._stale = True  # a failover may have moved its slots
                raise
        raise StoreError(f"redis cluster: slot {slot} moved twice in one call")

    def _all_servers(self) -> Sequence[_Server]:
        with self._lock:
            return tuple(self._servers.values())

    def servers(self) -> Sequence[ServerHealth]:
        """Each master of the slot map (the given nodes until the map is read)."""
        nodes = self._masters or tuple(dict.fromkeys(self._seeds))
        return tuple(n.health.snapshot(n.address) for n in nodes)

    def server_for(self, session_id: bytes) -> str | None:
        """The master that owns the slot of ``session_id``'s key (None before the map is read)."""
        slots = self._slots
        if slots is None:
            return None
        server = slots[key_slot(self.key(session_id))]
        return None if server is None else server.address


def _moved_to(exc: ResponseError) -> tuple[str, int] | None:
    """``(host, port)`` of a ``MOVED slot host:port`` reply, else None (ASK included:
    a slot being migrated is a failed call, not followed)."""
    if not isinstance(exc, MovedError):
        return None
    host, port = exc.node_addr
    return str(host).strip("[]"), int(port)
