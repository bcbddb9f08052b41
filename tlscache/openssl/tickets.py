"""OpenSSL's session-ticket key callback, wired to a Python source of keys.

A stateless ticket is the session, encrypted and authenticated by the server under a
*ticket key*; any server holding that key resumes it without a lookup. OpenSSL asks a
callback for the key: to issue (``enc=1``: fill in the key name and IV, initialise the
cipher and the MAC) and to accept (``enc=0``: find the key by the name the ticket carries).
The callback answers 1 (accepted), 2 (accepted, issue a fresh ticket: the key is an older
one) or 0 (unknown key: full handshake); it never raises into OpenSSL.

Which callback. ``SSL_CTX_set_tlsext_ticket_key_evp_cb`` (OpenSSL 3.0+, MAC through an
``EVP_MAC_CTX``) is used where present; otherwise the old HMAC callback
(``SSL_CTX_callback_ctrl(ctx, 72, cb)`` with an ``HMAC_CTX``). Neither is declared by
``cryptography``'s bindings; both come from :func:`tlscache.openssl.resolver.resolve`, like
the session callbacks. Checked in the wheel this project pins (cryptography 50.0.2, OpenSSL
4.0.3 linked statically into ``_rust.abi3.so``): its ``.symtab`` has exactly one local
``FUNC`` for each of ``SSL_CTX_set_tlsext_ticket_key_evp_cb``, ``SSL_CTX_callback_ctrl``,
``EVP_EncryptInit_ex``, ``EVP_DecryptInit_ex``, ``EVP_aes_256_cbc``, ``EVP_MAC_CTX_set_params``,
``HMAC_Init_ex`` and ``EVP_sha256``, and none is exported (``nm -D``): the EVP callback is
what runs there. The HMAC path remains for OpenSSL 1.1.1 builds.

Tickets use AES-256-CBC and HMAC-SHA256 (what OpenSSL does with its own keys), a 16-byte
key name and a random 16-byte IV from ``os.urandom``.

The MAC key and digest reach ``EVP_MAC_CTX_set_params`` as an ``OSSL_PARAM`` array. The
binding declares no ``OSSL_PARAM`` type, and the ``OSSL_PARAM_construct_*`` helpers return
the struct by value, which cffi cannot call through a ``void *`` cast; so the array is laid
out here by hand. ``struct ossl_param_st`` is public, stable ABI since OpenSSL 3.0
(``include/openssl/core.h``): ``const char *key; unsigned int data_type; void *data;
size_t data_size; size_t return_size`` (40 bytes on LP64). One array is built per key and
points straight into the key's own ``bytearray``, so erasing the key erases what OpenSSL reads.

0-RTT is never enabled here: early data would need single-use tickets (see ``docs/tickets.md``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from OpenSSL import SSL

from tlscache.exceptions import ConfigurationError, describe_error
from tlscache.openssl.callbacks import keep_with_ssl_ctx
from tlscache.openssl.resolver import resolve

__all__ = [
    "KEY_NAME_SIZE",
    "TicketEvent",
    "TicketKeyMaterial",
    "TicketKeySource",
    "install_ticket_callback",
]

log = logging.getLogger(__name__)

KEY_NAME_SIZE = 16
_IV_SIZE = 16
_AES_KEY_SIZE = 32
_CTRL_SET_TLSEXT_TICKET_KEY_CB = 72  # SSL_CTRL_SET_TLSEXT_TICKET_KEY_CB
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = (1 << 64) - 1
_OSSL_PARAM = struct.Struct("<QI4xQQQ")  # key, data_type, (pad), data, data_size, return_size

#: What the callback reports for each ticket it handles.
TicketEvent = Literal["issued", "decrypted", "renewed", "rejected", "failed"]

Kind = Literal["evp", "hmac"]


class TicketKeyMaterial(Protocol):
    """One ticket key as the callback reads it: a 16-byte name, the AES-256 key and the
    HMAC key (bytearrays, so that a retired key can be overwritten in place)."""

    @property
    def name(self) -> bytes: ...

    @property
    def aes_key(self) -> bytearray: ...

    @property
    def hmac_key(self) -> bytearray: ...


class TicketKeySource(Protocol):
    """Where the callback gets keys; called on the handshaking thread, no I/O allowed."""

    def key_for_encryption(self) -> TicketKeyMaterial | None:
        """The key new tickets are issued under (None: issue no ticket)."""
        ...

    def key_for_decryption(self, name: bytes) -> tuple[TicketKeyMaterial, bool] | None:
        """The key named ``name`` and whether tickets under it should be renewed."""
        ...

    def count_ticket(self, event: TicketEvent) -> None:
        """One ticket was issued, decrypted, renewed, rejected, or the callback failed."""
        ...


@dataclass
class _Prepared:
    """One key made ready for OpenSSL; the cdata keep its buffers pinned and alive."""

    name: bytes
    aes: Any
    hmac: Any
    params: Any
    keep: tuple[Any, ...]


@dataclass
class _Installed:
    """What the ``SSL_CTX`` keeps alive: the cffi callback and the source."""

    kind: Kind
    source: TicketKeySource
    callback: Any


#: SSL_version() of a TLS 1.3 connection.
_TLS1_3_VERSION: Final = 0x0304


class _Glue:
    """The callback for one source; prepared keys are cached by name."""

    _MAX_PREPARED = 64

    def __init__(self, source: TicketKeySource, kind: Kind) -> None:
        from OpenSSL._util import ffi, lib

        res = resolve()
        self.ffi = ffi
        self.ssl_version = lib.SSL_version
        self.source = source
        self.kind = kind
        self.encrypt_init = res.get("EVP_EncryptInit_ex")
        self.decrypt_init = res.get("EVP_DecryptInit_ex")
        self.cipher = res.get("EVP_aes_256_cbc")()
        if kind == "evp":
            self.mac_set_params = res.get("EVP_MAC_CTX_set_params")
        else:
            self.hmac_init = res.get("HMAC_Init_ex")
            self.sha256 = res.get("EVP_sha256")()
        self._digest_key = ffi.new("char[]", b"digest")
        self._key_key = ffi.new("char[]", b"key")
        self._sha256_name = ffi.new("char[]", b"SHA256")
        self._prepared: dict[bytes, _Prepared] = {}
        self._lock = threading.Lock()

    def _address(self, cdata: Any) -> int:
        return int(self.ffi.cast("uintptr_t", cdata))

    def prepare(self, key: TicketKeyMaterial) -> _Prepared:
        """The key's pinned buffers and its OSSL_PARAM array (built once per key)."""
        name = bytes(key.name)
        prepared = self._prepared.get(name)
        if prepared is not None and prepared.keep[0] is key.aes_key:
            return prepared
        if len(name) != KEY_NAME_SIZE or len(key.aes_key) != _AES_KEY_SIZE:
            raise ConfigurationError("a ticket key needs a 16-byte name and a 32-byte AES key")
        ffi = self.ffi
        aes = ffi.from_buffer("unsigned char[]", key.aes_key)
        hmac = ffi.from_buffer("unsigned char[]", key.hmac_key)
        params = ffi.new("unsigned char[]", _OSSL_PARAM.size * 3)
        view = ffi.buffer(params)
        _OSSL_PARAM.pack_into(
            view,
            0,
            self._address(self._key_key),
            _OSSL_PARAM_OCTET_STRING,
            self._address(hmac),
            len(key.hmac_key),
            _OSSL_PARAM_UNMODIFIED,
        )
        _OSSL_PARAM.pack_into(
            view,
            _OSSL_PARAM.size,
            self._address(self._digest_key),
            _OSSL_PARAM_UTF8_STRING,
            self._address(self._sha256_name),
            len(b"SHA256"),
            _OSSL_PARAM_UNMODIFIED,
        )
        # The third entry stays all zero: OSSL_PARAM_END.
        prepared = _Prepared(name, aes, hmac, params, (key.aes_key, key.hmac_key))
        with self._lock:
            if len(self._prepared) >= self._MAX_PREPARED:
                self._prepared.clear()
            self._prepared[name] = prepared
        return prepared

    def _mac_init(self, prepared: _Prepared, mac_ctx: Any) -> bool:
        if self.kind == "evp":
            return bool(self.mac_set_params(mac_ctx, prepared.params) == 1)
        size = len(prepared.keep[1])
        return bool(self.hmac_init(mac_ctx, prepared.hmac, size, self.sha256, self.ffi.NULL) == 1)

    def callback(
        self, ssl: Any, key_name: Any, iv: Any, cipher_ctx: Any, mac_ctx: Any, enc: int
    ) -> int:
        ffi = self.ffi
        source = self.source
        try:
            if enc == 1:
                key = source.key_for_encryption()
                if key is None:
                    return 0
                prepared = self.prepare(key)
                fresh_iv = os.urandom(_IV_SIZE)
                ffi.memmove(key_name, prepared.name, KEY_NAME_SIZE)
                ffi.memmove(iv, fresh_iv, _IV_SIZE)
                if not self._mac_init(prepared, mac_ctx) or (
                    self.encrypt_init(cipher_ctx, self.cipher, ffi.NULL, prepared.aes, iv) != 1
                ):
                    source.count_ticket("failed")
                    return 0  # no ticket this time; the handshake goes on
                source.count_ticket("issued")
                return 1
            name = ffi.buffer(key_name, KEY_NAME_SIZE)[:]
            found = source.key_for_decryption(name)
            if found is None:
                source.count_ticket("rejected")
                return 0
            key, renew = found
            prepared = self.prepare(key)
            if not self._mac_init(prepared, mac_ctx) or (
                self.decrypt_init(cipher_ctx, self.cipher, ffi.NULL, prepared.aes, iv) != 1
            ):
                source.count_ticket("failed")
                return 0
            source.count_ticket("renewed" if renew else "decrypted")
            # TLS 1.3: a fresh ticket after every resumption (OpenSSL sends one then only
            # when told to renew), so that a client never shows one ticket twice (RFC 8446,
            # appendix C.4) and keeps up with the current key.
            return 2 if renew or self.ssl_version(ssl) == _TLS1_3_VERSION else 1
        except Exception as e:  # never into OpenSSL: no ticket, or a full handshake
            _warn_failed(e)
            with contextlib.suppress(Exception):
                source.count_ticket("failed")
            return 0


