"""OpenSSL's external session cache callbacks, wired to a Python handler.

This is the only module that touches cffi on the handshake path. The handler (the session
cache layer) sees plain bytes: a session id, the session's DER encoding and its lifetime.

Rules the glue enforces, each learnt the hard way:

* No exception ever reaches OpenSSL: a failing handler is a cache miss, logged (rate-limited)
  by type and source line only: an exception's message may hold session bytes.
* ``get`` returns a fresh ``d2i`` session with ``*copy = 0``: OpenSSL owns that reference.
* The cffi callback objects live as long as the ``Context``; when the ``Context`` dies the
  callbacks are first unregistered from the ``SSL_CTX``, which may outlive it (an ``SSL``
  switched to another context by SNI keeps the original as its session context).
* ``new`` returns 0: we keep no reference to the session.

pyOpenSSL's private ``Context._context`` / ``Connection._ssl`` cdata are used because the public
API offers no access to the ``SSL_CTX`` / ``SSL`` pointers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

from OpenSSL import SSL

from tlscache.exceptions import ConfigurationError, describe_error
from tlscache.openssl.resolver import Resolution, resolve

__all__ = [
    "DEFAULT_SESSION_ID_CONTEXT",
    "SessionCallbacks",
    "install_callbacks",
    "session_id",
]

log = logging.getLogger(__name__)

_SESS_CACHE_SERVER = 0x0002
_SESS_CACHE_NO_INTERNAL = 0x0300
_MAX_SID_CTX_LENGTH = 32  # SSL_MAX_SID_CTX_LENGTH
_ATTR = "_tlscache_session_callbacks"

#: The session id context set when none is given. It is a constant (plus the verify mode, so
#: that sessions made without client-certificate checks are not resumed where they are
#: required), hence identical on every server of a farm that runs the same configuration.
#: Servers of *different* services sharing one store must each pass their own value.
DEFAULT_SESSION_ID_CONTEXT = b"tlscache/session-id-context/v1"


class SessionCallbacks(Protocol):
    """What the cache layer provides; called on the handshaking thread, under the GIL."""

    def on_new(self, session_id: bytes, der: bytes, timeout_s: int) -> None: ...

    def on_get(self, session_id: bytes) -> bytes | None: ...

    def on_remove(self, session_id: bytes) -> None: ...


class _RateLimitedLog:
    """At most one log record per ``interval`` seconds per kind; counts what it drops."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, exc: BaseException | None = None) -> None:
        try:
            now = time.monotonic()
            if now < self._next.get(kind, 0.0):
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return
            self._next[kind] = now + self.interval
            dropped = self._dropped.pop(kind, 0)
            suffix = f" ({dropped} similar suppressed)" if dropped else ""
            log.warning("%s%s", msg, suffix, exc_info=exc)
        except Exception:  # logging must never break a handshake
            pass


_warn = _RateLimitedLog()


@dataclass
class _Installed:
    """One ``install_callbacks`` call: the handler and the cffi objects OpenSSL points to."""

    handler: SessionCallbacks
    new_cb: Any
    get_cb: Any
    remove_cb: Any


