"""The external session cache on the standard library's ``ssl.SSLContext`` (asyncio servers).

The ``ssl`` module has no session-cache callbacks and no public way to the ``SSL_CTX`` it
wraps, so asyncio servers (``asyncio.start_server``, uvicorn, hypercorn, aiohttp) could not
share sessions. This module finds that ``SSL_CTX`` and proves it before calling anything on it:

1. The interpreter: CPython with the GIL (the callbacks run under it), 64-bit Linux.
2. The object: an ``ssl.SSLContext`` (or subclass) for a server (``PROTOCOL_TLS_SERVER`` or
   the generic ``PROTOCOL_TLS``). CPython keeps the ``SSL_CTX *`` right after ``PyObject_HEAD``
   (``id(ctx) + 16``; observed on 3.11 to 3.13); no API exposes it.
3. The library: every function comes from the libssl/libcrypto that ``_ssl`` itself loaded
   (``dlopen(_ssl.__file__, RTLD_NOLOAD)`` + ``dlsym`` on that handle), lies in an executable
   mapping of those files, is not interposed (``dlsym(RTLD_DEFAULT)``, which ``_ssl``'s own
   calls would bind to first, finds nothing else), and ``OpenSSL_version(0)`` equals
   ``ssl.OPENSSL_VERSION``.
4. The pointer: non-NULL, aligned, inside a readable and writable anonymous mapping, and one
   of the first two words of the structure it points at (``method``; OpenSSL 3 puts
   ``libctx`` first) is the ``SSL_METHOD`` the context's protocol implies, which
   ``SSL_CTX_get_ssl_method`` then confirms.
5. The object behind it: distinctive values set through Python read back through OpenSSL,
   then the originals restored (options, TLS 1.3 ticket count, verify mode, minimum and
   maximum version); CPython's defaults are found (cache mode ``SSL_SESS_CACHE_SERVER``,
   no session or info callbacks).

Any failed check raises ``ResolverError`` with the reason, before anything is changed.

Why a second function table: ``_ssl`` links the system's shared libssl (Debian's 3.0.x), not
the OpenSSL built into the ``cryptography`` wheel that pyOpenSSL uses; the two have different
functions and structure layouts. Everything here goes through its own ``cffi.FFI`` with
opaque types, so a pointer of one library can never be passed to the other by mistake
(pyOpenSSL's cdata are of another ``FFI``; cffi refuses to mix them). The new/get/remove
callback bodies are ``callbacks.py``'s (:func:`~tlscache.openssl.callbacks.session_functions`),
given this module's FFI and functions instead of pyOpenSSL's and without the per-connection
bookkeeping, which needs pyOpenSSL ``Connection`` objects; so the rules are the same (no
exception reaches OpenSSL, ``get`` returns a fresh ``d2i`` with ``*copy = 0``). A fatal alert
arrives, as there, through the remove callback (no info callback is registered) and reports
the connection's current session only. Callbacks live as long as the ``SSL_CTX``, as on the
pyOpenSSL path (:mod:`tlscache.openssl.ctxlife`, with this library's ex-data functions): an
``SSLSocket`` switched to another context by SNI keeps its first ``SSL_CTX``, and its session
callbacks, after the first Python context is gone.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import ssl
import struct
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cffi  # type: ignore[import-untyped,unused-ignore]

from tlscache.exceptions import ConfigurationError, ResolverError
from tlscache.openssl.callbacks import (
    DEFAULT_SESSION_ID_CONTEXT,
    Natives,
    SessionCallbacks,
    _onerror,
    session_functions,
)
from tlscache.openssl.ctxlife import FREE_CALLBACK_TYPE, SslCtxRegistry
from tlscache.openssl.resolver import _Mapping, _read_maps

__all__ = [
    "CTX_POINTER_OFFSET",
    "StdlibInstall",
    "StdlibResolution",
    "VerifiedContext",
    "default_session_id_context",
    "install_stdlib_callbacks",
    "resolve_stdlib",
    "ssl_ctx_address",
    "verify_context",
]

#: Where CPython keeps the ``SSL_CTX *`` in an ``_ssl._SSLContext``: after ``PyObject_HEAD``.
CTX_POINTER_OFFSET = 16

_ffi = cffi.FFI()
_ffi.cdef(
    """
    typedef struct ssl_ctx_st SSL_CTX;
    typedef struct ssl_st SSL;
    typedef struct ssl_session_st SSL_SESSION;
    typedef struct ssl_method_st SSL_METHOD;
    typedef struct x509_st X509;
    typedef struct stack_st OPENSSL_STACK;
    """
)

_NEW_CB = "int (*)(SSL *, SSL_SESSION *)"
_GET_CB = "SSL_SESSION *(*)(SSL *, const unsigned char *, int, int *)"
_REMOVE_CB = "void (*)(SSL_CTX *, SSL_SESSION *)"
_INFO_CB = "void (*)(const SSL *, int, int)"

#: C prototypes of every function taken from ``_ssl``'s libssl/libcrypto.
SIGNATURES: Mapping[str, str] = {
    "OpenSSL_version": "const char *(*)(int)",
    "TLS_method": "const SSL_METHOD *(*)(void)",
    "TLS_server_method": "const SSL_METHOD *(*)(void)",
    "SSL_CTX_get_ssl_method": "const SSL_METHOD *(*)(const SSL_CTX *)",
    "SSL_CTX_get_options": "uint64_t (*)(const SSL_CTX *)",
    "SSL_CTX_get_num_tickets": "size_t (*)(const SSL_CTX *)",
    "SSL_CTX_get_verify_mode": "int (*)(const SSL_CTX *)",
    "SSL_CTX_ctrl": "long (*)(SSL_CTX *, int, long, void *)",
    "SSL_CTX_get_timeout": "long (*)(const SSL_CTX *)",
    "SSL_CTX_set_timeout": "long (*)(SSL_CTX *, long)",
    "SSL_CTX_set_session_id_context": "int (*)(SSL_CTX *, const unsigned char *, unsigned int)",
    "SSL_CTX_sess_get_new_cb": "int (*(*)(SSL_CTX *))(SSL *, SSL_SESSION *)",
    "SSL_CTX_sess_get_get_cb": (
        "SSL_SESSION *(*(*)(SSL_CTX *))(SSL *, const unsigned char *, int, int *)"
    ),
    "SSL_CTX_sess_get_remove_cb": "void (*(*)(SSL_CTX *))(SSL_CTX *, SSL_SESSION *)",
    "SSL_CTX_get_info_callback": "void (*(*)(const SSL_CTX *))(const SSL *, int, int)",
    "SSL_CTX_sess_set_new_cb": f"void (*)(SSL_CTX *, {_NEW_CB})",
    "SSL_CTX_sess_set_get_cb": f"void (*)(SSL_CTX *, {_GET_CB})",
    "SSL_CTX_sess_set_remove_cb": f"void (*)(SSL_CTX *, {_REMOVE_CB})",
    "SSL_CTX_set_info_callback": f"void (*)(SSL_CTX *, {_INFO_CB})",
    "SSL_CTX_get0_certificate": "X509 *(*)(const SSL_CTX *)",
    "SSL_CTX_get_client_CA_list": "OPENSSL_STACK *(*)(const SSL_CTX *)",
    "OPENSSL_sk_num": "int (*)(const OPENSSL_STACK *)",
    "OPENSSL_sk_value": "void *(*)(const OPENSSL_STACK *, int)",
    "i2d_X509": "int (*)(X509 *, unsigned char **)",
    "i2d_X509_NAME": "int (*)(void *, unsigned char **)",
    "CRYPTO_free": "void (*)(void *, const char *, int)",
    "SSL_get_session": "SSL_SESSION *(*)(const SSL *)",
    "SSL_SESSION_get_id": "const unsigned char *(*)(const SSL_SESSION *, unsigned int *)",
    "SSL_SESSION_get_timeout": "long (*)(const SSL_SESSION *)",
    "SSL_SESSION_free": "void (*)(SSL_SESSION *)",
    "i2d_SSL_SESSION": "int (*)(const SSL_SESSION *, unsigned char **)",
    "d2i_SSL_SESSION": "SSL_SESSION *(*)(SSL_SESSION **, const unsigned char **, long)",
    "ERR_clear_error": "void (*)(void)",
    "ERR_peek_last_error": "unsigned long (*)(void)",
    # The callbacks' lifetime follows the SSL_CTX's (ctxlife.py); new and dup are NULL.
    "CRYPTO_get_ex_new_index": f"int (*)(int, long, void *, void *, void *, {FREE_CALLBACK_TYPE})",
    "SSL_CTX_set_ex_data": "int (*)(SSL_CTX *, int, void *)",
}

#: Checked against ``dlsym(RTLD_DEFAULT)``: an interposer would show there.
_ANCHORS = ("OpenSSL_version", "TLS_server_method", "SSL_CTX_get_options", "SSL_CTX_ctrl")

_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_SSL_CTRL_GET_MIN_PROTO_VERSION = 130
_SSL_CTRL_GET_MAX_PROTO_VERSION = 131
_SESS_CACHE_SERVER = 0x0002
_SESS_CACHE_NO_INTERNAL = 0x0300
_VERIFY_PEER = 0x01
_MAX_SID_CTX_LENGTH = 32
_ERR_SYSTEM_FLAG = 1 << 31
_ERR_REASON_MASK = 0x7FFFFF
_SSL_R_UNEXPECTED_EOF_WHILE_READING = 294
_SERVER_PROTOCOLS = {ssl.PROTOCOL_TLS_SERVER: "TLS_server_method", ssl.PROTOCOL_TLS: "TLS_method"}


# --------------------------------------------------------------------------- memory


def _region_of(regions: list[_Mapping], address: int, length: int) -> _Mapping | None:
    """The mapping holding all of ``[address, address + length)``, if one does."""
    for r in regions:
        if r.start <= address and address + length <= r.end:
            return r
    return None


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class StdlibResolution:
    """The functions of ``_ssl``'s OpenSSL, verified, and where they live."""

    version: str
    libssl_path: str
    libcrypto_path: str
    functions: Mapping[str, Any]
    checks: tuple[str, ...]

    def __getitem__(self, name: str) -> Any:
        return self.functions[name]


