"""Sealer.open over random values under one fixed key ring and clock.

Invariants: only SealError; a value opens only if this module sealed it (the seeds,
sealed at import with the same ring, lookup key and context, and nonces fixed so that
the runner and the fuzzing process make the same bytes), and then to its session.
"""

from __future__ import annotations

import itertools
from unittest import mock

from tlscache.exceptions import SealError
from tlscache.keyring import KeyRing, SealingKey
from tlscache.sealing import Sealer

NOW = 1_750_000_000.0
LOOKUP_KEY = bytes(range(32))
CONTEXT = b"fuzz context"
RING = KeyRing(
    bytes([1]) * 32,
    (
        SealingKey(1, 1_700_000_000, None),  # retired
        SealingKey(2, 1_710_000_000, bytes([2]) * 32),
        SealingKey(3, 1_720_000_000, bytes([3]) * 32),  # current: the newest live key
    ),
)
SEALER = Sealer(RING, clock=lambda: NOW)
#: Every value sealed in this process, and the session it holds.
SEALED: dict[bytes, bytes] = {}


def seal(session: bytes, lifetime_s: int = 300, sealer: Sealer = SEALER) -> bytes:
    """``session`` sealed with a nonce that depends only on how many were sealed before."""
    nonce = next(_NONCES).to_bytes(12, "big")
    with mock.patch("os.urandom", lambda size: nonce[:size]):
        value = sealer.seal(LOOKUP_KEY, CONTEXT, session, lifetime_s)
    SEALED[value] = session
    return value


_NONCES = itertools.count(1)


def test_one_input(data: bytes) -> None:
    try:
        session = SEALER.open(LOOKUP_KEY, CONTEXT, data, 600.0)
    except SealError as exc:
        assert exc.args
        return
    assert data in SEALED, f"opened a value this process never sealed: {data.hex()}"
    assert session == SEALED[data]


def _seal_seeds() -> list[bytes]:
    older = Sealer(KeyRing(RING.lookup_secret, RING.keys[:2]), clock=lambda: NOW)
    expired = Sealer(RING, clock=lambda: NOW - 3600)
    return [
        seal(b"\x30\x82" + bytes(range(140))),
        seal(b"s"),
        seal(b"x" * 3000, lifetime_s=1),
        seal(b"older key", sealer=older),
        seal(b"expired", sealer=expired),
        b"\x01" + b"\x00" * 44,
        b"",
    ]


_SEEDS: list[bytes] = _seal_seeds()


def seeds() -> list[bytes]:
    return list(_SEEDS)
