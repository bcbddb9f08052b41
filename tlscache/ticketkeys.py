"""Session-ticket keys shared by a farm through its session store, rotated without a leader.

Time is cut into periods (``period_s``, default an hour); period ``P`` starts at
``P * period_s`` on the wall clock. Each period has one ticket key:

* **Random, never derived.** A key is 80 bytes from ``os.urandom`` (16-byte name, AES-256
  key, HMAC-SHA256 key). Nothing long-lived derives it, so once every copy is erased a
  ticket issued under it can no longer be opened by anyone: forward secrecy for tickets,
  bounded by ``(previous + 1) * period_s``.
* **Shared without a leader.** The key for ``P`` lives in the store under a well-known id,
  ``HMAC(lookup secret of the sealing ring, "tlscache ticket-key v1" || group || P)``
  (:meth:`Sealer.lookup_key`), so the store learns neither the period nor the purpose. The
  value is sealed with the ring's current sealing key. The first server to get there adds
  its random key with an atomic add-if-absent (:meth:`SessionStore.add`); a server that
  loses the race reads the winner's. Every server ends up with the same key for ``P``.
* **Fetched ahead.** At ``fetch_ahead`` of a period (default 80 %) the next period's key is
  fetched (or added), so servers whose clocks differ by less than the rest of the period
  all hold ``P + 1`` before anyone issues under it. A server started late converges on the
  current key at its first :meth:`TicketKeys.refresh`.
* **Previous keys renew, never encrypt.** Keys of the ``previous`` periods before the
  current one still open tickets; the callback then answers "renew" and the client gets a
  ticket under the current key. Older keys are *retired*: their bytearrays are overwritten
  with zeros and they are deleted from the store (which also expires them on its own).
* **Store down.** A server that cannot reach the store keeps its keys, keeps issuing under
  the newest one, counts and logs the failure (at most once per ``log_interval_s``) and
  retries, soon at first and then every ``retry_s``. It never fails a handshake: with no
  key at all it makes a local one (logged), and once the newest key it has falls out of the
  window it makes a local key for the current period rather than stretch an old key's life.
  At start it waits up to ``startup_wait_s`` for a store still coming up. Local keys are
  offered to the store once it answers; if another server's key won, the local one only
  decrypts (and renews) until it retires.

What this does not protect: a copy of the store's sealed value taken while the key was live
opens with the sealing key that sealed it, so forward secrecy against someone who records
the store also needs sealing keys retired (``tlscache-keys retire``). Python ``bytes``
copies made while sealing and opening are freed, not overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Self

from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, SealError, StoreError
from tlscache.openssl.tickets import KEY_NAME_SIZE, TicketEvent
from tlscache.sealing import Sealer
from tlscache.stores.base import SessionStore

__all__ = ["TicketKey", "TicketKeyPolicy", "TicketKeyStats", "TicketKeys"]

log = logging.getLogger("tlscache.ticketkeys")

_SECRET_SIZE = 32
_MATERIAL_SIZE = KEY_NAME_SIZE + 2 * _SECRET_SIZE
_CONTEXT_LABEL = b"tlscache ticket-key v1\x00"
#: The first wait after a failed refresh; it doubles up to ``TicketKeyPolicy.retry_s``.
_FIRST_RETRY_S = 0.5


@dataclass(frozen=True, slots=True)
class TicketKeyPolicy:
    """How ticket keys rotate and how hard the store is tried."""

    period_s: float = 3600.0  #: one new key per period
    previous: int = 2  #: earlier periods whose keys still decrypt (and renew)
    fetch_ahead: float = 0.8  #: fraction of a period after which the next key is fetched
    store_timeout_s: float = 1.0  #: deadline of each store call
    retry_s: float = 10.0  #: longest wait after failed refreshes (the first ones are sooner)
    startup_wait_s: float = 2.0  #: at start, how long a store still coming up is waited for
    log_interval_s: float = 60.0  #: at most one store-failure log record per interval
    group: bytes = b"default"  #: servers sharing keys use the same group

    def __post_init__(self) -> None:
        if not self.period_s > 0 or not math.isfinite(self.period_s):
            raise ConfigurationError("period_s must be a positive number")
        if self.previous < 0:
            raise ConfigurationError("previous must not be negative")
        if not 0.0 < self.fetch_ahead < 1.0:
            raise ConfigurationError("fetch_ahead must be between 0 and 1")
        if self.store_timeout_s <= 0 or self.retry_s <= 0:
            raise ConfigurationError("store_timeout_s and retry_s must be positive")
        if self.startup_wait_s < 0:
            raise ConfigurationError("startup_wait_s must not be negative")
        if not 0 < len(self.group) <= 64:
            raise ConfigurationError("group must be 1..64 bytes")


@dataclass(eq=False, slots=True)
class TicketKey:
    """One ticket key (never in repr). ``shared``: it came from, or went to, the store."""

    period: int
    name: bytes
    aes_key: bytearray = field(repr=False)
    hmac_key: bytearray = field(repr=False)
    shared: bool = False

    @classmethod
    def random(cls, period: int) -> TicketKey:
        return cls.from_material(period, os.urandom(_MATERIAL_SIZE))

    @classmethod
    def from_material(cls, period: int, material: bytes, *, shared: bool = False) -> TicketKey:
        if len(material) != _MATERIAL_SIZE:
            raise SealError("malformed", f"ticket key material of {len(material)} bytes")
        n, s = KEY_NAME_SIZE, _SECRET_SIZE
        return cls(
            period,
            bytes(material[:n]),
            bytearray(material[n : n + s]),
            bytearray(material[n + s :]),
            shared,
        )

    def material(self) -> bytes:
        return self.name + bytes(self.aes_key) + bytes(self.hmac_key)

    def erase(self) -> None:
        """Overwrite the secrets in place (the buffers OpenSSL was pointed at too)."""
        self.aes_key[:] = bytes(len(self.aes_key))
        self.hmac_key[:] = bytes(len(self.hmac_key))

    @property
    def erased(self) -> bool:
        return not any(self.aes_key) and not any(self.hmac_key)


class TicketKeyStats(NamedTuple):
    """Counters since start, and the state now."""

    issued: int  #: tickets issued (under the current key)
    decrypted: int  #: tickets accepted under the current key (or a newer one)
    renewed: int  #: tickets accepted under a previous key; a fresh ticket was issued
    rejected: int  #: tickets under an unknown or retired key: full handshake
    failed: int  #: callback failures (no ticket, or a full handshake)
    rotations: int  #: times the encrypting key changed
    store_failures: int  #: refreshes that could not use the store
    local_keys: int  #: keys made locally because no shared key was available
    retired: int  #: keys erased
    keys_held: int  #: keys that decrypt now
    current_period: int | None  #: period of the encrypting key
    current_shared: bool  #: whether the encrypting key is the farm's shared one


class _State(NamedTuple):
    current: TicketKey | None
    by_name: Mapping[bytes, TicketKey]


class TicketKeys:
    """The farm's ticket keys for one server: a :class:`~tlscache.openssl.tickets.TicketKeySource`.

    ``store`` must implement :meth:`SessionStore.add`; ``sealer`` seals the keys and names
    their store ids. ``clock`` is the wall clock (unix seconds; servers of a farm share no
    other). :meth:`refresh` does the store work (tests call it; :meth:`start` runs it in a
    daemon thread when due); the callback side only reads an immutable snapshot.
    """

    def __init__(
        self,
        store: SessionStore,
        sealer: Sealer,
        *,
        policy: TicketKeyPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.policy = policy or TicketKeyPolicy()
        self._clock = clock
        self._context = _CONTEXT_LABEL + self.policy.group
        self._state = _State(None, {})
        self._refresh_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            (
                "issued",
                "decrypted",
                "renewed",
                "rejected",
                "failed",
                "rotations",
                "store_failures",
                "local_keys",
                "retired",
            ),
            0,
        )
        self._next_log = 0.0
        self._failed_refreshes = 0  # in a row: the retry waits grow from 0.5 s to retry_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ periods and ids

    def period_at(self, t: float) -> int:
        return math.floor(t / self.policy.period_s)

    def store_id(self, period: int) -> bytes:
        """The store key of ``period``'s ticket key (32 bytes; reveals nothing)."""
        return self.sealer.lookup_key(self._context, period.to_bytes(8, "big", signed=True))

    @property
    def _lifetime_s(self) -> int:
        return math.ceil((self.policy.previous + 2) * self.policy.period_s)

    # ------------------------------------------------------------ the source side

    def key_for_encryption(self) -> TicketKey | None:
        current = self._state.current
        if current is None and not self._stop.is_set():
            with self._refresh_lock:
                current = self._state.current
                if current is None and not self._stop.is_set():
                    current = self._make_local(self.period_at(self._clock()), "no key yet")
                    self._publish(current, [current])
        return current

    def key_for_decryption(self, name: bytes) -> tuple[TicketKey, bool] | None:
        state = self._state
        key = state.by_name.get(name)
        if key is None or state.current is None:
            return None
        renew = key is not state.current and key.period <= state.current.period
        return key, renew

    def count_ticket(self, event: TicketEvent) -> None:
        with self._count_lock:
            self._counts[event] += 1

    # ------------------------------------------------------------ refreshing

    def refresh(self) -> float:
        """Bring the keys up to date with the store and the clock; the seconds until the
        next refresh is due. Never raises for a store failure (counted and logged)."""
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> float:
        policy = self.policy
        now = self._clock()
        period = self.period_at(now)
        keys = list(self._state.by_name.values())
        failed = False
        wanted = [period]
        ahead_at = (period + policy.fetch_ahead) * policy.period_s
        if now >= ahead_at:
            wanted.append(period + 1)
        for p in wanted:
            if any(k.period == p and k.shared for k in keys):
                continue
            try:
                keys.append(self._obtain(p, keys))
            except (StoreError, SealError) as e:
                failed = True
                self._store_failed(p, e)
                break  # the store is down: the next period can wait for the retry
        current = self._choose(period, keys)
        self._publish(current, keys)
        if failed:
            # Soon at first (a store that was still starting), then every retry_s.
            self._failed_refreshes += 1
            return min(policy.retry_s, _FIRST_RETRY_S * 2.0 ** (self._failed_refreshes - 1))
        self._failed_refreshes = 0
        due = (period + 1) * policy.period_s
        if now < ahead_at:
            due = ahead_at
        return max(0.0, due - now)

    def _obtain(self, period: int, keys: list[TicketKey]) -> TicketKey:
        """The shared key of ``period``: read it, or add ours (a held local one if any)."""
        sid = self.store_id(period)
        found = self._read(sid, period)
        if found is not None:
            return found
        candidate = next((k for k in keys if k.period == period and not k.shared), None)
        mine = candidate or TicketKey.random(period)
        sealed = self.sealer.seal(sid, self._context, mine.material(), self._lifetime_s)
        if self.store.add(sid, sealed, self._lifetime_s, self._deadline()):
            mine.shared = True
            if candidate is not None:
                keys.remove(candidate)
            return mine
        found = self._read(sid, period)
        if found is None:
            raise StoreError("ticket key add lost the race but the winner's key is not there")
        if candidate is None:
            mine.erase()
        return found

    def _read(self, sid: bytes, period: int) -> TicketKey | None:
        value = self.store.fetch(sid, self._deadline())
        if value is None:
            return None
        material = self.sealer.open(sid, self._context, value, self._lifetime_s)
        return TicketKey.from_material(period, material, shared=True)

    def _deadline(self) -> Deadline:
        return Deadline.after(self.policy.store_timeout_s)

    def _choose(self, period: int, keys: list[TicketKey]) -> TicketKey:
        """The encrypting key: the shared one of ``period``, else a local one of it, else
        the newest held while inside the window, else a fresh local key."""
        for shared in (True, False):
            for k in keys:
                if k.period == period and k.shared is shared:
                    return k
        older = [k for k in keys if k.period < period]
        if older:
            newest = max(older, key=lambda k: (k.period, k.shared))
            if newest.period >= period - self.policy.previous:
                return newest
        key = self._make_local(period, "no usable shared key")
        keys.append(key)
        return key

    def _make_local(self, period: int, why: str) -> TicketKey:
        with self._count_lock:
            self._counts["local_keys"] += 1
        log.warning("ticket keys: %s; made a local key for period %d (not shared)", why, period)
        return TicketKey.random(period)

    def _publish(self, current: TicketKey, keys: list[TicketKey]) -> None:
        """Swap in the new snapshot, then retire what fell out of the window."""
        floor = current.period - self.policy.previous
        live = [k for k in keys if k is current or k.period >= floor]
        retired = [k for k in keys if k not in live]
        old = self._state.current
        self._state = _State(current, {k.name: k for k in live})
        with self._count_lock:
            if old is not None and old is not current:
                self._counts["rotations"] += 1
            self._counts["retired"] += len(retired)
        for k in retired:
            k.erase()
            if k.shared:
                with contextlib.suppress(StoreError):  # else it expires on its own
                    self.store.delete(self.store_id(k.period), self._deadline())

    def _store_failed(self, period: int, exc: BaseException) -> None:
        with self._count_lock:
            self._counts["store_failures"] += 1
            count = self._counts["store_failures"]
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + self.policy.log_interval_s
            log.warning(
                "ticket keys: store unavailable for period %d (%s; %d failures so far); "
                "keeping the keys held",
                period,
                type(exc).__name__,
                count,
            )

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        """Refresh now, then in a daemon thread whenever due (idempotent)."""
        if self._thread is None:
            self._await_store(self.policy.startup_wait_s)
            self.refresh()
            self._thread = threading.Thread(
                target=self._run, name="tlscache-ticket-keys", daemon=True
            )
            self._thread.start()
        return self

    def _await_store(self, budget_s: float) -> None:
        """Give a store that is still coming up (a local dc_client not yet connected to its
        server) a moment before the first refresh, which would otherwise make a local key:
        servers started together then share one key from the start."""
        end = time.monotonic() + budget_s
        pause = 0.05
        while True:
            try:
                self.store.fetch(self.store_id(self.period_at(self._clock())), self._deadline())
                return
            except StoreError:
                if time.monotonic() + pause > end:
                    return
                time.sleep(pause)
                pause = min(2 * pause, 0.5)

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(max(0.05, wait)):
            try:
                wait = self.refresh()
            except Exception as e:  # the thread must outlive any surprise
                log.warning("ticket keys: refresh failed: %s", type(e).__name__)
                wait = self.policy.retry_s

    def close(self) -> None:
        """Stop refreshing and erase every key held (tickets then give full handshakes)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._refresh_lock:
            state, self._state = self._state, _State(None, {})
        for k in state.by_name.values():
            k.erase()

    def held(self) -> tuple[TicketKey, ...]:
        """The keys held now, oldest first (for tests and status pages; secrets hidden)."""
        return tuple(sorted(self._state.by_name.values(), key=lambda k: k.period))

    @property
    def current(self) -> TicketKey | None:
        return self._state.current

    def stats(self) -> TicketKeyStats:
        state = self._state
        with self._count_lock:
            c = dict(self._counts)
        cur = state.current
        return TicketKeyStats(
            c["issued"],
            c["decrypted"],
            c["renewed"],
            c["rejected"],
            c["failed"],
            c["rotations"],
            c["store_failures"],
            c["local_keys"],
            c["retired"],
            len(state.by_name),
            None if cur is None else cur.period,
            False if cur is None else cur.shared,
        )
