"""Warnings that a peer can provoke, at most one per kind per interval.

A hostile client or a broken store can make the same failure happen thousands of times a
second; logging each would fill the disk and cost more than the failure. One record per
kind per ``interval`` is written, and the next one says how many were dropped in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one log record per ``interval`` seconds per kind; counts what it drops.

    Calling it never raises: logging must never break a handshake or a connection.
    """

    def __init__(
        self,
        interval: float = 10.0,
        *,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.logger = logger if logger is not None else logging.getLogger("tlscache")
        self._clock = clock
        self._next: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def __call__(self, kind: str, msg: str, exc: BaseException | None = None) -> None:
        try:
            now = self._clock()
            if now < self._next.get(kind, 0.0):
                self._dropped[kind] = self._dropped.get(kind, 0) + 1
                return
            self._next[kind] = now + self.interval
            dropped = self._dropped.pop(kind, 0)
            suffix = f" ({dropped} similar suppressed)" if dropped else ""
            self.logger.warning("%s%s", msg, suffix, exc_info=exc)
        except Exception:  # logging must never break a handshake
            pass
