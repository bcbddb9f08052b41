"""The operator's key ring: the secrets that seal sessions before they reach a store.

A ring holds one *lookup secret* and a list of *sealing keys*:

* the lookup secret keys the hash that turns (session id context, session id)
  into the key a store sees. It does not change when sealing keys rotate, so a
  rotation never makes a stored session unfindable and a lookup stays one round
  trip; replacing it (``tlscache-keys generate --force``) empties the cache;
* the newest live sealing key seals; older live keys still open what they
  sealed; a retired key keeps only its id (its secret is erased from the file),
  so a value sealed under it is recognised and refused.

The file is JSON, written atomically with mode 0600, and refused at load if it
is a symbolic link, if anyone but its owner may read or write it, or if this
process's user does not own it. :class:`KeyRingFile` re-reads it when it
changes, so running servers pick up a rotation without a restart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from tlscache.exceptions import KeyRingError
from tlscache.forksafe import repair_after_fork

__all__ = ["KeyRing", "KeyRingFile", "SealingKey"]

log = logging.getLogger("tlscache.keyring")

FORMAT: Final = "tlscache-keyring"
VERSION: Final = 1
SECRET_SIZE: Final = 32
MAX_KEY_ID: Final = 0xFFFFFFFF
#: How often, at most, a running server looks at the file for a rotation.
DEFAULT_CHECK_INTERVAL_S: Final = 1.0
#: A key ring is a few hundred bytes per key; anything this large is not one.
_MAX_FILE_SIZE: Final = 1 << 20
_FINGERPRINT_LABEL: Final = b"tlscache keyring fingerprint v1\x00"


@dataclass(frozen=True, slots=True)
class SealingKey:
    """One sealing key; ``secret`` is None once the key is retired (never in repr)."""

    key_id: int
    created: int  # unix seconds
    secret: bytes | None = field(repr=False)

    @property
    def retired(self) -> bool:
        return self.secret is None


@dataclass(frozen=True, slots=True)
class KeyRing:
    """An immutable key ring; every change returns a new ring.

    A ring always has a live key (one that seals): one without is refused when
    it is built, so a server never meets it on the handshake path.
    """

    lookup_secret: bytes = field(repr=False)
    keys: tuple[SealingKey, ...]
    # Derived once: the sealing path reads them for every session.
    _current: SealingKey = field(init=False, repr=False, compare=False)
    _by_id: Mapping[int, SealingKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.lookup_secret, bytes) or len(self.lookup_secret) != SECRET_SIZE:
            raise KeyRingError(f"the lookup secret must be {SECRET_SIZE} bytes")
        by_id: dict[int, SealingKey] = {}
        for key in self.keys:
            if isinstance(key.key_id, bool) or not 0 < key.key_id <= MAX_KEY_ID:
                raise KeyRingError(f"key id {key.key_id!r} out of range 1..{MAX_KEY_ID}")
            if key.key_id in by_id:
                raise KeyRingError(f"key id {key.key_id} appears twice")
            if key.secret is not None and (
                not isinstance(key.secret, bytes) or len(key.secret) != SECRET_SIZE
            ):
                raise KeyRingError(f"key {key.key_id}: secrets must be {SECRET_SIZE} bytes")
            by_id[key.key_id] = key
        live = [k for k in self.keys if not k.retired]
        if not live:
            raise KeyRingError("the key ring has no live key; run 'tlscache-keys rotate'")
        object.__setattr__(self, "_current", max(live, key=lambda k: k.key_id))
        object.__setattr__(self, "_by_id", by_id)

    # ------------------------------------------------------------ queries

    @property
    def current(self) -> SealingKey:
        """The key that seals: the live one with the highest id."""
        return self._current

    def by_id(self) -> Mapping[int, SealingKey]:
        """Every key, live or retired, by id (do not modify)."""
        return self._by_id

    def fingerprint(self) -> str:
        """A short one-way digest of every secret in the ring: equal on two servers if and
        only if they hold the same ring, without showing anything that helps find a secret."""
        h = hashlib.sha256(_FINGERPRINT_LABEL + self.lookup_secret)
        for key in sorted(self.keys, key=lambda k: k.key_id):
            h.update(key.key_id.to_bytes(4, "big") + (key.secret or b"retired"))
        return h.hexdigest()[:16]

    # ------------------------------------------------------------ changes

    @classmethod
    def generate(cls, now: float | None = None) -> KeyRing:
        """A new ring: a fresh lookup secret and one sealing key."""
        created = int(time.time() if now is None else now)
        return cls(
            secrets.token_bytes(SECRET_SIZE),
            (SealingKey(1, created, secrets.token_bytes(SECRET_SIZE)),),
        )

    def rotated(self, now: float | None = None) -> KeyRing:
        """This ring plus a new key, which becomes the sealing key at once."""
        created = int(time.time() if now is None else now)
        next_id = max(k.key_id for k in self.keys) + 1
        key = SealingKey(next_id, created, secrets.token_bytes(SECRET_SIZE))
        return replace(self, keys=(*self.keys, key))

    def retire(self, key_id: int) -> KeyRing:
        """Retire one key: its secret is dropped; what it sealed no longer opens."""
        found = self._by_id.get(key_id)
        if found is None:
            raise KeyRingError(f"no key with id {key_id}")
        if found.retired:
            return self
        if found.key_id == self._current.key_id:
            raise KeyRingError(f"key {key_id} seals new sessions; rotate before retiring it")
        keys = tuple(
            SealingKey(k.key_id, k.created, None) if k.key_id == key_id else k for k in self.keys
        )
        return replace(self, keys=keys)

    # ------------------------------------------------------------ files

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "lookup_secret": _b64(self.lookup_secret),
            "keys": [
                {"id": k.key_id, "created": k.created}
                | ({"retired": True} if k.secret is None else {"secret": _b64(k.secret)})
                for k in self.keys
            ],
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "key ring") -> KeyRing:
        """Parse a ring; every problem is a :class:`KeyRingError` naming ``where`` (and never
        quoting the file, which holds secrets)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyRingError(
                f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from None
        except UnicodeDecodeError:
            raise KeyRingError(f"{where} is not UTF-8 text") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise KeyRingError(f'{where} is not a tlscache key ring (no "format": "{FORMAT}")')
        if doc.get("version") != VERSION:
            raise KeyRingError(f"{where}: unsupported version {doc.get('version')!r}")
        try:
            entries = doc["keys"]
            if not isinstance(entries, list):
                raise ValueError('"keys" must be a list')
            keys = tuple(_key_from(entry) for entry in entries)
            lookup_secret = _unb64(doc["lookup_secret"])
        except KeyError as exc:
            raise KeyRingError(f"{where} is malformed: missing {exc}") from None
        except (ValueError, TypeError, binascii.Error) as exc:
            raise KeyRingError(f"{where} is malformed: {exc}") from None
        try:
            return cls(lookup_secret, keys)
        except KeyRingError as exc:
            raise KeyRingError(f"{where}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        """Read a ring, refusing a file that is unsafe (see the module docstring)."""
        data, _ = _read_checked(Path(path))
        return cls.from_json(data, str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ring atomically with mode 0600: a reader sees the old file or the new
        one, never half of one, and a crash leaves one of the two on disk."""
        target = Path(path)
        directory = target.parent
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable (some filesystems refuse to sync a directory: fine)."""
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    finally:
        os.close(dfd)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("secrets are base64 strings")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError("a secret is not valid base64") from None


def _key_from(entry: Any) -> SealingKey:
    if not isinstance(entry, dict):
        raise ValueError("each key is an object")
    if "id" not in entry:
        raise ValueError("a key has no id")
    key_id, created = entry["id"], entry.get("created", 0)
    if type(key_id) is not int or type(created) is not int:
        raise ValueError("key id and created are integers")
    if entry.get("retired") is True:
        return SealingKey(key_id, created, None)
    if "secret" not in entry:
        raise ValueError(f'key {key_id} has neither a secret nor "retired": true')
    return SealingKey(key_id, created, _unb64(entry["secret"]))


def _read_checked(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes, if it is a regular file (not a link), owned by this process's
    user and closed to everyone else."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the server.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyRingError(
            f"key ring {path} does not exist; create one with 'tlscache-keys generate {path}'"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyRingError(
                f"key ring {path} is a symbolic link; name the file itself"
            ) from None
        raise KeyRingError(f"cannot open key ring {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise KeyRingError(f"key ring {path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_uid != os.geteuid():
            raise KeyRingError(
                f"key ring {path} is owned by uid {st.st_uid}, not by this process's user "
                f"(uid {os.geteuid()}); a key ring must belong to the user that reads it"
            )
        if st.st_mode & 0o077:
            raise KeyRingError(
                f"key ring {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"it must be readable by its owner only (chmod 600 {path})"
            )
        if st.st_size > _MAX_FILE_SIZE:
            raise KeyRingError(f"key ring {path} is too large to be a key ring")
        return f.read(_MAX_FILE_SIZE + 1), st


class KeyRingFile:
    """A ring on disk that follows rotations of the file while a server runs.

    :meth:`ring` costs a clock read on the handshake path; at most every
    ``check_interval_s`` it also stats the file and re-reads it when it changed.
    A file that turns bad (unsafe, malformed, missing) keeps the last good ring in
    use and is logged once per change of the file, so a botched edit never breaks
    handshakes and never floods the log. The first load raises
    :class:`~tlscache.exceptions.KeyRingError`: a server must not start without keys.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        data, st = _read_checked(self.path)
        self._ring = KeyRing.from_json(data, str(self.path))
        self._signature = _signature(st)
        self._bad_signature = _NONE  # the last file refused, so that it is logged once
        self._next_check = clock() + check_interval_s
        self.reloads = 0  #: times a changed file was loaded
        self.reload_errors = 0  #: times a changed file was refused (the old ring stayed)
        repair_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at fork time

    def ring(self) -> KeyRing:
        """The ring in use (re-read first if the file changed and a check is due)."""
        if self._clock() >= self._next_check:
            self._maybe_reload()
        return self._ring

    def _maybe_reload(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # another thread is checking; use the ring we have
        try:
            self._next_check = self._clock() + self.check_interval_s
            try:
                seen = _signature(os.lstat(self.path))
            except OSError:
                seen = _MISSING
            if seen == self._signature or seen == self._bad_signature:
                return
            try:
                data, st = _read_checked(self.path)
                ring = KeyRing.from_json(data, str(self.path))
            except KeyRingError as exc:
                self.reload_errors += 1
                self._bad_signature = seen
                log.warning("key ring not reloaded, keeping the keys in use: %s", exc)
                return
            self._ring = ring
            self._signature = _signature(st)
            self._bad_signature = _NONE
            self.reloads += 1
            log.info("key ring %s reloaded; key %d seals", self.path, ring.current.key_id)
        finally:
            self._lock.release()


_Signature = tuple[int, int, int, int, int]
#: The signature of a file that is not there (a real one never has inode -1).
_MISSING: Final[_Signature] = (-1, -1, -1, -1, -1)
_NONE: Final[_Signature] = (-2, -2, -2, -2, -2)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)
