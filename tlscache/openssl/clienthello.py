"""Non-blocking session lookups: the ClientHello callback pauses the handshake instead.

OpenSSL asks for a stored session inside its get-session callback and waits for the answer,
so an event-loop server that looks the session up there stalls its whole loop for one store
round trip. OpenSSL's ClientHello callback runs earlier, before any session lookup, and may
answer "retry": the handshake then returns without blocking (``SSL_get_error`` =
``SSL_ERROR_WANT_CLIENT_HELLO_CB``; pyOpenSSL raises ``SSL.Error([])`` for it) and calls the
callback again on the next ``do_handshake()``. So:

1. The ClientHello callback reads the id OpenSSL will look up: a TLS 1.3 ``pre_shared_key``
   identity of a stateful ticket (32 bytes), or the TLS 1.2 session id. It starts the
   lookup and returns RETRY: with a cache that has an ``async_store``, as a task on the
   running event loop (``cache.on_get_async``: no thread at all); otherwise
   ``cache.on_get`` in a small thread pool (any shell: Twisted, a thread per loop).
2. The server's shell waits for the lookup without blocking (:meth:`NonblockingResumption.
   paused_lookup` gives the future) and calls ``do_handshake()`` again; the callback now
   returns SUCCESS.
3. OpenSSL calls the get-session callback; the answer prefetched for this connection is
   handed to the ordinary get path of :mod:`tlscache.openssl.callbacks` (which decodes and
   checks it). An id that was not prefetched is a miss: nothing on this path blocks.

A miss, a timeout or an open breaker is an empty answer: a full handshake, as always.

The lookup itself is the cache's own ``on_get`` or ``on_get_async``: its deadline, circuit
breaker, sealing, single-use take and counters apply unchanged, for every store.
This is hand-written because no binding exposes the ClientHello callback; the extension
parser is hand-written because it must refuse anything malformed without raising (the
ClientHello is attacker input) and is twenty lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

from OpenSSL import SSL

from tlscache.exceptions import ConfigurationError, describe_error
from tlscache.openssl.callbacks import (
    SessionCallbacks,
    connection_of,
    install_callbacks,
    installed_get_callback,
    keep_with_ssl_ctx,
    on_callback_error,
)
from tlscache.openssl.resolver import resolve

__all__ = [
    "PSK_EXTENSION",
    "SSL_ERROR_WANT_CLIENT_HELLO_CB",
    "STATEFUL_TICKET_ID_LEN",
    "Lookup",
    "NonblockingResumption",
    "NonblockingStats",
    "PausedLookup",
    "offers_tls13",
    "parse_psk_identities",
]

log = logging.getLogger(__name__)

#: ``SSL_get_error`` when the ClientHello callback asked to be called again.
SSL_ERROR_WANT_CLIENT_HELLO_CB = 11
_SSL_WANT_CLIENT_HELLO_CB = 7  # SSL_want() / SSL_CLIENT_HELLO_CB
_CLIENT_HELLO_SUCCESS = 1
_CLIENT_HELLO_RETRY = -1
#: TLS extension numbers (RFC 8446).
PSK_EXTENSION = 41
SUPPORTED_VERSIONS_EXTENSION = 43
#: A stateful TLS 1.3 ticket's identity is an OpenSSL session id (SSL_MAX_SSL_SESSION_ID_LENGTH).
STATEFUL_TICKET_ID_LEN = 32
_MAX_SESSION_ID_LEN = 32
_MAX_IDENTITIES = 16  # more than any client sends; bounds the parser's work
_TLS13 = 0x0304
_CTRL_GET_MAX_PROTO_VERSION = 131

#: Starts a lookup of (session id context, session id); the future gives the DER or None.
Lookup = Callable[[bytes, bytes], "concurrent.futures.Future[bytes | None]"]
#: What a paused handshake waits for: a thread pool's future, or a task on the event loop.
PausedLookup: TypeAlias = concurrent.futures.Future[bytes | None] | asyncio.Future[bytes | None]


class _Cache(Protocol):
    """What :class:`NonblockingResumption` needs of a :class:`~tlscache.SessionCache`."""

    stateful_tls13_tickets: bool
    num_tickets: int | None
    async_store: Any

    def install(self, ctx: SSL.Context) -> bytes: ...

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None: ...

    def on_get(self, context: bytes, session_id: bytes) -> bytes | None: ...

    async def on_get_async(
        self, context: bytes, session_id: bytes, tls13: bool | None = None
    ) -> bytes | None: ...

    def on_remove(self, context: bytes, session_id: bytes) -> None: ...

    def on_fatal_alert(self, context: bytes, session_ids: Any) -> None: ...


# --------------------------------------------------------------------------- parsing


def parse_psk_identities(body: bytes) -> tuple[bytes, ...] | None:
    """The identities of a ``pre_shared_key`` extension body (RFC 8446, 4.2.11), or None.

    ``u16 len; {u16 len, identity, u32 obfuscated_age}...; u16 len; {u8 len, binder}...``.
    Anything that does not parse exactly (short, overlong, empty lists, trailing bytes, more
    than 16 identities) is None; it never raises. Binders are checked for shape only.
    """
    n = len(body)
    if n < 2:
        return None
    ids_len = (body[0] << 8) | body[1]
    ids_end = 2 + ids_len
    if ids_len < 7 or ids_end + 2 > n:
        return None
    identities: list[bytes] = []
    pos = 2
    while pos < ids_end:
        if pos + 2 > ids_end or len(identities) >= _MAX_IDENTITIES:
            return None
        id_len = (body[pos] << 8) | body[pos + 1]
        pos += 2
        if id_len == 0 or pos + id_len + 4 > ids_end:
            return None
        identities.append(bytes(body[pos : pos + id_len]))
        pos += id_len + 4
    binders_len = (body[ids_end] << 8) | body[ids_end + 1]
    pos = ids_end + 2
    if binders_len < 33 or pos + binders_len != n:
        return None
    binders = 0
    while pos < n:
        b_len = body[pos]
        pos += 1
        if b_len < 32 or pos + b_len > n:
            return None
        pos += b_len
        binders += 1
    if binders != len(identities):
        return None
    return tuple(identities)


def offers_tls13(body: bytes) -> bool:
    """Whether a ``supported_versions`` ClientHello extension body lists TLS 1.3."""
    if len(body) < 3 or body[0] != len(body) - 1 or body[0] % 2:
        return False
    return any(v == _TLS13 for (v,) in struct.iter_unpack(">H", body[1:]))


# --------------------------------------------------------------------------- state


class NonblockingStats(NamedTuple):
    """Counts of the non-blocking path (the lookups themselves are the cache's counters)."""

    paused: int  #: handshakes paused for a lookup (the callback returned RETRY)
    started: int  #: lookups started
    answered: int  #: get callbacks answered from a prefetched lookup (hit or miss)
    not_prefetched: int  #: get callbacks for an id that was not prefetched: a miss
    nothing_offered: int  #: ClientHellos offering no id to look up
    malformed: int  #: ClientHellos whose pre_shared_key extension did not parse
    overloaded: int  #: lookups not started: too many in flight (a full handshake)
    on_loop: int = 0  #: of ``started``, tasks on the event loop (the rest: worker threads)
    no_loop: int = 0  #: lookups not started: loop mode, but no event loop running here


@dataclass
class _Counts:
    paused: int = 0
    started: int = 0
    answered: int = 0
    not_prefetched: int = 0
    nothing_offered: int = 0
    malformed: int = 0
    overloaded: int = 0
    on_loop: int = 0
    no_loop: int = 0


@dataclass
class _Prefetch:
    """One connection's lookup: the id, and the answer to come (None: nothing looked up)."""

    session_id: bytes
    future: concurrent.futures.Future[bytes | None] | asyncio.Future[bytes | None] | None


# A connection's lookup is an attribute of its Connection: it lives exactly as long (not
# keyed by the SSL* address, which is reused), and only the thread handshaking that
# connection sets it (a single dict store, atomic under the GIL: no lock).
_PREFETCH_ATTR = "_tlscache_prefetch"


def _prefetch_of(conn: SSL.Connection) -> _Prefetch | None:
    found: _Prefetch | None = conn.__dict__.get(_PREFETCH_ATTR)
    return found


# The prefetched answer for the get callback now running on this thread (see _Handler).
_answer = threading.local()


class _Handler:
    """The cache, with ``on_get`` answered from the prefetched lookup instead of the store."""

    def __init__(self, cache: _Cache) -> None:
        self.cache = cache

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        self.cache.on_new(context, session_id, der, timeout_s)

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        found: tuple[bytes, bytes] | None = getattr(_answer, "value", None)
        if found is None or found[0] != session_id:
            return None
        return found[1]

    def on_remove(self, context: bytes, session_id: bytes) -> None:
        self.cache.on_remove(context, session_id)

    def on_fatal_alert(self, context: bytes, session_ids: Any) -> None:
        self.cache.on_fatal_alert(context, session_ids)


class NonblockingResumption:
    """Session lookups that pause the handshake instead of blocking the thread.

    ``cache`` is a :class:`~tlscache.SessionCache`; :meth:`install` installs it on a Context
    (as ``cache.install`` does) plus the ClientHello callback. ``lookups`` says where the
    lookups run: ``"loop"``, as tasks of ``cache.on_get_async`` on the event loop running
    the handshake (needs the cache's ``async_store``; no threads); ``"threads"``,
    ``lookup``, by default ``cache.on_get`` on a pool of ``max_workers`` threads (any
    shell). By default ``"loop"`` when the cache has an ``async_store`` and no ``lookup``
    is given. At most ``max_pending`` lookups are in flight, and a ClientHello beyond that
    gets a full handshake (``overloaded``), as does one that finds no running loop in loop
    mode (``no_loop``).

    A server shell drives it: when ``do_handshake()`` raises ``SSL.Error``,
    :meth:`paused_lookup` says whether the handshake is only waiting for a lookup (and gives
    its future: a task on the loop, or a thread pool's future); call ``do_handshake()`` again
    once it is done.
    """

    def __init__(
        self,
        cache: _Cache,
        *,
        max_workers: int = 4,
        max_pending: int = 256,
        lookup: Lookup | None = None,
        lookups: Literal["threads", "loop"] | None = None,
    ) -> None:
        if max_workers < 1 or max_pending < 1:
            raise ConfigurationError("max_workers and max_pending must be at least 1")
        if lookups is None:
            has_async = getattr(cache, "async_store", None) is not None
            lookups = "loop" if has_async and lookup is None else "threads"
        if lookups == "loop":
            if lookup is not None:
                raise ConfigurationError("lookup= is for lookups on threads, not on the loop")
            if getattr(cache, "async_store", None) is None:
                raise ConfigurationError(
                    "lookups on the event loop need a SessionCache with an async_store"
                )
        elif lookups != "threads":
            raise ConfigurationError("lookups must be 'threads' or 'loop'")
        self.cache = cache
        self.max_pending = max_pending
        #: Where lookups run: ``"loop"`` or ``"threads"``.
        self.lookups: Literal["threads", "loop"] = lookups
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if lookup is None and lookups == "threads":
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers, thread_name_prefix="tlscache-lookup"
            )
            pool = self._pool

            def lookup(
                context: bytes, session_id: bytes
            ) -> concurrent.futures.Future[bytes | None]:
                return pool.submit(cache.on_get, context, session_id)

        self._lookup: Lookup | None = lookup
        self._lock = threading.Lock()
        self._counts = _Counts()
        self._in_flight = 0
        self._warned_no_loop = False
        self._want: Callable[[Any], int] = resolve().get("SSL_want")

    # ------------------------------------------------------------ setup

    def install(self, ctx: SSL.Context) -> bytes:
        """Install the cache on ``ctx`` with non-blocking lookups; the session id context.

        Same rules as ``SessionCache.install`` (before any Connection; sealing checks).
        Raises ``ResolverError`` if this OpenSSL lacks the ClientHello callback.
        """
        res = resolve()
        set_hello = res.get("SSL_CTX_set_client_hello_cb")
        get_sid = res.get("SSL_client_hello_get0_session_id")
        get_ext = res.get("SSL_client_hello_get0_ext")
        set_get = res.get("SSL_CTX_sess_set_get_cb")
        ssl_ctrl = res.get("SSL_ctrl")
        context = self.cache.install(ctx)
        handler: SessionCallbacks = _Handler(self.cache)
        install_callbacks(
            ctx,
            handler,
            session_id_context=context,
            stateful_tls13_tickets=self.cache.stateful_tls13_tickets,
            num_tickets=self.cache.num_tickets,
        )
        original_get = installed_get_callback(ctx)

        from OpenSSL._util import ffi, lib

        lib = getattr(lib, "_original_lib", lib)
        null, buffer = ffi.NULL, ffi.buffer
        uchar_pp, size_p = ffi.typeof("const unsigned char **"), ffi.typeof("size_t *")
        get_options = lib.SSL_get_options
        no_tls13 = lib.SSL_OP_NO_TLSv1_3

        def extension(ssl: Any, kind: int) -> bytes | None:
            out, outlen = ffi.new(uchar_pp), ffi.new(size_p)
            if get_ext(ssl, kind, out, outlen) != 1:
                return None
            return buffer(out[0], outlen[0])[:] if outlen[0] else b""

        def server_allows_tls13(ssl: Any) -> bool:
            if get_options(ssl) & no_tls13:
                return False
            top = int(ssl_ctrl(ssl, _CTRL_GET_MAX_PROTO_VERSION, 0, null))
            return top == 0 or top >= _TLS13

        def offered_id(ssl: Any) -> tuple[bytes, bool] | None:
            """The id OpenSSL will look up for this ClientHello, if any, and whether the
            handshake is TLS 1.3."""
            versions = extension(ssl, SUPPORTED_VERSIONS_EXTENSION)
            if versions is not None and offers_tls13(versions) and server_allows_tls13(ssl):
                # TLS 1.3: only a PSK identity is looked up, never the legacy session id.
                body = extension(ssl, PSK_EXTENSION)
                if body is None:
                    return None
                identities = parse_psk_identities(body)
                if identities is None:
                    self._count("malformed")
                    return None
                ticket = next((i for i in identities if len(i) == STATEFUL_TICKET_ID_LEN), None)
                return None if ticket is None else (ticket, True)
            out = ffi.new(uchar_pp)
            length = get_sid(ssl, out)
            if not 0 < length <= _MAX_SESSION_ID_LEN:
                return None
            return bytes(buffer(out[0], length)), False

        def hello_cb(ssl: Any, al: Any, arg: Any) -> int:
            try:
                conn = connection_of(ssl)
                if conn is None:
                    return _CLIENT_HELLO_SUCCESS
                known = _prefetch_of(conn)
                if known is not None:
                    future = known.future
                    if future is None or future.done():
                        return _CLIENT_HELLO_SUCCESS
                    return _CLIENT_HELLO_RETRY  # called again before the lookup finished
                offered = offered_id(ssl)
                if offered is None:
                    self._count("nothing_offered")
                    conn.__dict__[_PREFETCH_ATTR] = _Prefetch(b"", None)
                    return _CLIENT_HELLO_SUCCESS
                sid, tls13 = offered
                future = self._start(context, sid, tls13)
                conn.__dict__[_PREFETCH_ATTR] = _Prefetch(sid, future)
                if future is None or future.done():
                    return _CLIENT_HELLO_SUCCESS
                self._count("paused")
                return _CLIENT_HELLO_RETRY
            except Exception as e:
                log.warning("ClientHello callback failed: %s", describe_error(e))
                return _CLIENT_HELLO_SUCCESS  # a full handshake, never a failed one

        def get_cb(ssl: Any, data: Any, length: int, copy: Any) -> Any:
            try:
                sid = buffer(data, length)[:]
                conn = connection_of(ssl)
                known = _prefetch_of(conn) if conn is not None else None
                future = known.future if known is not None else None
                if known is None or known.session_id != sid or future is None or not future.done():
                    self._count("not_prefetched")
                    return null
                self._count("answered")
                try:
                    der = future.result()
                except (Exception, asyncio.CancelledError):
                    der = None
                if der is None:
                    return null
                _answer.value = (sid, der)
                try:
                    return original_get(ssl, data, length, copy)  # decode and check as usual
                finally:
                    _answer.value = None
            except Exception as e:
                log.warning("non-blocking get callback failed: %s", describe_error(e))
                return null

        hello = ffi.callback(
            "int (*)(SSL *, int *, void *)", hello_cb, error=1, onerror=on_callback_error
        )
        get = ffi.callback(
            "SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *)",
            get_cb,
            onerror=on_callback_error,
        )
        # Alive as long as the SSL_CTX, which may outlive the Context: OpenSSL never calls
        # a freed callback.
        keep_with_ssl_ctx(ctx, hello, get, original_get)
        set_get(ctx._context, get)
        set_hello(ctx._context, hello, null)
        return context

    # ------------------------------------------------------------ lookups

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self._counts, name, getattr(self._counts, name) + 1)

    def _start(self, context: bytes, session_id: bytes, tls13: bool) -> PausedLookup | None:
        loop: asyncio.AbstractEventLoop | None = None
        if self._lookup is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._count("no_loop")
                if not self._warned_no_loop:
                    self._warned_no_loop = True
                    log.warning(
                        "lookups on the event loop, but no asyncio loop runs this handshake: "
                        "full handshakes; pass lookups='threads' for this server"
                    )
                return None
        with self._lock:
            if self._in_flight >= self.max_pending:
                self._counts.overloaded += 1
                return None
            self._in_flight += 1
            self._counts.started += 1
            if loop is not None:
                self._counts.on_loop += 1
        future: PausedLookup
        try:
            if loop is None:
                assert self._lookup is not None
                future = self._lookup(context, session_id)
            else:
                # Called inside do_handshake() on the loop's thread: a task of that loop.
                future = loop.create_task(self.cache.on_get_async(context, session_id, tls13))
        except Exception:
            self._finished(None)
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future: object) -> None:
        with self._lock:
            self._in_flight -= 1

    def paused_lookup(self, conn: SSL.Connection) -> PausedLookup | None:
        """The lookup ``conn``'s handshake waits for, or None if it is not paused for one.

        Call it when ``do_handshake()`` raised ``SSL.Error``: None means a real error. In
        loop mode it is an ``asyncio.Task`` of the loop running the handshake (await it);
        otherwise a ``concurrent.futures.Future`` (``asyncio.wrap_future`` it). Either
        takes ``add_done_callback``; neither fails (a failed lookup is a miss).
        """
        if self._want(conn._ssl) != _SSL_WANT_CLIENT_HELLO_CB:
            return None
        known = _prefetch_of(conn)
        return None if known is None else known.future

    def stats(self) -> NonblockingStats:
        with self._lock:
            c = self._counts
            return NonblockingStats(
                c.paused,
                c.started,
                c.answered,
                c.not_prefetched,
                c.nothing_offered,
                c.malformed,
                c.overloaded,
                c.on_loop,
                c.no_loop,
            )

    def close(self) -> None:
        """Stop the lookup threads (lookups in flight finish first). Loop mode has none:
        its lookups are tasks of the loop, ended with it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
