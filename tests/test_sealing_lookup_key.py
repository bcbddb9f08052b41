"""The store key's format, computed independently: HMAC-SHA256 over the documented input."""

from __future__ import annotations

import hashlib
import hmac
import threading

from tlscache.keyring import KeyRing
from tlscache.sealing import Sealer


def reference(secret: bytes, context: bytes, session_id: bytes) -> bytes:
    """``HMAC-SHA256(lookup secret, label || len(context) || context || id)``."""
    message = b"tlscache lookup v1\x00" + bytes([len(context)]) + context + session_id
    return hmac.new(secret, message, hashlib.sha256).digest()


def test_lookup_key_is_the_documented_hmac() -> None:
    ring = KeyRing.generate()
    sealer = Sealer(ring)
    for context, sid in [(b"shop", b"\x01" * 32), (b"", b"\x02"), (b"x" * 255, b"\x03" * 32)]:
        expected = reference(ring.lookup_secret, context, sid)
        assert sealer.lookup_key(context, sid) == expected, (context, sid)
        assert sealer.lookup_key(context, sid) == expected  # the prototype is not consumed


def test_lookup_keys_from_many_threads_agree() -> None:
    ring = KeyRing.generate()
    sealer = Sealer(ring)
    ids = [bytes([i]) * 32 for i in range(64)]
    expected = {sid: reference(ring.lookup_secret, b"svc", sid) for sid in ids}
    wrong: list[bytes] = []

    def work() -> None:
        for _ in range(20):
            for sid in ids:
                if sealer.lookup_key(b"svc", sid) != expected[sid]:
                    wrong.append(sid)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []
