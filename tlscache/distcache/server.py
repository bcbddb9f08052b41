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
  messages are kept as long as the peer likes.

Embedding::

    server = Server(SessionTable(), read_timeout=5)
    await server.start(["IP:127.0.0.1:9000"])
    ...
    await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

from tlscache.distcache import sockets
from tlscache.distcache.address import Address, parse_address
from tlscache.distcache.loops import LoopKind, loop_factory
from tlscache.distcache.serverconn import CacheService, ServerConnection
from tlscache.distcache.table import SessionTable

log = logging.getLogger("tlscache.dc_server")
_monotonic_ns: Final = time.monotonic_ns

DEFAULT_READ_TIMEOUT: Final = 30.0
STATS_INTERVAL: Final = 1.0
# A flood of bad connections must not turn into a flood of log lines (or block on stderr).
MAX_WARNINGS_PER_SECOND: Final = 50


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


class _Connection(asyncio.Protocol):
    """One client connection. The per-request path is :meth:`data_received`."""

    __slots__ = (
        "_continue_soon",
        "_eof",
        "_feed",
        "_last_rx",
        "_on_lost",
        "_proto",
        "_reading_paused",
        "_server",
        "_stall_timer",
        "_write_paused",
        "transport",
    )

    def __init__(self, server: Server, on_lost: Callable[[], None] | None = None) -> None:
        self._server = server
        self._proto: ServerConnection = server.service.connection()
        self._feed = self._proto.feed
        self.transport: asyncio.Transport | None = None
        self._stall_timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._write_paused = False
        self._reading_paused = False
        self._continue_soon = False
        self._eof = False
        self._on_lost = on_lost

    # ------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self._server
        limit = server.max_connections
        if limit is not None and len(server.connections) >= limit:
            server.warn(
                "Warning, rejected connection from %s: already at the maximum (%d)",
                _peer(transport),
                limit,
            )
            transport.abort()
            return
        server.connections.add(self)
        # The transports' default limits (64 KiB high, 16 KiB low) suit us: an answer
        # is at most 32 KiB, and setting them costs a call per connection.

    def data_received(self, data: bytes) -> None:
        out = self._feed(data, _monotonic_ns() // 1_000_000)
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        if self._proto.busy:
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
        self._server.connections.discard(self)
        self._cancel_stall_timer()
        self.transport = None
        if self._on_lost is not None:
            self._on_lost()

    def pause_writing(self) -> None:
        # Backpressure: a peer that does not read its answers stops being read.
        self._write_paused = True
        self._settle()
        self._arm_stall_timer()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._last_rx = time.monotonic()
        self._settle()

    # ------------------------------------------------------------ slow paths

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
        if proto.pending and not self._write_paused and not self._continue_soon:
            # Answer the held-back requests on a later loop pass: others get their turn.
            self._continue_soon = True
            asyncio.get_running_loop().call_soon(self._continue)
        if proto.partial:
            # Part of a message is buffered: the peer must finish it within read_timeout.
            self._last_rx = time.monotonic()
            self._arm_stall_timer()
        elif self._stall_timer is not None and not self._write_paused:
            self._cancel_stall_timer()
        if self._eof and not proto.pending:
            transport.close()

    def _continue(self) -> None:
        self._continue_soon = False
        transport = self.transport
        if transport is None or transport.is_closing() or self._write_paused:
            return
        out = self._feed(b"", _monotonic_ns() // 1_000_000)
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
        progress: int = 0,
        stats: bool = True,
    ) -> None:
        self.table = table if table is not None else SessionTable()
        self.service = CacheService(self.table)
        self.read_timeout = read_timeout
        self.max_connections = max_connections
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

    @property
    def operations(self) -> int:
        return self.service.operations

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    def _protocol(self) -> _Connection:
        return _Connection(self)

    async def start(self, listeners: Iterable[str | Address | socket.socket]) -> None:
        """Start accepting on every listener (address strings, Addresses or bound sockets).

        An inherited connected socket (``FD:n``) is served as the one connection
        it is, as in C; :func:`serve` returns once it has gone away.
        """
        loop = asyncio.get_running_loop()
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
            server = await sockets.serve(sock, factory)
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
    **options: Any,
) -> Server:
    """Run a dc_server until ``stop`` is set (or its ``FD:`` connection has gone away).

    ``options`` go to :class:`Server`. Returns the (closed) server for its counters.
    """
    server = Server(table, **options)
    try:
        await server.start(listen_addresses)
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
    **options: Any,
) -> Server:
    """Blocking entry point: run :func:`serve` on a fresh event loop."""

    async def main() -> Server:
        if ready is not None:
            asyncio.get_running_loop().call_soon(ready)
        return await serve(listen_addresses, table, **options)

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
    "DEFAULT_READ_TIMEOUT",
    "Server",
    "configure_logging",
    "now_ms",
    "raise_fd_limit",
    "run",
    "serve",
]
