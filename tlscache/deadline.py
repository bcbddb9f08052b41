"""A point in time by which a call must be done, carried from the handshake to the socket.

A lookup's time budget is set once, by :class:`~tlscache.SessionCache`, and every
layer below it (the store, the client, the socket timeout) spends from that same
budget instead of converting a bare number of milliseconds or seconds again at
each step, as urllib3's ``Timeout`` does for HTTP. The clock is injectable so
that deadline behaviour is tested without relying on a busy machine keeping time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["Clock", "Deadline"]

#: A monotonic clock in seconds.
Clock = Callable[[], float]

#: The shortest socket timeout handed to the kernel: a zero timeout would make a
#: socket non-blocking instead of "give up now".
_MIN_SOCKET_TIMEOUT: Final = 1e-4


class Deadline:
    """An absolute expiry on a monotonic clock.

    Immutable by convention (it is created on every handshake, so it is a plain
    slotted class rather than a frozen dataclass).
    """

    __slots__ = ("clock", "expires")

    def __init__(self, expires: float, clock: Clock = time.monotonic) -> None:
        self.expires = expires
        self.clock = clock

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.monotonic) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(clock() + seconds, clock)

    @classmethod
    def after_ms(cls, ms: float, clock: Clock = time.monotonic) -> Deadline:
        """The deadline ``ms`` milliseconds from now."""
        return cls(clock() + ms / 1000.0, clock)

    def remaining(self) -> float:
        """Seconds left, never negative."""
        left = self.expires - self.clock()
        return left if left > 0.0 else 0.0

    def remaining_ms(self) -> float:
        """Milliseconds left, never negative."""
        return self.remaining() * 1000.0

    @property
    def expired(self) -> bool:
        return self.clock() >= self.expires

    def socket_timeout(self) -> float:
        """A timeout for ``socket.settimeout``: what is left, but never zero."""
        left = self.expires - self.clock()
        return left if left > _MIN_SOCKET_TIMEOUT else _MIN_SOCKET_TIMEOUT

    def earlier(self, other: Deadline | None) -> Deadline:
        """Whichever of the two expires first (``other`` may be None)."""
        if other is None or self.expires <= other.expires:
            return self
        return other

    def __repr__(self) -> str:
        return f"Deadline(remaining_ms={self.remaining_ms():.3f})"
