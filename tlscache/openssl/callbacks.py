"""OpenSSL's external session cache callbacks, wired to a Python handler.

This is the only module that touches cffi on the handshake path. The handler (the session
cache layer) sees plain bytes: the session id context the callbacks were installed with, a
session id, the session's DER encoding and its lifetime.

Rules the glue enforces, each learnt the hard way:

* No exception ever reaches OpenSSL: a failing handler is a cache miss, logged (rate-limited)
  by type and source line only: an exception's message may hold session bytes.
* ``get`` returns a fresh ``d2i`` session with ``*copy = 0``: OpenSSL owns that reference.
* The cffi callback objects live as long as the ``SSL_CTX``, not the Python ``Context``:
  an ``SSL`` switched to another context by SNI keeps the original as its session context
  (only that context's session callbacks ever run for it) and keeps its ``SSL_CTX`` alive
  after pyOpenSSL dropped the ``Context``. They are kept in a registry under the
  ``SSL_CTX``'s address (:mod:`tlscache.openssl.ctxlife`) and dropped when OpenSSL really
  frees the ``SSL_CTX``, after every ``SSL`` using it.
  A cache installed on a Context that connections are only switched to is reported (once)
  as never used.
* ``new`` returns 0: we keep no reference to the session.
* A fatal alert, sent or received, reports every session the connection used or was issued
  (``on_fatal_alert``): the store is untrusted, so a session whose connection failed must not
  be offered again. OpenSSL tells us through the remove callback, which it calls for a fatal
  alert with the alert's error on the thread's error queue; a remove without an error (an
  ``SSL`` freed without a clean shutdown, an expired session) or with the unexpected-EOF
  error (a connection closed without close_notify) is an ordinary ``on_remove``. No info
  callback is registered: OpenSSL calls one at every state change, some 16 times per
  handshake, and each call would enter Python.

pyOpenSSL's private ``Context._context`` / ``Connection._ssl`` cdata are used because the public
API offers no access to the ``SSL_CTX`` / ``SSL`` pointers, and ``Connection._reverse_mapping``
(the map pyOpenSSL's own callbacks use) to find the ``Connection`` of an ``SSL *``.
"""

from __future__ import annotations

import _thread
import functools
import hashlib
import logging
import signal
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi

from tlscache.exceptions import ConfigurationError, describe_error
from tlscache.lograte import RateLimitedLog
from tlscache.openssl.ctxlife import SslCtxRegistry
from tlscache.openssl.resolver import Resolution, resolve

__all__ = [
    "DEFAULT_SESSION_ID_CONTEXT",
    "SessionCallbacks",
    "connection_of",
    "default_session_id_context",
    "install_callbacks",
    "installed_get_callback",
    "keep_with_ssl_ctx",
    "on_callback_error",
    "session_id",
]

log = logging.getLogger(__name__)

_SESS_CACHE_SERVER = 0x0002
_SESS_CACHE_NO_INTERNAL = 0x0300
_MAX_SID_CTX_LENGTH = 32  # SSL_MAX_SID_CTX_LENGTH
_MAX_IDS_PER_CONNECTION = 16
_REDELIVERY_DELAY_S = 0.01

#: Version label of the default session id context, a sha256 over this label, the server
#: certificate (DER), the accepted client CA names (DER, sorted) and the verify mode. Servers
#: with the same certificate and trust settings get the same value (so a farm shares
#: sessions); services whose trust settings differ never do.
DEFAULT_SESSION_ID_CONTEXT = b"tlscache/session-id-context/v2"


#: ``SSL_version()`` of a TLS 1.3 connection.
_TLS1_3_VERSION: Final = 0x0304


class SessionCallbacks(Protocol):
    """What the cache layer provides; called on the handshaking thread, under the GIL.

    ``context`` is the session id context of the ``Context`` the callbacks were installed on
    (what ``install_callbacks`` returned), so that stored values can be bound to it.
    """

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None: ...

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        """``tls13``: whether the handshake asking is TLS 1.3 (None: not known)."""

    def on_remove(self, context: bytes, session_id: bytes) -> None: ...

    def on_fatal_alert(self, context: bytes, session_ids: Sequence[bytes]) -> None: ...


