"""A shared TLS session cache for pyOpenSSL servers.

:class:`SessionCache` receives OpenSSL's new/get/remove session callbacks (via
:func:`tlscache.openssl.callbacks.install_callbacks`) and turns them into calls
on a :class:`~tlscache.stores.SessionStore`, so that every server of a farm can
resume a session that another one negotiated.

The cache sits on the handshake path, so it is built to never make a handshake
fail and to cost little when the store misbehaves:

* every store call carries one :class:`~tlscache.deadline.Deadline`, and a store
  error or timeout is a miss;
* a circuit breaker stops calling a store that keeps failing, so a dead cache
  costs one timeout per cool-down period rather than one per handshake;
* new sessions are written inside the callback with a short deadline (the
  cheapest hand-off there is), or by a bounded background writer thread with
  ``async_writes=True`` when a handshake must never wait for a write;
* ``remove`` is ignored by default (see :data:`RemovePolicy`).
"""

from __future__ import annotations

import bisect
import enum
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from tlscache.deadline import Clock, Deadline
from tlscache.exceptions import (
    ConfigurationError,
    SealError,
    StoreError,
    StoreTimeout,
    describe_error,
)
from tlscache.latency import histogram_quantile
from tlscache.stores.base import MAX_ID_LEN, MAX_VALUE_LEN, SessionStore

if TYPE_CHECKING:
    from OpenSSL import SSL

__all__ = [
    "LATENCY_BUCKETS_MS",
    "BreakerState",
    "CacheStats",
    "CircuitBreaker",
    "RemovePolicy",
    "SessionCache",
]

log = logging.getLogger("tlscache.session_cache")

#: What OpenSSL's remove callback does to the shared store.
#:
#: ``"ignore"`` (default): nothing. OpenSSL also calls remove for connections that
#: were freed without a clean TLS shutdown and for sessions it considers expired;
#: deleting those from a shared store throws away sessions that other servers
#: could still resume. The store's own TTL expires entries anyway.
#: ``"delete"``: propagate the removal to the store (through the writer queue).
RemovePolicy = Literal["ignore", "delete"]

#: Upper bounds (ms) of the lookup latency histogram; a last bucket catches the rest.
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)

_DER_SEQUENCE = 0x30
#: A call that takes this many times its time budget counts as a timeout (scheduling
#: jitter past the deadline does not; a store that ignores deadlines does).
_LATE_FACTOR = 2.0


