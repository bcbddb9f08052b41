"""An in-process session store: for one server, for tests, and as a reference."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, StoreError
from tlscache.forksafe import repair_after_fork

from .base import SessionStore

__all__ = ["MemoryStore"]


class MemoryStore(SessionStore):
    """A bounded, thread-safe dict with per-entry expiry.

    When full, the least recently stored or fetched entry goes first (LRU).
    Not shared between processes: a farm needs a networked store (a forked child gets
    its own copy, with a fresh lock). ``clock`` is
    injectable so tests can move time without sleeping.

    Calls wait for nothing but the store's own lock, so they cannot overrun a
    deadline and do not consult it.
    """

    supports_take = True
    in_process = True  # nothing outside this process reaches it: sealing is optional

    def __init__(
        self, max_entries: int = 20_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ConfigurationError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._closed = False
        repair_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at fork time

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def _check(self) -> None:
        if self._closed:
            raise StoreError("store is closed")

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> None:
        expires = self._clock() + max(0.0, ttl_s)
        key, val = bytes(session_id), bytes(value)
        with self._lock:
            self._check()
            self._data[key] = (expires, val)
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    def _live(self, key: bytes) -> tuple[float, bytes] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if self._clock() > entry[0]:
            del self._data[key]
            return None
        return entry

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        key = bytes(session_id)
        with self._lock:
            self._check()
            entry = self._live(key)
            if entry is None:
                return None
            self._data.move_to_end(key)
            return entry[1]

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        with self._lock:
            self._check()
            self._data.pop(bytes(session_id), None)

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        key = bytes(session_id)
        with self._lock:
            self._check()
            entry = self._live(key)
            if entry is None:
                return None
            del self._data[key]
            return entry[1]

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        key = bytes(session_id)
        with self._lock:
            self._check()
            if self._live(key) is not None:
                return False
            self._data[key] = (self._clock() + max(0.0, ttl_s), bytes(value))
            self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
            return True

    def purge_expired(self) -> int:
        """Drop every expired entry now; returns how many went. Lookups do it lazily anyway."""
        now = self._clock()
        with self._lock:
            dead = [k for k, (exp, _) in self._data.items() if now > exp]
            for k in dead:
                del self._data[k]
        return len(dead)

    def clear(self) -> None:
        """Forget everything (as a restarted cache server would)."""
        with self._lock:
            self._data.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._data.clear()
