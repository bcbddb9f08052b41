"""The dc_server session cache, without any I/O or clock of its own.

Semantics are those of the C dc_server (see docs/distcache.md):

* every entry has an expiry time in milliseconds on the server's clock; an entry
  is expired once ``now_ms > expiry`` (strictly later), and expired entries are
  dropped lazily before each operation;
* ADD never overwrites an unexpired entry (result 0x65);
* when the cache is full, the ``max(1, capacity // 30)`` entries expiring
  soonest are evicted before the new one is stored (FIFO by expiry, ties in
  insertion order, GET refreshes nothing).

Unlike the C array (linear scans), lookups are dict hits and expiry/eviction
use a heap with lazy deletion, so every operation is O(log n).

Memory matters (a cache holds tens of thousands of sessions), so an entry is
two bytes objects and nothing else: the dict maps ``id -> record`` and the heap
holds the very same record objects. A record is ``key || id_len || id || data``
where ``key`` is the 16-byte big-endian ``expiry || sequence``; comparing
records as bytes therefore orders them by expiry, then insertion, exactly like
the C array, and a heap entry is still live iff the dict maps its id to that
very object.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Final

from tlscache.distcache.protocol import (
    ADD_PREFIX,
    MAX_ID_LEN,
    MAX_PAYLOAD,
    MAX_TIMEOUT_MS,
    Result,
)
from tlscache.exceptions import ConfigurationError, ProtocolError

DEFAULT_SESSIONS: Final = 512
MIN_SESSIONS: Final = 64
MAX_SESSIONS: Final = 60_000
# Beyond the C limit only on explicit request (``allow_large``).
MAX_SESSIONS_LARGE: Final = 50_000_000

_KEY: Final = 16  # bytes of expiry (8) + insertion sequence (8)
_ID: Final = _KEY + 1  # the id starts after the key and its length byte
_NEVER: Final = 1 << 64  # later than any representable expiry
_PREFIX: Final = ADD_PREFIX.size

# Result codes as plain ints: the hot path compares and indexes with them.
OK: Final = int(Result.OK)
NOTOK: Final = int(Result.NOTOK)
ADD_CORRUPT: Final = int(Result.ADD_CORRUPT)
ADD_MATCHING_SESSION: Final = int(Result.ADD_MATCHING_SESSION)
ADD_TIMEOUT_RANGE: Final = int(Result.ADD_TIMEOUT_RANGE)
ADD_ID_RANGE: Final = int(Result.ADD_ID_RANGE)
ADD_DATA_RANGE: Final = int(Result.ADD_DATA_RANGE)


_ID_LEN: Final = tuple(bytes([n]) for n in range(MAX_ID_LEN + 1))


def eviction_batch(capacity: int) -> int:
    """How many soonest-expiring entries C evicts when the cache is full."""
    return max(1, capacity // 30)


class SessionCache:
    """Session id -> data with expiry, bounded by count and optionally by bytes.

    ``now_ms`` is passed into every operation so that the caller owns the clock
    (a monotonic one in the server, a fake one in tests).
    """

    __slots__ = (
        "_batch",
        "_bytes",
        "_capacity",
        "_heap",
        "_max_bytes",
        "_next_expiry",
        "_seq",
        "_store",
    )

    def __init__(
        self,
        capacity: int = DEFAULT_SESSIONS,
        max_bytes: int | None = None,
        *,
        allow_large: bool = False,
    ) -> None:
        top = MAX_SESSIONS_LARGE if allow_large else MAX_SESSIONS
        if not MIN_SESSIONS <= capacity <= top:
            raise ConfigurationError(
                f"session capacity {capacity} out of range ({MIN_SESSIONS}..{top})"
            )
        if max_bytes is not None and max_bytes < 1:
            raise ConfigurationError(f"byte capacity {max_bytes} must be positive")
        self._capacity = capacity
        self._batch = eviction_batch(capacity)
        self._max_bytes = max_bytes
        self._store: dict[bytes, bytes] = {}
        self._heap: list[bytes] = []
        self._seq = 0
        self._next_expiry = _NEVER
        self._bytes = 0

    # ------------------------------------------------------------ inspection

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def max_bytes(self) -> int | None:
        return self._max_bytes

    @property
    def total_bytes(self) -> int:
        """Sum of id and data lengths of the stored entries (what ``max_bytes`` bounds)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, session_id: object) -> bool:
        """Presence without expiring anything (for inspection; use :meth:`have`)."""
        return session_id in self._store

    def ids(self) -> Iterator[bytes]:
        """Stored ids, including any expired ones not yet flushed."""
        return iter(list(self._store))

    def expiry_of(self, session_id: bytes) -> int | None:
        """The expiry time (ms) of an entry, or None."""
        record = self._store.get(session_id)
        return None if record is None else int.from_bytes(record[:8], "big")

    # ------------------------------------------------------------ operations

    def expire(self, now_ms: int) -> int:
        """Drop every entry with ``now_ms > expiry``; return how many were dropped."""
        if now_ms <= self._next_expiry:
            return 0
        before = len(self._store)
        heap = self._heap
        store = self._store
        limit = now_ms.to_bytes(8, "big")  # entry < limit  <=>  expiry < now_ms
        pop = heapq.heappop
        while heap and heap[0] < limit:
            record = pop(heap)
            sid = record[_ID : _ID + record[_KEY]]
            if store.get(sid) is record:
                del store[sid]
                self._bytes -= len(record) - _ID
        self._next_expiry = int.from_bytes(heap[0][:8], "big") if heap else _NEVER
        return before - len(store)

    def add(self, session_id: bytes, data: bytes, timeout_ms: int, now_ms: int) -> int:
        """Store a session as dc_server's ADD does; return the one-byte result code.

        The checks and their order are C's minus the one that only concerns
        the wire layout (an id running past the end of the payload).
        """
        if not 0 <= timeout_ms <= MAX_TIMEOUT_MS:
            return ADD_TIMEOUT_RANGE
        if not 1 <= len(session_id) <= MAX_ID_LEN:
            return ADD_ID_RANGE
        if not data or len(data) > MAX_PAYLOAD:
            return ADD_DATA_RANGE
        return self._insert(bytes(session_id), data, timeout_ms, now_ms)

    def add_payload(self, payload: bytes, now_ms: int) -> int:
        """Handle a raw ADD payload (``u32 timeout | u32 id_len | id | data``)."""
        return self.add_from(payload, 0, len(payload), now_ms)

    def add_from(
        self, buf: bytes | bytearray | memoryview, start: int, end: int, now_ms: int
    ) -> int:
        """:meth:`add_payload` for ``buf[start:end]`` without copying the payload first.

        Raises :class:`ProtocolError` for a payload under 8 bytes: C closes the
        connection without a reply in that case.
        """
        size = end - start
        if size < _PREFIX:
            raise ProtocolError(f"ADD payload of {size} bytes is shorter than its 8-byte prefix")
        timeout_ms, id_len = ADD_PREFIX.unpack_from(buf, start)
        if timeout_ms > MAX_TIMEOUT_MS:
            return ADD_TIMEOUT_RANGE
        if id_len >= size - _PREFIX:
            return ADD_CORRUPT
        if id_len == 0 or id_len > MAX_ID_LEN:
            return ADD_ID_RANGE
        id_end = start + _PREFIX + id_len
        return self._insert(
            bytes(buf[start + _PREFIX : id_end]), buf[id_end:end], timeout_ms, now_ms
        )

    def _insert(
        self,
        sid: bytes,
        data: bytes | bytearray | memoryview,
        timeout_ms: int,
        now_ms: int,
    ) -> int:
        if now_ms > self._next_expiry:
            self.expire(now_ms)
        store = self._store
        if sid in store:
            return ADD_MATCHING_SESSION
        size = len(sid) + len(data)
        max_bytes = self._max_bytes
        if max_bytes is not None and size > max_bytes:
            return ADD_DATA_RANGE
        if len(store) >= self._capacity:
            self._evict(self._batch)
        if max_bytes is not None:
            while self._bytes + size > max_bytes and store:
                self._evict(1)
        expiry = now_ms + timeout_ms
        seq = self._seq
        self._seq = seq + 1
        record = b"".join(
            (expiry.to_bytes(8, "big"), seq.to_bytes(8, "big"), _ID_LEN[len(sid)], sid, data)
        )
        store[sid] = record
        heap = self._heap
        heapq.heappush(heap, record)
        if expiry < self._next_expiry:
            self._next_expiry = expiry
        self._bytes += size
        if len(heap) > 2 * len(store) + 64:
            self._rebuild_heap()
        return OK

    def get(self, session_id: bytes, now_ms: int) -> bytes | None:
        """The session data, or None on a miss. Never refreshes the entry."""
        if now_ms > self._next_expiry:
            self.expire(now_ms)
        record = self._store.get(session_id)
        return None if record is None else record[_ID + len(session_id) :]

    def have(self, session_id: bytes, now_ms: int) -> bool:
        if now_ms > self._next_expiry:
            self.expire(now_ms)
        return session_id in self._store

    def remove(self, session_id: bytes, now_ms: int) -> bool:
        if now_ms > self._next_expiry:
            self.expire(now_ms)
        record = self._store.pop(session_id, None)
        if record is None:
            return False
        # The heap entry stays behind (lazy deletion); _rebuild_heap bounds the waste.
        self._bytes -= len(record) - _ID
        return True

    def clear(self) -> None:
        self._store.clear()
        self._heap.clear()
        self._bytes = 0
        self._next_expiry = _NEVER

    # ------------------------------------------------------------ internals

    def _evict(self, count: int) -> None:
        """Drop ``count`` live entries from the front of the expiry order."""
        heap = self._heap
        store = self._store
        pop = heapq.heappop
        while count and heap:
            record = pop(heap)
            sid = record[_ID : _ID + record[_KEY]]
            if store.get(sid) is record:
                del store[sid]
                self._bytes -= len(record) - _ID
                count -= 1
        self._next_expiry = int.from_bytes(heap[0][:8], "big") if heap else _NEVER

    def _rebuild_heap(self) -> None:
        """Forget the heap entries of removed sessions (amortised O(1) per REMOVE)."""
        heap = list(self._store.values())
        heapq.heapify(heap)
        self._heap = heap
        self._next_expiry = int.from_bytes(heap[0][:8], "big") if heap else _NEVER
