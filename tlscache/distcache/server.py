"""The dc_server network layer: an asyncio shell around :mod:`tlscache.distcache.serverconn`.

The protocol, the table and every decision about a request live in the sans-IO
:class:`~tlscache.distcache.serverconn.ServerConnection`; this module moves its
bytes, applies backpressure, times out peers that stall, limits connections and
logs what the connection role reports (:attr:`ServerConnection.error`).

Differences from the C server, all deliberate:

* bad input (wrong protocol version, garbage, malformed frames) closes only
  that connection, logged once with the peer and the reason, after the answers
  to the requests before it have been sent; the process never aborts;
* pipelined requests are all answered, in order, whatever their size;
* a request followed by a half-close is answered before the connection closes;
* a frame is complete only when all ``14 + data_len`` bytes are there;
* a peer that stalls in the middle of a message (or stops reading our answers)
  is dropped after ``read_timeout`` seconds; idle connections between
  messages are kept as long as the peer likes, unless the connection cap is
  reached (then the longest-idle make room for newcomers);
* memory is bounded per connection (``max_in_flight`` requests, one turn's
  answers) and across connections (``max_buffered``), and pipelining
  connections are served round-robin, so a few clients cannot starve the rest.

Embedding::

    server = Server(SessionTable(), read_timeout=5)
    await server.start(["IP:127.0.0.1:9000"])
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import logging
import resource
import socket
import sys
import termios
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

from tlscache.distcache import sockets
from tlscache.distcache.address import Address, parse_address
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.loops import LoopKind, loop_factory
from tlscache.distcache.protocol import HEADER_SIZE
from tlscache.distcache.serverconn import CacheService, ServerConnection
from tlscache.distcache.table import SessionTable

log = logging.getLogger("tlscache.dc_server")
_monotonic_ns: Final = time.monotonic_ns

DEFAULT_READ_TIMEOUT: Final = 30.0
STATS_INTERVAL: Final = 1.0
# A flood of bad connections must not turn into a flood of log lines (or block on stderr).
MAX_WARNINGS_PER_SECOND: Final = 50
#: Requests one connection may have decoded but not answered: a read is at most
#: ``max_in_flight * 14`` bytes (14 is the smallest request), and a connection with
#: requests left over is not read again until they are answered.
DEFAULT_MAX_IN_FLIGHT: Final = 512
#: Answer bytes one connection may produce per turn before the others get theirs.
DEFAULT_OUTPUT_BUDGET: Final = 64 * 1024
#: Answers waiting in all connections' transports together; beyond it each
#: connection gets one answer per turn (so nobody is starved) instead of a batch.
DEFAULT_MAX_BUFFERED: Final = 16 * 1024 * 1024
#: File descriptors kept free of connections (listeners, logs, the odd accept race).
FD_RESERVE: Final = 32
#: When at the connection cap, close this share of the idle connections at once
#: (at least one), oldest first, so that a flood of newcomers costs one scan per batch.
EVICT_FRACTION: Final = 64
#: Only connections idle this long are closed to make room: newcomers in a flood
#: must not push each other out, and a client between two requests keeps its place.
EVICT_MIN_IDLE_MS: Final = 1000
#: How often connections waiting for their peer to read (over the output cap) look again.
PARK_INTERVAL: Final = 0.02
_MIN_READ: Final = 4096
#: The read size while over the output cap: peers that do not read pile up few requests.
_CAPPED_READ: Final = 1024
# Bytes a socket has sent that its peer has not taken yet (Linux; None elsewhere).
_TIOCOUTQ: Final = getattr(termios, "TIOCOUTQ", None) if sys.platform == "linux" else None
_MAX_READ: Final = 256 * 1024


def now_ms() -> int:
    """The server clock: monotonic milliseconds (wall-clock jumps do not expire sessions)."""
    return time.monotonic_ns() // 1_000_000


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (thousands of idle clients are fine)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
    return soft


def default_max_connections(fd_limit: int) -> int:
    """The connection cap for a process allowed ``fd_limit`` descriptors."""
    return max(1, fd_limit - FD_RESERVE)


def read_size(max_in_flight: int) -> int:
    """The read buffer that holds at most ``max_in_flight`` whole requests (within bounds)."""
    return min(_MAX_READ, max(_MIN_READ, max_in_flight * HEADER_SIZE))


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    sockname = transport.get_extra_info("sockname")
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    if isinstance(sockname, str) and sockname:
        return f"UNIX:{sockname} (fd {fd})"
    return f"fd {fd}"


class _Connection(asyncio.BufferedProtocol):
    """One client connection. The per-request path is :meth:`data_received`.

    Reads land in the server's one shared buffer of ``read_size`` bytes, so that a
    read can hold at most ``max_in_flight`` requests and an idle connection owns
    no read buffer at all.
    """

    __slots__ = (
        "_accounted",
        "_eof",
        "_feed",
        "_last_active",
        "_last_rx",
        "_on_lost",
        "_proto",
        "_queued",
        "_reading_paused",
        "_server",
        "_stall_timer",
        "_view",
        "_write_paused",
        "transport",
    )

    def __init__(self, server: Server, on_lost: Callable[[], None] | None = None) -> None:
        self._server = server
        self._proto: ServerConnection = server.service.connection(
            server.output_budget, server.max_batch
        )
        self._feed = self._proto.feed
        self._view = server._read_view
        self.transport: asyncio.Transport | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._last_active = _monotonic_ns() // 1_000_000
        self._accounted = 0  # our share of Server.buffered (bytes the transport holds)
        self._write_paused = False
        self._reading_paused = False
        self._queued = False
        self._eof = False
        self._on_lost = on_lost

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self._server
        limit = server.max_connections
        if limit is not None and len(server.connections) >= limit and not server.make_room():
            server.warn(
                "Warning, rejected connection from %s: already at the maximum (%d)",
                _peer(transport),
                limit,
            )
            transport.abort()
            return
        server.connections.add(self)
        # Any byte the kernel does not take pauses us (and is counted in
        # Server.buffered) until the transport is empty again: a peer that does not
        # read holds at most one turn's answers here, and the total stays bounded.
        # (A TLS transport pauses at size >= high, a plain one at size > high.)
        tls = transport.get_extra_info("ssl_object") is not None
        transport.set_write_buffer_limits(high=1 if tls else 0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        server = self._server
        if server.buffered >= server.max_buffered:
            return server._capped_view
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        now = self._last_active = _monotonic_ns() // 1_000_000
        server = self._server
        if server.buffered >= server.max_buffered:
            self._answer_one(data, now)
            return
        out = self._feed(data, now)
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        if self._proto.busy:
            self._settle()

    def _answer_one(self, data: bytes, now: int) -> None:
        """Over the server's output cap: answer one request if the peer has read
        everything sent so far, else none; queue the rest for later turns.

        A peer that reads gets served, one answer per turn (nobody is starved),
        while one that does not read adds nothing more to what is buffered.
        """
        proto = self._proto
        if not self._caught_up():
            proto.receive(data)
            if proto.pending and not self._write_paused and not self._queued:
                self._queued = True
                self._server.park(self)
            self._settle()
            return
        proto.output_budget = 0
        try:
            out = self._feed(data, now)
        finally:
            proto.output_budget = self._server.output_budget
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        self._settle()

    def eof_received(self) -> bool:
        proto = self._proto
        proto.end_of_input()
        if proto.pending:
            # Answer everything received first; _settle closes once it is all sent.
            self._eof = True
            return True
        if proto.error is not None:
            self._drop(proto.error.reason)
            return True
        # Everything received has been answered; closing flushes those answers first.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        server = self._server
        server.connections.discard(self)
        self._cancel_stall_timer()
        self.transport = None
        if self._accounted:
            server.release(self._accounted)
            self._accounted = 0
        if self._on_lost is not None:
            self._on_lost()

    def pause_writing(self) -> None:
        # Backpressure: a peer that does not read its answers stops being read.
        self._write_paused = True
        transport = self.transport
        if transport is not None:
            size = transport.get_write_buffer_size()
            self._server.buffered += size - self._accounted
            self._accounted = size
        self._settle()
        self._arm_stall_timer()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_rx = time.monotonic()
        if self._accounted:
            self._server.release(self._accounted)
            self._accounted = 0
        self._settle()

    # ------------------------------------------------------------ slow paths

    def _caught_up(self) -> bool:
        """Whether the kernel has delivered all we sent (unknown counts as yes)."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or _TIOCOUTQ is None:
            return True
        try:
            unsent = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
        except OSError:
            return True
        return int.from_bytes(unsent, sys.byteorder) == 0

    def idle(self) -> bool:
        """Between messages with nothing owed: may be closed to make room for a newcomer."""
        transport = self.transport
        return (
            transport is not None
            and not transport.is_closing()
            and not self._proto.busy
            and not self._write_paused
            and not self._accounted
            and not self._eof
        )

    def _settle(self) -> None:
        """Bring reading, timers and deferred work in line with the protocol state."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        proto = self._proto
        if proto.error is not None:
            self._drop(proto.error.reason)
            return
        hold = self._write_paused or proto.pending
        if hold and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not hold and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False
        if proto.pending and not self._write_paused and not self._queued:
            # Answer the held-back requests on a later turn, behind the other connections.
            self._queued = True
            self._server.enqueue(self)
        if proto.partial:
            # Part of a message is buffered: the peer must finish it within read_timeout.
            self._last_rx = time.monotonic()
            self._arm_stall_timer()
        elif self._stall_timer is not None and not self._write_paused:
            self._cancel_stall_timer()
        if self._eof and not proto.pending:
            transport.close()

    def turn(self) -> None:
        """One turn of the server's round-robin: answer one batch of held-back requests."""
        self._queued = False
        transport = self.transport
        if transport is None or transport.is_closing() or self._write_paused:
            return  # resume_writing queues the connection again
        now = self._last_active = _monotonic_ns() // 1_000_000
        server = self._server
        if server.buffered >= server.max_buffered:
            if not self._caught_up():
                self._queued = True
                server.park(self)
                return
            self._answer_one(b"", now)
            return
        out = self._feed(b"", now)
        if out:
            transport.write(out)
        self._settle()

    def _arm_stall_timer(self) -> None:
        if self._stall_timer is None and self.transport is not None:
            timeout = self._server.read_timeout
            if timeout is not None:
                self._last_rx = time.monotonic()
                loop = asyncio.get_running_loop()
                self._stall_timer = loop.call_later(timeout, self._check_stall)

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _check_stall(self) -> None:
        self._stall_timer = None
        if self.transport is None:
            return
        if not self._proto.partial and not self._write_paused:
            return
        timeout = self._server.read_timeout
        assert timeout is not None
        idle = time.monotonic() - self._last_rx
        if idle >= timeout:
            if self._write_paused:
                self._drop(f"peer has not read its responses for {idle:.1f} s", flush=False)
            else:
                self._drop(
                    f"stalled for {idle:.1f} s inside a message "
                    f"({self._proto.buffered} bytes buffered)"
                )
            return
        loop = asyncio.get_running_loop()
        self._stall_timer = loop.call_later(timeout - idle, self._check_stall)

    def _drop(self, reason: str, *, flush: bool = True) -> None:
        """Close this connection because of the peer, logging it exactly once.

        With ``flush`` the answers to the requests before the bad input still go
        out, but a peer that does not take them within ``read_timeout`` is cut off.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        server = self._server
        server.warn("Warning, closing connection from %s: %s", _peer(transport), reason)
        self._cancel_stall_timer()
        if not transport.get_write_buffer_size():
            transport.close()
        elif flush and server.read_timeout is not None:
            transport.close()
            # connection_lost cancels this once the answers are out.
            loop = asyncio.get_running_loop()
            self._stall_timer = loop.call_later(server.read_timeout, transport.abort)
        else:
            transport.abort()


class Server:
    """A dc_server: one table, any number of listeners and connections."""

    def __init__(
        self,
        table: SessionTable | None = None,
        *,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
        max_connections: int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        output_budget: int = DEFAULT_OUTPUT_BUDGET,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        max_batch: int | None = None,
        progress: int = 0,
        stats: bool = True,
    ) -> None:
        self.table = table if table is not None else SessionTable()
        self.service = CacheService(self.table)
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.output_budget = output_budget
        self.max_buffered = max_buffered
        # A whole read's requests per turn by default: reads are already bounded by
        # max_in_flight, and splitting them would cost a pass and two epoll changes.
        self.max_batch = max_batch if max_batch is not None else max_in_flight
        #: Bytes waiting in the transports of write-paused connections.
        self.buffered = 0
        # One read buffer for every connection: reads are handled one at a time.
        self._read_view = memoryview(bytearray(read_size(max_in_flight)))
        self._capped_view = self._read_view[:_CAPPED_READ]
        self._ready: deque[_Connection] = deque()
        self._ready_scheduled = False
        self._parked: list[_Connection] = []
        self._park_timer: asyncio.TimerHandle | None = None
        self.progress = progress
        self.stats = stats
        self.connections: set[_Connection] = set()
        self.max_warnings_per_second = MAX_WARNINGS_PER_SECOND
        self._warn_second = 0
        self._warned = 0
        self._suppressed = 0
        self._servers: list[asyncio.AbstractServer] = []
        self._sockets: list[socket.socket] = []
        self._stats_task: asyncio.Task[None] | None = None
        self._single: asyncio.Future[None] | None = None
        self._last_ops = 0
        self._last_sessions = 0

    # ------------------------------------------------------------ round-robin

    def enqueue(self, conn: _Connection) -> None:
        """Give ``conn`` a turn after every connection already waiting for one."""
        self._ready.append(conn)
        if not self._ready_scheduled:
            self._ready_scheduled = True
            asyncio.get_running_loop().call_soon(self._run_ready)

    def _run_ready(self) -> None:
        """One turn for each connection waiting now; those re-queued wait for the next pass.

        Between passes the loop polls the sockets, so other clients are read and
        answered between any two batches of a pipelining one.
        """
        self._ready_scheduled = False
        ready = self._ready
        for _ in range(len(ready)):
            ready.popleft().turn()
        if ready:
            self._ready_scheduled = True
            asyncio.get_running_loop().call_soon(self._run_ready)

    def park(self, conn: _Connection) -> None:
        """Over the output cap, a peer that has not read our last answers waits here;
        every ``PARK_INTERVAL`` the parked get a turn again (and look again)."""
        self._parked.append(conn)
        if self._park_timer is None:
            loop = asyncio.get_running_loop()
            self._park_timer = loop.call_later(PARK_INTERVAL, self._unpark)

    def _unpark(self) -> None:
        self._park_timer = None
        parked, self._parked = self._parked, []
        for conn in parked:
            if conn.transport is not None:
                self.enqueue(conn)
            else:
                conn._queued = False

    def release(self, size: int) -> None:
        """A connection's buffered answers were sent (or dropped)."""
        self.buffered -= size

    def make_room(self) -> bool:
        """At the connection cap: close the longest-idle connections; False if none is idle."""
        limit = self.max_connections or 1
        now = _monotonic_ns() // 1_000_000
        oldest = now - EVICT_MIN_IDLE_MS
        idle = [c for c in self.connections if c._last_active <= oldest and c.idle()]
        if not idle:
            return False
        count = max(1, limit // EVICT_FRACTION)
        victims = heapq.nsmallest(count, idle, key=lambda conn: conn._last_active)
        for conn in victims:
            self.connections.discard(conn)
            transport = conn.transport
            assert transport is not None
            self.warn(
                "Warning, closing connection from %s: idle for %.1f s, making room for new ones",
                _peer(transport),
                (now - conn._last_active) / 1000,
            )
            transport.close()
        return True

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's own complaints (accept failing with EMFILE), rate-limited too."""
        exc = context.get("exception")
        reason = f"{context.get('message', 'error')}: {exc}" if exc else context.get("message")
        self.warn("Warning, %s", reason)

    @property
    def operations(self) -> int:
        return self.service.operations

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def _protocol(self) -> _Connection:
        return _Connection(self)

    async def start(
        self, listeners: Iterable[str | Address | socket.socket], tls: LinkTLS | None = None
    ) -> None:
        """Start accepting on every listener (address strings, Addresses or bound sockets).

        An inherited connected socket (``FD:n``) is served as the one connection
        it is, as in C; :func:`serve` returns once it has gone away. With ``tls``
        every listener must be TCP, and every client must present a certificate
        from ``tls.ca`` (see :mod:`tlscache.distcache.linktls`).
        """
        loop = asyncio.get_running_loop()
        listeners = list(listeners)
        ssl_context = tls.server_context() if tls is not None else None
        if tls is not None:
            for item in listeners:
                if isinstance(item, socket.socket):
                    tls.check_socket(item)
                else:
                    tls.check_address(parse_address(item) if isinstance(item, str) else item)
        if loop.get_exception_handler() is None:  # an embedding application's handler stays
            loop.set_exception_handler(self._loop_exception)
        for item in listeners:
            if isinstance(item, socket.socket):
                sock = item
            else:
                sock = sockets.listen(parse_address(item) if isinstance(item, str) else item)
            self._sockets.append(sock)
            if sockets.is_listening(sock):
                factory = self._protocol
            else:
                factory = self._single_connection(loop)
            server = await sockets.serve(
                sock,
                factory,
                ssl=ssl_context,
                ssl_handshake_timeout=tls.handshake_timeout if tls is not None else None,
            )
            if server is not None:
                self._servers.append(server)
        if self._stats_task is None:
            self._stats_task = loop.create_task(self._housekeeping())

    def _single_connection(self, loop: asyncio.AbstractEventLoop) -> Callable[[], _Connection]:
        """The protocol factory of an ``FD:`` connection, which resolves ``_single`` when lost."""
        done: asyncio.Future[None] = loop.create_future()
        self._single = done

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        return lambda: _Connection(self, finished)

    async def close(self) -> None:
        """Stop listening, close every connection and wait for the listeners to finish."""
        if self._stats_task is not None:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task
            self._stats_task = None
        if self._park_timer is not None:
            self._park_timer.cancel()
            self._park_timer = None
        for srv in self._servers:
            srv.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(srv.wait_closed(), 2.0)
        self._servers.clear()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()

    async def _housekeeping(self) -> None:
        """Once a second: flush expired sessions (as C's main loop does) and print statistics."""
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            self.table.expire(now_ms())
            self._flush_suppressed()
            if self.stats:
                self.report()

    def warn(self, fmt: str, *args: object) -> None:
        """Log a bad connection, at most ``max_warnings_per_second`` lines a second."""
        second = int(time.monotonic())
        if second != self._warn_second:
            self._flush_suppressed()
            self._warn_second = second
            self._warned = 0
        if self._warned >= self.max_warnings_per_second:
            self._suppressed += 1
            return
        self._warned += 1
        log.warning(fmt, *args)

    def _flush_suppressed(self) -> None:
        if self._suppressed:
            log.warning(
                "Warning, %d more bad connections were closed without being logged",
                self._suppressed,
            )
            self._suppressed = 0

    def report(self) -> None:
        """C's statistics line, when the session count or (with -progress) the op count changed."""
        ops = self.operations
        sessions = len(self.table)
        changed = sessions != self._last_sessions
        if self.progress and ops // self.progress != self._last_ops // self.progress:
            changed = True
        if not changed:
            return
        delta = sessions - self._last_sessions
        sign = "+" if delta > 0 else "-" if delta < 0 else "="
        log.info(
            "Info, total operations = %7d  (+ %5d), total sessions = %5d  (%c%3d)",
            ops,
            ops - self._last_ops,
            sessions,
            sign,
            abs(delta),
        )
        self._last_ops = ops
        self._last_sessions = sessions


async def serve(
    listen_addresses: Sequence[str | Address | socket.socket],
    table: SessionTable | None = None,
    *,
    stop: asyncio.Event | None = None,
    tls: LinkTLS | None = None,
    **options: Any,
) -> Server:
    """Run a dc_server until ``stop`` is set (or its ``FD:`` connection has gone away).

    ``options`` go to :class:`Server`; ``tls`` to :meth:`Server.start`. Returns the
    (closed) server for its counters.
    """
    server = Server(table, **options)
    try:
        await server.start(listen_addresses, tls)
    except BaseException:
        await server.close()  # the listeners started before the failure
        raise
    stop = stop if stop is not None else asyncio.Event()
    try:
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
        if server._single is not None:
            waiters.append(server._single)
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    finally:
        await server.close()
    return server


def run(
    listen_addresses: Sequence[str | Address | socket.socket],
    table: SessionTable | None = None,
    *,
    loop: LoopKind = "auto",
    ready: Callable[[], None] | None = None,
    tls: LinkTLS | None = None,
    **options: Any,
) -> Server:
    """Blocking entry point: run :func:`serve` on a fresh event loop."""

    async def main() -> Server:
        if ready is not None:
            asyncio.get_running_loop().call_soon(ready)
        return await serve(listen_addresses, table, tls=tls, **options)

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main())


def configure_logging(stream: Any = None) -> None:
    """Plain ``Info, ...``/``Warning, ...`` lines on stderr, like the C tools."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


__all__ = [
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_OUTPUT_BUDGET",
    "DEFAULT_READ_TIMEOUT",
    "Server",
    "configure_logging",
    "default_max_connections",
    "now_ms",
    "raise_fd_limit",
    "run",
    "serve",
]
