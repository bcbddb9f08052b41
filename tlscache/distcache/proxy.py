"""dc_client's multiplexer: many local connections over one upstream connection.

The core (:class:`Multiplexer`) does no I/O. A shell feeds it events (a local
client connected, sent bytes or went away; the upstream connected, sent bytes
or dropped; the clock moved) and then calls :meth:`Multiplexer.drain` to learn
what to do: bytes for the upstream, bytes for each local client, connections
to close, whether to reset the upstream or start connecting it.
:class:`ProxyServer` is the asyncio shell used by the ``dc_client`` tool.

Wire behaviour is the C dc_client's: each forwarded request
gets a fresh uid from the proxy's own counter (1, 2, 3, ... never reset), its
payload and operation are forwarded unchanged, and the client's own uid is put
back on the answer. With no upstream connection every request is answered at
once with an empty payload; requests outstanding when the upstream drops are
answered with the one-byte result ``0x02``.

Where it deliberately differs from C:

* many requests are in flight upstream at once (pipelining, up to
  ``max_in_flight``), which is what lets one proxy connection carry the load
  of many clients; each client still gets its answers in its own order;
* a per-request upstream timeout: a server that accepts but never answers
  costs a client ``0x02`` after ``request_timeout_ms``, not a hang;
* a local client that vanishes mid-request, or sends garbage, is dropped
  alone (C aborts the whole proxy); a bad upstream reply resets only the
  upstream connection;
* a local client that half-closes its connection still gets the answers to
  what it sent before the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from tlscache.distcache.address import Address
from tlscache.distcache.protocol import (
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_DATA,
    PROTO_LEVEL,
    PROTO_VERSION,
    Decoder,
    Operation,
    Result,
    encode_message,
)
from tlscache.exceptions import ProtocolError

log = logging.getLogger("tlscache.dc_client")
_monotonic = time.monotonic

T = TypeVar("T")

DEFAULT_RETRY_MS = 5000
DEFAULT_REQUEST_TIMEOUT_MS = 1000
DEFAULT_MAX_IN_FLIGHT = 512
DEFAULT_MAX_CLIENTS = 1024
# A client that pipelines more than this many unanswered requests is not read
# from until it catches up, so one greedy client cannot grow the proxy's memory.
CLIENT_BACKLOG_HIGH = 1024
CLIENT_BACKLOG_LOW = 256


def empty_reply(uid: int, operation: int) -> bytes:
    """The reply meaning "no server available": data_len 0, complete 1 (as C sends it)."""
    return HEADER.pack(PROTO_LEVEL, 1, uid, 0, operation, 1, 0)


def disconnected_reply(uid: int, operation: int) -> bytes:
    """The one-byte result 0x02: the upstream dropped with this request outstanding."""
    return HEADER.pack(PROTO_LEVEL, 1, uid, 0, operation, 1, 1) + bytes([Result.DISCONNECTED])


_pack = HEADER.pack
_pack_into = HEADER.pack_into
_unpack = HEADER.unpack_from


def _messages(decoder: Decoder, data: bytes, response: int) -> list[tuple[int, int, bytes]]:
    """(uid, operation, payload) of every message ``data`` completes.

    Leading single-frame messages with a valid header are taken straight from
    ``data`` (the common case: no Message objects); anything else -- partial
    frames, multi-frame messages, anything the checks would reject -- goes
    through the full :class:`Decoder`, which raises on bad input.
    """
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    end = len(data)
    if not decoder.in_message:
        while end - pos >= HEADER_SIZE:
            level, resp, uid, op_class, op, complete, dlen = _unpack(data, pos)
            stop = pos + HEADER_SIZE + dlen
            if (
                stop > end
                or complete != 1
                or resp != response
                or op_class
                or op > 3
                or dlen > MAX_FRAME_DATA
                or level >> 16 != PROTO_VERSION
            ):
                break
            out.append((uid, op, data[pos + HEADER_SIZE : stop]))
            pos = stop
        if pos == end:
            return out
    for m in decoder.feed(data[pos:] if pos else data):
        out.append((m.uid, m.operation, m.payload))
    return out


class Upstream(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


class _Pending(Generic[T]):
    """One request from a local client, from arrival until its answer is handed over."""

    __slots__ = ("client", "op", "payload", "reply", "sent", "uid")

    def __init__(self, client: LocalClient[T], uid: int, op: int, payload: bytes) -> None:
        self.client = client
        self.uid = uid
        self.op = op
        self.payload = payload
        self.reply: bytes | None = None
        self.sent = 0.0


class LocalClient(Generic[T]):
    """The core's view of one local connection; ``ctx`` is the shell's handle for it."""

    __slots__ = (
        "closed",
        "ctx",
        "decoder",
        "in_ready",
        "last_active",
        "number",
        "out",
        "unsent",
        "waiting",
    )

    def __init__(self, ctx: T, number: int, now: float) -> None:
        self.ctx = ctx
        self.number = number
        # Only while a partial or multi-frame request is buffered (made on demand).
        self.decoder: Decoder | None = None
        # Every request not yet answered to the client, in the client's order.
        self.waiting: deque[_Pending[T]] = deque()
        # The tail of ``waiting`` not yet forwarded upstream.
        self.unsent: deque[_Pending[T]] = deque()
        self.out: list[bytes] = []
        self.in_ready = False
        self.closed = False
        self.last_active = now

    @property
    def backlog(self) -> int:
        """Requests received from this client and not yet answered."""
        return len(self.waiting)


class Actions(Generic[T]):
    """What the shell must do after an event, in this order."""

    __slots__ = ("close", "connect", "reset_upstream", "upstream", "writes")

    def __init__(self) -> None:
        self.connect = False  # start connecting the upstream
        self.reset_upstream = False  # abort the current upstream connection
        self.upstream = b""  # bytes to write upstream (after any reset/connect)
        self.writes: Sequence[tuple[T, bytes]] = ()  # bytes for local clients
        self.close: Sequence[T] = ()  # local clients to close (after their writes)


@dataclass(slots=True)
class Stats:
    """Counters for logs and tests."""

    forwarded: int = 0
    answered: int = 0
    empty_replies: int = 0
    disconnected_replies: int = 0
    discarded: int = 0  # upstream answers for clients that had gone
    rejected_clients: int = 0
    bad_clients: int = 0
    upstream_resets: int = 0
    connects: int = 0


class Multiplexer(Generic[T]):
    """The sans-IO proxy core. ``now`` arguments are monotonic seconds."""

    def __init__(
        self,
        retry_ms: int = DEFAULT_RETRY_MS,
        idle_ms: int = 0,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        first_uid: int = 1,
    ) -> None:
        if max_in_flight < 1 or max_clients < 1 or retry_ms < 1:
            raise ValueError("max_in_flight, max_clients and retry_ms must be positive")
        self.retry = retry_ms / 1000.0
        self.idle = idle_ms / 1000.0
        self.request_timeout = request_timeout_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.max_clients = max_clients
        self.stats = Stats()
        self.state = Upstream.DOWN
        self._next_uid = first_uid & 0xFFFFFFFF
        self._next_attempt = float("-inf")  # the first attempt is due at once
        self._outage_logged = False
        self._clients: dict[LocalClient[T], None] = {}
        self._numbers = 0
        # Upstream uid -> request, in send order (dicts keep insertion order).
        self._inflight: dict[int, _Pending[T]] = {}
        self._ready: deque[LocalClient[T]] = deque()  # clients with unsent requests
        self._up_decoder = Decoder(expect_response=True)
        self._up_out: list[bytes] = []
        self._dirty: list[LocalClient[T]] = []
        self._close: list[T] = []
        self._reset = False
        self._connect = False
        # Scratch of the fast forwarding path (see _forward_whole).
        self._fast_buf = b""
        self._fast_count = 0
        self._fast_first = 0

    # ------------------------------------------------------------ inspection

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        return sum(len(c.unsent) for c in self._ready)

    # ------------------------------------------------------------ local side

    def add_client(self, ctx: T, now: float) -> LocalClient[T] | None:
        """Register a new local connection; None means "at the limit, close it"."""
        if len(self._clients) >= self.max_clients:
            self.stats.rejected_clients += 1
            log.error("rejected new client connection already at maximum (%d)", self.max_clients)
            return None
        self._numbers += 1
        client = LocalClient(ctx, self._numbers, now)
        self._clients[client] = None
        return client

    def client_data(self, client: LocalClient[T], data: bytes, now: float) -> None:
        """Bytes from a local client: forward, queue or answer each whole request."""
        if client.closed:
            return
        fast = 0
        if self.state is Upstream.UP and client.decoder is None and not client.unsent:
            fast = self._forward_whole(client, data, now)
            if fast == len(data):
                if fast:
                    self._up_out.append(self._fast_buf)
                return
        decoder = client.decoder
        if decoder is None:
            decoder = client.decoder = Decoder(expect_response=False)
        try:
            messages = _messages(decoder, data[fast:] if fast else data, 0)
        except ProtocolError as exc:
            if fast:
                self._unforward(self._fast_count)
            self.stats.bad_clients += 1
            log.warning("local connection %d sent bad data (%s); closing it", client.number, exc)
            self._drop(client)
            self._close.append(client.ctx)
            return
        if not decoder.in_message:
            client.decoder = None
        if fast:
            self._up_out.append(self._fast_buf[:fast])
        if not messages:
            return
        client.last_active = now
        up = self.state is Upstream.UP
        for uid, op, payload in messages:
            p = _Pending(client, uid, op, payload)
            client.waiting.append(p)
            if not up:
                self.stats.empty_replies += 1
                p.reply = empty_reply(uid, op)
            elif not client.unsent and len(self._inflight) < self.max_in_flight:
                self._send(p, now)
            else:
                client.unsent.append(p)
                if not client.in_ready:
                    client.in_ready = True
                    self._ready.append(client)
        if not up:
            self._flush(client)

    def _forward_whole(self, client: LocalClient[T], data: bytes, now: float) -> int:
        """Forward the leading whole single-frame requests of ``data`` at once.

        The common case of :meth:`client_data`: every request goes straight
        upstream, so the frames are copied once and only their headers are
        rewritten in place (the proxy's uid). Returns how many bytes of ``data``
        were taken; the rewritten copy is left in ``_fast_buf``.
        """
        end = len(data)
        pos = 0
        inflight = self._inflight
        room = self.max_in_flight - len(inflight)
        waiting = client.waiting
        buf: bytearray | None = None
        count = 0
        self._fast_first = self._next_uid
        while end - pos >= HEADER_SIZE and room > count:
            level, resp, cuid, op_class, op, complete, dlen = _unpack(data, pos)
            stop = pos + HEADER_SIZE + dlen
            if (
                stop > end
                or complete != 1
                or resp
                or op_class
                or op > 3
                or dlen > MAX_FRAME_DATA
                or level >> 16 != PROTO_VERSION
            ):
                break
            if buf is None:
                buf = bytearray(data)
            uid = self._next_uid
            self._next_uid = (uid + 1) & 0xFFFFFFFF
            while uid in inflight:  # only after 2**32 requests with one stuck
                uid = self._next_uid
                self._next_uid = (uid + 1) & 0xFFFFFFFF
            p = _Pending(client, cuid, op, b"")
            p.sent = now
            inflight[uid] = p
            waiting.append(p)
            _pack_into(buf, pos, PROTO_LEVEL, 0, uid, 0, op, 1, dlen)
            pos = stop
            count += 1
        if count:
            assert buf is not None
            self._fast_buf = bytes(buf)
            self._fast_count = count
            self.stats.forwarded += count
            client.last_active = now
        return pos

    def _unforward(self, count: int) -> None:
        """Take back the ``count`` requests :meth:`_forward_whole` just forwarded."""
        inflight = self._inflight
        for _ in range(count):
            inflight.popitem()  # they are the newest entries
        self._next_uid = self._fast_first
        self.stats.forwarded -= count
        self._fast_buf = b""

    def client_closed(self, client: LocalClient[T]) -> None:
        """The local connection is gone; answers still due to it are discarded."""
        if not client.closed:
            self._drop(client)

    def _drop(self, client: LocalClient[T]) -> None:
        client.closed = True
        self._clients.pop(client, None)
        client.waiting.clear()
        client.unsent.clear()
        client.out.clear()
        # In-flight requests stay in the table: their answers must still be
        # consumed in order, then they are discarded.

    # ------------------------------------------------------------ upstream side

    def connect_due(self, now: float) -> bool:
        """True (and state CONNECTING) if a connection attempt should start now."""
        if self.state is Upstream.DOWN and now >= self._next_attempt:
            self.state = Upstream.CONNECTING
            self._next_attempt = now + self.retry
            self.stats.connects += 1
            return True
        return False

    def upstream_connected(self, now: float) -> None:
        if self.state is Upstream.UP:
            return
        if self._outage_logged:
            log.info("connected to the server again")
        self._outage_logged = False
        self.state = Upstream.UP
        self._up_decoder = Decoder(expect_response=True)
        self._up_out.clear()

    def upstream_failed(self, now: float, reason: str) -> None:
        """A connection attempt failed or the established connection dropped."""
        was_up = self.state is Upstream.UP
        self._go_down(now)
        if was_up or not self._outage_logged:
            log.warning(
                "server %s: %s; retrying every %g ms",
                "connection lost" if was_up else "unavailable",
                reason,
                self.retry * 1000,
            )
            self._outage_logged = True

    def reset_upstream(self, now: float, reason: str) -> None:
        """Abandon the upstream connection (the shell aborts it)."""
        if self.state is not Upstream.UP:
            return
        self.stats.upstream_resets += 1
        log.error("resetting the server connection: %s", reason)
        self._outage_logged = True
        self._reset = True
        self._go_down(now)

    def _go_down(self, now: float) -> None:
        self.state = Upstream.DOWN
        self._next_attempt = now + self.retry
        self._up_out.clear()
        touched: dict[LocalClient[T], None] = {}
        for p in self._inflight.values():
            c = p.client
            if not c.closed:
                self.stats.disconnected_replies += 1
                p.reply = disconnected_reply(p.uid, p.op)
                touched[c] = None
        self._inflight.clear()
        for c in self._ready:
            for p in c.unsent:
                self.stats.empty_replies += 1
                p.reply = empty_reply(p.uid, p.op)
            c.unsent.clear()
            c.in_ready = False
            touched[c] = None
        self._ready.clear()
        for c in touched:
            self._flush(c)

    def upstream_data(self, data: bytes, now: float) -> None:
        """Bytes from the server: hand each answer to its client, in that client's order."""
        if self.state is not Upstream.UP:
            return
        try:
            messages = _messages(self._up_decoder, data, 1)
        except ProtocolError as exc:
            self.reset_upstream(now, f"bad data from the server ({exc})")
            return
        inflight = self._inflight
        stats = self.stats
        dirty = self._dirty
        for uid, op, payload in messages:
            p = inflight.pop(uid, None)
            if p is None:
                self.reset_upstream(now, f"answer with unknown request_uid {uid}")
                return
            if op != p.op:
                inflight[uid] = p  # answered 0x02 with the rest
                self.reset_upstream(
                    now, f"answer to request_uid {uid} has operation {op}, expected {p.op}"
                )
                return
            c = p.client
            if c.closed:
                stats.discarded += 1
                continue
            stats.answered += 1
            size = len(payload)
            if size <= MAX_FRAME_DATA:
                reply = _pack(PROTO_LEVEL, 1, p.uid, 0, op, 1, size) + payload
            else:
                reply = encode_message(True, p.uid, op, payload)
            c.last_active = now
            waiting = c.waiting
            if waiting and waiting[0] is p:
                # Answered in the client's order (the usual case): straight out.
                waiting.popleft()
                out = c.out
                if not out:
                    dirty.append(c)
                out.append(reply)
                if waiting and waiting[0].reply is not None:
                    self._flush(c)
            else:
                p.reply = reply
                self._flush(c)
        if self._ready:
            self._pump(now)

    def _send(self, p: _Pending[T], now: float) -> None:
        uid = self._next_uid
        self._next_uid = (uid + 1) & 0xFFFFFFFF
        while uid in self._inflight:  # only after 2**32 requests with one stuck
            uid = self._next_uid
            self._next_uid = (uid + 1) & 0xFFFFFFFF
        p.sent = now
        self._inflight[uid] = p
        payload = p.payload
        size = len(payload)
        if size <= MAX_FRAME_DATA:
            self._up_out.append(_pack(PROTO_LEVEL, 0, uid, 0, p.op, 1, size) + payload)
        else:
            self._up_out.append(encode_message(False, uid, p.op, payload))
        p.payload = b""
        self.stats.forwarded += 1

    def _pump(self, now: float) -> None:
        """Fill free upstream slots from the waiting clients, round-robin."""
        ready = self._ready
        inflight = self._inflight
        while ready and len(inflight) < self.max_in_flight:
            c = ready.popleft()
            if c.closed or not c.unsent:
                c.in_ready = False
                continue
            self._send(c.unsent.popleft(), now)
            if c.unsent:
                ready.append(c)
            else:
                c.in_ready = False

    def _flush(self, c: LocalClient[T]) -> None:
        waiting = c.waiting
        out = c.out
        was_empty = not out
        while waiting:
            reply = waiting[0].reply
            if reply is None:
                break
            out.append(reply)
            waiting.popleft()
        if was_empty and out:
            self._dirty.append(c)

    # ------------------------------------------------------------ clock

    def tick(self, now: float) -> None:
        """Time-driven work: upstream request timeout, idle clients, reconnect."""
        if self._inflight and self.state is Upstream.UP:
            oldest = next(iter(self._inflight.values()))
            if now - oldest.sent > self.request_timeout:
                self.reset_upstream(
                    now,
                    f"no answer within {self.request_timeout * 1000:g} ms "
                    f"({len(self._inflight)} requests outstanding)",
                )
        if self.idle > 0:
            limit = now - self.idle
            for c in list(self._clients):
                if c.last_active < limit and not c.waiting and c.decoder is None:
                    self._drop(c)
                    self._close.append(c.ctx)
        if self.connect_due(now):
            self._connect = True

    def next_tick(self) -> float:
        """Seconds between :meth:`tick` calls that keep every timer reasonably precise."""
        period = min(self.retry / 3, self.request_timeout / 4)
        if self.idle > 0:
            period = min(period, self.idle / 4)
        return max(0.01, min(period, 0.25))

    # ------------------------------------------------------------ output

    @property
    def only_upstream(self) -> bool:
        """True when upstream bytes are all :meth:`drain` would return (the commonest case)."""
        return not (self._dirty or self._close or self._reset or self._connect)

    @property
    def upstream_due(self) -> bool:
        """True when there are bytes for the upstream."""
        return bool(self._up_out)

    def take_upstream(self) -> bytes:
        """The bytes due upstream (as ``drain().upstream``), leaving the rest for :meth:`drain`."""
        out = self._up_out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def drain(self) -> Actions[T]:
        """Everything the shell must do now; clears the core's output buffers."""
        actions: Actions[T] = Actions()
        if self._connect:
            actions.connect = True
            self._connect = False
        if self._reset:
            actions.reset_upstream = True
            self._reset = False
        if self._up_out:
            out = self._up_out
            actions.upstream = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
        if self._dirty:
            writes = []
            for c in self._dirty:
                o = c.out
                if o and not c.closed:
                    writes.append((c.ctx, o[0] if len(o) == 1 else b"".join(o)))
                    o.clear()
            self._dirty.clear()
            actions.writes = writes
        if self._close:
            actions.close = self._close
            self._close = []
        return actions


# ================================================================ asyncio shell


class _LocalProtocol(asyncio.Protocol):
    """One accepted local connection."""

    __slots__ = ("client", "eof", "paused", "server", "transport", "write_blocked")

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client: LocalClient[_LocalProtocol] | None = None
        self.paused = False  # reading paused: too many unanswered requests
        self.write_blocked = False  # reading paused: the client does not read its answers
        self.eof = False  # the client half-closed: close once its answers are out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.client = self.server.core.add_client(self, _monotonic())
        if self.client is None:
            self.transport.abort()
            return
        self.server.clients_seen += 1

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        server = self.server
        server.core.client_data(client, data, _monotonic())
        server.apply()
        if len(client.waiting) > CLIENT_BACKLOG_HIGH and not self.paused and self.transport:
            self.paused = True
            if not self.write_blocked:
                self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.write_blocked = True
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        client = self.client
        if client is None or not client.backlog:
            return False  # nothing owed: close
        self.eof = True  # answer what it asked, then close (see ProxyServer.apply)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        self.client = None
        if client is not None:
            self.server.core.client_closed(client)
            self.server.apply()
        self.server.connection_gone()

    def written(self) -> None:
        """Answers went out; resume a paused client once its backlog is small again."""
        client = self.client
        if (
            self.paused
            and client is not None
            and client.backlog < CLIENT_BACKLOG_LOW
            and self.transport is not None
        ):
            self.paused = False
            if not self.write_blocked:
                self.transport.resume_reading()


class _UpstreamProtocol(asyncio.Protocol):
    __slots__ = ("server", "transport")

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        server = self.server
        if server.upstream is self:
            server.core.upstream_data(data, _monotonic())
            server.apply()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        if server.upstream is self:
            server.upstream = None
            server._up_pending.clear()
            reason = f"{exc}" if exc else "closed by the server"
            server.core.upstream_failed(time.monotonic(), reason)
            server.apply()


async def _open_upstream(
    loop: asyncio.AbstractEventLoop,
    address: Address,
    factory: Callable[[], _UpstreamProtocol],
) -> tuple[asyncio.BaseTransport, _UpstreamProtocol]:
    if address.kind == "unix":
        return await loop.create_unix_connection(factory, address.path)
    if address.kind == "fd":
        sock = socket.socket(fileno=os.dup(address.fd))
        return await loop.create_connection(factory, sock=sock)
    assert address.host is not None  # checked by connect_address()
    transport, proto = await loop.create_connection(
        factory, address.host, address.port, family=address.family
    )
    sock_obj = transport.get_extra_info("socket")
    if sock_obj is not None:
        with contextlib.suppress(OSError):
            sock_obj.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return transport, proto


class ProxyServer:
    """The asyncio shell around :class:`Multiplexer`: a listener plus one upstream."""

    def __init__(
        self,
        listener: socket.socket,
        server_address: Address,
        *,
        retry_ms: int = DEFAULT_RETRY_MS,
        idle_ms: int = 0,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        connect_timeout: float = 2.0,
    ) -> None:
        self.listener = listener
        self.server_address = server_address
        self.core: Multiplexer[_LocalProtocol] = Multiplexer(
            retry_ms=retry_ms,
            idle_ms=idle_ms,
            request_timeout_ms=request_timeout_ms,
            max_in_flight=max_in_flight,
            max_clients=max_clients,
        )
        self.connect_timeout = connect_timeout
        self.upstream: _UpstreamProtocol | None = None
        self._up_pending: list[bytes] = []
        self._up_scheduled = False
        self.clients_seen = 0
        self._connecting = False
        self._single = False  # FD: listener that is itself one connection
        # Created up front so that a stop() before serve() runs (a signal during
        # start-up) is not lost.
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def apply(self) -> None:
        """Carry out what the core asked for."""
        core = self.core
        if core.only_upstream:
            # The commonest case by far (a request to forward): no Actions needed.
            # The bytes stay in the core until the flush at the end of this loop
            # iteration, which takes them with everything else due by then.
            if (
                core.upstream_due
                and not self._up_scheduled
                and self._loop is not None
                and self.upstream is not None
            ):
                self._up_scheduled = True
                self._loop.call_soon(self._flush_upstream)
            return
        actions = core.drain()
        if actions.reset_upstream and self.upstream is not None:
            up, self.upstream = self.upstream, None
            self._up_pending.clear()
            if up.transport is not None:
                up.transport.abort()
        if actions.connect:
            self._start_connect()
        if actions.upstream and self.upstream is not None:
            # Coalesce: every request that arrives in one loop iteration goes
            # upstream in one write (one syscall), however many clients sent them.
            self._up_pending.append(actions.upstream)
            if not self._up_scheduled and self._loop is not None:
                self._up_scheduled = True
                self._loop.call_soon(self._flush_upstream)
        for proto, data in actions.writes:
            if proto.transport is not None:
                proto.transport.write(data)
                if proto.paused:
                    proto.written()
                if proto.eof and proto.client is not None and not proto.client.backlog:
                    proto.transport.close()
        for proto in actions.close:
            if proto.transport is not None:
                proto.transport.close()

    def _flush_upstream(self) -> None:
        self._up_scheduled = False
        pending = self._up_pending
        more = self.core.take_upstream()
        if more:
            pending.append(more)
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)

    def _start_connect(self) -> None:
        if self._connecting or self._loop is None:
            return
        self._connecting = True
        task = self._loop.create_task(self._connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self) -> None:
        assert self._loop is not None
        loop = self._loop
        proto = _UpstreamProtocol(self)
        try:
            try:
                await asyncio.wait_for(
                    _open_upstream(loop, self.server_address, lambda: proto),
                    self.connect_timeout,
                )
            except (TimeoutError, OSError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
                self.core.upstream_failed(time.monotonic(), f"connect failed: {reason}")
                self.apply()
                return
        finally:
            self._connecting = False
        if self._stopped.is_set():
            if proto.transport is not None:
                proto.transport.close()
            return
        self.upstream = proto
        self.core.upstream_connected(time.monotonic())
        self.apply()

    def connection_gone(self) -> None:
        if self._single and self.core.clients == 0:
            self._stopped.set()

    def stop(self) -> None:
        self._stopped.set()

    async def _ticker(self) -> None:
        period = self.core.next_tick()
        while True:
            await asyncio.sleep(period)
            self.core.tick(time.monotonic())
            self.apply()

    async def serve(self) -> None:
        """Run until :meth:`stop` (or, with an FD: listen address, until its one client goes)."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        accepting = True
        try:
            accepting = bool(self.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        except OSError:
            accepting = True
        if self.core.connect_due(time.monotonic()):
            self._start_connect()
        srv: asyncio.AbstractServer | None = None
        if accepting:
            self.listener.setblocking(False)
            if self.listener.family == socket.AF_UNIX:
                srv = await loop.create_unix_server(
                    lambda: _LocalProtocol(self), sock=self.listener
                )
            else:
                srv = await loop.create_server(lambda: _LocalProtocol(self), sock=self.listener)
        else:
            self._single = True
            await loop.connect_accepted_socket(lambda: _LocalProtocol(self), self.listener)
        ticker = loop.create_task(self._ticker())
        try:
            await self._stopped.wait()
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            if srv is not None:
                srv.close()
            for task in list(self._tasks):
                task.cancel()
            if self.upstream is not None and self.upstream.transport is not None:
                self.upstream.transport.close()
                self.upstream = None


__all__ = [
    "Actions",
    "LocalClient",
    "Multiplexer",
    "Operation",
    "ProxyServer",
    "Stats",
    "Upstream",
    "disconnected_reply",
    "empty_reply",
]
