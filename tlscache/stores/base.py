"""The contract between the session cache and a storage backend.

The cache only ever calls these few methods, each with a time budget, so any
backend (in-process dict, distcache, memcached, Redis) and any wrapper (sealing,
metrics, tracing) can be slotted in without touching the OpenSSL callbacks.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from tlscache.exceptions import StoreError

__all__ = ["MAX_ID_LEN", "MAX_VALUE_LEN", "SessionStore", "WrappingStore", "describe_error"]

#: The longest session id a store must accept (TLS ids are 1..32 bytes; distcache allows 64).
MAX_ID_LEN = 64
#: The largest value a store must accept: distcache's limit minus its 8-byte ADD header and id.
MAX_VALUE_LEN = 32768 - 8 - MAX_ID_LEN


def describe_error(exc: BaseException) -> str:
    """``exc``'s type and innermost source location, for logs: never its message or
    traceback text, which a store (or a wrapper) may have built from a session value."""
    tb = exc.__traceback__
    if tb is None:
        return type(exc).__name__
    while tb.tb_next is not None:
        tb = tb.tb_next
    name = os.path.basename(tb.tb_frame.f_code.co_filename)
    return f"{type(exc).__name__} at {name}:{tb.tb_lineno}"


class SessionStore(ABC):
    """Key/value storage for serialized sessions, with expiry.

    ``deadline_s`` is the time budget of the call, in seconds: a store that cannot
    finish in time raises :class:`~tlscache.exceptions.StoreTimeout`; any other
    failure raises :class:`~tlscache.exceptions.StoreError`. Values are opaque
    bytes; a store never interprets them (they hold master secrets: never log them).
    """

    #: True if :meth:`take` is an atomic get-and-delete (needed for single-use tickets).
    supports_take: bool = False

    @abstractmethod
    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline_s: float) -> None:
        """Keep ``value`` under ``session_id`` for ``ttl_s`` seconds (add or replace)."""

    @abstractmethod
    def fetch(self, session_id: bytes, deadline_s: float) -> bytes | None:
        """The unexpired value stored under ``session_id``, or None."""

    @abstractmethod
    def delete(self, session_id: bytes, deadline_s: float) -> None:
        """Forget ``session_id``; deleting an absent id is not an error."""

    def take(self, session_id: bytes, deadline_s: float) -> bytes | None:
        """Fetch and delete in one atomic step, so at most one caller gets the value.

        Only stores with ``supports_take`` implement it: a fetch followed by a
        delete is not atomic across a farm and must not pretend to be.
        """
        raise StoreError(f"{type(self).__name__} has no atomic take")

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and threads; the store is unusable afterwards."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class WrappingStore(SessionStore):
    """A store that forwards every call to ``inner``: the base for wrappers.

    A wrapper (e.g. one that encrypts and authenticates values, or one that
    counts calls) overrides only what it changes; ``supports_take`` follows the
    inner store's.
    """

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.supports_take = inner.supports_take

    def store(self, session_id: bytes, value: bytes, ttl_s: float, deadline_s: float) -> None:
        self.inner.store(session_id, value, ttl_s, deadline_s)

    def fetch(self, session_id: bytes, deadline_s: float) -> bytes | None:
        return self.inner.fetch(session_id, deadline_s)

    def delete(self, session_id: bytes, deadline_s: float) -> None:
        self.inner.delete(session_id, deadline_s)

    def take(self, session_id: bytes, deadline_s: float) -> bytes | None:
        return self.inner.take(session_id, deadline_s)

    def close(self) -> None:
        self.inner.close()
