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
* with a key ring (``keys=``) the store is untrusted storage: it sees neither
  session ids nor sessions, only keyed hashes of the ids and sealed values
  (:mod:`tlscache.sealing`); a value that does not open is a miss;
* sessions are deleted from the store only when their connection ended in a
  fatal alert, by default (see :data:`RemovePolicy`);
* with ``single_use=True`` a TLS 1.3 ticket resumes at most once across the farm:
  the lookup takes the entry (an atomic get-and-delete in the store) instead of
  reading it. TLS 1.2 sessions stay reusable (see :meth:`SessionCache._lookup_once`).
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import gc
import logging
import os
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

from tlscache.deadline import Clock, Deadline
from tlscache.exceptions import (
    ConfigurationError,
    SealError,
    SealFailure,
    StoreError,
    StoreTimeout,
    describe_error,
)
from tlscache.forksafe import repair_after_fork
from tlscache.keyring import KeyRing, KeyRingFile
from tlscache.latency import histogram_quantile
from tlscache.sealing import SEAL_OVERHEAD, Sealer
from tlscache.stores.base import MAX_ID_LEN, MAX_VALUE_LEN, SessionStore, WriteStatus
from tlscache.stores.near import NearCache

if TYPE_CHECKING:
    from OpenSSL import SSL

    from tlscache.stores.aio import AsyncSessionStore

__all__ = [
    "LATENCY_BUCKETS_MS",
    "BreakerState",
    "CacheStats",
    "CircuitBreaker",
    "RemovePolicy",
    "SessionCache",
]

log = logging.getLogger("tlscache.session_cache")

#: When sessions are deleted from the shared store.
#:
#: ``"alerts"`` (default): when the connection that used or was issued them sent
#: or received a fatal alert (``on_fatal_alert``); a session whose connection
#: ended that way must not be resumed (RFC 5246, section 7.2.2). OpenSSL's remove
#: callback is ignored: it also fires for connections closed without close_notify
#: and for sessions it considers expired, whose deletion would throw away sessions
#: other servers could still resume (the store's TTL expires entries anyway).
#: ``"delete"``: remove callbacks delete too. ``"ignore"``: nothing is ever deleted
#: (not recommended: sessions of failed connections stay resumable).
RemovePolicy = Literal["alerts", "delete", "ignore"]
_REMOVE_POLICIES: Final = ("alerts", "delete", "ignore")

#: Upper bounds (ms) of the lookup latency histogram; a last bucket catches the rest.
LATENCY_BUCKETS_MS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)

_DER_SEQUENCE = 0x30
_DER_INTEGER = 0x02
_TLS10, _TLS12 = 0x0301, 0x0303
#: A call that takes this many times its time budget counts as a timeout (scheduling
#: jitter past the deadline does not; a store that ignores deadlines does).
_LATE_FACTOR = 2.0
#: An async lookup's timeout noticed this many budgets after it was due was held up by a
#: busy event loop (its timer ran late), not necessarily by the store.
_LOOP_LAG = 0.5


class BreakerState(enum.Enum):
    """Circuit breaker states."""

    CLOSED = "closed"  # calls go to the store
    OPEN = "open"  # calls are skipped until the cool-down ends
    HALF_OPEN = "half_open"  # one probe call is in flight; the others are skipped


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a single half-open probe.

    After ``threshold`` consecutive failures it opens; ``reset_s`` later the next
    caller becomes the probe: its success closes the breaker, its failure opens
    it for another ``reset_s``, and a call that proves nothing (:meth:`undecided`:
    a write sent without an answer) neither counts nor holds the probe's turn.
    While open, :meth:`allow` is a lock and a clock read, so skipping costs microseconds.
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

    def undecided(self) -> None:
        """A store call that proves nothing either way (a write sent, no answer yet).

        Neither a success (a stopped server's socket buffer takes writes too) nor a
        failure. A probe that comes to this hands its turn to the next call at once,
        so that recovery is not held up for another period by a write.
        """
        if self._state is not BreakerState.HALF_OPEN:
            return
        with self._lock:
            if self._state is BreakerState.HALF_OPEN:
                self._next_probe = Deadline(0.0, self._clock)

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
    misses: int  #: lookups that found no usable session (absent, rejected or refused)
    bad_values: int  #: values from the store rejected: implausible or refused by the seal
    sealed_refused: int  #: values that did not open (the sum of the five below)
    sealed_malformed: int  #: not a sealed value of a known version
    sealed_unknown_key: int  #: sealed under a key this ring never had
    sealed_retired_key: int  #: sealed under a key retired since
    sealed_tampered: int  #: failed authentication: forged, altered, moved or truncated
    sealed_expired: int  #: authentic, but past its sealed lifetime or this cache's timeout
    errors: int  #: lookups that failed (not timeouts)
    timeouts: int  #: lookups that exceeded their deadline
    skipped: int  #: lookups not attempted: breaker open
    removes: int  #: deletes the store carried out
    removes_ignored: int  #: deletes not made because of the remove policy
    remove_errors: int  #: deletes that failed or were not attempted (breaker open, closed)
    alerts_invalidated: int  #: sessions deleted because their connection had a fatal alert
    breaker_state: str  #: ``closed``, ``open`` or ``half_open``
    breaker_opens: int  #: times the breaker opened
    latency_buckets_ms: tuple[float, ...]  #: histogram upper bounds; last bucket is +inf
    latency_counts: tuple[int, ...]  #: lookups per bucket (len(buckets) + 1 entries)
    latency_p50_ms: float  #: median lookup latency, interpolated from the histogram
    latency_p99_ms: float  #: 99th percentile, interpolated from the histogram
    latency_max_ms: float  #: slowest lookup seen
    latency_sum_ms: float = 0.0  #: all lookups' times added up (a Prometheus histogram's _sum)
    takes: int = 0  #: single use: TLS 1.3 sessions handed out and removed from the store
    take_misses: int = 0  #: single use: takes that found nothing (absent, expired, used)
    take_fallbacks: int = 0  #: of ``takes``, by GET then DELETE (a store without take)
    put_back: int = 0  #: single use: TLS 1.2 sessions taken, then stored again (reusable)

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
    alerts_invalidated: int = 0
    sealed_refused: int = 0
    sealed_malformed: int = 0
    sealed_unknown_key: int = 0
    sealed_retired_key: int = 0
    sealed_tampered: int = 0
    sealed_expired: int = 0
    takes: int = 0
    take_misses: int = 0
    take_fallbacks: int = 0
    put_back: int = 0

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

    def _refused(self) -> None:
        self.misses += 1
        self.bad_values += 1
        self.sealed_refused += 1

    def malformed(self) -> None:
        self._refused()
        self.sealed_malformed += 1

    def unknown_key(self) -> None:
        self._refused()
        self.sealed_unknown_key += 1

    def retired_key(self) -> None:
        self._refused()
        self.sealed_retired_key += 1

    def tampered(self) -> None:
        self._refused()
        self.sealed_tampered += 1

    def expired(self) -> None:
        self._refused()
        self.sealed_expired += 1