class BreakerState(enum.Enum):
    """Circuit breaker states."""

    CLOSED = "closed"  # calls go to the store
    OPEN = "open"  # calls are skipped until the cool-down ends
    HALF_OPEN = "half_open"  # one probe call is in flight; the others are skipped


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    After ``threshold`` consecutive failures it opens; ``reset_s`` later the next
    caller becomes the probe: its success closes the breaker, its failure opens
    it for another ``reset_s``. While open, :meth:`allow` is a lock and a clock
    read, so skipping costs microseconds.
    """

    def __init__(self, threshold: int, reset_s: float, *, clock: Clock = time.monotonic) -> None:
        if threshold < 1:
            raise ConfigurationError("breaker_threshold must be at least 1")
        if reset_s <= 0:
            raise ConfigurationError("breaker_reset_s must be positive")
        self.threshold = threshold
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        # Open: when the cool-down ends. Half-open: when the probe in flight is given up.
        self._next_probe = Deadline(0.0, clock)
        self.opens = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held at fork time

    def allow(self) -> bool:
        """Whether the caller may use the store now."""
        if self._state is BreakerState.CLOSED:
            return True
        with self._lock:
            return self._allow_locked()

    def _allow_locked(self) -> bool:
        if self._state is BreakerState.CLOSED:
            return True
        if not self._next_probe.expired:
            # Cooling down, or a probe is in flight (one that never reports is replaced
            # once its own period is over).
            return False
        self._state = BreakerState.HALF_OPEN
        self._next_probe = Deadline.after(self.reset_s, self._clock)
        return True

    def success(self) -> None:
        """A store call succeeded. Closes a half-open breaker; an open one stays open (the
        call started before the breaker opened: only the probe may close it)."""
        if self._state is BreakerState.CLOSED and self._failures == 0:
            return
        with self._lock:
            if self._state is BreakerState.OPEN:
                return
            if self._state is BreakerState.HALF_OPEN:
                log.info("session store recovered; circuit breaker closed")
            self._state = BreakerState.CLOSED
            self._failures = 0

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.threshold
            ):
                if self._state is BreakerState.CLOSED:
                    self.opens += 1
                    log.warning(
                        "session store failing; circuit breaker open for %.1f s", self.reset_s
                    )
                self._state = BreakerState.OPEN
                self._next_probe = Deadline.after(self.reset_s, self._clock)


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A snapshot of the cache's counters (see ``docs/session-cache.md``)."""

    stores: int  #: sessions written to the store
    store_errors: int  #: writes that failed (timeouts included)
    store_timeouts: int  #: writes that timed out
    writes_skipped: int  #: writes not attempted: breaker open
    writes_dropped: int  #: writes not attempted: writer queue full or cache closed
    pending_writes: int  #: writes queued, not yet done
    hits: int  #: lookups answered with a session
    pending_hits: int  #: of those, answered from a write still queued in this process
    misses: int  #: lookups the store answered with "absent"
    bad_values: int  #: values from the store rejected as implausible (counted as misses too)
    errors: int  #: lookups that failed (not timeouts)
    timeouts: int  #: lookups that exceeded their deadline
    skipped: int  #: lookups not attempted: breaker open
    removes: int  #: removals sent to the store
    removes_ignored: int  #: removals dropped by the ``"ignore"`` policy
    remove_errors: int  #: removals that failed
    breaker_state: str  #: ``closed``, ``open`` or ``half_open``
    breaker_opens: int  #: times the breaker opened
    latency_buckets_ms: tuple[float, ...]  #: histogram upper bounds; last bucket is +inf
    latency_counts: tuple[int, ...]  #: lookups per bucket (len(buckets) + 1 entries)
    latency_p50_ms: float  #: median lookup latency, interpolated from the histogram
    latency_p99_ms: float  #: 99th percentile, interpolated from the histogram
    latency_max_ms: float  #: slowest lookup seen

    @property
    def lookups(self) -> int:
        """Every get callback: hits + misses + errors + timeouts + skipped."""
        return self.hits + self.misses + self.errors + self.timeouts + self.skipped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Counters:
    """The cache's running counts (see :class:`CacheStats`), changed only under the cache's lock.

    Named slots rather than a dict keyed by strings: a misspelt counter is a type
    error, and an increment is a slot store. The lookup outcomes are methods so that
    one callable, chosen outside the lock, says what a finished lookup counts.
    """

    stores: int = 0
    store_errors: int = 0
    store_timeouts: int = 0
    writes_skipped: int = 0
    writes_dropped: int = 0
    hits: int = 0
    pending_hits: int = 0
    misses: int = 0
    bad_values: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    removes: int = 0
    removes_ignored: int = 0
    remove_errors: int = 0

    def hit(self) -> None:
        self.hits += 1

    def miss(self) -> None:
        self.misses += 1

    def bad_value(self) -> None:
        self.misses += 1
        self.bad_values += 1

    def error(self) -> None:
        self.errors += 1

    def timeout(self) -> None:
        self.timeouts += 1


#: What a finished lookup counts: one of the outcome methods of :class:`_Counters`.
_Outcome = Callable[[_Counters], None]


def _der_sequence_fits(value: bytes) -> bool:
    """True if ``value`` is one DER SEQUENCE whose length header covers exactly ``value``."""
    n = len(value)
    if n < 2 or value[0] != _DER_SEQUENCE:
        return False
    first = value[1]
    if first < 0x80:
        return 2 + first == n
    k = first & 0x7F
    if not 1 <= k <= 4 or n < 2 + k:
        return False
    return 2 + k + int.from_bytes(value[2 : 2 + k], "big") == n


def _as_bytes(value: object) -> bytes | None:
    """A store's answer as bytes; a wrong type becomes b"" (rejected as implausible)."""
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return b""


_Write = tuple[bytes, bytes, float] | tuple[bytes, None, float]  # (id, value or None=delete, ttl)

#: Every SessionCache of this process (each with its breaker), for the fork handler.
_live_caches: weakref.WeakSet[SessionCache] = weakref.WeakSet()


def _reinit_after_fork() -> None:
    for cache in list(_live_caches):
        cache._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