_warn = RateLimitedLog(logger=log)


# --------------------------------------------------------------------------- per connection


class _Record:
    """What one connection was given: the ids, and who to tell if it fails."""

    __slots__ = ("__weakref__", "context", "handler", "ids")

    def __init__(self, handler: SessionCallbacks, context: bytes, ids: list[bytes]) -> None:
        self.handler = handler
        self.context = context
        self.ids = ids


#: The attribute by which a Connection holds its ``_Record``: it goes when the connection
#: (and its SSL) is freed. Only the thread handshaking a connection touches it (its
#: callbacks run there), so no lock is needed; at most _MAX_IDS_PER_CONNECTION ids (the
#: newest) are kept.
_RECORD_ATTR = "_tlscache_record"

#: Session id -> the record of the connection that was issued or last resumed it. The remove
#: callback OpenSSL calls for a fatal alert names a session, not a connection: this finds the
#: other ids of that connection. Weak values: an entry lives exactly as long as its
#: connection (whose ``__dict__`` holds the record), so the index is bounded by the live
#: connections times _MAX_IDS_PER_CONNECTION and needs no cleaning. A TLS 1.2 session resumed
#: by several connections at once maps to the latest of them; its other ids, if any, are
#: then deleted too (erring towards deleting is safe: a miss costs a full handshake).
_by_sid: weakref.WeakValueDictionary[bytes, _Record] = weakref.WeakValueDictionary()
_index = _by_sid.__setitem__

# pyOpenSSL's map from ``SSL *`` to its Connection, a WeakValueDictionary made once with the
# class. Its dict of weak references is read directly: WeakValueDictionary.get is Python code,
# and this runs several times per handshake.
_reverse_mapping: Any = getattr(SSL.Connection, "_reverse_mapping", None)
_refs: dict[Any, Any] | None = (
    getattr(_reverse_mapping, "data", None)
    if isinstance(_reverse_mapping, weakref.WeakValueDictionary)
    else None
)
_refs_get: Callable[[Any], Any] | None = None if _refs is None else _refs.get


def _connection_of(ssl: Any) -> SSL.Connection | None:
    """The pyOpenSSL Connection of an ``SSL *`` (``None`` if pyOpenSSL did not make it)."""
    if _refs_get is not None:
        ref = _refs_get(ssl)
        return None if ref is None else ref()
    mapping = getattr(SSL.Connection, "_reverse_mapping", None)
    return None if mapping is None else mapping.get(ssl)


def _remember(
    ssl: Any, handler: SessionCallbacks, context: bytes, sid: bytes
) -> SSL.Connection | None:
    """Note that the connection of ``ssl`` was issued, or resumed, session ``sid``; return it."""
    conn = _connection_of(ssl)
    if conn is None:
        return None
    rec: _Record | None = conn.__dict__.get(_RECORD_ATTR)
    if rec is None:
        rec = conn.__dict__[_RECORD_ATTR] = _Record(handler, context, [sid])
        _index(sid, rec)
        return conn
    rec.handler = handler
    rec.context = context
    ids = rec.ids
    if sid not in ids:
        ids.append(sid)
        if len(ids) > _MAX_IDS_PER_CONNECTION:
            dropped = ids.pop(0)
            if _by_sid.get(dropped) is rec:
                del _by_sid[dropped]
    _index(sid, rec)
    return conn


def _take_ids(sid: bytes) -> list[bytes]:
    """``sid`` and every other id of the connection it was issued to or resumed by; those
    ids are forgotten (a failed connection is reported once)."""
    rec = _by_sid.get(sid)
    if rec is None:
        return [sid]
    ids, rec.ids = rec.ids, []
    for other in ids:
        if _by_sid.get(other) is rec:
            _by_sid.pop(other, None)
    if sid not in ids:
        ids.append(sid)
    return ids


class _Records:
    """A read-only view of every live connection's record (for tests and reports)."""

    def _live(self) -> list[SSL.Connection]:
        if _reverse_mapping is None:
            return []
        return [c for c in list(_reverse_mapping.values()) if _RECORD_ATTR in vars(c)]

    def __contains__(self, conn: object) -> bool:
        return _RECORD_ATTR in getattr(conn, "__dict__", {})

    def __getitem__(self, conn: SSL.Connection) -> _Record:
        rec: _Record | None = getattr(conn, "__dict__", {}).get(_RECORD_ATTR)
        if rec is None:
            raise KeyError(conn)
        return rec

    def __len__(self) -> int:
        return len(self._live())


_records = _Records()


# --------------------------------------------------------------------------- SNI switches

# Contexts switched to whose own session cache was reported unused (once each).
_warned_switch_targets: weakref.WeakSet[SSL.Context] = weakref.WeakSet()


def _check_switch(conn: SSL.Connection, owner: SSL.Context, handler: SessionCallbacks) -> None:
    """Warn (once per Context) when ``conn`` was switched to a Context whose own session
    cache is therefore never used: only ``owner``'s callbacks see this connection."""
    current = getattr(conn, "_context", None)
    if current is None or current is owner or current in _warned_switch_targets:
        return
    entry = _registry.get(current._context)
    installed = None if entry is None else entry.newest(_SESSION)
    if installed is None or installed.handler is handler:
        return
    _warned_switch_targets.add(current)
    log.warning(
        "a connection was switched (SNI, Connection.set_context) to a Context that has "
        "its own session cache installed; OpenSSL only ever calls the session callbacks "
        "of the Context a connection was made from, so that cache is never used for "
        "its sessions: install the same cache on the Context connections are made from"
    )


# --------------------------------------------------------------------------- callbacks


@dataclass
class _Installed:
    """One ``install_callbacks`` call: the handler and the cffi objects OpenSSL points to."""

    handler: SessionCallbacks
    context: bytes
    new_cb: Any
    get_cb: Any
    remove_cb: Any


class Natives(NamedTuple):
    """One FFI's OpenSSL functions that the session callbacks call (pyOpenSSL's, or the
    ``ssl`` module's library in ``stdlib.py``), so both get the same callback bodies."""

    ffi: Any
    get_id: Any  # SSL_SESSION_get_id
    get_timeout: Any  # SSL_SESSION_get_timeout
    i2d: Any  # i2d_SSL_SESSION
    d2i: Any  # d2i_SSL_SESSION
    session_free: Any  # SSL_SESSION_free
    clear_errors: Any  # ERR_clear_error
    #: ``ERR_peek_last_error``; without it every remove is an ordinary ``on_remove``.
    peek_error: Any = None
    #: Whether a packed error code is OpenSSL's "unexpected EOF while reading".
    is_eof: Callable[[int], bool] | None = None


def sid_reader(ffi: Any, get_id: Any) -> Callable[[Any], bytes]:
    """``sid_of(session)``: the id of an ``SSL_SESSION *`` (``b""`` if it has none)."""
    null, new, buffer = ffi.NULL, ffi.new, ffi.buffer
    uint_p = ffi.typeof("unsigned int *")  # ctype objects: no string parsing per call

    def sid_of(sess: Any) -> bytes:
        length = new(uint_p)
        p = get_id(sess, length)
        return buffer(p, length[0])[:] if p != null else b""

    return sid_of


def _onerror(exc_type: Any, exc_value: Any, tb: Any) -> None:
    """What escapes a callback's ``except Exception`` (MemoryError, KeyboardInterrupt...).

    A signal that arrives while OpenSSL runs is handled at the next Python code, which is
    often one of these callbacks: a KeyboardInterrupt raised there (Ctrl-C, or a stop
    handler that raises it) cannot cross OpenSSL, so it is delivered to the main thread
    again, from another thread and a moment later, until it lands outside a callback.
    """
    if isinstance(exc_value, KeyboardInterrupt) and (
        threading.current_thread() is threading.main_thread()
    ):
        timer = threading.Timer(_REDELIVERY_DELAY_S, _interrupt_main)
        timer.daemon = True
        timer.start()
        return
    _warn("callback", f"session callback failed: {type(exc_value).__name__}")


def _interrupt_main() -> None:
    """A KeyboardInterrupt in the main thread, waking it from a blocking call (accept)."""
    main = threading.main_thread().ident
    if main is not None and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.pthread_kill(main, signal.SIGINT)  # a real signal interrupts system calls
    else:
        _thread.interrupt_main()