_warn_lock = threading.Lock()
_warned: dict[str, int] = {}


def _warn_failed(exc: BaseException) -> None:
    """Log a failing callback once per exception type and every 1000th time after."""
    kind = type(exc).__name__
    with _warn_lock:
        n = _warned[kind] = _warned.get(kind, 0) + 1
    if n == 1 or n % 1000 == 0:
        log.warning("ticket key callback failed (%d times): %s", n, describe_error(exc))


def _onerror(exc_type: Any, exc_value: Any, tb: Any) -> None:
    _warn_failed(exc_value)


def _kind_available() -> Kind:
    res = resolve()
    have = res.functions
    if have.get("SSL_CTX_set_tlsext_ticket_key_evp_cb") and have.get("EVP_MAC_CTX_set_params"):
        return "evp"
    if have.get("SSL_CTX_callback_ctrl") and have.get("HMAC_Init_ex"):
        return "hmac"
    raise ConfigurationError("this OpenSSL offers no session ticket key callback")


def install_ticket_callback(
    ctx: SSL.Context, source: TicketKeySource, *, kind: Kind | None = None
) -> Kind:
    """Make ``ctx`` issue and accept session tickets under ``source``'s keys.

    ``kind`` forces the EVP or the old HMAC callback (default: the best available); the
    one used is returned. The callback objects live as long as ``ctx``'s ``SSL_CTX``, which
    connections switched away from ``ctx`` by SNI keep (and keep using for their tickets)
    after ``ctx`` is gone. Does not touch ``OP_NO_TICKET``
    or the session cache mode: :func:`tlscache.resumption.configure_resumption` does.
    Raises ``ResolverError`` or ``ConfigurationError`` if OpenSSL offers no callback.
    """
    if not isinstance(ctx, SSL.Context):
        raise ConfigurationError("ctx must be an OpenSSL.SSL.Context")
    for name in ("key_for_encryption", "key_for_decryption", "count_ticket"):
        if not callable(getattr(source, name, None)):
            raise ConfigurationError(f"ticket key source has no callable {name}()")
    chosen = kind or _kind_available()
    from OpenSSL._util import ffi

    res = resolve()
    glue = _Glue(source, chosen)
    mac_type = "void *"
    callback = ffi.callback(
        f"int (*)(SSL *, unsigned char *, unsigned char *, void *, {mac_type}, int)",
        glue.callback,
        error=0,
        onerror=_onerror,
    )
    raw = ctx._context
    # Kept before OpenSSL points at it: a handshake may call it as soon as it is set.
    keep_with_ssl_ctx(ctx, _Installed(chosen, source, (glue, callback)))
    if chosen == "evp":
        res.get("SSL_CTX_set_tlsext_ticket_key_evp_cb")(raw, callback)
    else:
        cb = ffi.cast("void (*)(void)", callback)
        res.get("SSL_CTX_callback_ctrl")(raw, _CTRL_SET_TLSEXT_TICKET_KEY_CB, cb)
    return chosen
