"""Session stores for an event loop: lookups awaited instead of waited for.

:class:`AsyncSessionStore` is the read side of :class:`~tlscache.stores.SessionStore` as
coroutines: ``fetch``, ``delete`` and, with ``supports_take``, an atomic ``take``. A
:class:`~tlscache.SessionCache` given one (``async_store=``) answers
:meth:`~tlscache.SessionCache.on_get_async` through it, with the same breaker, deadline,
sealing and counters as its blocking lookups; the cache, not the store, opens sealed
values. Writes stay on the blocking store: OpenSSL's new-session callback cannot await.

Adapters: :class:`AsyncDistcacheStore` (over :class:`~tlscache.distcache.aioclient.
AsyncClient`) and :class:`AsyncMemoryStore` (over a :class:`~tlscache.stores.MemoryStore`,
for one process and for tests).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod

from tlscache.deadline import Deadline
from tlscache.distcache.aioclient import AsyncClient
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.protocol import MAX_ID_LEN, Capabilities
from tlscache.exceptions import ClientError, StoreError
from tlscache.stores.distcache import _GET, _REMOVE, _TAKE
from tlscache.stores.memory import MemoryStore

__all__ = ["AsyncDistcacheStore", "AsyncMemoryStore", "AsyncSessionStore"]


class AsyncSessionStore(ABC):
    """The lookup side of a session store, as coroutines for one event loop.

    Same contract as :class:`~tlscache.stores.SessionStore`: each call gets a
    :class:`~tlscache.deadline.Deadline` and raises
    :class:`~tlscache.exceptions.StoreTimeout` past it, or
    :class:`~tlscache.exceptions.StoreError` for any other failure. Values are opaque
    (sealed, with a key ring) and never logged.
    """

    #: True if :meth:`take` is an atomic get-and-delete (single-use tickets).
    supports_take: bool = False

    @abstractmethod
    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """The unexpired value stored under ``session_id``, or None."""

    @abstractmethod
    async def delete(self, session_id: bytes, deadline: Deadline) -> None:
        """Forget ``session_id``; deleting an absent id is not an error."""

    async def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """Fetch and delete in one atomic step (only with ``supports_take``)."""
        raise StoreError(f"{type(self).__name__} has no atomic take")

    async def aclose(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections; the store is unusable afterwards."""


class AsyncMemoryStore(AsyncSessionStore):
    """A :class:`~tlscache.stores.MemoryStore` behind the async interface.

    Its calls wait only for the store's own lock, so they run directly on the loop.
    Pass the same ``inner`` the cache writes to, so that lookups see those writes.
    """

    supports_take = True

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner if inner is not None else MemoryStore()

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        return self.inner.fetch(session_id, deadline)

    async def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        return self.inner.take(session_id, deadline)

    async def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self.inner.delete(session_id, deadline)


class AsyncDistcacheStore(AsyncSessionStore):
    """Sessions kept by a distcache server, reached over the asyncio client.

    The asyncio twin of :class:`~tlscache.stores.DistcacheStore`: the same address forms
    and ``tls``, the same errors (the client's exceptions become the store contract's
    through the same mapping), and the same TAKE rule: ``supports_take`` is False until
    the server says otherwise, and the first :meth:`fetch` asks it (once; a failed probe
    is tried again at the next fetch). Every request of this process goes over one
    pipelined connection (:class:`~tlscache.distcache.aioclient.AsyncClient`), which is
    opened again by the next call after it is lost. A client belongs to one event loop:
    used from another loop (``asyncio.run`` again), the store opens a new one.
    """

    def __init__(self, address: str, *, tls: LinkTLS | None = None) -> None:
        self.address = address
        self.tls = tls
        self._client = AsyncClient(address, tls=tls)  # checks the address now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._probed = False

    def _current(self) -> AsyncClient:
        """The client for the running loop (a new one on a new loop)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                self._client = AsyncClient(self.address, tls=self.tls)
                self._probed = False
            self._loop = loop
        return self._client

    async def capabilities(self, deadline: Deadline | None = None) -> Capabilities:
        """Probe the server (again) and set ``supports_take`` from its answer."""
        caps = await self._current().capabilities(deadline=deadline)
        self.supports_take = caps.take
        self._probed = True
        return caps

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None  # such an id can never have been stored
        client = self._current()
        if not self._probed:
            # Best effort: the fetch itself reports whatever is wrong with the server.
            with contextlib.suppress(ClientError):
                await self.capabilities(deadline)
        with _GET:
            return await client.get(session_id, deadline=deadline)

    async def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        """TAKE: the session, deleted by the server in the same step (one taker gets it).

        Raises :class:`StoreError` if the server has no TAKE (``supports_take`` False).
        """
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return None
        client = self._current()
        with _TAKE:
            if not self._probed:
                await self.capabilities(deadline)
            if not self.supports_take:
                raise StoreError(f"distcache server at {self.address} has no atomic take")
            try:
                return await client.take(session_id, deadline=deadline)
            except ClientError:
                self._probed = False  # the path may have changed: probe again next time
                raise

    async def delete(self, session_id: bytes, deadline: Deadline) -> None:
        if not 0 < len(session_id) <= MAX_ID_LEN:
            return
        client = self._current()
        with _REMOVE:
            await client.remove(session_id, deadline=deadline)

    async def aclose(self) -> None:
        await self._client.close()

    def __repr__(self) -> str:
        return f"<AsyncDistcacheStore {self.address} take={self.supports_take}>"