#: What a finished lookup counts: one of the outcome methods of :class:`_Counters`.
_Outcome = Callable[[_Counters], None]

#: What a value that did not open counts, by :class:`SealError` failure.
_REFUSED: Final[dict[SealFailure, _Outcome]] = {
    "malformed": _Counters.malformed,
    "unknown_key": _Counters.unknown_key,
    "retired_key": _Counters.retired_key,
    "tampered": _Counters.tampered,
    "expired": _Counters.expired,
}


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


def _der_fields(der: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, contents) of each element of the outer DER SEQUENCE, in order; stops at the
    first element that does not fit (the caller then knows less, never something wrong)."""
    if len(der) < 2 or der[0] != _DER_SEQUENCE:
        return
    i, n = 2, len(der)
    if der[1] & 0x80:
        i += der[1] & 0x7F
    while i + 2 <= n:
        tag, length = der[i], der[i + 1]
        i += 2
        if length & 0x80:
            k = length & 0x7F
            if not 1 <= k <= 4 or i + k > n:
                return
            length = int.from_bytes(der[i : i + k], "big")
            i += k
        if i + length > n:
            return
        yield tag, der[i : i + length]
        i += length


def _der_int(contents: bytes) -> int | None:
    """An INTEGER TLV's value (``contents`` is the whole TLV, as in an EXPLICIT tag)."""
    if len(contents) < 3 or contents[0] != _DER_INTEGER or contents[1] != len(contents) - 2:
        return None
    return int.from_bytes(contents[2:], "big", signed=True)


def _single_use_applies(der: bytes) -> bool:
    """Whether single use applies to this session: anything but TLS 1.0-1.2.

    OpenSSL's session DER starts ``SEQUENCE { INTEGER 1, INTEGER ssl_version, ...}``;
    OpenSSL resumes a session only in a handshake of that same version, so this field
    says which kind of resumption the session can give. Unknown layouts count as TLS 1.3
    (single use), the safe side.
    """
    fields = _der_fields(der)
    first = next(fields, None)
    second = next(fields, None)
    if first != (_DER_INTEGER, b"\x01") or second is None or second[0] != _DER_INTEGER:
        return True
    return not _TLS10 <= int.from_bytes(second[1], "big") <= _TLS12


def _seconds_left(der: bytes, now: float) -> float | None:
    """Seconds until the session's own expiry (``[1] time`` + ``[2] timeout``), if readable."""
    issued = lifetime = None
    for tag, contents in _der_fields(der):
        if tag == 0xA1:
            issued = _der_int(contents)
        elif tag == 0xA2:
            lifetime = _der_int(contents)
    if issued is None or lifetime is None:
        return None
    return issued + lifetime - now


def _store_chain(store: SessionStore) -> Iterator[SessionStore]:
    """``store`` and the stores it wraps (``inner``), outermost first."""
    seen: set[int] = set()
    current: object = store
    while isinstance(current, SessionStore) and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "inner", None)


#: A store call that answers a lookup: ``fetch`` or ``take``.
_Read = Callable[[bytes, Deadline], bytes | None]
#: The same on an :class:`~tlscache.stores.aio.AsyncSessionStore`.
_AsyncRead = Callable[[bytes, Deadline], Awaitable[bytes | None]]


def _as_bytes(value: object) -> bytes | None:
    """A store's answer as bytes; a wrong type becomes b"" (rejected as implausible)."""
    if value is None or type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return b""


_gc = threading.local()


def _note_collection(phase: str, info: dict[str, int]) -> None:
    _gc.collecting = phase == "start"


gc.callbacks.append(_note_collection)


def _in_collection() -> bool:
    """Whether this thread is inside a garbage collection (which may have started at any
    allocation, with any lock of this process held by this very thread)."""
    return getattr(_gc, "collecting", False)


