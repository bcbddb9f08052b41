"""KeyRing.from_json over random bytes.

Invariants: only KeyRingError; a ring it accepts writes back (``to_json``) to text
that parses to the same ring.
"""

from __future__ import annotations

import base64
import json

from tlscache.exceptions import KeyRingError
from tlscache.keyring import KeyRing, SealingKey


def test_one_input(data: bytes) -> None:
    try:
        ring = KeyRing.from_json(data, "fuzz")
    except KeyRingError as exc:
        assert "fuzz" in str(exc)
        return
    assert KeyRing.from_json(ring.to_json()) == ring
    assert ring.current.secret is not None


def seeds() -> list[bytes]:
    ring = KeyRing.generate(now=1_700_000_000)
    rotated = ring.rotated(now=1_700_100_000)
    retired = rotated.retire(ring.current.key_id)
    manual = KeyRing(b"\x05" * 32, (SealingKey(7, 0, b"\x06" * 32),))
    secret = base64.b64encode(b"\x01" * 32).decode()
    odd = {
        "format": json.loads(ring.to_json())["format"],
        "version": json.loads(ring.to_json())["version"],
        "lookup_secret": secret,
        "keys": [{"id": 1, "secret": secret}, {"id": 2, "retired": True, "created": 5}],
    }
    return [r.to_json().encode() for r in (ring, rotated, retired, manual)] + [
        json.dumps(odd).encode(),
        b"{}",
        b"[]",
        b"\xff\xfe",
    ]