#: The three session callbacks as Python functions, before cffi wraps them.
SessionFunctions = tuple[
    Callable[[Any, Any], int],
    Callable[[Any, Any, int, Any], Any],
    Callable[[Any, Any], None],
]


def session_functions(
    n: Natives,
    handler: SessionCallbacks,
    context: bytes,
    *,
    version: Callable[[Any], int] | None = None,
    remember: Callable[[Any, SessionCallbacks, bytes, bytes], SSL.Connection | None] | None = None,
    owner: weakref.ref[SSL.Context] | None = None,
    take_ids: Callable[[bytes], Sequence[bytes]] | None = None,
) -> SessionFunctions:
    """The new/get/remove bodies for ``handler``, shared by both FFIs (closures, with every
    name a local, keep the handshake path lean).

    ``version``: ``SSL_version``, to tell ``on_get`` whether the handshake is TLS 1.3 (without
    it, or for a handler whose ``single_use`` is false when the callbacks are made, ``on_get``
    gets two arguments).
    ``remember(ssl, handler, context, sid)``: notes a session a connection was issued or
    resumed, and returns its Connection. ``owner``: the Context the callbacks are installed
    on, to tell when a connection was switched away.
    ``take_ids(sid)``: every id of the connection ``sid`` belongs to, for a fatal alert
    (without it only ``sid`` is reported).

    A remove with an error other than unexpected EOF on the thread's error queue is a fatal
    alert (OpenSSL removes the session right after queueing the alert's error): it goes to
    ``on_fatal_alert``; any other remove to ``on_remove``. The queue is only peeked.
    """
    ffi = n.ffi
    null, new, buffer, from_buffer = ffi.NULL, ffi.new, ffi.buffer, ffi.from_buffer
    uchar_a = ffi.typeof("unsigned char[]")
    uchar_pp = ffi.typeof("unsigned char **")
    sid_of = sid_reader(ffi, n.get_id)
    get_timeout, i2d, d2i = n.get_timeout, n.i2d, n.d2i
    session_free, clear_errors = n.session_free, n.clear_errors
    on_new, on_get, on_remove = handler.on_new, handler.on_get, handler.on_remove
    on_fatal_alert = handler.on_fatal_alert
    peek_error, is_eof = n.peek_error, n.is_eof
    tls13 = _TLS1_3_VERSION
    # The version matters only to single use: for a handler that says it does not need it,
    # skip the call into OpenSSL (which also hands the GIL over) on every lookup.
    ask_version = version if getattr(handler, "single_use", True) else None

    def new_cb(ssl: Any, sess: Any) -> int:
        try:
            sid = sid_of(sess)
            if not sid:
                return 0  # stateless ticket or no id: nothing to look up later
            if remember is not None:
                conn = remember(ssl, handler, context, sid)
                if conn is not None and owner is not None:
                    ctx = owner()
                    if ctx is not None and conn._context is not ctx:
                        _check_switch(conn, ctx, handler)
            size = i2d(sess, null)
            if size <= 0:
                clear_errors()
                _warn("i2d", "i2d_SSL_SESSION failed; session not stored")
                return 0
            buf = new(uchar_a, size)
            i2d(sess, new(uchar_pp, buf))
            on_new(context, sid, buffer(buf, size)[:], int(get_timeout(sess)))
        except Exception as e:
            _warn("new", f"session cache on_new failed: {describe_error(e)}")
        return 0

    def get_cb(ssl: Any, data: Any, length: int, copy: Any) -> Any:
        try:
            sid = buffer(data, length)[:]
            if ask_version is None:
                der = on_get(context, sid)
            else:
                der = on_get(context, sid, ask_version(ssl) == tls13)
            if der is None:
                return null
            buf = from_buffer(uchar_a, der)  # no copy: d2i reads ``der`` in place
            sess = d2i(null, new(uchar_pp, buf), len(der))
            if sess == null:
                clear_errors()  # a stale error would fail the next SSL_get_error
                _warn("d2i", f"stored session for {sid.hex()[:16]}... does not decode")
                return null
            if sid_of(sess) != sid:
                session_free(sess)
                _warn("mismatch", f"stored session for {sid.hex()[:16]}... has another id")
                return null
            if remember is not None:
                remember(ssl, handler, context, sid)
            copy[0] = 0
            return sess
        except Exception as e:
            _warn("get", f"session cache on_get failed: {describe_error(e)}")
            return null

    def remove_cb(ctx: Any, sess: Any) -> None:
        try:
            sid = sid_of(sess)
            if not sid:
                return
            err = 0 if peek_error is None else int(peek_error())
            if err and (is_eof is None or not is_eof(err)):
                ids = (sid,) if take_ids is None else tuple(take_ids(sid))
                on_fatal_alert(context, ids)
            else:
                on_remove(context, sid)
        except Exception as e:
            _warn("remove", f"session cache on_remove failed: {describe_error(e)}")

    return new_cb, get_cb, remove_cb


