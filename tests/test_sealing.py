"""Sealer: store keys, sealing and opening, and every way a value is refused."""

from __future__ import annotations

import struct

import pytest

from tlscache.exceptions import ConfigurationError, SealError
from tlscache.keyring import KeyRing
from tlscache.sealing import HEADER_SIZE, LOOKUP_KEY_SIZE, SEAL_OVERHEAD, Sealer

DER = b"\x30\x81\x83" + b"s" * 131
CTX = b"shop-frontend"
SID = b"\x07" * 32
T0 = 1_700_000_000.0


class WallClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate(now=T0)


@pytest.fixture
def clock() -> WallClock:
    return WallClock()


def sealed(sealer: Sealer, lifetime: int = 300) -> tuple[bytes, bytes]:
    key = sealer.lookup_key(CTX, SID)
    return key, sealer.seal(key, CTX, DER, lifetime)


def refused(sealer: Sealer, key: bytes, value: bytes, context: bytes = CTX) -> str:
    with pytest.raises(SealError) as info:
        sealer.open(key, context, value, 300)
    return info.value.failure


def test_round_trip(ring: KeyRing, clock: WallClock) -> None:
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer)
    assert len(key) == LOOKUP_KEY_SIZE
    assert len(value) == len(DER) + SEAL_OVERHEAD
    assert DER not in value and b"sss" not in value  # encrypted
    assert sealer.open(key, CTX, value, 300) == DER
    # Another server with the same ring opens it too.
    assert Sealer(ring, clock=clock).open(key, CTX, value, 300) == DER


def test_lookup_key_is_keyed_and_bound_to_the_context(ring: KeyRing) -> None:
    sealer = Sealer(ring)
    key = sealer.lookup_key(CTX, SID)
    assert key == sealer.lookup_key(CTX, SID)  # deterministic: one round trip per lookup
    assert SID not in key
    assert key != sealer.lookup_key(b"other-service", SID)
    assert key != sealer.lookup_key(CTX, b"\x08" * 32)
    # The context's length is part of the input: (ab, c) and (a, bc) differ.
    assert sealer.lookup_key(b"ab", b"c") != sealer.lookup_key(b"a", b"bc")
    assert Sealer(KeyRing.generate()).lookup_key(CTX, SID) != key  # another ring, another key
    with pytest.raises(ConfigurationError):
        sealer.lookup_key(b"x" * 256, SID)


def test_each_seal_uses_a_fresh_nonce(ring: KeyRing) -> None:
    sealer = Sealer(ring)
    key = sealer.lookup_key(CTX, SID)
    assert sealer.seal(key, CTX, DER, 300) != sealer.seal(key, CTX, DER, 300)


def test_header_layout(ring: KeyRing, clock: WallClock) -> None:
    sealer = Sealer(ring, clock=clock)
    _, value = sealed(sealer, lifetime=120)
    version, key_id, sealed_ms, lifetime = struct.unpack_from(">BIQI", value)
    assert (version, key_id, sealed_ms, lifetime) == (1, 1, int(T0 * 1000), 120)
    assert HEADER_SIZE == 29


def test_any_altered_byte_is_refused(ring: KeyRing, clock: WallClock) -> None:
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer)
    for i in range(len(value)):
        for flip in (0x01, 0x80):
            bad = bytearray(value)
            bad[i] ^= flip
            failure = refused(sealer, key, bytes(bad))
            if i == 0:
                assert failure == "malformed"  # the version byte
            elif 1 <= i < 5:
                assert failure in ("unknown_key", "tampered")  # the key id
            else:
                assert failure == "tampered", i


@pytest.mark.parametrize("cut", [1, 16, 17, len(DER), len(DER) + SEAL_OVERHEAD - 1])
def test_truncated_values_are_refused(ring: KeyRing, cut: int) -> None:
    sealer = Sealer(ring)
    key, value = sealed(sealer)
    failure = refused(sealer, key, value[:-cut])
    assert failure == ("tampered" if len(value) - cut > SEAL_OVERHEAD else "malformed")


def test_extended_values_are_refused(ring: KeyRing) -> None:
    sealer = Sealer(ring)
    key, value = sealed(sealer)
    assert refused(sealer, key, value + b"\x00") == "tampered"


@pytest.mark.parametrize("value", [b"", b"\x01", DER, b"\x01" + bytes(SEAL_OVERHEAD)])
def test_garbage_is_refused(ring: KeyRing, value: bytes) -> None:
    sealer = Sealer(ring)
    assert refused(sealer, sealer.lookup_key(CTX, SID), value) in (
        "malformed",
        "unknown_key",
    )


def test_a_value_moved_to_another_lookup_key_is_refused(ring: KeyRing) -> None:
    """Replacing a victim's entry with another (genuine) session's value fails."""
    sealer = Sealer(ring)
    _, value = sealed(sealer)
    victim = sealer.lookup_key(CTX, b"\x09" * 32)
    assert refused(sealer, victim, value) == "tampered"


