"""dc_client's asyncio shell: sockets and a clock around the sans-IO multiplexer.

:class:`ProxyServer` accepts local connections and keeps one connection to the
server; everything that decides anything is in
:class:`~tlscache.distcache.multiplexer.Multiplexer`. The shell reports each
socket event to the core, then drains the core once per event-loop iteration
(so every request that arrived in that iteration goes upstream in one write,
whatever client sent it), carries out the core's events, writes its bytes,
logs what it reports, and arms one timer for the core's next deadline.

A local client that half-closes its connection still gets the answers to
what it sent before the connection is closed; a client that pipelines far
ahead of its answers, or stops reading them, is not read from until it
catches up. The transport's write-buffer limits are set from the core's
per-client output budget, and the shell reports a client's unsent output to
the core whenever it is not zero, so that the core can hold back, time out or
close clients that do not read; clients the core evicts are aborted, so their
buffers are freed at once rather than flushed to a peer that does not read.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import socket
from collections.abc import Callable
from typing import NamedTuple, cast

from tlscache.distcache import sockets
from tlscache.distcache.address import Address
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.multiplexer import (
    BadInput,
    ClientEvicted,
    ClientIdle,
    ClientRejected,
    ConnectUpstream,
    Event,
    LocalClient,
    Multiplexer,
    ProxyLimits,
    ResetUpstream,
    Suppressed,
    UpstreamLost,
    UpstreamRestored,
)

log = logging.getLogger("tlscache.dc_client")

# Bytes of client output freed by closes before the allocator is asked to give
# memory back, and how soon after: a crowd of clients that never read leaves
# the C heap fragmented, and the process would keep its peak size for good.
TRIM_AFTER_BYTES = 1 << 20
TRIM_DELAY = 0.5


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere): returns freed heap pages to the system."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


_malloc_trim = _find_malloc_trim()

# A client with more unanswered requests than this is not read from until it
# is down to CLIENT_BACKLOG_LOW, so one greedy client cannot grow the proxy's memory.
CLIENT_BACKLOG_HIGH = 1024
CLIENT_BACKLOG_LOW = 256


class _Hooks(NamedTuple):
    """What a connection may do: feed the core, have it drained, say it is gone."""

    core: Multiplexer[_Local]
    clock: Callable[[], float]
    wake: Callable[[], None]  # drain at the end of this loop iteration
    drain: Callable[[], None]  # drain now
    local_gone: Callable[[], None]
    upstream_gone: Callable[[_Upstream], None]
    released: Callable[[int], None]  # a closed client's buffered output is freed


class _Local(asyncio.Protocol):
    """One accepted local connection."""

    __slots__ = ("client", "eof", "hooks", "paused", "transport", "write_blocked")

    def __init__(self, hooks: _Hooks) -> None:
        self.hooks = hooks
        self.transport: asyncio.Transport | None = None
        self.client: LocalClient[_Local] | None = None
        self.paused = False  # reading paused: too many unanswered requests
        self.write_blocked = False  # reading paused: the client does not read its answers
        self.eof = False  # the client half-closed: close once its answers are out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        hooks = self.hooks
        core = hooks.core
        self.client = core.add_client(self, hooks.clock())
        if self.client is None:
            self.transport.abort()
        else:
            # pause_writing() when the client's unsent answers pass its budget.
            budget = core.client_output_budget
            self.transport.set_write_buffer_limits(high=budget, low=core.client_output_low)
        hooks.wake()

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        hooks = self.hooks
        hooks.core.client_data(client, data, hooks.clock())
        hooks.wake()
        if client.backlog > CLIENT_BACKLOG_HIGH and not self.paused and self.transport:
            self.paused = True
            if not self.write_blocked:
                self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        client = self.client
        if client is None or not client.backlog:
            return False  # nothing owed: close
        self.eof = True  # answer what it asked, then close (see deliver)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        self.client = None
        hooks = self.hooks
        if client is not None:
            freed = client.buffered
            hooks.core.client_closed(client)
            hooks.wake()
            if freed:
                hooks.released(freed)
        hooks.local_gone()

    def pause_writing(self) -> None:
        self.write_blocked = True
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self._report_output()

    def resume_writing(self) -> None:
        self.write_blocked = False
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._report_output()

    def _report_output(self) -> None:
        """Tell the core how much of this client's output is unsent (budget, stall, cap)."""
        client = self.client
        transport = self.transport
        if client is None or transport is None:
            return
        size = transport.get_write_buffer_size()
        if size or client.buffered:
            hooks = self.hooks
            hooks.core.client_output(client, size, hooks.clock())
            hooks.wake()

    def deliver(self, data: bytes) -> None:
        """Write answers; resume a paused client once its backlog is small again."""
        transport = self.transport
        client = self.client
        if transport is None or client is None:
            return
        transport.write(data)
        if client.buffered or transport.get_write_buffer_size():
            self._report_output()
        if self.paused and client.backlog < CLIENT_BACKLOG_LOW:
            self.paused = False
            if not self.write_blocked:
                transport.resume_reading()
        if self.eof and not client.backlog:
            transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close without flushing: the buffered answers are dropped and their memory freed."""
        if self.transport is not None:
            self.transport.abort()


class _Upstream(asyncio.Protocol):
    """The connection to the server, until it is lost or the shell abandons it."""

    __slots__ = ("attached", "hooks", "transport")

    def __init__(self, hooks: _Hooks) -> None:
        self.hooks = hooks
        self.transport: asyncio.Transport | None = None
        self.attached = True  # False once lost or abandoned: its events no longer count

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.attached:
            hooks = self.hooks
            hooks.core.upstream_data(data, hooks.clock())
            # Answers go out at once; requests from local clients wait for the
            # end of the loop iteration, so that they go upstream in one write.
            hooks.drain()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.attached:
            self.attached = False
            hooks = self.hooks
            hooks.core.upstream_failed(hooks.clock(), str(exc) if exc else "closed by the server")
            hooks.wake()
            hooks.upstream_gone(self)

    def write(self, data: bytes) -> None:
        if self.attached and self.transport is not None:
            self.transport.write(data)

    def abandon(self, abort: bool = True) -> None:
        """Stop counting this connection's events and close it."""
        self.attached = False
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()


