"""The down period of one remote server: skip it after a failure, then probe it once.

A networked store must not spend a handshake's deadline on a server that just failed. After
a failure (refused, reset, timed out, a reply that is not the server's protocol) the server
is *down* for ``retry_s`` seconds: calls to it are answered without the network (a miss, a
skipped write). When the period is over the next call is the *probe*; while it runs the
others keep skipping. Its success puts the server back, its failure starts a new period.
A probe that ends without a verdict (the caller gave up before touching the network) lets
the next call probe at once.

The probe holds a lease of one more ``retry_s``: a probe whose outcome is never reported
(a bug, a thread killed) delays the next probe by one period instead of leaving the
server down for good.

Sans-IO: a clock in, a verdict (:class:`Admission`) out; the stores do the I/O. The
memcached and Redis stores share it, so "down" means the same thing in both.
"""

from __future__ import annotations

import enum
import threading

from tlscache.deadline import Clock
from tlscache.exceptions import ConfigurationError

from .base import ServerHealth

__all__ = ["Admission", "DownPeriod"]


class Admission(enum.Enum):
    """What a call may do with the server now."""

    CALL = "call"  #: up: use the network
    PROBE = "probe"  #: down, and its period is over: this call finds out (report the outcome)
    SKIP = "skip"  #: down: answer without the network


class DownPeriod:
    """One server's failures and down period, thread-safe; ``clock`` is monotonic seconds.

    A call asks :meth:`admit`, then reports :meth:`succeeded` or :meth:`failed` (an error
    reply from a live server is a success: it answered). A probe that ends with neither
    reports :meth:`abandoned`.
    """

    __slots__ = ("_lock", "clock", "down_until", "failures", "retry_s")

    def __init__(self, retry_s: float, clock: Clock) -> None:
        if not retry_s >= 0:
            raise ConfigurationError("retry_s must be 0 or more")
        self.retry_s = retry_s
        self.clock = clock
        self.failures = 0  #: consecutive failures (0 when up)
        self.down_until: float | None = None  #: None while up
        self._lock = threading.Lock()

    @property
    def up(self) -> bool:
        """True until a failure, and again after a success."""
        return self.down_until is None

    def available(self) -> bool:
        """Whether :meth:`admit` would not skip now (for placements that pass a down server by)."""
        until = self.down_until
        return until is None or self.clock() >= until

    def admit(self) -> Admission:
        """May a call touch the server now? ``PROBE`` takes the one probe of this period."""
        if self.down_until is None:  # the common case, without the lock
            return Admission.CALL
        with self._lock:
            until: float | None = self.down_until  # another call may have cleared it
            if until is None:
                return Admission.CALL
            now = self.clock()
            if now < until:
                return Admission.SKIP
            self.down_until = now + self.retry_s  # the probe's lease: the others skip
            return Admission.PROBE

    def succeeded(self) -> None:
        """The server answered: it is up."""
        if self.down_until is not None or self.failures:
            with self._lock:
                self.failures = 0
                self.down_until = None

    def failed(self) -> None:
        """The server failed a call: down for ``retry_s`` from now."""
        with self._lock:
            self.failures += 1
            self.down_until = self.clock() + self.retry_s

    def abandoned(self) -> None:
        """A probe ended without touching the server: the next call may probe at once."""
        with self._lock:
            if self.down_until is not None:
                self.down_until = min(self.down_until, self.clock())

    def snapshot(self, address: str) -> ServerHealth:
        """The server as a status page shows it: up only after a success, not after a wait."""
        with self._lock:
            until, failures = self.down_until, self.failures
        retry = None if until is None else max(0.0, until - self.clock())
        return ServerHealth(address, until is None, failures, retry)

    def after_fork(self) -> None:
        """A forked child's new lock (another thread of the parent may have held it)."""
        self._lock = threading.Lock()
