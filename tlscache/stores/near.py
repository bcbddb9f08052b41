"""A small in-process cache in front of a remote store: recent reads and own writes.

A resumption that lands on the backend that made the session, or a client that reconnects
several times within a second or two, then costs no round trip. The price is staleness: an
entry deleted or replaced through another process is still served here for up to ``ttl_s``.
That is harmless for sessions used many times, and wrong for single-use ones, where a second
use must fail everywhere at once: a near cache has no atomic ``take`` (``supports_take`` is
False, so a ``SessionCache`` with single use refuses it); a direct ``take()`` goes to the inner
store and drops the local copy.

Hand-written: an ``OrderedDict`` LRU with per-entry expiry is a few lines, and the
``cachetools`` caches are not thread-safe and have one TTL for all entries.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError
from tlscache.forksafe import repair_after_fork

from .base import SessionStore, WrappingStore, WriteStatus

__all__ = ["NearCache", "NearStats"]


class NearStats(NamedTuple):
    """What the near cache answered itself, and what it passed on."""

    hits: int  #: fetches answered here
    misses: int  #: fetches passed to the inner store
    entries: int  #: entries held now
    evictions: int  #: entries dropped to stay within ``max_entries``


class NearCache(WrappingStore):
    """A bounded, thread-safe LRU of recent fetch results and own writes, each trusted for
    ``ttl_s`` (or less, if the session's own lifetime is shorter).

    Misses are not kept: a session stored by another backend a moment later must be found.
    Deletes and takes drop the local entry before they go through.
    """

    def __init__(
        self,
        inner: SessionStore,
        *,
        max_entries: int = 1024,
        ttl_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if inner.in_process:
            raise ConfigurationError(
                f"a near cache in front of {type(inner).__name__} (in-process) only adds copies"
            )
        if max_entries < 1:
            raise ConfigurationError("max_entries must be at least 1")
        if not 0 < ttl_s < float("inf"):
            raise ConfigurationError("ttl_s must be above 0")
        super().__init__(inner)
        self.supports_take = False  # no atomic take here: see the module docstring
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, tuple[float, bytes]] = OrderedDict()
        self._hits = self._misses = self._evictions = 0
        repair_after_fork(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at fork time

    def _keep(self, key: bytes, value: bytes, ttl_s: float) -> None:
        expires = self._clock() + min(self.ttl_s, max(0.0, ttl_s))
        with self._lock:
            self._entries[key] = (expires, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self._evictions += 1

    def _drop(self, key: bytes) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        key = bytes(session_id)
        self._drop(key)  # a failed write must not leave the old value trusted here
        status = self.inner.store(key, value, ttl_s, deadline)
        self._keep(key, bytes(value), ttl_s)
        return status

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        key = bytes(session_id)
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now <= entry[0]:
                self._entries.move_to_end(key)
                self._hits += 1
                return entry[1]
            if entry is not None:
                del self._entries[key]
            self._misses += 1
        value = self.inner.fetch(key, deadline)
        if value is not None:
            self._keep(key, value, self.ttl_s)
        return value

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        key = bytes(session_id)
        self._drop(key)
        self.inner.delete(key, deadline)

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """The inner store's take (if it has one); never answered from here."""
        key = bytes(session_id)
        self._drop(key)
        return self.inner.take(key, deadline)

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        """The inner store's atomic add; the value is kept here only if it was added."""
        key = bytes(session_id)
        self._drop(key)
        added = self.inner.add(key, value, ttl_s, deadline)
        if added:
            self._keep(key, bytes(value), ttl_s)
        return added

    def clear(self) -> None:
        """Forget every local entry (the inner store keeps its own)."""
        with self._lock:
            self._entries.clear()

    def stats(self) -> NearStats:
        with self._lock:
            return NearStats(self._hits, self._misses, len(self._entries), self._evictions)

    def close(self) -> None:
        self.clear()
        self.inner.close()
