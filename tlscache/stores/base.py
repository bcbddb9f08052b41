"""The contract between the session cache and a storage backend.

The cache only ever calls these few methods, each with a :class:`~tlscache.deadline.Deadline`,
so any backend (in-process dict, distcache) and any wrapper (metrics, tracing) can be slotted in
without touching the OpenSSL callbacks. A store is untrusted storage: with a key ring the cache
hands it only keyed hashes of session ids and sealed values (see ``docs/security.md``).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType
from typing import Final, NamedTuple, Self

from tlscache.deadline import Deadline
from tlscache.distcache import protocol
from tlscache.exceptions import StoreError

__all__ = [
    "MAX_ID_LEN",
    "MAX_VALUE_LEN",
    "ServerHealth",
    "SessionStore",
    "WrappingStore",
    "WriteStatus",
]

#: The longest session id a store must accept (TLS ids are 1..32 bytes; distcache allows 64).
MAX_ID_LEN: Final = protocol.MAX_ID_LEN
#: The largest value a store must accept: what one distcache ADD carries with the longest id.
MAX_VALUE_LEN: Final = protocol.MAX_SESSION_DATA


class WriteStatus(enum.Enum):
    """What :meth:`SessionStore.store` knew when it returned (``None`` means ``CONFIRMED``).

    The circuit breaker needs the difference: only an answer from the store says it is
    healthy. A pipelined write that merely reached the kernel says nothing (a stopped
    server's socket buffers take it all the same), so it must not reset the breaker.
    """

    CONFIRMED = "confirmed"  #: the store answered: this write, or an earlier one, stored
    SENT = "sent"  #: handed on without any answer from the store yet: no verdict


class ServerHealth(NamedTuple):
    """One server of a store, as a status page shows it."""

    address: str  #: as configured, e.g. ``127.0.0.1:11211``
    up: bool  #: False from a failure until a call to it succeeds (see ``stores/health.py``)
    failures: int  #: consecutive failures (0 when healthy)
    retry_in_s: float | None  #: seconds until it is tried again while down, else None


class SessionStore(ABC):
    """Key/value storage for serialized sessions, with expiry.

    ``deadline`` is when the call must be done: a store that cannot finish by then
    raises :class:`~tlscache.exceptions.StoreTimeout`; any other failure raises
    :class:`~tlscache.exceptions.StoreError`. A store spends from that deadline
    (``deadline.remaining()``, ``deadline.socket_timeout()``) rather than restarting
    a budget at each step. Values are opaque bytes; a store never interprets them
    (they hold master secrets: never log them).
    """

    #: True if :meth:`take` is an atomic get-and-delete (needed for single-use tickets).
    supports_take: bool = False
    #: True if only this process can reach what the store holds. A store that other
    #: processes or hosts reach must be given sealed values: ``SessionCache.install``
    #: refuses to store unsealed sessions in it without an explicit opt-in.
    in_process: bool = False

    @abstractmethod
    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        """Keep ``value`` under ``session_id`` for ``ttl_s`` seconds (add or replace).

        Returns None or ``WriteStatus.CONFIRMED`` when the store answered, and
        ``WriteStatus.SENT`` when the write was handed on without an answer (pipelined).
        """

    @abstractmethod
    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """The unexpired value stored under ``session_id``, or None."""

    @abstractmethod
    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        """Forget ``session_id``; deleting an absent id is not an error."""

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """Fetch and delete in one atomic step, so at most one caller gets the value.

        Only stores with ``supports_take`` implement it: a fetch followed by a
        delete is not atomic across a farm and must not pretend to be.
        """
        raise StoreError(f"{type(self).__name__} has no atomic take")

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        """Keep ``value`` only if nothing is stored under ``session_id``, in one atomic step.

        True: added; False: something is there already (left as it was). Shared ticket
        keys need it: the first server to add a period's key wins and all read the winner's.
        """
        raise StoreError(f"{type(self).__name__} has no atomic add")

    def servers(self) -> Sequence[ServerHealth]:
        """The servers behind the store and their health (empty for a store without any)."""
        return ()

    def server_for(self, session_id: bytes) -> str | None:
        """The address of the server that holds ``session_id`` (None without placement)."""
        return None

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

    A wrapper (e.g. one that counts calls) overrides only what it changes;
    ``supports_take`` and ``in_process`` follow the inner store's.
    """

    def __init__(self, inner: SessionStore) -> None:
        self.inner = inner
        self.supports_take = inner.supports_take
        self.in_process = inner.in_process

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        return self.inner.store(session_id, value, ttl_s, deadline)

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        return self.inner.fetch(session_id, deadline)

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self.inner.delete(session_id, deadline)

    def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        return self.inner.take(session_id, deadline)

    def add(self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline) -> bool:
        return self.inner.add(session_id, value, ttl_s, deadline)

    def servers(self) -> Sequence[ServerHealth]:
        return self.inner.servers()

    def server_for(self, session_id: bytes) -> str | None:
        return self.inner.server_for(session_id)

    def close(self) -> None:
        self.inner.close()