def _make_callbacks(res: Resolution, handler: SessionCallbacks) -> _Installed:
    """Build the three cffi callbacks for ``handler`` (closures keep the hot path lean)."""
    from OpenSSL._util import ffi, lib

    lib = getattr(lib, "_original_lib", lib)
    null = ffi.NULL
    new = ffi.new
    buffer = ffi.buffer
    from_buffer = ffi.from_buffer
    uint_p = ffi.typeof("unsigned int *")  # ctype objects: no string parsing per call
    uchar_a = ffi.typeof("unsigned char[]")
    uchar_pp = ffi.typeof("unsigned char **")
    get_id = res.get("SSL_SESSION_get_id")
    get_timeout = res.get("SSL_SESSION_get_timeout")
    i2d = res.get("i2d_SSL_SESSION")
    d2i = res.get("d2i_SSL_SESSION")
    session_free = lib.SSL_SESSION_free
    clear_errors = lib.ERR_clear_error
    on_new, on_get, on_remove = handler.on_new, handler.on_get, handler.on_remove

    def sid_of(sess: Any) -> bytes:
        length = new(uint_p)
        p = get_id(sess, length)
        return buffer(p, length[0])[:] if p != null else b""

    def new_cb(ssl: Any, sess: Any) -> int:
        try:
            sid = sid_of(sess)
            if not sid:
                return 0  # stateless ticket or no id: nothing to look up later
            size = i2d(sess, null)
            if size <= 0:
                clear_errors()
                _warn("i2d", "i2d_SSL_SESSION failed; session not stored")
                return 0
            buf = new(uchar_a, size)
            i2d(sess, new(uchar_pp, buf))
            on_new(sid, buffer(buf, size)[:], int(get_timeout(sess)))
        except Exception as e:
            _warn("new", f"session cache on_new failed: {describe_error(e)}")
        return 0

    def get_cb(ssl: Any, data: Any, length: int, copy: Any) -> Any:
        try:
            sid = buffer(data, length)[:]
            der = on_get(sid)
            if der is None:
                return null
            buf = from_buffer(uchar_a, der)  # no copy; ``der`` outlives the call
            sess = d2i(null, new(uchar_pp, buf), len(buf))
            if sess == null:
                clear_errors()  # a stale error would fail the next SSL_get_error
                _warn("d2i", f"stored session for {sid.hex()[:16]}... does not decode")
                return null
            if sid_of(sess) != sid:
                session_free(sess)
                _warn("mismatch", f"stored session for {sid.hex()[:16]}... has another id")
                return null
            copy[0] = 0
            return sess
        except Exception as e:
            _warn("get", f"session cache on_get failed: {describe_error(e)}")
            return null

    def remove_cb(ctx: Any, sess: Any) -> None:
        try:
            sid = sid_of(sess)
            if sid:
                on_remove(sid)
        except Exception as e:
            _warn("remove", f"session cache on_remove failed: {describe_error(e)}")

    def onerror(exc_type: Any, exc_value: Any, tb: Any) -> None:
        # Only reached if the handlers above fail outside their try (e.g. MemoryError).
        _warn("callback", f"session callback failed: {type(exc_value).__name__}")

    return _Installed(
        handler,
        ffi.callback("int (*)(SSL *, SSL_SESSION *)", new_cb, error=0, onerror=onerror),
        ffi.callback(
            "SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *)",
            get_cb,
            onerror=onerror,
        ),
        ffi.callback("void (*)(SSL_CTX *, SSL_SESSION *)", remove_cb, onerror=onerror),
    )


def _unregister(ctx_address: int, res: Resolution, keep: list[_Installed] | None) -> None:
    """Clear the callbacks from an ``SSL_CTX`` whose ``Context`` is going away.

    ``keep`` holds the callback objects when the Context could not (they die after this).
    """
    from OpenSSL._util import ffi

    ctx = ffi.cast("SSL_CTX *", ctx_address)
    res.get("SSL_CTX_sess_set_new_cb")(ctx, ffi.NULL)
    res.get("SSL_CTX_sess_set_get_cb")(ctx, ffi.NULL)
    res.get("SSL_CTX_sess_set_remove_cb")(ctx, ffi.NULL)


def _default_session_id_context(ctx: SSL.Context) -> bytes:
    mode = ctx.get_verify_mode()
    return hashlib.sha256(DEFAULT_SESSION_ID_CONTEXT + b"/verify=%d" % mode).digest()


_install_lock = threading.Lock()


