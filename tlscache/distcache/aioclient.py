"""asyncio distcache client with many requests in flight on one connection.

The server answers the requests of one connection in order, but replies are
matched by ``request_uid`` (and operation) anyway, as the C client does, so a
confused peer is detected instead of silently mis-delivering sessions.

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
from types import TracebackType
from typing import cast

from tlscache.distcache.address import Address
from tlscache.distcache.address import connect as blocking_connect
from tlscache.distcache.client import (
    add_result,
    check_reply,
    get_result,
    next_uid,
    resolve,
    yes_no_result,
)
from tlscache.distcache.protocol import (
    Decoder,
    Message,
    Operation,
    Result,
    encode_add,
    encode_get,
    encode_have,
    encode_remove,
    validate_add_request,
)
from tlscache.exceptions import ClientError, ClientTimeout, ProtocolError

#: Timers may fire this early (seconds); a call this close to its deadline is expired.
_SLACK = 0.001
#: A reply this overdue (seconds past its call's deadline) is taken as never coming: the
#: connection is dropped, so calls that timed out do not pile up against a silent server.
_GIVE_UP_S = 5.0


class _Protocol(asyncio.Protocol):
    """Matches replies to pending futures by uid; fails them all on connection loss."""

    def __init__(self, address: Address, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder(expect_response=True)
        # uid -> (reply future, deadline on the loop's clock). A call that timed out
        # keeps its entry until its late reply arrives, so that reply is recognised.
        self.pending: dict[int, tuple[asyncio.Future[Message], float]] = {}
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
            messages = self.decoder.feed(data)
        except ProtocolError as exc:
            self._abort(ClientError(f"malformed reply from {self.address}: {exc.reason}"))
            return
        pending = self.pending
        for msg in messages:
            entry = pending.pop(msg.uid, None)
            if entry is None:
                self._abort(ClientError(f"{self.address} sent a reply to unknown uid {msg.uid}"))
                return
            fut = entry[0]
            if not fut.done():  # a call that timed out or was cancelled is done already
                fut.set_result(msg)

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

    def send(self, uid: int, frame: bytes, deadline: float) -> asyncio.Future[Message]:
        """Queue one request now; the future of its reply fails at ``deadline`` (loop time)."""
        if self.lost or self.transport is None:
            raise ClientError(f"connection to {self.address} lost")
        if uid in self.pending:  # only after 2**32 requests with one still in flight
            raise ClientError(f"request uid {uid} already in flight")
        fut: asyncio.Future[Message] = self.loop.create_future()
        if self._wbuf:
            self._wbuf.append(frame)
        elif self.pending:
            # Requests already in flight: gather whatever else is sent during this loop
            # iteration into one write (one syscall instead of one per request).
            self._wbuf.append(frame)
            self.loop.call_soon(self._flush)
        else:
            self.transport.write(frame)
        self.pending[uid] = (fut, deadline)
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
        for fut, deadline in self.pending.values():
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
        self._wbuf.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = math.inf
        pending, self.pending = self.pending, {}
        for fut, _ in pending.values():
            if not fut.done():
                fut.set_exception(error)


async def _open(address: Address) -> _Protocol:
    loop = asyncio.get_running_loop()
    proto = _Protocol(address, loop)
    if address.kind == "unix":
        await loop.create_unix_connection(lambda: proto, address.path)
    elif address.kind == "fd":
        sock = blocking_connect(address)
        await loop.create_connection(lambda: proto, sock=sock)
    else:
        # asyncio sets TCP_NODELAY on TCP transports itself.
        assert address.host is not None  # resolve() refused wildcard addresses
        await loop.create_connection(
            lambda: proto, address.host, address.port, family=address.family
        )
    return proto


class AsyncClient:
    """A pipelining distcache client for one event loop.

    Create it with :meth:`connect` (or ``async with AsyncClient(address)``). Any
    number of calls may be in flight at once; each has its own deadline
    (``deadline_ms``, default from the constructor) covering any reconnect,
    the write and the reply, after which it raises :class:`ClientTimeout` (its
    late reply, if any, is discarded).
    """

    def __init__(self, address: str | Address, *, deadline_ms: float = 1000.0) -> None:
        if deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        self.address = resolve(address)
        self.deadline_ms = deadline_ms
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._closed = False

    @classmethod
    async def connect(cls, address: str | Address, *, deadline_ms: float = 1000.0) -> AsyncClient:
        """A client already connected to ``address`` (within ``deadline_ms``)."""
        client = cls(address, deadline_ms=deadline_ms)
        await client._ensure(_deadline(deadline_ms))
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
        self, session_id: bytes, data: bytes, timeout_ms: int, *, deadline_ms: float | None = None
    ) -> Result:
        """Store a session; see :meth:`tlscache.distcache.client.Client.add`."""
        validate_add_request(session_id, data, timeout_ms)
        uid = next_uid()
        frame = encode_add(uid, session_id, data, timeout_ms)
        return add_result(await self._call(frame, uid, Operation.ADD, deadline_ms))

    async def get(self, session_id: bytes, *, deadline_ms: float | None = None) -> bytes | None:
        """The session's data, or None if absent (replies under 5 bytes count as misses)."""
        uid = next_uid()
        return get_result(
            await self._call(encode_get(uid, session_id), uid, Operation.GET, deadline_ms)
        )

    async def remove(self, session_id: bytes, *, deadline_ms: float | None = None) -> bool:
        """True if the session was there and is now removed."""
        uid = next_uid()
        payload = await self._call(
            encode_remove(uid, session_id), uid, Operation.REMOVE, deadline_ms
        )
        return yes_no_result(payload, Operation.REMOVE)

    async def have(self, session_id: bytes, *, deadline_ms: float | None = None) -> bool:
        """True if the server holds an unexpired session with this id."""
        uid = next_uid()
        payload = await self._call(encode_have(uid, session_id), uid, Operation.HAVE, deadline_ms)
        return yes_no_result(payload, Operation.HAVE)

    async def close(self) -> None:
        """Close the connection; calls still pending fail with :class:`ClientError`."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.close(ClientError("client closed"))

    async def __aenter__(self) -> AsyncClient:
        await self._ensure(_deadline(self.deadline_ms))
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

    async def _ensure(self, deadline: float) -> _Protocol:
        proto = self._proto
        if proto is not None and not proto.lost:
            return proto
        if self._closed:
            raise ClientError("client is closed")
        task = self._connecting
        if task is None or (task.done() and not _usable(task)):
            # A connect that outlived its caller's deadline is used once it is done.
            task = self._connecting = asyncio.ensure_future(_open(self.address))
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

    async def _call(
        self, frame: bytes, uid: int, operation: Operation, deadline_ms: float | None
    ) -> bytes:
        proto = self._proto
        loop = proto.loop if proto is not None else asyncio.get_running_loop()
        deadline = loop.time() + (self.deadline_ms if deadline_ms is None else deadline_ms) / 1e3
        if proto is None or proto.lost:
            proto = await self._ensure(deadline)
        fut = proto.send(uid, frame, deadline)
        if proto.paused:  # rare: the server is not reading; bound this wait too
            try:
                async with asyncio.timeout_at(deadline):
                    await proto.drain()
            except TimeoutError:
                fut.cancel()
                raise ClientTimeout(f"{self.address} is not reading requests") from None
        return check_reply(await fut, uid, operation)


def _usable(task: asyncio.Task[_Protocol]) -> bool:
    """True if a finished connect task holds a connection that is still up."""
    return not task.cancelled() and task.exception() is None and not task.result().lost


def _deadline(ms: float) -> float:
    return asyncio.get_running_loop().time() + ms / 1000.0