def test_a_value_under_another_context_is_refused(ring: KeyRing) -> None:
    sealer = Sealer(ring)
    key, value = sealed(sealer)
    assert refused(sealer, key, value, context=b"admin-api") == "tampered"


def test_a_value_sealed_under_another_ring_is_refused(ring: KeyRing) -> None:
    """A forger without the ring cannot plant a session, even with a plausible key id."""
    forger = Sealer(KeyRing.generate())
    sealer = Sealer(ring)
    key = sealer.lookup_key(CTX, SID)
    assert refused(sealer, key, forger.seal(key, CTX, DER, 300)) == "tampered"


def test_unknown_key(ring: KeyRing) -> None:
    newer = Sealer(ring.rotated())
    key = newer.lookup_key(CTX, SID)
    value = newer.seal(key, CTX, DER, 300)  # sealed under key 2, which `ring` never had
    assert refused(Sealer(ring), key, value) == "unknown_key"


def test_rotation_new_key_seals_old_key_still_opens(ring: KeyRing) -> None:
    old = Sealer(ring)
    key, old_value = sealed(old)
    rotated = ring.rotated()
    new = Sealer(rotated)
    assert new.lookup_key(CTX, SID) == key  # rotation never moves a stored session
    new_value = new.seal(key, CTX, DER, 300)
    assert struct.unpack_from(">BI", new_value)[1] == 2
    assert new.open(key, CTX, old_value, 300) == DER
    assert new.open(key, CTX, new_value, 300) == DER


def test_retired_key(ring: KeyRing) -> None:
    key, value = sealed(Sealer(ring))
    retired = ring.rotated().retire(1)
    assert refused(Sealer(retired), key, value) == "retired_key"


def test_expiry_from_the_sealing_time(ring: KeyRing, clock: WallClock) -> None:
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer, lifetime=300)
    clock.now += 299
    assert sealer.open(key, CTX, value, 300) == DER
    clock.now += 2
    assert refused(sealer, key, value) == "expired"


def test_expiry_from_the_sealed_lifetime(ring: KeyRing, clock: WallClock) -> None:
    """The lifetime the sealing server gave is authenticated: a reader with a longer limit
    (or a store that keeps the entry longer) cannot extend it."""
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer, lifetime=60)
    clock.now += 59
    assert sealer.open(key, CTX, value, 3600) == DER
    clock.now += 2
    with pytest.raises(SealError) as info:
        sealer.open(key, CTX, value, 3600)
    assert info.value.failure == "expired"


def test_expiry_from_the_readers_limit(ring: KeyRing, clock: WallClock) -> None:
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer, lifetime=3600)
    clock.now += 61
    with pytest.raises(SealError) as info:
        sealer.open(key, CTX, value, 60)
    assert info.value.failure == "expired"


def test_sealing_time_in_the_future(ring: KeyRing) -> None:
    reader_clock = WallClock()
    reader = Sealer(ring, clock=reader_clock, max_skew_s=60)
    ahead = Sealer(ring, clock=WallClock(T0 + 30))  # within the allowed skew
    key = reader.lookup_key(CTX, SID)
    assert reader.open(key, CTX, ahead.seal(key, CTX, DER, 300), 300) == DER
    far = Sealer(ring, clock=WallClock(T0 + 600))  # a clock gone wrong, or a forger's dream
    with pytest.raises(SealError) as info:
        reader.open(key, CTX, far.seal(key, CTX, DER, 300), 300)
    assert info.value.failure == "expired" and "future" in info.value.reason


def test_forgery_counts_as_tampered_not_expired(ring: KeyRing, clock: WallClock) -> None:
    """Times are trusted only once the value authenticates."""
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer)
    bad = bytearray(value)
    bad[5:13] = (0).to_bytes(8, "big")  # sealing time 1970
    assert refused(sealer, key, bytes(bad)) == "tampered"


@pytest.mark.parametrize("lifetime", [0, -1, 2**32])
def test_lifetime_out_of_range_is_refused_at_sealing(ring: KeyRing, lifetime: int) -> None:
    sealer = Sealer(ring)
    with pytest.raises(ConfigurationError):
        sealer.seal(sealer.lookup_key(CTX, SID), CTX, DER, lifetime)


def test_seal_errors_never_quote_the_value(ring: KeyRing, clock: WallClock) -> None:
    sealer = Sealer(ring, clock=clock)
    key, value = sealed(sealer)
    clock.now += 1000
    for bad in (value, value[:-1], value[:10]):
        with pytest.raises(SealError) as info:
            sealer.open(key, CTX, bad, 300)
        text = str(info.value) + repr(info.value)
        assert bad.hex()[:16] not in text and "sss" not in text


def test_negative_skew_is_a_configuration_error(ring: KeyRing) -> None:
    with pytest.raises(ConfigurationError):
        Sealer(ring, max_skew_s=-1)
