"""dc_server's session table: id -> session with an expiry, without any I/O or clock.

Semantics are those of the C dc_server (see docs/distcache.md):

* every entry has an expiry time in milliseconds on the server's clock; an entry
  is expired once ``now_ms > expiry`` (strictly later), and expired entries are
  dropped lazily before each operation;
* ADD never overwrites an unexpired entry (result 0x65);
* when the table is full, the ``max(1, capacity // 30)`` entries expiring
  soonest are evicted before the new one is stored (FIFO by expiry, ties in
  insertion order, GET refreshes nothing).

The table applies only the rules that depend on what it holds (a matching
session, the byte bound, eviction); whether an ADD is acceptable at all is the
protocol's call (:attr:`~tlscache.distcache.protocol.AddRequest.refusal`).

Unlike the C array (linear scans), lookups are dict hits and expiry/eviction
use a heap with lazy deletion, so every operation is O(log n).

Memory matters (a table holds tens of thousands of sessions), so an entry is
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

from tlscache.distcache.protocol import MAX_ID_LEN, AddRequest, Result, add_refusal
from tlscache.exceptions import ConfigurationError

DEFAULT_SESSIONS: Final = 512
MIN_SESSIONS: Final = 64
MAX_SESSIONS: Final = 60_000
# Beyond the C limit only on explicit request (``allow_large``).
MAX_SESSIONS_LARGE: Final = 50_000_000

_KEY: Final = 16  # bytes of expiry (8) + insertion sequence (8)
_ID: Final = _KEY + 1  # the id starts after the key and its length byte
_NEVER: Final = 1 << 64  # later than any representable expiry
_ID_LEN: Final = tuple(bytes([n]) for n in range(MAX_ID_LEN + 1))

_OK: Final = Result.OK
_MATCHING_SESSION: Final = Result.ADD_MATCHING_SESSION
_DATA_RANGE: Final = Result.ADD_DATA_RANGE


def eviction_batch(capacity: int) -> int:
    """How many soonest-expiring entries C evicts when the table is full."""
    return max(1, capacity // 30)


class SessionTable:
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
    def total_bytes(self) -> int:
        """Sum of id and data lengths of the stored entries (what ``max_bytes`` bounds)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._store)

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

    def add(self, session_id: bytes, data: bytes, timeout_ms: int, now_ms: int) -> Result:
        """Store a session given as plain fields; return dc_server's ADD result."""
        request = AddRequest(
            timeout_ms, bytes(session_id), bytes(data), add_refusal(session_id, data, timeout_ms)
        )
        return self.add_request(request, now_ms)

    def add_request(self, request: AddRequest, now_ms: int) -> Result:
        """Store a session as dc_server's ADD does; return the one-byte result code.

        A request the protocol already refuses is answered with that refusal;
        otherwise the table's own rules apply: an unexpired entry with the same
        id is kept (0x65), a session over the byte bound is refused (0x68), and
        a full table makes room by evicting the soonest-expiring entries.
        """
        timeout_ms, sid, data, refusal = request
        if refusal is not None:
            return refusal
        if now_ms > self._next_expiry:
            self.expire(now_ms)
        store = self._store
        if sid in store:
            return _MATCHING_SESSION
        size = len(sid) + len(data)
        max_bytes = self._max_bytes
        if max_bytes is None:
            if len(store) >= self._capacity:
                self._evict(self._batch)
        else:
            if size > max_bytes:
                return _DATA_RANGE
            if len(store) >= self._capacity:
                self._evict(self._batch)
            while self._bytes + size > max_bytes and store:
                self._evict(1)
        expiry = now_ms + timeout_ms
        seq = self._seq
        self._seq = seq + 1
        key = ((expiry << 64) | seq).to_bytes(_KEY, "big")
        record = b"".join((key, _ID_LEN[len(sid)], sid, data))
        store[sid] = record
        heap = self._heap
        heapq.heappush(heap, record)
        if expiry < self._next_expiry:
            self._next_expiry = expiry
        self._bytes += size
        return _OK

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
        store = self._store
        record = store.pop(session_id, None)
        if record is None:
            return False
        self._bytes -= len(record) - _ID
        # The heap entry stays behind (lazy deletion), the only way an entry goes
        # stale; rebuilding when they outnumber the live ones bounds the waste.
        if len(self._heap) > 2 * len(store) + 64:
            self._rebuild_heap()
        return True

    def take(self, session_id: bytes, now_ms: int) -> bytes | None:
        """The session data, removed in the same step (TAKE): at most one caller gets it.

        Atomic because the server answers one request at a time from one thread.
        """
        if now_ms > self._next_expiry:
            self.expire(now_ms)
        data = self.get(session_id, now_ms)
        if data is not None:
            self.remove(session_id, now_ms)
        return data

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