def _interpreter_checks(checks: list[str]) -> None:
    if not sys.platform.startswith("linux"):
        raise ResolverError(f"unsupported platform {sys.platform}: this needs /proc and ELF")
    if sys.implementation.name != "cpython":
        raise ResolverError(f"{sys.implementation.name} is not CPython: its SSLContext differs")
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        raise ResolverError("free-threaded CPython: the context layout and locking are unproven")
    if struct.calcsize("P") != 8 or sys.byteorder != "little":
        raise ResolverError("only 64-bit little-endian builds are supported")
    checks.append(f"CPython {sys.version.split()[0]} with the GIL, 64-bit Linux")


_resolve_lock = threading.Lock()
_resolved: StdlibResolution | ResolverError | None = None


def resolve_stdlib() -> StdlibResolution:
    """The verified function table of the OpenSSL that ``_ssl`` uses; cached, failures too."""
    global _resolved
    with _resolve_lock:
        if _resolved is None:
            try:
                _resolved = _resolve()
            except ResolverError as e:
                _resolved = e
            except Exception as e:
                _resolved = ResolverError(f"unexpected error while resolving: {e!r}")
        if isinstance(_resolved, ResolverError):
            raise ResolverError(_resolved.reason)
        return _resolved


def _reset_cache() -> None:
    """Forget the cached resolution (tests only)."""
    global _resolved
    with _resolve_lock:
        _resolved = None


