"""Key rings: rotation, retirement, the file's safety checks, atomic saves, live reloads."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from tlscache.exceptions import KeyRingError
from tlscache.keyring import KeyRing, KeyRingFile, SealingKey
from tlscache.sealing import Sealer

CTX = b"svc"
SID = b"\x07" * 32
DER = b"\x30\x03abc"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "keys.json"
    KeyRing.generate().save(p)
    return p


def touch_later(p: Path) -> None:
    """Make sure a rewrite is seen as a change even on coarse-timestamp filesystems."""
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


# --------------------------------------------------------------------------- the ring


def test_generate_rotate_retire() -> None:
    ring = KeyRing.generate(now=1000)
    assert [k.key_id for k in ring.keys] == [1] and ring.current.created == 1000
    rotated = ring.rotated(now=2000).rotated(now=3000)
    assert rotated.current.key_id == 3
    assert rotated.lookup_secret == ring.lookup_secret  # rotation keeps stored keys findable
    retired = rotated.retire(1)
    assert retired.by_id()[1].retired and retired.by_id()[1].secret is None
    assert retired.retire(1) is retired  # retiring twice changes nothing
    with pytest.raises(KeyRingError, match="rotate before retiring"):
        retired.retire(3)
    with pytest.raises(KeyRingError, match="no key with id 9"):
        retired.retire(9)


def test_rotation_after_retiring_everything_but_the_current() -> None:
    ring = KeyRing.generate().rotated().retire(1).rotated()
    assert ring.current.key_id == 3 and [k.retired for k in ring.keys] == [True, False, False]


def test_secrets_never_appear_in_repr() -> None:
    ring = KeyRing.generate().rotated()
    text = repr(ring) + repr(ring.keys) + str(ring)
    assert ring.lookup_secret.hex()[:8] not in text and repr(ring.lookup_secret) not in text
    for key in ring.keys:
        assert key.secret is not None and repr(key.secret) not in text


@pytest.mark.parametrize(
    ("lookup", "keys", "message"),
    [
        (b"x" * 31, (SealingKey(1, 0, b"k" * 32),), "lookup secret"),
        (b"x" * 32, (SealingKey(1, 0, b"k" * 16),), "secrets must be 32 bytes"),
        (b"x" * 32, (SealingKey(0, 0, b"k" * 32),), "out of range"),
        (b"x" * 32, (SealingKey(2**32, 0, b"k" * 32),), "out of range"),
        (b"x" * 32, (SealingKey(1, 0, b"k" * 32), SealingKey(1, 0, b"j" * 32)), "twice"),
        (b"x" * 32, (SealingKey(1, 0, None),), "no live key"),
        (b"x" * 32, (), "no live key"),
    ],
)
def test_invalid_rings_are_refused(
    lookup: bytes, keys: tuple[SealingKey, ...], message: str
) -> None:
    with pytest.raises(KeyRingError, match=message):
        KeyRing(lookup, keys)


def test_json_round_trip_keeps_retired_keys_without_secrets() -> None:
    ring = KeyRing.generate().rotated().retire(1)
    text = ring.to_json()
    doc = json.loads(text)
    assert doc["keys"][0] == {"id": 1, "created": ring.keys[0].created, "retired": True}
    assert KeyRing.from_json(text) == ring
    assert ring.fingerprint() == KeyRing.from_json(text).fingerprint()
    assert ring.fingerprint() != KeyRing.generate().fingerprint()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON \\(line 1, column 2"),
        ("[]", "not a tlscache key ring"),
        ('{"format": "something-else"}', "not a tlscache key ring"),
        ('{"format": "tlscache-keyring", "version": 7}', "unsupported version 7"),
        ('{"format": "tlscache-keyring", "version": 1}', "missing 'keys'"),
        ('{"format": "tlscache-keyring", "version": 1, "keys": {}}', "must be a list"),
        ('{"format": "tlscache-keyring", "version": 1, "keys": [1]}', "each key is an object"),
        ('{"format": "tlscache-keyring", "version": 1, "keys": [{"id": "1"}]}', "integers"),
        ('{"format": "tlscache-keyring", "version": 1, "keys": [{"id": 1}]}', "neither a secret"),
        (
            '{"format": "tlscache-keyring", "version": 1, "keys": [{"id": 1, "secret": "!!"}]}',
            "not valid base64",
        ),
        (
            '{"format": "tlscache-keyring", "version": 1, "keys": [{"id": 1, "secret": '
            '"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}]}',
            "missing 'lookup_secret'",
        ),
    ],
)
def test_malformed_files_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(KeyRingError, match=message) as info:
        KeyRing.from_json(text, "keys.json")
    assert str(info.value).startswith("keys.json")


def test_errors_never_quote_a_secret() -> None:
    doc = json.loads(KeyRing.generate().to_json())
    secret = doc["keys"][0]["secret"]
    doc["lookup_secret"] = doc["lookup_secret"][:-4] + "!!!!"
    with pytest.raises(KeyRingError) as info:
        KeyRing.from_json(json.dumps(doc))
    assert secret not in str(info.value) and doc["lookup_secret"] not in str(info.value)


# --------------------------------------------------------------------------- the file


def test_save_is_mode_0600_and_load_round_trips(tmp_path: Path) -> None:
    p = tmp_path / "keys.json"
    old = os.umask(0)  # even with a permissive umask
    try:
        ring = KeyRing.generate()
        ring.save(p)
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert KeyRing.load(p) == ring
    assert sorted(os.listdir(tmp_path)) == ["keys.json"]  # no temporary file left


def test_save_is_atomic(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that fails halfway leaves the old ring whole and no temporary file behind."""
    before = path.read_bytes()

    def fail(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        KeyRing.load(path).rotated().save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]


