"""Sealed sessions: what a store holds is encrypted, authenticated and bound to its key.

A serialized session carries its master secret and the client's identity, and
whoever can reach a shared cache can read and write it. So before a session
leaves the process:

* its **store key** becomes ``HMAC-SHA256(lookup secret, label || len(context) ||
  context || id)``: the store never sees a real session id, a session id read
  off the wire finds nothing, and services with different session id contexts
  can neither find nor collide with each other's entries;
* its **value** is sealed with AES-256-GCM-SIV under the ring's current key.
  The associated data (``label || len(context) || context || store key ||
  header``) binds the session id context, the store key and the whole header:
  format version, key id, sealing time, lifetime and nonce. A value moved to
  another key, replayed under another context, truncated or altered fails to
  open.

Why AES-GCM-SIV: every server of a farm seals under the same key with random
96-bit nonces and no shared counter. Plain GCM must then stop near 2^32
messages per key (the birthday bound on random nonces), and one repeated
nonce there reveals the authentication key, after which values can be forged.
GCM-SIV is nonce-misuse resistant: a repeated nonce reveals only whether two
plaintexts were equal (never the case for two sessions), so the per-key limit
is far beyond any rotation period. It costs a few microseconds per session.

Sealed value layout (version 1)::

    0   1   version (1)
    1   4   key id, big-endian
    5   8   sealing time, unix milliseconds, big-endian
    13  4   lifetime in seconds the sealing server gave the session, big-endian
    17  12  nonce
    29  n   ciphertext and 16-byte tag

The sealing time and lifetime are authenticated, so the reading server enforces
min(that lifetime, its own limit) from the sealing time, whatever the store's
TTL or the session's DER says. Times are wall-clock (servers of a farm share
no monotonic clock); a sealing time more than ``max_skew_s`` ahead of the
reader's clock is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from collections.abc import Callable
from typing import Final, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from tlscache.exceptions import ConfigurationError, SealError
from tlscache.keyring import KeyRing, KeyRingFile

__all__ = ["LOOKUP_KEY_SIZE", "SEAL_OVERHEAD", "Sealer"]

VERSION: Final = 1
_HEADER: Final = struct.Struct(">BIQI")  # version, key id, sealed at (ms), lifetime (s)
_NONCE: Final = 12
_TAG: Final = 16
HEADER_SIZE: Final = _HEADER.size + _NONCE
#: Bytes a sealed value adds to a session.
SEAL_OVERHEAD: Final = HEADER_SIZE + _TAG
#: Length of a store key made by :meth:`Sealer.lookup_key`.
LOOKUP_KEY_SIZE: Final = 32
MAX_LIFETIME_S: Final = 0xFFFFFFFF
_LOOKUP_LABEL: Final = b"tlscache lookup v1\x00"
_SEAL_LABEL: Final = b"tlscache session v1\x00"
#: A sealing time this far in the future is another host's clock gone wrong.
DEFAULT_MAX_SKEW_S: Final = 60.0
_MAX_CONTEXT: Final = 255
#: Contexts remembered per ring; a server has a handful (one per service or vhost).
_MAX_CONTEXTS: Final = 256


class _Context:
    """What depends only on (ring, context), computed once: the keyed hash with the
    label and the context already absorbed, and the associated data's prefix."""

    __slots__ = ("ad_prefix", "lookup")

    def __init__(self, lookup_secret: bytes, context: bytes) -> None:
        if len(context) > _MAX_CONTEXT:
            raise ConfigurationError(f"a session id context is at most {_MAX_CONTEXT} bytes")
        framed = len(context).to_bytes(1, "big") + context
        mac = hmac.new(lookup_secret, _LOOKUP_LABEL + framed, hashlib.sha256)
        # The C object behind ``hmac.HMAC`` where there is one: its copy() is one call,
        # where HMAC.copy() builds a Python object first. Both copy/update/digest alike.
        self.lookup: _Mac = getattr(mac, "_hmac", None) or mac
        self.ad_prefix = _SEAL_LABEL + framed


class _Mac(Protocol):
    def copy(self) -> _Mac: ...

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Keys:
    """One ring, ready for use: one AEAD per live key and a per-context state.

    Built once per ring object (a rotation makes a new one), so the handshake
    path does neither a key schedule nor a key derivation per session.
    """

    __slots__ = ("aeads", "contexts", "current", "current_aead", "retired", "ring")

    def __init__(self, ring: KeyRing, previous: _Keys | None) -> None:
        reuse = {} if previous is None else previous.by_secret()
        self.ring = ring
        self.contexts: dict[bytes, _Context] = {}
        self.aeads: dict[int, AESGCMSIV] = {}
        self.retired: set[int] = set()
        for key in ring.keys:
            if key.secret is None:
                self.retired.add(key.key_id)
            else:
                self.aeads[key.key_id] = reuse.get(key.secret) or AESGCMSIV(key.secret)
        self.current = ring.current.key_id
        self.current_aead = self.aeads[self.current]

    def context(self, context: bytes) -> _Context:
        state = self.contexts.get(context)
        if state is None:
            if len(self.contexts) >= _MAX_CONTEXTS:
                self.contexts.clear()
            state = self.contexts[context] = _Context(self.ring.lookup_secret, context)
        return state

    def by_secret(self) -> dict[bytes, AESGCMSIV]:
        secrets = {k.key_id: k.secret for k in self.ring.keys if k.secret is not None}
        return {secrets[key_id]: aead for key_id, aead in self.aeads.items()}