def _make_callbacks(
    res: Resolution,
    handler: SessionCallbacks,
    context: bytes,
    owner: weakref.ref[SSL.Context],
) -> _Installed:
    """Build the three cffi callbacks for ``handler`` on pyOpenSSL's FFI.

    ``owner`` is the Context they are installed on, to tell when a connection was
    switched to another one.
    """
    from OpenSSL._util import ffi, lib

    lib = getattr(lib, "_original_lib", lib)
    natives = Natives(
        ffi,
        res.get("SSL_SESSION_get_id"),
        res.get("SSL_SESSION_get_timeout"),
        res.get("i2d_SSL_SESSION"),
        res.get("d2i_SSL_SESSION"),
        lib.SSL_SESSION_free,
        lib.ERR_clear_error,
        res.get("ERR_peek_last_error"),
        _eof_test(lib),
    )
    new_cb, get_cb, remove_cb = session_functions(
        natives,
        handler,
        context,
        version=lib.SSL_version,  # negotiated before any session lookup
        remember=_remember,
        owner=owner,
        take_ids=_take_ids,
    )
    return _Installed(
        handler,
        context,
        ffi.callback("int (*)(SSL *, SSL_SESSION *)", new_cb, error=0, onerror=_onerror),
        ffi.callback(
            "SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *)",
            get_cb,
            onerror=_onerror,
        ),
        ffi.callback("void (*)(SSL_CTX *, SSL_SESSION *)", remove_cb, onerror=_onerror),
    )


def _eof_test(lib: Any) -> Callable[[int], bool]:
    """``is_eof(err)``: whether a packed error is "unexpected EOF while reading" (OpenSSL 3
    answers a peer that hung up without close_notify with a fatal alert of its own)."""
    eof = getattr(lib, "SSL_R_UNEXPECTED_EOF_WHILE_READING", None)
    if eof is None:
        return lambda err: False
    reason_of = lib.ERR_GET_REASON
    return lambda err: bool(reason_of(err) == eof)


# --------------------------------------------------------------------------- lifetime


def _ex_data_functions() -> tuple[Any, Any]:
    res = resolve()
    return res.get("CRYPTO_get_ex_new_index"), res.get("SSL_CTX_set_ex_data")


#: What every pyOpenSSL ``SSL_CTX`` keeps alive: its session callbacks (``_SESSION``, one
#: ``_Installed`` per ``install_callbacks``), and other layers' callbacks.
_registry = SslCtxRegistry(_ffi, _ex_data_functions, _onerror)
_SESSION = "session"
_KEPT = "kept"


def _address_of(raw: Any) -> int:
    return _registry.address(raw)


# --------------------------------------------------------------------------- context checks


