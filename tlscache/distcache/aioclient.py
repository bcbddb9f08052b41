"""asyncio distcache client with many requests in flight on one connection.

The server answers the requests of one connection in order, but replies are
matched by ``request_uid`` (and operation) anyway, as the C client does, so a
confused peer is detected instead of silently mis-delivering sessions. That
matching, and every other rule about replies, is the
:class:`~tlscache.distcache.clientconn.ClientConnection` this module drives; it
adds only the transport, the futures and the timer.

Requests are queued for writing synchronously when a call starts, so calls
made one after another on a connected client reach the server in that order: a
caller can reason about their effects in issue order (``dc_test -pipeline``
relies on it). A request sent while others are in flight is coalesced with the
rest of that loop iteration's requests into one write.

Deadlines cost one timer per connection, not one per request: the timer is
armed for the earliest deadline and, when it fires, expires every overdue call.

If the connection is lost, every pending call fails with
:class:`~tlscache.exceptions.ClientError`; the next call opens a new one.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from types import TracebackType
from typing import Any, TypeVar, cast

from tlscache.deadline import Deadline
from tlscache.distcache.address import Address, connectable
from tlscache.distcache.clientconn import (
    ClientConnection,
    Request,
    add_request,
    get_request,
    have_request,
    probe_request,
    remove_request,
    take_request,
)
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.protocol import Capabilities, Result, new_probe_nonce
from tlscache.distcache.sockets import open_connection
from tlscache.exceptions import ClientError, ClientTimeout, TakeUnsupported

__all__ = ["AsyncClient"]

T = TypeVar("T")

#: Timers may fire this early (seconds); a call this close to its deadline is expired.
_SLACK = 0.001
#: A reply this overdue (seconds past its call's deadline) is taken as never coming: the
#: connection is dropped, so calls that timed out do not pile up against a silent server.
_GIVE_UP_S = 5.0


class _Protocol(asyncio.Protocol):
    """One connection: writes requests, resolves their futures, fails them all on loss."""

    def __init__(self, address: Address, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.conn = ClientConnection(str(address))
        # uid -> (future of the finished request, deadline on the loop's clock, request).
        # A call that timed out keeps its entry until its late reply arrives, so that
        # reply is recognised.
        self.pending: dict[int, tuple[asyncio.Future[Request[Any]], float, Request[Any]]] = {}
        self.lost = False
        self.paused = False
        self._drain: list[asyncio.Future[None]] = []
        self._wbuf: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    # -------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            done = self.conn.receive_data(data)
        except ClientError as exc:
            self._abort(exc)
            return
        pending = self.pending
        for request in done:
            fut = pending.pop(request.uid)[0]
            if not fut.done():  # a call that timed out or was cancelled is done already
                fut.set_result(request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        reason = f": {exc}" if exc else ""
        self._fail_all(ClientError(f"connection to {self.address} lost{reason}"))
        self._wake_writers()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers()

    # -------------------------------------------------------- requests

    def send(self, request: Request[T], deadline: float) -> asyncio.Future[Request[T]]:
        """Queue ``request`` now; its future fails at ``deadline`` (loop time)."""
        if self.lost or self.transport is None:
            raise ClientError(f"connection to {self.address} lost")
        data = self.conn.send(request)
        fut: asyncio.Future[Request[T]] = self.loop.create_future()
        if self._wbuf:
            self._wbuf.append(data)
        elif self.pending:
            # Requests already in flight: gather whatever else is sent during this loop
            # iteration into one write (one syscall instead of one per request).
            self._wbuf.append(data)
            self.loop.call_soon(self._flush)
        else:
            self.transport.write(data)
        self.pending[request.uid] = (fut, deadline, request)
        if deadline < self._timer_at:
            self._arm(deadline)
        return fut

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self.paused and not self.lost:
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._drain.append(waiter)
            await waiter

    def close(self, error: ClientError) -> None:
        if self.transport is not None:
            self.transport.close()
        self.lost = True
        self._fail_all(error)

    # -------------------------------------------------------- internals

    def _flush(self) -> None:
        data = b"".join(self._wbuf)
        self._wbuf.clear()
        if not self.lost and self.transport is not None:
            self.transport.write(data)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._expire)
        self._timer_at = when

    def _expire(self) -> None:
        """Fail every overdue call; re-arm for the earliest remaining deadline."""
        self._timer = None
        self._timer_at = math.inf
        now = self.loop.time() + _SLACK
        earliest = math.inf
        for fut, deadline, _ in self.pending.values():
            if fut.done():
                if deadline + _GIVE_UP_S <= now:
                    self._abort(ClientError(f"{self.address} stopped answering"))
                    return
                earliest = min(earliest, deadline + _GIVE_UP_S)
            elif deadline <= now:
                fut.set_exception(ClientTimeout(f"no reply from {self.address} in time"))
                earliest = min(earliest, deadline + _GIVE_UP_S)
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._arm(earliest)

    def _wake_writers(self) -> None:
        for waiter in self._drain:
            if not waiter.done():
                waiter.set_result(None)
        self._drain.clear()

    def _abort(self, error: ClientError) -> None:
        self.lost = True
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, error: ClientError) -> None:
        """Settle every pending call: with its reply if that came, else with ``error``."""
        self._wbuf.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        self.conn.abandon()
        pending, self.pending = self.pending, {}
        for fut, _, request in pending.values():
            if fut.done():
                continue
            if request.done:  # answered in the same read as the reply that broke the connection
                fut.set_result(request)
            else:
                fut.set_exception(error)


async def _open(address: Address) -> _Protocol:
    proto = _Protocol(address, asyncio.get_running_loop())
    await open_connection(address, lambda: proto)
    return proto


async def _open_tls(address: Address, ctx: ssl.SSLContext, tls: LinkTLS) -> _Protocol:
    proto = _Protocol(address, asyncio.get_running_loop())
    await open_connection(
        address,
        lambda: proto,
        ssl=ctx,
        server_hostname=tls.server_hostname(address),
        ssl_handshake_timeout=tls.handshake_timeout,
    )
    return proto


class AsyncClient:
    """A pipelining distcache client for one event loop.

    Create it with :meth:`connect` (or ``async with AsyncClient(address)``). Any
    number of calls may be in flight at once; each has its own deadline (a
    :class:`~tlscache.deadline.Deadline`, by default ``deadline_ms`` from the
    constructor) covering any reconnect, the write and the reply, after which it
    raises :class:`ClientTimeout` (its late reply, if any, is discarded).
    ``tls`` speaks mutual TLS to a dc_server at an ``IP:`` address (see
    :mod:`tlscache.distcache.linktls`).
    """

    def __init__(
        self, address: str | Address, *, deadline_ms: float = 1000.0, tls: LinkTLS | None = None
    ) -> None:
        if deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        self.address = connectable(address)
        self.tls = tls
        if tls is not None:
            tls.server_hostname(self.address)  # a UNIX: or FD: address is refused here
        self._ssl = tls.client_context() if tls is not None else None
        self.deadline_ms = deadline_ms
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False
        # What the connection ``_caps_for`` offers beyond C, once probed.
        self._caps: Capabilities | None = None
        self._caps_for: _Protocol | None = None

    @classmethod
    async def connect(
        cls, address: str | Address, *, deadline_ms: float = 1000.0, tls: LinkTLS | None = None
    ) -> AsyncClient:
        """A client already connected to ``address`` (within ``deadline_ms``)."""
        client = cls(address, deadline_ms=deadline_ms, tls=tls)
        await client._ensure(client._default_deadline())
        return client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    @property
    def in_flight(self) -> int:
        """Requests sent whose replies have not arrived yet (timed-out ones included)."""
        return len(self._proto.pending) if self._proto is not None else 0

    async def add(
        self, session_id: bytes, data: bytes, timeout_ms: int, *, deadline: Deadline | None = None
    ) -> Result:
        """Store a session; see :meth:`tlscache.distcache.client.Client.add`."""
        return await self._call(add_request(session_id, data, timeout_ms), deadline)

    async def get(self, session_id: bytes, *, deadline: Deadline | None = None) -> bytes | None:
        """The session's data, or None if absent (replies under 5 bytes count as misses)."""
        return await self._call(get_request(session_id), deadline)

    async def remove(self, session_id: bytes, *, deadline: Deadline | None = None) -> bool:
        """True if the session was there and is now removed."""
        return await self._call(remove_request(session_id), deadline)

    async def have(self, session_id: bytes, *, deadline: Deadline | None = None) -> bool:
        """True if the server holds an unexpired session with this id."""
        return await self._call(have_request(session_id), deadline)

    async def capabilities(self, *, deadline: Deadline | None = None) -> Capabilities:
        """What the server offers beyond C distcache, probed once per connection.

        See :meth:`tlscache.distcache.client.Client.capabilities`.
        """
        proto = self._proto
        caps = self._caps
        if caps is not None and proto is not None and proto is self._caps_for and not proto.lost:
            return caps
        caps = await self._call(probe_request(new_probe_nonce()), deadline)
        self._caps, self._caps_for = caps, self._proto
        return caps

    async def take(self, session_id: bytes, *, deadline: Deadline | None = None) -> bytes | None:
        """The session's data, deleted in the same step; see
        :meth:`tlscache.distcache.client.Client.take` (raises
        :class:`~tlscache.exceptions.TakeUnsupported` likewise)."""
        if deadline is None:
            deadline = Deadline.after_ms(self.deadline_ms)
        if not (await self.capabilities(deadline=deadline)).take:
            raise TakeUnsupported(f"{self.address} does not offer TAKE")
        return await self._call(take_request(session_id), deadline)

    async def close(self) -> None:
        """Close the connection; calls still pending fail with :class:`ClientError`."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.close(ClientError("client closed"))

    async def __aenter__(self) -> AsyncClient:
        await self._ensure(self._default_deadline())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.address} in_flight={self.in_flight}>"

    # ------------------------------------------------------------ internals

    def _default_deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.deadline_ms / 1000.0

    async def _ensure(self, deadline: float) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._closed:
            raise ClientError("client is closed")
        task = self._connecting
        if task is None or (task.done() and not _usable(task)):
            # A connect that outlived its caller's deadline is used once it is done.
            task = self._connecting = asyncio.ensure_future(
                _open(self.address)
                if self._ssl is None or self.tls is None
                else _open_tls(self.address, self._ssl, self.tls)
            )
        try:
            async with asyncio.timeout_at(deadline):
                proto = await asyncio.shield(task)
        except TimeoutError:
            raise ClientTimeout(f"connect to {self.address} timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.address}: {exc}") from exc
        if self.closed:  # close() ran while we waited
            proto.close(ClientError("client closed"))
            raise ClientError("client is closed")
        self._proto = proto
        return proto

    async def _call(self, request: Request[T], deadline: Deadline | None) -> T:
        proto = self._proto
        loop = proto.loop if proto is not None else asyncio.get_running_loop()
        # The loop's clock need not be the deadline's (uvloop keeps its own): convert once.
        if deadline is None:
            when = loop.time() + self.deadline_ms / 1000.0
        else:
            when = loop.time() + deadline.remaining()
        if proto is None or proto.lost:
            proto = await self._ensure(when)
        fut = proto.send(request, when)
        if proto.paused:  # rare: the server is not reading; bound this wait too
            try:
                async with asyncio.timeout_at(when):
                    await proto.drain()
            except TimeoutError:
                fut.cancel()
                raise ClientTimeout(f"{self.address} is not reading requests") from None
        return (await fut).result()


def _usable(task: asyncio.Task[_Protocol]) -> bool:
    """True if a finished connect task holds a connection that is still up."""
    return not task.cancelled() and task.exception() is None and not task.result().lost