class Sealer:
    """Makes store keys, and seals and opens session values, with the keys of one ring.

    ``keys`` is a fixed :class:`KeyRing` or a :class:`KeyRingFile` that follows
    rotations. ``clock`` is the wall clock (unix seconds; injectable for tests).
    Thread-safe: the state it keeps is replaced whole, never changed in place.
    """

    def __init__(
        self,
        keys: KeyRing | KeyRingFile,
        *,
        clock: Callable[[], float] = time.time,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
    ) -> None:
        if max_skew_s < 0:
            raise ConfigurationError("max_skew_s must not be negative")
        self.keys = keys  #: the ring, or the file that holds it
        self._file = keys if isinstance(keys, KeyRingFile) else None
        self._clock = clock
        self.max_skew_s = max_skew_s
        ring = keys.ring() if isinstance(keys, KeyRingFile) else keys
        self._keys = _Keys(ring, None)

    def _current(self) -> _Keys:
        """The state of the ring in use; rebuilt only when a file brought a new ring."""
        keys = self._keys
        if self._file is not None:
            ring = self._file.ring()
            if keys.ring is not ring:
                keys = self._keys = _Keys(ring, keys)
        return keys

    @property
    def ring(self) -> KeyRing:
        """The ring in use now."""
        return self._current().ring

    def lookup_key(self, context: bytes, session_id: bytes) -> bytes:
        """The 32-byte key a store sees for ``session_id`` under ``context``."""
        keys = self._keys if self._file is None else self._current()
        state = keys.contexts.get(context) or keys.context(context)
        mac = state.lookup.copy()
        mac.update(session_id)
        return mac.digest()

    def seal(self, lookup_key: bytes, context: bytes, session: bytes, lifetime_s: int) -> bytes:
        """``session`` sealed under the current key, valid ``lifetime_s`` seconds from now,
        openable only under ``lookup_key`` and ``context``."""
        if not 0 < lifetime_s <= MAX_LIFETIME_S:
            raise ConfigurationError(f"lifetime_s must be 1..{MAX_LIFETIME_S}")
        keys = self._current()
        sealed_ms = int(self._clock() * 1000)
        header = _HEADER.pack(VERSION, keys.current, sealed_ms, int(lifetime_s)) + os.urandom(
            _NONCE
        )
        ad = keys.context(context).ad_prefix + lookup_key + header
        ciphertext = keys.current_aead.encrypt(header[_HEADER.size :], session, ad)
        return header + ciphertext

    def open(self, lookup_key: bytes, context: bytes, value: bytes, max_age_s: float) -> bytes:
        """The session sealed in ``value``, or :class:`SealError` saying why not.

        ``max_age_s`` is this server's limit; the session is refused once
        min(its sealed lifetime, ``max_age_s``) has passed since it was sealed.
        Authenticity is checked before the times are trusted, so a forged value
        always counts as ``tampered`` (or ``unknown_key``), never as ``expired``.
        """
        if len(value) < SEAL_OVERHEAD + 1:
            raise SealError("malformed", f"sealed value of {len(value)} bytes is too short")
        version, key_id, sealed_ms, lifetime = _HEADER.unpack_from(value)
        if version != VERSION:
            raise SealError("malformed", f"unknown seal version {version}")
        keys = self._keys if self._file is None else self._current()
        aead = keys.aeads.get(key_id)
        if aead is None:
            if key_id in keys.retired:
                raise SealError("retired_key", f"sealed under retired key {key_id}")
            raise SealError("unknown_key", f"sealed under unknown key {key_id}")
        state = keys.contexts.get(context) or keys.context(context)
        ad = state.ad_prefix + lookup_key + value[:HEADER_SIZE]
        try:
            session = aead.decrypt(value[_HEADER.size : HEADER_SIZE], value[HEADER_SIZE:], ad)
        except InvalidTag:
            raise SealError("tampered", "sealed value failed authentication") from None
        age = self._clock() - sealed_ms / 1000.0
        limit = lifetime if lifetime < max_age_s else max_age_s
        if age > limit:
            raise SealError("expired", f"sealed {age:.0f} s ago, limit {limit:.0f} s")
        if age < -self.max_skew_s:
            raise SealError("expired", f"sealed {-age:.0f} s in the future")
        return session