def test_save_replaces_the_file_never_writes_into_it(path: Path) -> None:
    """A reader holding the old file sees it whole: the new ring is a new inode."""
    inode = path.stat().st_ino
    with open(path, "rb") as reader:
        KeyRing.load(path).rotated().save(path)
        assert KeyRing.from_json(reader.read()).current.key_id == 1
    assert path.stat().st_ino != inode
    assert KeyRing.load(path).current.key_id == 2


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_files_others_may_read_or_write_are_refused(path: Path, mode: int) -> None:
    path.chmod(mode)
    with pytest.raises(KeyRingError, match=f"mode {mode:04o}.*chmod 600"):
        KeyRing.load(path)
    with pytest.raises(KeyRingError):
        KeyRingFile(path)


def test_a_file_of_another_owner_is_refused(path: Path) -> None:
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # nobody
    else:
        pytest.skip("needs root to give the file away")
    with pytest.raises(KeyRingError, match="owned by uid 65534"):
        KeyRing.load(path)


def test_a_symlink_is_refused(path: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.json"
    link.symlink_to(path)
    with pytest.raises(KeyRingError, match="symbolic link"):
        KeyRing.load(link)


def test_a_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeyRingError, match="tlscache-keys generate"):
        KeyRing.load(tmp_path / "nope.json")


def test_a_directory_or_fifo_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(KeyRingError):
        KeyRing.load(d)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(KeyRingError, match="not a regular file"):
        KeyRing.load(fifo)  # and it does not hang waiting for a writer


def test_a_file_with_invalid_utf8_is_refused(path: Path) -> None:
    path.write_bytes(b'{"format": "\xff"}')
    with pytest.raises(KeyRingError, match="not UTF-8 text"):
        KeyRing.load(path)


# --------------------------------------------------------------------------- live reloads


def test_keyringfile_picks_up_a_rotation(path: Path) -> None:
    clock = Clock()
    ring_file = KeyRingFile(path, check_interval_s=1.0, clock=clock)
    first = ring_file.ring()
    sealer = Sealer(ring_file)
    key = sealer.lookup_key(CTX, SID)
    old_value = sealer.seal(key, CTX, DER, 300)
    KeyRing.load(path).rotated().save(path)
    touch_later(path)
    assert ring_file.ring() is first  # not checked before the interval
    clock.now += 1.0
    assert ring_file.ring().current.key_id == 2
    assert ring_file.reloads == 1
    # The sealer follows: new key seals, the old one still opens, the store key is unchanged.
    assert sealer.lookup_key(CTX, SID) == key
    assert sealer.seal(key, CTX, DER, 300)[1:5] == (2).to_bytes(4, "big")
    assert sealer.open(key, CTX, old_value, 300) == DER
    clock.now += 1.0
    assert ring_file.ring() is ring_file.ring()  # unchanged file: the same ring object
    assert ring_file.reloads == 1


@pytest.mark.parametrize("damage", ["json", "mode", "symlink", "missing", "no-live-key"])
def test_keyringfile_keeps_the_last_good_ring_when_the_file_turns_bad(
    path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    ring_file = KeyRingFile(path, clock=clock)
    good = ring_file.ring()
    if damage == "json":
        path.write_text("{ not json")
    elif damage == "mode":
        path.chmod(0o644)
    elif damage == "symlink":
        other = path.with_name("other.json")
        KeyRing.generate().save(other)
        path.unlink()
        path.symlink_to(other)
    elif damage == "missing":
        path.unlink()
    else:
        doc = json.loads(path.read_text())
        doc["keys"][0] = {"id": 1, "created": 0, "retired": True}
        path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="tlscache.keyring"):
        for _ in range(5):
            clock.now += 1.0
            assert ring_file.ring() is good
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not at every check
    assert "keeping the keys in use" in warnings[0].getMessage()
    assert ring_file.reload_errors == 1
    # Repaired: picked up at the next check.
    if damage == "mode":
        path.chmod(0o600)
    else:
        if path.is_symlink():
            path.unlink()
        good.rotated().save(path)
    touch_later(path)
    clock.now += 1.0
    assert ring_file.ring() is not good
    assert ring_file.ring().lookup_secret == good.lookup_secret


def test_keyringfile_refuses_a_bad_file_at_start(tmp_path: Path) -> None:
    p = tmp_path / "keys.json"
    p.write_text("{}")
    p.chmod(0o600)
    with pytest.raises(KeyRingError, match="not a tlscache key ring"):
        KeyRingFile(p)