def install_callbacks(
    ctx: SSL.Context,
    handler: SessionCallbacks,
    *,
    session_id_context: bytes | None = None,
    disable_internal_cache: bool = True,
    stateful_tls13_tickets: bool = True,
    num_tickets: int | None = None,
) -> None:
    """Make ``ctx`` keep its server sessions in ``handler`` (an external cache).

    ``session_id_context`` must be identical on every server sharing the store (OpenSSL only
    resumes sessions made under the same context, and silently caches nothing with client
    verification and no context). OpenSSL cannot report a context set earlier, so one is
    always set here: the given one, or a default derived from ``DEFAULT_SESSION_ID_CONTEXT``
    and the verify mode (call this after ``set_verify``; pass the value again if you used
    ``Context.set_session_id``). ``disable_internal_cache`` makes every resumption come from
    the handler. ``stateful_tls13_tickets`` sets ``OP_NO_TICKET``: TLS 1.3 tickets then carry
    ids looked up through the handler, TLS 1.2 resumes by session id. ``num_tickets`` sets
    how many TLS 1.3 tickets a handshake issues (OpenSSL's default is 2).

    Raises ``ResolverError`` if the OpenSSL functions cannot be verified, and
    ``ConfigurationError`` for bad arguments. Calling it again replaces the handler.
    """
    if not isinstance(ctx, SSL.Context):
        raise ConfigurationError("ctx must be an OpenSSL.SSL.Context")
    if getattr(ctx, "_used", False):  # pyOpenSSL freezes a Context once it made a Connection
        raise ConfigurationError("install_callbacks must run before ctx makes any Connection")
    for name in ("on_new", "on_get", "on_remove"):
        if not callable(getattr(handler, name, None)):
            raise ConfigurationError(f"handler has no callable {name}()")
    if session_id_context is None:
        session_id_context = _default_session_id_context(ctx)
    if not isinstance(session_id_context, bytes) or not (
        1 <= len(session_id_context) <= _MAX_SID_CTX_LENGTH
    ):
        raise ConfigurationError(f"session_id_context must be 1..{_MAX_SID_CTX_LENGTH} bytes")
    if num_tickets is not None and (
        isinstance(num_tickets, bool) or not isinstance(num_tickets, int) or num_tickets < 0
    ):
        raise ConfigurationError("num_tickets must be a non-negative int")

    res = resolve()
    set_new = res.get("SSL_CTX_sess_set_new_cb")
    set_get = res.get("SSL_CTX_sess_set_get_cb")
    set_remove = res.get("SSL_CTX_sess_set_remove_cb")
    set_num_tickets = res.get("SSL_CTX_set_num_tickets") if num_tickets is not None else None

    from OpenSSL._util import ffi

    installed = _make_callbacks(res, handler)
    raw = ctx._context
    with _install_lock:
        ctx.set_session_id(session_id_context)
        mode = _SESS_CACHE_SERVER | (_SESS_CACHE_NO_INTERNAL if disable_internal_cache else 0)
        ctx.set_session_cache_mode(mode)
        if stateful_tls13_tickets:
            ctx.set_options(SSL.OP_NO_TICKET)
        if set_num_tickets is not None and set_num_tickets(raw, num_tickets) != 1:
            raise ConfigurationError(f"SSL_CTX_set_num_tickets({num_tickets}) failed")

        # Keep every callback set ever installed alive with the Context (a handshake on
        # another thread may be inside an older one), and register the teardown once.
        keep: list[_Installed] | None = getattr(ctx, _ATTR, None)
        if keep is None:
            keep = []
            address = int(ffi.cast("uintptr_t", raw))
            try:
                setattr(ctx, _ATTR, keep)
                # The finalizer runs before the Context's attributes are cleared, so the
                # callbacks are still alive while they are unregistered.
                weakref.finalize(ctx, _unregister, address, res, None)
            except AttributeError:  # a Context without __dict__: the finalizer owns them
                weakref.finalize(ctx, _unregister, address, res, keep)
        keep.append(installed)
        set_new(raw, installed.new_cb)
        set_get(raw, installed.get_cb)
        set_remove(raw, installed.remove_cb)


def session_id(conn: SSL.Connection) -> bytes | None:
    """The id of ``conn``'s current session (``None`` without one); for tests and reports."""
    from OpenSSL._util import ffi, lib

    res = resolve()
    sess = lib.SSL_get1_session(conn._ssl)
    if sess == ffi.NULL:
        return None
    try:
        length = ffi.new("unsigned int *")
        p = res.get("SSL_SESSION_get_id")(sess, length)
        return bytes(ffi.buffer(p, length[0])) if p != ffi.NULL else b""
    finally:
        lib.SSL_SESSION_free(sess)