class SessionCache:
    """OpenSSL session callbacks backed by a shared :class:`SessionStore`.

    ``timeout`` (s) is the session lifetime: set on the Context by :meth:`install`
    and the upper bound of a stored entry's TTL. ``deadline_ms`` bounds each
    lookup (``write_deadline_ms``, default the same, each write). The breaker
    opens after ``breaker_threshold`` consecutive failures and probes again
    ``breaker_reset_s`` later. New sessions are written inside the callback; with
    ``async_writes=True`` they go to one writer thread instead, through a queue of at
    most ``write_queue_size`` writes not yet done.

    Each lookup and each write gets one :class:`~tlscache.deadline.Deadline` on
    ``clock`` (monotonic, seconds; injectable for tests), which also times lookups
    and drives the breaker. A store must honour the deadline it is given: a call
    that blocks stalls the handshake that made it (see ``docs/session-cache.md``).

    One SessionCache may serve several Contexts. It never raises into OpenSSL:
    every failure becomes a miss (lookup) or a dropped write, and is counted.
    """

    def __init__(
        self,
        store: SessionStore,
        timeout: int = 300,
        *,
        deadline_ms: float = 20.0,
        write_deadline_ms: float | None = None,
        breaker_threshold: int = 5,
        breaker_reset_s: float = 5.0,
        remove_policy: RemovePolicy = "ignore",
        session_id_context: bytes | None = None,
        async_writes: bool = False,
        write_queue_size: int = 1024,
        stateful_tls13_tickets: bool = True,
        num_tickets: int | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if timeout < 1:
            raise ConfigurationError("timeout must be at least 1 second")
        if deadline_ms <= 0 or (write_deadline_ms is not None and write_deadline_ms <= 0):
            raise ConfigurationError("deadlines must be positive")
        if remove_policy not in ("ignore", "delete"):
            raise ConfigurationError("remove_policy must be 'ignore' or 'delete'")
        if write_queue_size < 1:
            raise ConfigurationError("write_queue_size must be at least 1")
        self.store = store
        self.timeout = int(timeout)
        # Time budgets (s); every call gets a Deadline this far from its start.
        self._lookup_budget_s = deadline_ms / 1000.0
        self._write_budget_s = (
            self._lookup_budget_s if write_deadline_ms is None else write_deadline_ms / 1000.0
        )
        self._clock = clock
        self.remove_policy: RemovePolicy = remove_policy
        self.session_id_context = session_id_context
        self.async_writes = async_writes
        self.write_queue_size = write_queue_size
        self.stateful_tls13_tickets = stateful_tls13_tickets
        self.num_tickets = num_tickets
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_s, clock=clock)

        self._lock = threading.Lock()
        self._counts = _Counters()
        self._hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._max_ms = 0.0
        self._closed = False
        # Writer state; the thread starts lazily, and again in a forked child.
        self._pid = -1
        self._items: deque[_Write | None] = deque()  # None: stop (from close())
        self._wake = threading.Event()
        self._writer_waiting = True  # the writer sleeps (or is not started): wake it
        self._pending: dict[bytes, bytes] = {}
        self._inflight = 0  # queued + being written
        self._idle = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        _live_caches.add(self)

    # ------------------------------------------------------------ setup

    def install(self, ctx: SSL.Context) -> None:
        """Route ``ctx``'s session cache through this object and set its session timeout.

        Raises :class:`~tlscache.exceptions.ResolverError` if the OpenSSL
        functions needed cannot be found for the OpenSSL pyOpenSSL uses.
        """
        from tlscache.openssl.callbacks import install_callbacks

        install_callbacks(
            ctx,
            self,
            session_id_context=self.session_id_context,
            disable_internal_cache=True,
            stateful_tls13_tickets=self.stateful_tls13_tickets,
            num_tickets=self.num_tickets,
        )
        ctx.set_timeout(self.timeout)

    # ------------------------------------------------------------ OpenSSL callbacks

    def on_new(self, session_id: bytes, der: bytes, timeout_s: int) -> None:
        """OpenSSL negotiated a session: store it (now, or via the writer thread)."""
        try:
            if not 0 < len(session_id) <= MAX_ID_LEN or not 0 < len(der) <= MAX_VALUE_LEN:
                self._count_dropped_write()
                return
            ttl = float(min(timeout_s, self.timeout) if timeout_s > 0 else self.timeout)
            if self._closed:
                self._count_dropped_write()
            elif self.async_writes:
                self._enqueue((bytes(session_id), bytes(der), ttl))
            else:
                self._write(bytes(session_id), bytes(der), ttl)
        except Exception as exc:  # pragma: no cover - defensive: nothing may reach OpenSSL
            log.error("unexpected error in the new-session callback: %s", describe_error(exc))

    def on_get(self, session_id: bytes) -> bytes | None:
        """A client offers ``session_id``: its DER from the store, or None for a full handshake."""
        try:
            return self._lookup(bytes(session_id))
        except Exception as exc:  # pragma: no cover - defensive
            log.error("unexpected error in the get-session callback: %s", describe_error(exc))
            return None

    def on_remove(self, session_id: bytes) -> None:
        """OpenSSL drops a session: apply :data:`RemovePolicy`."""
        try:
            if self.remove_policy == "ignore":
                with self._lock:
                    self._counts.removes_ignored += 1
                return
            key = bytes(session_id)
            if self._closed:
                with self._lock:
                    self._counts.remove_errors += 1
            elif self.async_writes:
                self._enqueue((key, None, 0.0))
            else:
                self._write(key, None, 0.0)
        except Exception as exc:  # pragma: no cover - defensive
            log.error("unexpected error in the remove-session callback: %s", describe_error(exc))

    # ------------------------------------------------------------ lookups

    def _lookup(self, session_id: bytes) -> bytes | None:
        pending = self._pending.get(session_id)
        if pending is not None:
            with self._lock:
                counts = self._counts
                counts.hits += 1
                counts.pending_hits += 1
            return pending
        if not self.breaker.allow():
            with self._lock:
                self._counts.skipped += 1
            return None
        clock = self._clock
        budget = self._lookup_budget_s
        start = clock()  # one read starts both the deadline and the latency measurement
        try:
            value = _as_bytes(self.store.fetch(session_id, Deadline(start + budget, clock)))
        except StoreTimeout:
            self.breaker.failure()
            self._record_lookup(clock() - start, _Counters.timeout)
            return None
        except SealError:
            # The store answered, with a value that does not authenticate (a sealing
            # wrapper's verdict): a rejected value, not a failing store.
            self.breaker.success()
            self._record_lookup(clock() - start, _Counters.bad_value)
            return None
        except StoreError as exc:
            self.breaker.failure()
            self._record_lookup(clock() - start, _Counters.error)
            log.debug("session lookup failed: %s", type(exc).__name__)
            return None
        except Exception as exc:
            self.breaker.failure()
            self._record_lookup(clock() - start, _Counters.error)
            log.warning(
                "session store raised an unexpected error on fetch: %s", describe_error(exc)
            )
            return None
        elapsed = clock() - start
        outcome: _Outcome
        if value is None:
            outcome = _Counters.miss
        elif self._plausible(value):
            outcome = _Counters.hit
        else:
            value = None
            outcome = _Counters.bad_value
        if elapsed > budget * _LATE_FACTOR:
            # The store ignored its deadline: use the answer, but treat it as a timeout
            # so that a store that blocks keeps the breaker informed.
            self.breaker.failure()
            self._record_lookup(elapsed, _Counters.timeout)
            return value
        self.breaker.success()
        self._record_lookup(elapsed, outcome)
        return value

    @staticmethod
    def _plausible(value: bytes) -> bool:
        """Cheap check before OpenSSL parses it: one DER SEQUENCE of sane size. d2i decides."""
        return len(value) <= MAX_VALUE_LEN and _der_sequence_fits(value)

    def _record_lookup(self, elapsed: float, outcome: _Outcome) -> None:
        """Count a finished lookup: latency histogram and ``outcome`` under one lock."""
        ms = elapsed * 1000.0
        index = bisect.bisect_left(LATENCY_BUCKETS_MS, ms)
        with self._lock:
            self._hist[index] += 1
            if ms > self._max_ms:
                self._max_ms = ms
            outcome(self._counts)

    # ------------------------------------------------------------ writes

    def _write(self, session_id: bytes, value: bytes | None, ttl: float) -> None:
        """One store/delete call with the breaker and the deadline. Never raises."""
        deleting = value is None
        if not self.breaker.allow():
            with self._lock:
                if deleting:
                    self._counts.remove_errors += 1
                else:
                    self._counts.writes_skipped += 1
            return
        clock = self._clock
        budget = self._write_budget_s
        start = clock()
        deadline = Deadline(start + budget, clock)
        try:
            if value is None:
                self.store.delete(session_id, deadline)
            else:
                self.store.store(session_id, value, ttl, deadline)
        except StoreTimeout:
            self.breaker.failure()
            self._count_write(deleting, done=False, timed_out=True)
            return
        except Exception as exc:
            self.breaker.failure()
            self._count_write(deleting, done=False)
            if isinstance(exc, StoreError):
                log.debug("session store write failed: %s", type(exc).__name__)
            else:
                log.warning("session store raised an unexpected error: %s", describe_error(exc))
            return
        if clock() - start > budget * _LATE_FACTOR:
            self.breaker.failure()
            self._count_write(deleting, done=True, timed_out=True)
            return
        self.breaker.success()
        self._count_write(deleting, done=True)

    def _count_write(self, deleting: bool, *, done: bool, timed_out: bool = False) -> None:
        """Count a store or delete call that ran: ``done`` if the store took it."""
        with self._lock:
            counts = self._counts
            if deleting:
                if done:
                    counts.removes += 1
                else:
                    counts.remove_errors += 1
            elif done:
                counts.stores += 1
            else:
                counts.store_errors += 1
            if timed_out:
                counts.store_timeouts += 1

    def _count_dropped_write(self) -> None:
        with self._lock:
            self._counts.writes_dropped += 1

    def _enqueue(self, item: _Write) -> None:
        """Hand a write to the writer thread: an append under the lock, and a wake-up only
        when the writer sleeps (a busy writer drains everything queued before it sleeps)."""
        if self._closed:
            self._count_dropped_write()
            return
        if self._pid != os.getpid():
            self._start_writer()
        session_id, value, _ = item
        with self._lock:
            if self._inflight >= self.write_queue_size:
                self._counts.writes_dropped += 1
                return
            self._items.append(item)
            self._inflight += 1
            if value is None:
                self._pending.pop(session_id, None)
            else:
                self._pending[session_id] = value
            wake = self._writer_waiting
            self._writer_waiting = False
        if wake:
            self._wake.set()

    def _after_fork_in_child(self) -> None:
        """Threads do not survive fork and locks may have been held: start afresh.

        Writes the parent had queued are the parent's; the child drops them.
        """
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._start_lock = threading.Lock()
        self._items = deque()
        self._wake = threading.Event()
        self._writer_waiting = True
        self._pending = {}
        self._inflight = 0
        self._writer = None
        self._pid = -1
        self.breaker._after_fork_in_child()

    def _start_writer(self) -> None:
        """Start the writer thread (again, in a forked child: threads do not survive fork)."""
        if self._pid != -1 and self._pid != os.getpid():
            self._after_fork_in_child()  # only reached where os.register_at_fork is missing
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._writer = threading.Thread(
                target=self._run_writer, name="tlscache-session-writer", daemon=True
            )
            self._writer.start()
            self._pid = os.getpid()

    def _run_writer(self) -> None:
        items, wake, lock = self._items, self._wake, self._lock
        while True:
            wake.wait()
            wake.clear()
            while True:  # drain everything queued, then sleep
                with lock:
                    if not items:
                        self._writer_waiting = True
                        break
                    batch = list(items)
                    items.clear()
                for item in batch:
                    if item is None:
                        return
                    session_id, value, ttl = item
                    try:
                        self._write(session_id, value, ttl)
                    finally:
                        with lock:
                            if value is not None and self._pending.get(session_id) is value:
                                del self._pending[session_id]
                            self._inflight -= 1
                            if self._inflight == 0:
                                self._idle.notify_all()

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait until every queued write is done; False if ``timeout_s`` passed first."""
        if self._pid != os.getpid():
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 1.0) -> None:
        """Finish queued writes (up to ``timeout_s``) and stop the writer; later writes are
        dropped (``writes_dropped``), lookups still work. The store stays open."""
        self._closed = True
        writer = self._writer
        if writer is None or self._pid != os.getpid():
            return
        self.flush(timeout_s)
        with self._lock:
            self._items.append(None)
            self._writer_waiting = False
        self._wake.set()
        writer.join(timeout_s)

    # ------------------------------------------------------------ counters

    def stats(self) -> CacheStats:
        """A consistent snapshot of the counters; cheap enough to poll every second."""
        with self._lock:
            c = replace(self._counts)
            hist = tuple(self._hist)
            max_ms = self._max_ms
            pending = self._inflight
        return CacheStats(
            stores=c.stores,
            store_errors=c.store_errors,
            store_timeouts=c.store_timeouts,
            writes_skipped=c.writes_skipped,
            writes_dropped=c.writes_dropped,
            pending_writes=pending,
            hits=c.hits,
            pending_hits=c.pending_hits,
            misses=c.misses,
            bad_values=c.bad_values,
            errors=c.errors,
            timeouts=c.timeouts,
            skipped=c.skipped,
            removes=c.removes,
            removes_ignored=c.removes_ignored,
            remove_errors=c.remove_errors,
            breaker_state=self.breaker.state.value,
            breaker_opens=self.breaker.opens,
            latency_buckets_ms=LATENCY_BUCKETS_MS,
            latency_counts=hist,
            latency_p50_ms=histogram_quantile(LATENCY_BUCKETS_MS, hist, 0.50, max_ms),
            latency_p99_ms=histogram_quantile(LATENCY_BUCKETS_MS, hist, 0.99, max_ms),
            latency_max_ms=max_ms,
        )

    def __repr__(self) -> str:
        return (
            f"<SessionCache store={type(self.store).__name__} timeout={self.timeout}s "
            f"breaker={self.breaker.state.value}>"
        )