def _dlsym() -> Callable[[int | None, bytes], int | None]:
    libc = ctypes.CDLL(None)
    fn = libc.dlsym
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return fn


def _resolve() -> StdlibResolution:
    import _ssl

    checks: list[str] = []
    _interpreter_checks(checks)
    module = getattr(_ssl, "__file__", None)
    if not module:
        raise ResolverError("_ssl is built into the interpreter: no library to look in")
    try:
        handle = ctypes.CDLL(module, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError as e:
        raise ResolverError(f"dlopen(RTLD_NOLOAD) of {module} failed: {e}") from None
    dlsym = _dlsym()
    regions = _read_maps()
    addresses: dict[str, int] = {}
    files: dict[str, str] = {}
    for name in SIGNATURES:
        addr = dlsym(handle._handle, name.encode())
        if not addr:
            raise ResolverError(f"{name} is not in the OpenSSL that {module} loaded")
        region = _region_of(regions, addr, 16)
        if region is None or region.inode == 0 or "x" not in region.perms:
            raise ResolverError(f"{name} at {addr:#x} is not in an executable file mapping")
        addresses[name] = addr
        files[name] = region.path
    for name in _ANCHORS:
        seen = dlsym(None, name.encode())  # RTLD_DEFAULT: what _ssl's calls would bind first
        if seen and seen != addresses[name]:
            raise ResolverError(
                f"{name}: the global scope has another definition ({seen:#x}, not "
                f"{addresses[name]:#x}): interposed, _ssl may not call the function found"
            )
    libssl = {files[n] for n in SIGNATURES if n.startswith(("SSL_", "TLS_"))}
    libcrypto = {files[n] for n in ("OpenSSL_version", "ERR_clear_error", "CRYPTO_free")}
    if len(libssl) != 1 or not os.path.basename(next(iter(libssl))).startswith("libssl"):
        raise ResolverError(f"the SSL functions come from {sorted(libssl)}, not one libssl")
    if "d2i_SSL_SESSION" in files and files["d2i_SSL_SESSION"] not in libssl:
        raise ResolverError("d2i_SSL_SESSION is not in the libssl of the other SSL functions")
    checks.append(f"{len(addresses)} functions from {module}'s own libraries, none interposed")
    functions = {name: _ffi.cast(SIGNATURES[name], addr) for name, addr in addresses.items()}
    version = _ffi.string(functions["OpenSSL_version"](0)).decode("ascii", "replace")
    if version != ssl.OPENSSL_VERSION:
        raise ResolverError(
            f"OpenSSL_version(0) is {version!r} but ssl.OPENSSL_VERSION is "
            f"{ssl.OPENSSL_VERSION!r}: not the library _ssl uses"
        )
    checks.append(f"OpenSSL_version(0) == ssl.OPENSSL_VERSION ({version})")
    return StdlibResolution(
        version,
        next(iter(libssl)),
        ", ".join(sorted(libcrypto)),
        functions,
        tuple(checks),
    )


# --------------------------------------------------------------------------- the context


def ssl_ctx_address(ctx: ssl.SSLContext) -> int:
    """The word at ``id(ctx) + CTX_POINTER_OFFSET``: the ``SSL_CTX *`` if CPython's layout
    is the one observed (``verify_context`` proves it; never use this unproven)."""
    import _ssl

    if not isinstance(ctx, _ssl._SSLContext):
        raise ResolverError(f"{type(ctx).__name__} is not an ssl.SSLContext")
    if _ssl._SSLContext.__basicsize__ < CTX_POINTER_OFFSET + 8:
        raise ResolverError("_ssl._SSLContext is too small to hold the pointer")
    return int(ctypes.c_uint64.from_address(id(ctx) + CTX_POINTER_OFFSET).value)


@dataclass(frozen=True)
class VerifiedContext:
    """An ``SSL_CTX *`` proven to be the one behind a Python context."""

    address: int
    raw: Any  # ``SSL_CTX *`` of this module's FFI
    checks: tuple[str, ...]


def _locate(ctx: ssl.SSLContext, res: StdlibResolution, checks: list[str]) -> Any:
    """Steps 2 and 4 of the module docstring: the pointer, before any call on it."""
    if not isinstance(ctx, ssl.SSLContext):
        raise ResolverError(f"{type(ctx).__name__} is not an ssl.SSLContext")
    method_name = _SERVER_PROTOCOLS.get(ctx.protocol)
    if method_name is None:
        raise ResolverError(
            f"{ctx.protocol!r} is not a server context: use ssl.PROTOCOL_TLS_SERVER "
            "(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))"
        )
    address = ssl_ctx_address(ctx)
    if address == 0 or address % 16:
        raise ResolverError(
            f"the word at id(ctx)+{CTX_POINTER_OFFSET} ({address:#x}) is no heap pointer"
        )
    region = _region_of(_read_maps(), address, 16)
    if region is None or "r" not in region.perms or "w" not in region.perms:
        raise ResolverError(f"{address:#x} is not in a readable and writable mapping")
    if region.inode != 0:
        raise ResolverError(f"{address:#x} is in a file mapping ({region.path}), not the heap")
    method = int(_ffi.cast("uintptr_t", res[method_name]()))
    words = struct.unpack("<2Q", ctypes.string_at(address, 16))
    if method not in words:
        raise ResolverError(
            f"the structure at {address:#x} does not start with {method_name}'s SSL_METHOD: "
            "not an SSL_CTX of this OpenSSL"
        )
    raw = _ffi.cast("SSL_CTX *", address)
    if int(_ffi.cast("uintptr_t", res["SSL_CTX_get_ssl_method"](raw))) != method:
        raise ResolverError("SSL_CTX_get_ssl_method disagrees with the structure's method")
    checks.append(f"SSL_CTX at id(ctx)+{CTX_POINTER_OFFSET} on the heap, method {method_name}")
    return raw


def _read_backs(ctx: ssl.SSLContext, res: StdlibResolution, raw: Any) -> Iterator[str]:
    """Step 5: values set through Python, read through OpenSSL; yields what disagreed.

    The context's settings are restored afterwards, whatever happened.
    """
    ctrl = res["SSL_CTX_ctrl"]
    null = _ffi.NULL
    saved = (ctx.options, ctx.verify_mode, ctx.minimum_version, ctx.maximum_version)
    saved_tickets = ctx.num_tickets
    try:
        for flip in (ssl.OP_CIPHER_SERVER_PREFERENCE, ssl.OP_NO_RENEGOTIATION):
            for value in (saved[0] | flip, saved[0] & ~flip):
                ctx.options = value
                got = int(res["SSL_CTX_get_options"](raw))
                if got != int(ctx.options):
                    yield f"options: Python {int(ctx.options):#x}, OpenSSL {got:#x}"
        for n in (7, 3):
            ctx.num_tickets = n
            got = int(res["SSL_CTX_get_num_tickets"](raw))
            if got != n:
                yield f"num_tickets: Python {n}, OpenSSL {got}"
        for mode, flags in ((ssl.CERT_OPTIONAL, 0x1), (ssl.CERT_REQUIRED, 0x3)):
            ctx.verify_mode = mode
            got = int(res["SSL_CTX_get_verify_mode"](raw))
            if got != flags:
                yield f"verify mode: Python {mode.name} ({flags:#x}), OpenSSL {got:#x}"
        tls12, tls13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
        for lo, hi in ((tls12, tls13), (tls13, tls13), (tls12, tls12)):
            ctx.minimum_version, ctx.maximum_version = lo, hi
            got_lo = int(ctrl(raw, _SSL_CTRL_GET_MIN_PROTO_VERSION, 0, null))
            got_hi = int(ctrl(raw, _SSL_CTRL_GET_MAX_PROTO_VERSION, 0, null))
            if (got_lo, got_hi) != (lo.value, hi.value):
                yield (f"versions: Python {lo.name}..{hi.name}, OpenSSL {got_lo:#x}..{got_hi:#x}")
    finally:
        ctx.options = saved[0]
        ctx.minimum_version, ctx.maximum_version = saved[2], saved[3]
        ctx.verify_mode = saved[1]
        ctx.num_tickets = saved_tickets


def verify_context(ctx: ssl.SSLContext, res: StdlibResolution | None = None) -> VerifiedContext:
    """The proven ``SSL_CTX *`` of ``ctx``, or ``ResolverError`` saying which check failed.

    Changes nothing on ``ctx`` (settings used for the read-backs are restored).
    """
    res = resolve_stdlib() if res is None else res
    checks = list(res.checks)
    raw = _locate(ctx, res, checks)
    disagreements = list(_read_backs(ctx, res, raw))
    if disagreements:
        raise ResolverError(
            "OpenSSL does not see what Python set on this context: " + "; ".join(disagreements)
        )
    checks.append("options, num_tickets, verify mode, min/max version read back through OpenSSL")
    entry = _registry.get(raw)
    current: _Callbacks | None = None if entry is None else entry.newest(_SESSION)
    mode = int(res["SSL_CTX_ctrl"](raw, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, _ffi.NULL))
    callbacks = {
        "new": _address(res["SSL_CTX_sess_get_new_cb"](raw)),
        "get": _address(res["SSL_CTX_sess_get_get_cb"](raw)),
        "remove": _address(res["SSL_CTX_sess_get_remove_cb"](raw)),
        "info": _address(res["SSL_CTX_get_info_callback"](raw)),
    }
    if current is None:
        if mode != _SESS_CACHE_SERVER:
            raise ResolverError(f"session cache mode is {mode:#x}, not CPython's default 0x2")
        set_ = sorted(k for k, v in callbacks.items() if v)
        if set_:
            raise ResolverError(f"callbacks already set on this SSL_CTX: {', '.join(set_)}")
        checks.append("cache mode 0x2 and no callbacks, as CPython leaves them")
    else:
        ours = current.addresses()
        if callbacks != ours:
            raise ResolverError("the session callbacks on this SSL_CTX are no longer ours")
        checks.append("the callbacks installed earlier are still in place")
    return VerifiedContext(int(_ffi.cast("uintptr_t", raw)), raw, tuple(checks))


def _address(cdata: Any) -> int:
    return int(_ffi.cast("uintptr_t", cdata))


# --------------------------------------------------------------------------- callbacks


@dataclass
class _Callbacks:
    """One installation's cffi objects (OpenSSL points at them: keep them alive)."""

    handler: SessionCallbacks
    context: bytes
    new_cb: Any
    get_cb: Any
    remove_cb: Any

    def addresses(self) -> dict[str, int]:
        return {
            "new": _address(self.new_cb),
            "get": _address(self.get_cb),
            "remove": _address(self.remove_cb),
            "info": 0,  # none registered: fatal alerts arrive through remove
        }


def _ex_data_functions() -> tuple[Any, Any]:
    res = resolve_stdlib()
    return res["CRYPTO_get_ex_new_index"], res["SSL_CTX_set_ex_data"]


#: Every installation on an ``SSL_CTX`` of the ``ssl`` module's library, newest last, kept
#: until OpenSSL frees that ``SSL_CTX``.
_registry = SslCtxRegistry(_ffi, _ex_data_functions, _onerror)
_SESSION = "session"


def _make_callbacks(res: StdlibResolution, handler: SessionCallbacks, context: bytes) -> _Callbacks:
    """The new/get/remove callbacks for ``handler`` on this module's FFI (fatal alerts
    arrive through remove: no info callback)."""
    natives = Natives(
        _ffi,
        res["SSL_SESSION_get_id"],
        res["SSL_SESSION_get_timeout"],
        res["i2d_SSL_SESSION"],
        res["d2i_SSL_SESSION"],
        res["SSL_SESSION_free"],
        res["ERR_clear_error"],
        res["ERR_peek_last_error"],
        _is_eof,
    )
    new_cb, get_cb, remove_cb = session_functions(natives, handler, context)
    return _Callbacks(
        handler,
        context,
        _ffi.callback(_NEW_CB, new_cb, error=0, onerror=_onerror),
        _ffi.callback(_GET_CB, get_cb, onerror=_onerror),
        _ffi.callback(_REMOVE_CB, remove_cb, onerror=_onerror),
    )


def _is_eof(err: int) -> bool:
    """Whether a packed error is "unexpected EOF while reading": a peer that hung up
    without close_notify, answered by OpenSSL 3 with a fatal alert of its own."""
    return (
        not err & _ERR_SYSTEM_FLAG and err & _ERR_REASON_MASK == _SSL_R_UNEXPECTED_EOF_WHILE_READING
    )


# --------------------------------------------------------------------------- install


def _encode(*fields: bytes) -> bytes:
    return b"".join(struct.pack(">I", len(f)) + f for f in fields)


def _der(encode: Any, obj: Any, what: str, res: StdlibResolution) -> bytes:
    out = _ffi.new("unsigned char **")
    n = encode(obj, out)
    if n <= 0:
        res["ERR_clear_error"]()
        raise ConfigurationError(f"{what} cannot be encoded")
    try:
        return bytes(_ffi.buffer(out[0], n))
    finally:
        res["CRYPTO_free"](out[0], _ffi.NULL, 0)


def default_session_id_context(ctx: ssl.SSLContext) -> bytes:
    """The same default as :func:`tlscache.openssl.default_session_id_context` computes
    for pyOpenSSL (certificate, client CA names, verify mode), so a pyOpenSSL server and
    an ``ssl`` server with the same certificate and trust settings share sessions."""
    res = resolve_stdlib()
    raw = verify_context(ctx, res).raw
    cert = res["SSL_CTX_get0_certificate"](raw)
    if cert == _ffi.NULL:
        raise ConfigurationError(
            "the context has no certificate yet: call load_cert_chain() before installing "
            "the session cache, or pass session_id_context explicitly"
        )
    names: list[bytes] = []
    stack = res["SSL_CTX_get_client_CA_list"](raw)
    if stack != _ffi.NULL:
        for i in range(res["OPENSSL_sk_num"](stack)):
            name = res["OPENSSL_sk_value"](stack, i)
            names.append(_der(res["i2d_X509_NAME"], name, "a client CA name", res))
    mode = int(res["SSL_CTX_get_verify_mode"](raw))
    if mode & _VERIFY_PEER and not names:
        raise ConfigurationError(
            "the context verifies client certificates and the ssl module cannot name the "
            "client CAs it accepts: pass session_id_context explicitly (the same on every "
            "server of the service, and different from services that trust other CAs)"
        )
    return hashlib.sha256(
        _encode(
            DEFAULT_SESSION_ID_CONTEXT,
            _der(res["i2d_X509"], cert, "the certificate", res),
            struct.pack(">I", len(names)),
            *sorted(names),
            struct.pack(">i", mode),
        )
    ).digest()


@dataclass(frozen=True)
class StdlibInstall:
    """What :func:`install_stdlib_callbacks` did: the context set, and what it verified."""

    session_id_context: bytes
    openssl_version: str
    libssl_path: str
    checks: tuple[str, ...]


_install_lock = threading.Lock()


def install_stdlib_callbacks(
    ctx: ssl.SSLContext,
    handler: SessionCallbacks,
    *,
    session_id_context: bytes | None = None,
    disable_internal_cache: bool = True,
    stateful_tls13_tickets: bool = True,
    num_tickets: int | None = None,
    timeout_s: int | None = None,
) -> StdlibInstall:
    """Make the server context ``ctx`` keep its sessions in ``handler``.

    The counterpart of :func:`tlscache.openssl.install_callbacks` for ``ssl.SSLContext``
    (same arguments, same defaults; ``timeout_s`` sets the session lifetime). Every check of
    the module docstring runs first; ``ResolverError`` says which failed, and then nothing
    was changed. Call it after ``load_cert_chain()`` (the default session id context is
    derived from the certificate) and before the context serves connections. Calling it
    again replaces the handler.
    """
    for name in ("on_new", "on_get", "on_remove", "on_fatal_alert"):
        if not callable(getattr(handler, name, None)):
            raise ConfigurationError(f"handler has no callable {name}()")
    if session_id_context is not None and (
        not isinstance(session_id_context, bytes)
        or not 1 <= len(session_id_context) <= _MAX_SID_CTX_LENGTH
    ):
        raise ConfigurationError(f"session_id_context must be 1..{_MAX_SID_CTX_LENGTH} bytes")
    if num_tickets is not None and (
        isinstance(num_tickets, bool) or not isinstance(num_tickets, int) or num_tickets < 0
    ):
        raise ConfigurationError("num_tickets must be a non-negative int")
    if timeout_s is not None and timeout_s < 1:
        raise ConfigurationError("timeout_s must be at least 1")
    res = resolve_stdlib()
    with _install_lock:
        verified = verify_context(ctx, res)
        if session_id_context is None:
            session_id_context = default_session_id_context(ctx)
        raw = verified.raw
        try:
            entry = _registry.entry(raw)  # first: it is the one step here that can fail
        except ConfigurationError:
            res["ERR_clear_error"]()
            raise
        sid_ctx = _ffi.new("unsigned char[]", session_id_context)
        if res["SSL_CTX_set_session_id_context"](raw, sid_ctx, len(session_id_context)) != 1:
            res["ERR_clear_error"]()
            raise ConfigurationError("SSL_CTX_set_session_id_context failed")
        mode = _SESS_CACHE_SERVER | (_SESS_CACHE_NO_INTERNAL if disable_internal_cache else 0)
        res["SSL_CTX_ctrl"](raw, _SSL_CTRL_SET_SESS_CACHE_MODE, mode, _ffi.NULL)
        if stateful_tls13_tickets:
            ctx.options |= ssl.OP_NO_TICKET
        if num_tickets is not None:
            ctx.num_tickets = num_tickets
        if timeout_s is not None:
            res["SSL_CTX_set_timeout"](raw, int(timeout_s))
        callbacks = _make_callbacks(res, handler, session_id_context)
        # Kept before OpenSSL points at them, for as long as the SSL_CTX lives.
        entry.kept(_SESSION).append(callbacks)
        res["SSL_CTX_sess_set_new_cb"](raw, callbacks.new_cb)
        res["SSL_CTX_sess_set_get_cb"](raw, callbacks.get_cb)
        res["SSL_CTX_sess_set_remove_cb"](raw, callbacks.remove_cb)
    return StdlibInstall(session_id_context, res.version, res.libssl_path, verified.checks)