def _log_event(event: Event[_Local]) -> None:
    if isinstance(event, ClientRejected):
        log.error("rejected new client connection already at maximum (%d)", event.max_clients)
    elif isinstance(event, BadInput):
        if event.log:
            log.warning(
                "local connection %d sent bad data (%s); closing it", event.number, event.reason
            )
    elif isinstance(event, ClientEvicted):
        if event.log:
            log.warning("local connection %d: %s", event.number, event.cause.value)
    elif isinstance(event, Suppressed):
        log.warning("%d more: %s (in the last %g s)", event.count, event.what, event.seconds)
    elif isinstance(event, ResetUpstream):
        log.error("resetting the server connection: %s", event.reason)
    elif isinstance(event, UpstreamLost):
        log.warning(
            "server %s: %s; retrying every %g ms",
            "connection lost" if event.connected else "unavailable",
            event.reason,
            event.retry_ms,
        )
    elif isinstance(event, UpstreamRestored):
        log.info("connected to the server again")


class ProxyServer:
    """dc_client: local connections on ``listener``, one upstream to ``server_address``.

    ``upstream_tls`` speaks mutual TLS to the server (an ``IP:`` address); see
    :mod:`tlscache.distcache.linktls`.
    """

    def __init__(
        self,
        listener: socket.socket,
        server_address: Address,
        limits: ProxyLimits | None = None,
        *,
        connect_timeout: float = 2.0,
        upstream_tls: LinkTLS | None = None,
    ) -> None:
        self._upstream_name = (
            upstream_tls.server_hostname(server_address) if upstream_tls is not None else None
        )
        self._upstream_ssl = upstream_tls.client_context() if upstream_tls is not None else None
        self._upstream_tls = upstream_tls
        self.core: Multiplexer[_Local] = Multiplexer(limits)
        self._listener = listener
        self._server_address = server_address
        self._connect_timeout = connect_timeout
        # Created up front so that a stop() before serve() runs (a signal during
        # start-up) is not lost.
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks: _Hooks | None = None
        self._upstream: _Upstream | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._drain_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._single = False  # an FD: listen address that is itself one connection
        self._freed = 0  # client output freed since the last trim
        self._trim_handle: asyncio.TimerHandle | None = None

    def stop(self) -> None:
        self._stopped.set()

    async def serve(self) -> None:
        """Run until :meth:`stop` (or, with an FD: listen address, until its one client goes)."""
        loop = self._loop = asyncio.get_running_loop()
        hooks = self._hooks = _Hooks(
            self.core,
            loop.time,
            self._wake,
            self._drain,
            self._local_gone,
            self._upstream_gone,
            self._released,
        )
        self._on_timer()  # the first connection attempt is due at once
        # A backlog that holds a burst of as many connections as the proxy accepts.
        srv = await sockets.serve(
            self._listener, lambda: _Local(hooks), backlog=self.core.max_clients
        )
        if srv is None:
            self._single = True
            self._local_gone()  # in case that one client has gone already
        try:
            await self._stopped.wait()
        finally:
            if srv is not None:
                srv.close()
            if self._drain_handle is not None:  # answers due: hand them over first
                self._drain()
            if self._connecting is not None:
                self._connecting.cancel()
            if self._timer is not None:
                self._timer.cancel()
            if self._trim_handle is not None:
                self._trim_handle.cancel()
            if self._upstream is not None:
                self._upstream.abandon(abort=False)
                self._upstream = None

    # ------------------------------------------------------------ the core's output

    def _wake(self) -> None:
        """Drain the core at the end of this loop iteration (once, however many events)."""
        if self._drain_handle is None:
            assert self._loop is not None
            self._drain_handle = self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None
        events, upstream, writes = self.core.drain()
        for event in events:
            self._carry_out(event)
        if upstream and self._upstream is not None:
            self._upstream.write(upstream)
        for proto, data in writes:
            proto.deliver(data)
        when = self.core.next_deadline()
        if when is not None:
            self._arm(when)

    def _carry_out(self, event: Event[_Local]) -> None:
        _log_event(event)
        if isinstance(event, ConnectUpstream):
            self._start_connect()
        elif isinstance(event, ResetUpstream):
            if self._upstream is not None:
                self._upstream.abandon()
                self._upstream = None
        elif isinstance(event, BadInput | ClientIdle):
            event.client.close()
        elif isinstance(event, ClientEvicted):
            event.client.abort()

    # ------------------------------------------------------------ timer

    def _arm(self, when: float) -> None:
        """Make sure the timer fires by ``when``; an early firing just re-arms it."""
        if self._timer is not None:
            if self._timer_when <= when:
                return
            self._timer.cancel()
        assert self._loop is not None
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        assert self._loop is not None
        self._timer = None
        # The loop may run a timer a hair early (clock granularity): it is due.
        self.core.handle_timer(max(self._loop.time(), self._timer_when))
        self._wake()

    # ------------------------------------------------------------ connections

    def _start_connect(self) -> None:
        if self._connecting is not None or self._loop is None or self._stopped.is_set():
            return
        self._connecting = self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        assert self._loop is not None and self._hooks is not None
        proto = _Upstream(self._hooks)
        try:
            tls = self._upstream_tls
            await asyncio.wait_for(
                sockets.open_connection(
                    self._server_address,
                    lambda: proto,
                    ssl=self._upstream_ssl,
                    server_hostname=self._upstream_name,
                    ssl_handshake_timeout=tls.handshake_timeout if tls is not None else None,
                ),
                self._connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            self.core.upstream_failed(self._loop.time(), f"connect failed: {reason}")
            self._wake()
            return
        finally:
            self._connecting = None
        if self._stopped.is_set():
            proto.abandon(abort=False)
        elif proto.attached:  # not lost already
            self._upstream = proto
            self.core.upstream_connected(self._loop.time())
            self._wake()

    def _upstream_gone(self, proto: _Upstream) -> None:
        if self._upstream is proto:
            self._upstream = None

    def _released(self, nbytes: int) -> None:
        """Give freed output memory back to the system once enough has gone."""
        self._freed += nbytes
        if (
            self._freed >= TRIM_AFTER_BYTES
            and self._trim_handle is None
            and _malloc_trim is not None
            and self._loop is not None
        ):
            self._trim_handle = self._loop.call_later(TRIM_DELAY, self._trim)

    def _trim(self) -> None:
        self._trim_handle = None
        self._freed = 0
        if _malloc_trim is not None:
            _malloc_trim(0)

    def _local_gone(self) -> None:
        if self._single and self.core.clients == 0:
            self._stopped.set()


__all__ = ["ProxyServer"]