#: A queued write: (store key, value to store or None to delete, ttl, the session's DER for
#: answering lookups while the write is queued, or None).
_Write = tuple[bytes, bytes | None, float, bytes | None]

#: Every SessionCache of this process (each with its breaker), for the fork handler.


class SessionCache:
    """OpenSSL session callbacks backed by a shared :class:`SessionStore`.

    ``timeout`` (s) is the session lifetime: set on the Context by :meth:`install`
    and the upper bound of a stored entry's TTL and of a sealed session's age.
    ``deadline_ms`` bounds each lookup (``write_deadline_ms``, default the same,
    each write). The breaker opens after ``breaker_threshold`` consecutive
    failures and probes again ``breaker_reset_s`` later. New sessions are written
    inside the callback; with ``async_writes=True`` they go to one writer thread
    instead, through a queue of at most ``write_queue_size`` writes not yet done.

    ``keys`` (a :class:`~tlscache.keyring.KeyRing`, a
    :class:`~tlscache.keyring.KeyRingFile`, or the path of a key ring file, which
    is then followed through rotations) seals every session before it reaches the
    store: the store key is a keyed hash of (session id context, session id) and
    the value is encrypted and authenticated (:mod:`tlscache.sealing`). Without
    keys, sessions are stored as they are, under their ids, which :meth:`install`
    accepts only for an in-process store or with ``insecure_unsealed_storage=True``
    (see ``docs/security.md``). ``remove_policy`` says when sessions are deleted
    from the store (:data:`RemovePolicy`).

    ``single_use=True`` makes each TLS 1.3 ticket resume at most once across every
    server sharing the store: lookups take the entry (``store.take``) instead of
    reading it. A store without an atomic take gets a GET then a DELETE instead
    (best effort, counted in ``take_fallbacks``); a :class:`~tlscache.stores.NearCache`
    is refused. See ``docs/session-cache.md``, "Single-use tickets".

    Each lookup and each write gets one :class:`~tlscache.deadline.Deadline` on
    ``clock`` (monotonic, seconds; injectable for tests), which also times lookups
    and drives the breaker. A store must honour the deadline it is given: a call
    that blocks stalls the handshake that made it (see ``docs/session-cache.md``).

    ``async_store`` (an :class:`~tlscache.stores.aio.AsyncSessionStore` reaching the same
    sessions as ``store``) answers :meth:`on_get_async`, the lookups of an event-loop
    server (see :class:`~tlscache.openssl.clienthello.NonblockingResumption`); writes and
    deletes of the callbacks still go to ``store``.

    One SessionCache may serve several Contexts. It never raises into OpenSSL:
    every failure becomes a miss (lookup) or a dropped write, and is counted.
    """

    def __init__(
        self,
        store: SessionStore,
        timeout: int = 300,
        *,
        keys: KeyRing | KeyRingFile | str | os.PathLike[str] | None = None,
        insecure_unsealed_storage: bool = False,
        deadline_ms: float = 20.0,
        write_deadline_ms: float | None = None,
        breaker_threshold: int = 5,
        breaker_reset_s: float = 5.0,
        remove_policy: RemovePolicy = "alerts",
        session_id_context: bytes | None = None,
        async_writes: bool = False,
        write_queue_size: int = 1024,
        stateful_tls13_tickets: bool = True,
        num_tickets: int | None = None,
        single_use: bool = False,
        async_store: AsyncSessionStore | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if timeout < 1:
            raise ConfigurationError("timeout must be at least 1 second")
        if deadline_ms <= 0 or (write_deadline_ms is not None and write_deadline_ms <= 0):
            raise ConfigurationError("deadlines must be positive")
        if remove_policy not in _REMOVE_POLICIES:
            raise ConfigurationError("remove_policy must be 'alerts', 'delete' or 'ignore'")
        if write_queue_size < 1:
            raise ConfigurationError("write_queue_size must be at least 1")
        if keys is not None and insecure_unsealed_storage:
            raise ConfigurationError("pass keys or insecure_unsealed_storage=True, not both")
        if single_use and any(isinstance(s, NearCache) for s in _store_chain(store)):
            raise ConfigurationError(
                "single_use=True needs every lookup to reach the shared store, and a "
                "NearCache answers from a local copy (a ticket used on another server "
                "would still resume here): drop the near cache or single use"
            )
        self.store = store
        self.async_store = async_store
        self.timeout = int(timeout)
        if keys is None:
            self.sealer: Sealer | None = None
        elif isinstance(keys, KeyRing | KeyRingFile):
            self.sealer = Sealer(keys)
        else:
            self.sealer = Sealer(KeyRingFile(keys))
        self.insecure_unsealed_storage = insecure_unsealed_storage
        # The longest DER that still fits a store value once sealed.
        self._max_der = MAX_VALUE_LEN - (SEAL_OVERHEAD if self.sealer is not None else 0)
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
        self.single_use = single_use
        self._take_checked = False  # single use: the store was asked whether it can take
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_s, clock=clock)

        self._lock = threading.Lock()
        self._counts = _Counters()
        self._hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._max_ms = 0.0
        self._sum_ms = 0.0
        self._closed = False
        self._warned_unsealed = False
        # Writer state; the thread starts lazily, and again in a forked child.
        self._pid = -1
        self._items: deque[_Write | None] = deque()  # None: stop (from close())
        self._wake = threading.Event()
        self._writer_waiting = True  # the writer sleeps (or is not started): wake it
        self._pending: dict[bytes, bytes] = {}  # store key -> DER of a queued write
        self._inflight = 0  # queued + being written
        self._idle = threading.Condition(self._lock)
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Work of callbacks that could not take a lock: counter increments, and deletes
        # asked for inside a garbage collection. Append-only from the callbacks (atomic,
        # no lock); drained by stats() and by the next lookup or write.
        self._deferred_counts: deque[tuple[str, int]] = deque()
        self._deferred_deletes: deque[tuple[bytes, bytes]] = deque()
        repair_after_fork(self)

    @property
    def sealed(self) -> bool:
        """Whether sessions are sealed before they reach the store."""
        return self.sealer is not None

    # ------------------------------------------------------------ setup

    def install(self, ctx: SSL.Context | ssl.SSLContext) -> bytes:
        """Route ``ctx``'s session cache through this object and set its session timeout.

        ``ctx`` is a pyOpenSSL ``Context`` or a standard library ``ssl.SSLContext``
        (asyncio servers; see ``docs/servers/asyncio-stdlib.md``).

        Returns the session id context set on ``ctx`` (``session_id_context``, or the
        default derived from the server's certificate and trust settings).

        Raises :class:`~tlscache.exceptions.ConfigurationError` if the store is
        shared (not in-process) and sessions would be stored unsealed without
        ``insecure_unsealed_storage=True``, and
        :class:`~tlscache.exceptions.ResolverError` if the OpenSSL functions
        needed cannot be found for the OpenSSL pyOpenSSL uses.
        """
        if self.sealer is None and not self.insecure_unsealed_storage and not self.store.in_process:
            raise ConfigurationError(
                f"{type(self.store).__name__} is shared storage, and a stored session "
                "holds its master secret and the client's identity: seal sessions with "
                "a key ring. Create one with 'tlscache-keys generate PATH', copy it to "
                "every server, and pass keys=PATH. To store sessions unsealed anyway, "
                "pass insecure_unsealed_storage=True (see docs/security.md for what "
                "that gives up)."
            )
        from tlscache.openssl.callbacks import install_callbacks
        from tlscache.openssl.stdlib import install_stdlib_callbacks

        if isinstance(ctx, ssl.SSLContext):
            context = install_stdlib_callbacks(
                ctx,
                self,
                session_id_context=self.session_id_context,
                stateful_tls13_tickets=self.stateful_tls13_tickets,
                num_tickets=self.num_tickets,
                timeout_s=self.timeout,
            ).session_id_context
        else:
            context = install_callbacks(
                ctx,
                self,
                session_id_context=self.session_id_context,
                disable_internal_cache=True,
                stateful_tls13_tickets=self.stateful_tls13_tickets,
                num_tickets=self.num_tickets,
            )
            ctx.set_timeout(self.timeout)
        if self.single_use and not self._take_checked:
            self._check_take()
        if self.insecure_unsealed_storage and not self._warned_unsealed:
            self._warned_unsealed = True
            log.warning(
                "INSECURE: sessions go to %s unsealed, under their real ids "
                "(insecure_unsealed_storage=True): whoever can read the store can read and "
                "resume them, and whoever can write it can plant sessions with any client "
                "identity. Use a key ring instead (keys=PATH; see docs/security.md).",
                type(self.store).__name__,
            )
        return context

    def _check_take(self) -> None:
        """Single use: learn whether the store can take (a distcache server says so only
        when probed: probe it now, best effort), and say once if it cannot."""
        self._take_checked = True
        for store in _store_chain(self.store):
            probe = getattr(store, "capabilities", None)
            if callable(probe):
                try:
                    probe(Deadline.after(self._lookup_budget_s, self._clock))
                except Exception as exc:
                    # DistcacheStore.fetch probes again; until then, lookups GET and DELETE.
                    log.warning(
                        "could not ask %s whether it can take (%s): single use is "
                        "best-effort (GET, then DELETE) until it answers",
                        type(store).__name__,
                        type(exc).__name__,
                    )
                    return
                break
        if not self.store.supports_take:
            log.warning(
                "single use is best-effort on %s: it has no atomic take, so a TLS 1.3 "
                "session is read, then deleted. A lookup elsewhere between the GET and the "
                "DELETE reaching the store resumes it too (the replay window: one store "
                "round trip, at most %.0f ms here).",
                type(self.store).__name__,
                self._write_budget_s * 1000.0,
            )

    # ------------------------------------------------------------ OpenSSL callbacks

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        """OpenSSL negotiated a session: store it (now, or via the writer thread)."""
        try:
            if self._deferred_deletes:
                self._run_deferred_deletes()
            if not 0 < len(session_id) <= MAX_ID_LEN or not 0 < len(der) <= self._max_der:
                self._count_dropped_write()
                return
            if self._closed:
                self._count_dropped_write()
                return
            lifetime = min(timeout_s, self.timeout) if timeout_s > 0 else self.timeout
            der = bytes(der)
            sealer = self.sealer
            if sealer is None:
                key, value = bytes(session_id), der
            else:
                context = bytes(context)
                key = sealer.lookup_key(context, session_id)
                value = sealer.seal(key, context, der, lifetime)
            if self.async_writes:
                self._enqueue((key, value, float(lifetime), der))
            else:
                self._write(key, value, float(lifetime))
        except Exception as exc:  # pragma: no cover - defensive: nothing may reach OpenSSL
            log.error("unexpected error in the new-session callback: %s", describe_error(exc))

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        """A client offers ``session_id``: its DER from the store, or None for a full handshake.

        ``tls13`` says whether the handshake is TLS 1.3 (None: unknown). Single use
        applies to TLS 1.3 only, so a TLS 1.2 lookup reads as usual; unknown, the
        session's own version decides once it is in hand.
        """
        try:
            if self._deferred_deletes:
                self._run_deferred_deletes()
            sealer = self.sealer
            lookup = self._lookup_once if self.single_use and tls13 is not False else self._lookup
            if sealer is None:
                return lookup(bytes(session_id), None)
            context = bytes(context)
            return lookup(sealer.lookup_key(context, session_id), context)
        except Exception as exc:  # pragma: no cover - defensive
            log.error("unexpected error in the get-session callback: %s", describe_error(exc))
            return None

    async def on_get_async(
        self, context: bytes, session_id: bytes, tls13: bool | None = None
    ) -> bytes | None:
        """:meth:`on_get` on ``async_store``, awaited on the running event loop.

        Every decision is :meth:`on_get`'s (queued writes, breaker, deadline, sealing,
        single use, counters); only the store round trip is awaited instead of waited
        for. Never raises (cancellation aside); without ``async_store`` it is a miss.
        """
        try:
            if self.async_store is None:
                return None
            if self._deferred_deletes:
                self._run_deferred_deletes()
            sealer = self.sealer
            if self.single_use and tls13 is not False:
                lookup = self._lookup_once_async
            else:
                lookup = self._lookup_async
            if sealer is None:
                return await lookup(bytes(session_id), None)
            context = bytes(context)
            return await lookup(sealer.lookup_key(context, session_id), context)
        except Exception as exc:  # pragma: no cover - defensive
            log.error("unexpected error in the async session lookup: %s", describe_error(exc))
            return None

    def on_remove(self, context: bytes, session_id: bytes) -> None:
        """OpenSSL drops a session: deleted from the store only with ``remove_policy="delete"``.

        OpenSSL calls this when it frees a connection, which the garbage collector may do
        at any allocation: inside this cache's locked regions, a store's, or the
        breaker's, on this very thread. So it never waits for a lock (see
        :meth:`_count_nowait`), and inside a collection it only notes the delete, which
        the next lookup or write (or :meth:`stats`, :meth:`flush`) carries out.
        """
        try:
            if self.remove_policy != "delete":
                self._count_nowait("removes_ignored", 1)
                return
            self._delete(context, session_id)
        except Exception as exc:  # pragma: no cover - defensive
            log.error("unexpected error in the remove-session callback: %s", describe_error(exc))

    def on_fatal_alert(self, context: bytes, session_ids: Sequence[bytes]) -> None:
        """A connection sent or received a fatal alert: the sessions it used or was issued
        must not be resumed (RFC 5246, section 7.2.2), so they are deleted from the store
        (unless ``remove_policy="ignore"``)."""
        try:
            ids = list(dict.fromkeys(bytes(s) for s in session_ids if 0 < len(s) <= MAX_ID_LEN))
            if not ids:
                return
            if self.remove_policy == "ignore":
                self._count_nowait("removes_ignored", len(ids))
                return
            self._count_nowait("alerts_invalidated", len(ids))
            for session_id in ids:
                self._delete(context, session_id)
        except Exception as exc:  # pragma: no cover - defensive
            log.error("unexpected error in the fatal-alert callback: %s", describe_error(exc))

    def _delete(self, context: bytes, session_id: bytes) -> None:
        """Delete one session from the store, by the key it was stored under."""
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return
        if _in_collection():
            # A store call here could wait on a lock this thread holds (the store's, the
            # breaker's, this cache's): do it at the next safe point instead.
            self._deferred_deletes.append((bytes(context), bytes(session_id)))
            return
        sealer = self.sealer
        key = bytes(session_id) if sealer is None else sealer.lookup_key(bytes(context), session_id)
        if self._closed:
            self._count_nowait("remove_errors", 1)
        elif self.async_writes:
            self._enqueue((key, None, 0.0, None))
        else:
            self._write(key, None, 0.0)

    def _count_nowait(self, counter: str, n: int) -> None:
        """Add ``n`` to ``counter`` without ever waiting for the lock.

        Callbacks OpenSSL may make from a garbage collection use this: the collection
        may have started at an allocation inside a region that holds this lock on this
        thread (``stats()``, counting a lookup), and waiting would hang the process.
        When the lock is taken, the increment goes to an append-only deque (atomic, no
        lock) that :meth:`stats` adds in. Non-blocking acquisition was chosen over
        keeping every locked region free of allocations: that cannot be kept true of
        every future edit, nor of the stores' own locks.
        """
        if self._lock.acquire(blocking=False):
            try:
                setattr(self._counts, counter, getattr(self._counts, counter) + n)
            finally:
                self._lock.release()
        else:
            self._deferred_counts.append((counter, n))

    def _run_deferred_deletes(self) -> None:
        """Carry out the deletes OpenSSL asked for inside a garbage collection."""
        if _in_collection():
            return
        deferred = self._deferred_deletes
        while True:
            try:
                context, session_id = deferred.popleft()
            except IndexError:
                return
            self._delete(context, session_id)

    # ------------------------------------------------------------ lookups
    #
    # A lookup is three steps, so that the blocking and the asyncio paths make the same
    # decisions and differ only in how they wait for the store: _begin_lookup (queued
    # writes, breaker), the store call, then _finish_lookup or _lookup_failed (breaker,
    # sealing, plausibility, lateness, counters and latency).

    def _begin_lookup(self, key: bytes, check_pending: bool) -> tuple[bytes | None, float | None]:
        """(answer, None) when no store call is needed (a queued write, an open breaker),
        else (None, the start time the lookup's deadline and latency count from)."""
        if check_pending:
            pending = self._pending.get(key)
            if pending is not None:
                with self._lock:
                    counts = self._counts
                    counts.hits += 1
                    counts.pending_hits += 1
                return pending, None
        if not self.breaker.allow():
            with self._lock:
                self._counts.skipped += 1
            return None, None
        return None, self._clock()

    def _lookup_failed(self, exc: Exception, elapsed: float, *, blame: bool = True) -> None:
        """Count a store call that raised (the lookup is a miss). ``blame=False``: a
        timeout the store may not have caused, which tells the breaker nothing."""
        if isinstance(exc, StoreTimeout):
            if blame:
                self.breaker.failure()
            else:
                self.breaker.undecided()
            self._record_lookup(elapsed, _Counters.timeout)
        elif isinstance(exc, SealError):
            # The store answered, with a value that does not authenticate (a sealing
            # wrapper's verdict): a rejected value, not a failing store.
            self.breaker.success()
            self._record_lookup(elapsed, _REFUSED.get(exc.failure, _Counters.tampered))
        elif isinstance(exc, StoreError):
            self.breaker.failure()
            self._record_lookup(elapsed, _Counters.error)
            log.debug("session lookup failed: %s", type(exc).__name__)
        else:
            self.breaker.failure()
            self._record_lookup(elapsed, _Counters.error)
            log.warning(
                "session store raised an unexpected error on fetch: %s", describe_error(exc)
            )

    def _finish_lookup(
        self,
        key: bytes,
        context: bytes | None,
        value: bytes | None,
        elapsed: float,
        late_is_failure: bool = True,
    ) -> bytes | None:
        """The store answered ``value`` after ``elapsed`` s: open and check it, count it.

        ``late_is_failure=False`` (the async path, which cuts a store off at its deadline
        itself): an answer later than that was held up by the loop, not by the store.
        """
        outcome: _Outcome
        if value is None:
            outcome = _Counters.miss
        elif context is not None and self.sealer is not None and len(value) <= MAX_VALUE_LEN:
            try:
                value = self.sealer.open(key, context, value, self.timeout)
            except SealError as exc:
                value = None
                outcome = _REFUSED.get(exc.failure, _Counters.tampered)
        if value is not None:
            if self._plausible(value):
                outcome = _Counters.hit
            else:
                value = None
                outcome = _Counters.bad_value
        if late_is_failure and elapsed > self._lookup_budget_s * _LATE_FACTOR:
            # The store ignored its deadline: use the answer, but treat it as a timeout
            # so that a store that blocks keeps the breaker informed.
            self.breaker.failure()
            self._record_lookup(elapsed, _Counters.timeout)
            return value
        self.breaker.success()
        self._record_lookup(elapsed, outcome)
        return value

    def _lookup(self, key: bytes, context: bytes | None, read: _Read | None = None) -> bytes | None:
        """One store round trip for ``key``; ``context`` is None when values are unsealed.

        ``read`` replaces ``store.fetch`` (single use passes ``store.take``); then the
        caller has looked at the queued writes itself.
        """
        answer, start = self._begin_lookup(key, read is None)
        if start is None:
            return answer
        clock = self._clock
        try:
            value = (self.store.fetch if read is None else read)(
                key, Deadline(start + self._lookup_budget_s, clock)
            )
        except Exception as exc:
            self._lookup_failed(exc, clock() - start)
            return None
        # The store's time is measured up to here; opening the value is ours.
        return self._finish_lookup(key, context, _as_bytes(value), clock() - start)

    async def _lookup_async(
        self, key: bytes, context: bytes | None, read: _AsyncRead | None = None
    ) -> bytes | None:
        """:meth:`_lookup` on the async store: the same steps, the round trip awaited.

        The store keeps the deadline, as on the blocking path; the cache cuts off a store
        that does not at twice the budget (as the blocking path counts such a call as a
        timeout), so a paused handshake never waits longer. Not at the deadline itself: a
        reply that arrived just before it would be thrown away whenever the loop runs
        late. Times here are the loop's view and include the loop's own lateness, so a
        timeout noticed more than half a budget after it was due (a loop busy with other
        work) counts as a timeout but tells the breaker nothing, and an answer that came
        late is used as on time: an overloaded server must not turn resumption off (full
        handshakes cost it more) because of its own backlog.
        """
        answer, start = self._begin_lookup(key, read is None)
        if start is None:
            return answer
        clock = self._clock
        budget = self._lookup_budget_s
        try:
            async with asyncio.timeout(budget * _LATE_FACTOR):
                store = self.async_store
                assert store is not None
                value = await (store.fetch if read is None else read)(
                    key, Deadline(start + budget, clock)
                )
        except TimeoutError as exc:
            elapsed = clock() - start
            if isinstance(exc, StoreTimeout):
                failure, due = exc, budget
            else:
                failure, due = StoreTimeout("lookup overran its deadline"), budget * _LATE_FACTOR
            self._lookup_failed(failure, elapsed, blame=elapsed - due <= budget * _LOOP_LAG)
            return None
        except Exception as exc:
            self._lookup_failed(exc, clock() - start)
            return None
        except asyncio.CancelledError:
            self.breaker.undecided()  # the caller went away: no verdict on the store
            raise
        return self._finish_lookup(key, context, _as_bytes(value), clock() - start, False)

    def _take_pending(self, key: bytes) -> bytes | None:
        """Single use: a session still queued for writing in this process, handed out
        (and, if single use applies, taken from the queue), or None."""
        pending = self._pending.get(key)
        if pending is None:
            return None
        if not _single_use_applies(pending):
            with self._lock:
                self._counts.hits += 1
                self._counts.pending_hits += 1
            return pending
        with self._lock:
            won = self._pending.get(key) is pending
            if won:
                # The writer skips a write whose session is no longer pending.
                del self._pending[key]
                counts = self._counts
                counts.hits += 1
                counts.pending_hits += 1
                counts.takes += 1
        # Not won: the writer has claimed it: it is in the store, or about to be.
        return pending if won else None

    def _took(
        self, key: bytes, context: bytes | None, der: bytes | None, found: list[bool]
    ) -> bytes | None:
        """Single use: count a take's result; a session single use does not apply to is
        put back (``found``: whether the store's take answered with a value)."""
        if der is None:
            if found == [False]:
                self._count_nowait("take_misses", 1)
            return None
        if _single_use_applies(der):
            self._count_nowait("takes", 1)
        else:
            self._put_back(key, context, der)
        return der

    def _count_fallback_take(self) -> None:
        with self._lock:
            self._counts.takes += 1
            self._counts.take_fallbacks += 1

    def _lookup_once(self, key: bytes, context: bytes | None) -> bytes | None:
        """Single use: a TLS 1.3 session is handed out at most once, then gone from the store.

        The store is asked to take (get and delete atomically), so that of several
        servers offered the same ticket at once exactly one gets it. Used when the
        handshake's version is TLS 1.3 or unknown; when unknown, it shows once the session
        is in hand: a TLS 1.2 session taken this way is stored again at once with what is
        left of its lifetime. TLS 1.2 session ids are
        meant to be reused (a client resumes one on several connections, often in
        parallel), RFC 8446 section 8.1 asks single use of TLS 1.3 tickets only, and
        Apache never deletes on use; a parallel TLS 1.2 lookup in the moment between the
        take and the store makes a full handshake. A store without take gets a GET, then
        a DELETE of a TLS 1.3 session before it is handed out (``take_fallbacks``); a
        session whose DELETE failed is not used.
        """
        if key in self._pending:
            taken = self._take_pending(key)
            if taken is not None:
                return taken
        store = self.store
        if store.supports_take:
            found: list[bool] = []  # whether the store's take answered with a value

            def take(k: bytes, deadline: Deadline) -> bytes | None:
                value = store.take(k, deadline)
                found.append(value is not None)
                return value

            return self._took(key, context, self._lookup(key, context, take), found)
        der = self._lookup(key, context, store.fetch)
        if der is None or not _single_use_applies(der):
            return der
        if not self._write(key, None, 0.0):
            return None  # still in the store: not used (a hit, and a remove error)
        self._count_fallback_take()
        return der

    async def _lookup_once_async(self, key: bytes, context: bytes | None) -> bytes | None:
        """:meth:`_lookup_once` on the async store (same rules, same counters)."""
        if key in self._pending:
            taken = self._take_pending(key)
            if taken is not None:
                return taken
        store = self.async_store
        assert store is not None
        if store.supports_take:
            found: list[bool] = []

            async def take(k: bytes, deadline: Deadline) -> bytes | None:
                value = await store.take(k, deadline)
                found.append(value is not None)
                return value

            return self._took(key, context, await self._lookup_async(key, context, take), found)
        der = await self._lookup_async(key, context, store.fetch)
        if der is None or not _single_use_applies(der):
            return der
        if not await self._delete_async(key):
            return None
        self._count_fallback_take()
        return der

    def _put_back(self, key: bytes, context: bytes | None, der: bytes) -> None:
        """Store again a session that single use does not apply to, for its remaining life."""
        left = _seconds_left(der, time.time())
        ttl = self.timeout if left is None else min(self.timeout, int(left))
        if ttl < 1:
            return  # expired: OpenSSL refuses it anyway
        sealer = self.sealer
        value = der if sealer is None or context is None else sealer.seal(key, context, der, ttl)
        self._count_nowait("put_back", 1)
        if self.async_writes:
            self._enqueue((key, value, float(ttl), der))
        else:
            self._write(key, value, float(ttl))

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
            self._sum_ms += ms
            if ms > self._max_ms:
                self._max_ms = ms
            outcome(self._counts)

    # ------------------------------------------------------------ writes

    def _begin_write(self, deleting: bool) -> float | None:
        """The start time of a store/delete call, or None (counted) if the breaker is open."""
        if self.breaker.allow():
            return self._clock()
        with self._lock:
            if deleting:
                self._counts.remove_errors += 1
            else:
                self._counts.writes_skipped += 1
        return None

    def _write_failed(self, deleting: bool, exc: Exception) -> None:
        self.breaker.failure()
        if isinstance(exc, StoreTimeout):
            self._count_write(deleting, done=False, timed_out=True)
            return
        self._count_write(deleting, done=False)
        if isinstance(exc, StoreError):
            log.debug("session store write failed: %s", type(exc).__name__)
        else:
            log.warning("session store raised an unexpected error: %s", describe_error(exc))

    def _write_done(self, deleting: bool, elapsed: float, status: WriteStatus | None) -> None:
        if elapsed > self._write_budget_s * _LATE_FACTOR:
            self.breaker.failure()
            self._count_write(deleting, done=True, timed_out=True)
            return
        if status is WriteStatus.SENT:
            # Only an answer from the store is a success: a pipelined write that only
            # reached the kernel would otherwise reset the failures of a stalled store.
            self.breaker.undecided()
        else:
            self.breaker.success()
        self._count_write(deleting, done=True)

    def _write(self, key: bytes, value: bytes | None, ttl: float) -> bool:
        """One store/delete call with the breaker and the deadline; True if the store
        carried it out. Never raises."""
        deleting = value is None
        start = self._begin_write(deleting)
        if start is None:
            return False
        clock = self._clock
        deadline = Deadline(start + self._write_budget_s, clock)
        status: WriteStatus | None = None
        try:
            if value is None:
                self.store.delete(key, deadline)
            else:
                status = self.store.store(key, value, ttl, deadline)
        except Exception as exc:
            self._write_failed(deleting, exc)
            return False
        self._write_done(deleting, clock() - start, status)
        return True

    async def _delete_async(self, key: bytes) -> bool:
        """:meth:`_write` of a delete, on the async store; True if the store carried it out."""
        start = self._begin_write(True)
        if start is None:
            return False
        store = self.async_store
        assert store is not None
        clock = self._clock
        budget = self._write_budget_s
        try:
            async with asyncio.timeout(budget * _LATE_FACTOR):  # as in _lookup_async
                await store.delete(key, Deadline(start + budget, clock))
        except TimeoutError as exc:
            failure = exc if isinstance(exc, StoreTimeout) else StoreTimeout("delete timed out")
            self._write_failed(True, failure)
            return False
        except Exception as exc:
            self._write_failed(True, exc)
            return False
        self._write_done(True, clock() - start, None)
        return True

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
        key, _, _, der = item
        with self._lock:
            if self._inflight >= self.write_queue_size:
                if der is None:
                    self._counts.remove_errors += 1
                else:
                    self._counts.writes_dropped += 1
                return
            self._items.append(item)
            self._inflight += 1
            if der is None:
                self._pending.pop(key, None)  # a delete also cancels a queued write
            else:
                self._pending[key] = der
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
                    key, value, ttl, der = item
                    try:
                        if der is None or not self.single_use or self._claim(key, der):
                            self._write(key, value, ttl)
                    finally:
                        with lock:
                            if der is not None and self._pending.get(key) is der:
                                del self._pending[key]
                            self._inflight -= 1
                            if self._inflight == 0:
                                self._idle.notify_all()

    def _claim(self, key: bytes, der: bytes) -> bool:
        """Single use: whether the writer may store this queued session. A TLS 1.3 session
        leaves the pending map as its write starts (a lookup here then takes it from the
        store), and one a lookup here took while queued is not written at all."""
        if not _single_use_applies(der):
            return True
        with self._lock:
            if self._pending.get(key) is not der:
                return False  # taken here, replaced or deleted since it was queued
            del self._pending[key]
            return True

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait until every queued write is done; False if ``timeout_s`` passed first."""
        if self._deferred_deletes:
            self._run_deferred_deletes()
        if self._pid != os.getpid():
            return True
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout=timeout_s)

    def close(self, timeout_s: float = 1.0) -> None:
        """Finish queued writes (up to ``timeout_s``) and stop the writer; later writes are
        dropped (``writes_dropped``), lookups still work. The store stays open."""
        if self._deferred_deletes:
            self._run_deferred_deletes()
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
        if self._deferred_deletes:
            self._run_deferred_deletes()
        with self._lock:
            deferred = self._deferred_counts
            while deferred:
                counter, n = deferred.popleft()
                setattr(self._counts, counter, getattr(self._counts, counter) + n)
            c = replace(self._counts)
            hist = tuple(self._hist)
            max_ms = self._max_ms
            sum_ms = self._sum_ms
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
            sealed_refused=c.sealed_refused,
            sealed_malformed=c.sealed_malformed,
            sealed_unknown_key=c.sealed_unknown_key,
            sealed_retired_key=c.sealed_retired_key,
            sealed_tampered=c.sealed_tampered,
            sealed_expired=c.sealed_expired,
            errors=c.errors,
            timeouts=c.timeouts,
            skipped=c.skipped,
            removes=c.removes,
            removes_ignored=c.removes_ignored,
            remove_errors=c.remove_errors,
            alerts_invalidated=c.alerts_invalidated,
            breaker_state=self.breaker.state.value,
            breaker_opens=self.breaker.opens,
            latency_buckets_ms=LATENCY_BUCKETS_MS,
            latency_counts=hist,
            latency_p50_ms=histogram_quantile(LATENCY_BUCKETS_MS, hist, 0.50, max_ms),
            latency_p99_ms=histogram_quantile(LATENCY_BUCKETS_MS, hist, 0.99, max_ms),
            latency_max_ms=max_ms,
            latency_sum_ms=sum_ms,
            takes=c.takes,
            take_misses=c.take_misses,
            take_fallbacks=c.take_fallbacks,
            put_back=c.put_back,
        )

    def __repr__(self) -> str:
        return (
            f"<SessionCache store={type(self.store).__name__} timeout={self.timeout}s "
            f"{'sealed' if self.sealer is not None else 'unsealed'} "
            f"{'single-use ' if self.single_use else ''}"
            f"breaker={self.breaker.state.value}>"
        )
