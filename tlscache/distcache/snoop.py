"""dc_snoop: a transparent distcache relay that prints every message it carries.

Each accepted connection gets its own connection to the server; bytes are
relayed unchanged in both directions, whatever they are. A copy of each
direction goes to a :class:`~tlscache.distcache.analyser.ConnectionAnalyser`,
whose records :class:`Log` prints as one line per message (and, with
``-json``, as one JSON object). The relay never waits for, or depends on, the
analysis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TextIO, cast

from tlscache.distcache import sockets
from tlscache.distcache.address import Address
from tlscache.distcache.analyser import (
    C2S,
    S2C,
    ConnectionAnalyser,
    Direction,
    MessageRecord,
    Record,
    format_text,
    hexdump,
)


class Log:
    """Where records go: text lines (and hex dumps) to one stream, JSON lines to another."""

    def __init__(
        self,
        text: TextIO | None = sys.stderr,
        json_out: TextIO | None = None,
        dump: bool = False,
    ) -> None:
        self.text = text
        self.json_out = json_out
        self.dump = dump

    def emit(self, rec: Record) -> None:
        if self.text is not None:
            line = format_text(rec)
            if self.dump and isinstance(rec, MessageRecord) and rec.payload:
                line += "\n" + hexdump(rec.payload)
            self.text.write(line + "\n")
            self.text.flush()
        if self.json_out is not None:
            self.json_out.write(json.dumps(rec.to_json(), separators=(",", ":")) + "\n")
            self.json_out.flush()


class _Side(asyncio.Protocol):
    """One end of a relayed pair; bytes it receives go to the other end unchanged."""

    def __init__(self, pair: _Pair, direction: Direction) -> None:
        self.pair = pair
        self.direction = direction  # the direction of the bytes this side receives
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.direction == C2S:
            self.pair.accepted()

    def data_received(self, data: bytes) -> None:
        self.pair.relay(self, data)

    def eof_received(self) -> bool | None:
        self.eof = True
        self.pair.half_close(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pair.lost(self)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.peer.transport.resume_reading()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)


class _Pair:
    """An accepted client connection and its own connection to the server."""

    def __init__(
        self,
        number: int,
        server_address: Address,
        connect_timeout: float,
        log: Log,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        done: Callable[[_Pair], None],
    ) -> None:
        self.analyser = ConnectionAnalyser(number)
        self.client = _Side(self, C2S)
        self.server = _Side(self, S2C)
        self.client.peer = self.server
        self.server.peer = self.client
        self._server_address = server_address
        self._connect_timeout = connect_timeout
        self._log = log
        self._spawn = spawn
        self._done = done
        self._pending: list[bytes] = []  # client bytes before the server connection is up
        self._client_eof_pending = False
        self._up = False
        self._finished = False
        self._closed_by = ""

    def accepted(self) -> None:
        """Hold the client until its server connection exists."""
        assert self.client.transport is not None
        self.client.transport.pause_reading()
        self._spawn(self._open())

    async def _open(self) -> None:
        client_transport = self.client.transport
        assert client_transport is not None
        peer = client_transport.get_extra_info("peername")
        server = str(self._server_address)
        try:
            await asyncio.wait_for(
                sockets.open_connection(self._server_address, lambda: self.server),
                self._connect_timeout,
            )
        except OSError as exc:
            reason = exc.strerror or repr(exc)
            self._log.emit(self.analyser.connect_failed(time.time(), server, reason))
            self._finish()
            client_transport.close()
            return
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "local"
        self._log.emit(self.analyser.opened(time.time(), peer_text, server))
        if self.client.closed:  # gone while we connected (and logged as closed)
            self.close()
            return
        self._up = True
        for chunk in self._pending:
            self.server.send(chunk)
        self._pending.clear()
        transport = self.server.transport
        if self._client_eof_pending and transport is not None and transport.can_write_eof():
            transport.write_eof()
        client_transport.resume_reading()

    def relay(self, side: _Side, data: bytes) -> None:
        if side is self.client and not self._up:
            self._pending.append(data)
        else:
            assert side.peer is not None
            side.peer.send(data)
        for rec in self.analyser.feed(side.direction, data, time.time()):
            self._log.emit(rec)

    def half_close(self, side: _Side) -> None:
        peer = side.peer
        assert peer is not None
        if not self._closed_by:
            self._closed_by = "client" if side is self.client else "server"
        if side is self.client and not self._up:
            self._client_eof_pending = True
        elif peer.transport is not None and not peer.closed:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        if side.eof and peer.eof:
            self.close()

    def lost(self, side: _Side) -> None:
        if not self._closed_by:
            self._closed_by = "client" if side is self.client else "server"
        self.close()

    def close(self) -> None:
        """Close both ends; log how the pair ended (once)."""
        for s in (self.client, self.server):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.close()
        if not self._finished:
            self._log.emit(self.analyser.closed(time.time(), self._closed_by or "relay"))
            self._finish()

    def _finish(self) -> None:
        self._finished = True
        self._done(self)


class SnoopServer:
    """Accepts connections on a listener and relays each to its own server connection."""

    def __init__(
        self,
        listener: socket.socket,
        server_address: Address,
        log: Log,
        connect_timeout: float = 5.0,
    ) -> None:
        self._listener = listener
        self._server_address = server_address
        self._log = log
        self._connect_timeout = connect_timeout
        self._connections = 0
        self._pairs: set[_Pair] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # server connections being opened
        self._single = False  # an FD: listen address that is itself one connection
        # Created up front so that a stop() before serve() runs (a signal during
        # start-up) is not lost.
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def serve(self) -> None:
        """Relay until :meth:`stop` (or, with an FD: listen address, until its one pair ends)."""
        srv = await sockets.serve(self._listener, self._accepted)
        if srv is None:
            self._single = True
            if not self._pairs:
                self._stopped.set()
        try:
            await self._stopped.wait()
        finally:
            if srv is not None:
                srv.close()
            for task in list(self._tasks):
                task.cancel()
            for pair in list(self._pairs):
                pair.close()

    def _accepted(self) -> _Side:
        self._connections += 1
        pair = _Pair(
            self._connections,
            self._server_address,
            self._connect_timeout,
            self._log,
            self._spawn,
            self._gone,
        )
        self._pairs.add(pair)
        return pair.client

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _gone(self, pair: _Pair) -> None:
        self._pairs.discard(pair)
        if self._single and not self._pairs:
            self._stopped.set()


__all__ = ["Log", "SnoopServer"]