def _encode(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def default_session_id_context(ctx: SSL.Context) -> bytes:
    """The session id context ``install_callbacks`` sets when none is given (32 bytes).

    A sha256 over ``DEFAULT_SESSION_ID_CONTEXT``, the certificate last loaded into ``ctx``
    (DER), the client CA names it accepts (``set_client_ca_list``/``add_client_ca``, DER,
    sorted) and its verify mode. Raises ``ConfigurationError`` if no certificate is loaded.
    The trust store (``load_verify_locations``) is not part of it, so a Context that
    verifies client certificates without naming its client CAs is refused: it could share
    sessions with a service that trusts other CAs.
    """
    from OpenSSL._util import ffi, lib

    lib = getattr(lib, "_original_lib", lib)
    res = resolve()
    raw = ctx._context
    cert = res.get("SSL_CTX_get0_certificate")(raw)
    if cert == ffi.NULL:
        raise ConfigurationError(
            "the Context has no certificate yet: load the certificate before installing "
            "the session cache, or pass session_id_context explicitly"
        )
    i2d_x509 = res.get("i2d_X509")
    size = i2d_x509(cert, ffi.NULL)
    if size <= 0:
        lib.ERR_clear_error()
        raise ConfigurationError("the Context's certificate cannot be encoded")
    buf = ffi.new("unsigned char[]", size)
    i2d_x509(cert, ffi.new("unsigned char **", buf))
    names: list[bytes] = []
    stack = res.get("SSL_CTX_get_client_CA_list")(raw)
    if stack != ffi.NULL:
        for i in range(lib.sk_X509_NAME_num(stack)):
            name = lib.sk_X509_NAME_value(stack, i)
            out = ffi.new("unsigned char **")
            n = lib.i2d_X509_NAME(name, out)
            if n <= 0:
                lib.ERR_clear_error()
                raise ConfigurationError("a client CA name of the Context cannot be encoded")
            try:
                names.append(ffi.buffer(out[0], n)[:])
            finally:
                lib.OPENSSL_free(out[0])
    mode = ctx.get_verify_mode()
    if mode & SSL.VERIFY_PEER and not names:
        # Which clients it trusts would then live only in the trust store, which is not
        # part of the hash: two services trusting different CAs would share sessions.
        raise ConfigurationError(
            "the Context verifies client certificates but names no client CAs: call "
            "load_client_ca()/set_client_ca_list() with the CAs it accepts, or pass "
            "session_id_context explicitly (the same on every server of the service)"
        )
    return hashlib.sha256(
        _encode(
            DEFAULT_SESSION_ID_CONTEXT,
            ffi.buffer(buf, size)[:],
            struct.pack(">I", len(names)),
            *sorted(names),
            struct.pack(">i", mode),
        )
    ).digest()


@functools.cache
def _used_flag_means_connection() -> bool:
    """Whether ``Context._used`` is set only by making a Connection in this pyOpenSSL.

    24.3 and 25.0 have no flag; 25.1's ``set_cipher_list`` sets it through a throwaway
    Connection; later versions set it only in ``Connection()`` and ``set_context``.
    """
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    if not hasattr(probe, "_used"):
        return False
    probe.set_cipher_list(b"DEFAULT")
    return not probe._used


def _has_made_a_connection(ctx: SSL.Context) -> bool:
    """True if a Connection was made from ``ctx`` (or is alive on it, where that is all
    that can be told)."""
    if _used_flag_means_connection() and getattr(ctx, "_used", False):
        return True
    mapping = getattr(SSL.Connection, "_reverse_mapping", None)
    if mapping is None:
        return False
    return any(getattr(conn, "_context", None) is ctx for conn in list(mapping.values()))


_install_lock = threading.Lock()


def install_callbacks(
    ctx: SSL.Context,
    handler: SessionCallbacks,
    *,
    session_id_context: bytes | None = None,
    disable_internal_cache: bool = True,
    stateful_tls13_tickets: bool = True,
    num_tickets: int | None = None,
) -> bytes:
    """Make ``ctx`` keep its server sessions in ``handler`` (an external cache).

    Returns the session id context set on ``ctx``, which every handler call also carries.
    It must be identical on every server sharing the store (OpenSSL only resumes sessions
    made under the same context, and silently caches nothing with client verification and
    no context). OpenSSL cannot report a context set earlier, so one is always set here:
    the given one, or ``default_session_id_context(ctx)``, derived from the certificate,
    the client CA names and the verify mode (call this after loading the certificate and
    after ``set_verify``; ``ConfigurationError`` if no certificate is loaded yet).
    ``disable_internal_cache`` makes every resumption come from the handler.
    ``stateful_tls13_tickets`` sets ``OP_NO_TICKET``: TLS 1.3 tickets then carry ids looked
    up through the handler, TLS 1.2 resumes by session id. ``num_tickets`` sets how many TLS
    1.3 tickets a handshake issues (OpenSSL's default is 2).

    Fatal alerts reach ``handler.on_fatal_alert`` through OpenSSL's remove callback; no info
    callback is registered, so ``ctx.set_info_callback`` is pyOpenSSL's own, unchanged.
    The callbacks live as long as the ``SSL_CTX`` (which connections switched away by SNI
    keep alive after the Context is gone).

    Must run before a Connection is made from ``ctx``. Raises ``ResolverError`` if the
    OpenSSL functions cannot be verified, and ``ConfigurationError`` for bad arguments.
    Calling it again replaces the handler.
    """
    if not isinstance(ctx, SSL.Context):
        raise ConfigurationError("ctx must be an OpenSSL.SSL.Context")
    if _has_made_a_connection(ctx):  # its SSLs copied the settings we are about to change
        raise ConfigurationError("install_callbacks must run before ctx makes any Connection")
    for name in ("on_new", "on_get", "on_remove", "on_fatal_alert"):
        if not callable(getattr(handler, name, None)):
            raise ConfigurationError(f"handler has no callable {name}()")
    if session_id_context is None:
        session_id_context = default_session_id_context(ctx)
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

    from OpenSSL._util import ffi, lib

    installed = _make_callbacks(res, handler, session_id_context, weakref.ref(ctx))
    raw = ctx._context
    with _install_lock:
        try:
            entry = _registry.entry(raw)  # first: it is the one step here that can fail
        except ConfigurationError:
            lib.ERR_clear_error()
            raise
        # The bindings directly, not the Context's setters: pyOpenSSL 25.1 counts its own
        # throwaway Connection (set_cipher_list) as use and would warn.
        sid_ctx = ffi.new("unsigned char[]", session_id_context)
        if lib.SSL_CTX_set_session_id_context(raw, sid_ctx, len(session_id_context)) != 1:
            lib.ERR_clear_error()
            raise ConfigurationError("SSL_CTX_set_session_id_context failed")
        mode = _SESS_CACHE_SERVER | (_SESS_CACHE_NO_INTERNAL if disable_internal_cache else 0)
        lib.SSL_CTX_set_session_cache_mode(raw, mode)
        if stateful_tls13_tickets:
            lib.SSL_CTX_set_options(raw, SSL.OP_NO_TICKET)
        if set_num_tickets is not None and set_num_tickets(raw, num_tickets) != 1:
            raise ConfigurationError(f"SSL_CTX_set_num_tickets({num_tickets}) failed")

        # Keep every callback set ever installed alive with the SSL_CTX (a handshake on
        # another thread may be inside an older one), until OpenSSL frees it.
        entry.kept(_SESSION).append(installed)
        set_new(raw, installed.new_cb)
        set_get(raw, installed.get_cb)
        set_remove(raw, installed.remove_cb)
    return session_id_context


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


def installed_get_callback(ctx: SSL.Context) -> Any:
    """The get-session callback :func:`install_callbacks` last registered on ``ctx`` (a cffi
    callback), for a layer that answers some lookups itself and hands the rest on."""
    entry = _registry.get(ctx._context)
    installed = None if entry is None else entry.newest(_SESSION)
    if installed is None:
        raise ConfigurationError("no session callbacks are installed on this Context")
    return installed.get_cb


def keep_with_ssl_ctx(ctx: SSL.Context, *objects: Any) -> None:
    """Keep ``objects`` (cffi callbacks another layer registered on ``ctx``'s ``SSL_CTX``)
    alive as long as that ``SSL_CTX``, as the session callbacks are: OpenSSL may call them
    after the Python Context is gone, for the connections still using it. Raises
    ``ResolverError`` or ``ConfigurationError`` if OpenSSL's ex-data functions fail."""
    if not isinstance(ctx, SSL.Context):
        raise ConfigurationError("ctx must be an OpenSSL.SSL.Context")
    try:
        _registry.keep(ctx._context, _KEPT, *objects)
    except ConfigurationError:
        from OpenSSL._util import lib

        lib.ERR_clear_error()
        raise


#: The pyOpenSSL Connection of an ``SSL *`` (``None`` if pyOpenSSL did not make it).
connection_of = _connection_of
#: ``onerror`` for cffi callbacks into OpenSSL: what escapes a callback's own handling.
on_callback_error = _onerror
