"""dc_snoop: a transparent distcache relay that prints every message it carries.

Each accepted connection gets its own upstream connection; bytes are relayed
unchanged in both directions, whatever they are. A copy of each direction goes
through a :class:`~tlscache.distcache.protocol.Decoder` so that every message
can be printed as one line (and, with ``-json``, as one JSON object). Traffic
that does not decode is reported once and then relayed raw; the relay never
interferes with what the two ends say to each other.

:class:`ConnectionAnalyser` is the sans-IO part (bytes in, records out);
:class:`SnoopServer` is the asyncio relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO, cast

from tlscache.distcache.address import Address
from tlscache.distcache.protocol import (
    ADD_PREFIX,
    HEADER_SIZE,
    MAX_FRAME_DATA,
    Decoder,
    Message,
    Operation,
    Result,
)
from tlscache.exceptions import ProtocolError

C2S = "client->server"
S2C = "server->client"

Record = dict[str, Any]

_MAX_REMEMBERED = 4096  # requests per connection whose ids are kept to label the answers


class _Tail:
    """The bytes after the last complete message of one direction (to replay on error)."""

    __slots__ = ("buf", "scan")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.scan = 0  # frames before this offset have been walked

    def add(self, data: bytes, in_message: bool) -> None:
        if not in_message:  # the decoder holds nothing: a message boundary
            self.buf.clear()
            self.scan = 0
            return
        buf = self.buf
        buf += data
        scan = self.scan
        boundary = 0
        while len(buf) - scan >= HEADER_SIZE:
            end = scan + HEADER_SIZE + int.from_bytes(buf[scan + 12 : scan + 14], "big")
            if end > len(buf):
                break
            complete = buf[scan + 11]
            scan = end
            if complete:
                boundary = scan
        if boundary:
            del buf[:boundary]
            scan -= boundary
        self.scan = scan

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        self.scan = 0
        return data


def _salvage(data: bytes, responses: bool) -> tuple[list[Message], str, int]:
    """Decode ``data`` frame by frame up to the first bad byte.

    Returns the whole messages before it, the decoder's reason, and how many
    bytes those messages took.
    """
    decoder = Decoder(expect_response=responses)
    messages: list[Message] = []
    pos = good = 0
    try:
        while len(data) - pos >= HEADER_SIZE:
            end = pos + HEADER_SIZE + int.from_bytes(data[pos + 12 : pos + 14], "big")
            got = decoder.feed(data[pos : min(end, len(data))])
            pos = end
            if got:
                messages += got
                good = min(pos, len(data))
        decoder.feed(data[pos:])
    except ProtocolError as exc:
        return messages, exc.reason, good
    return messages, "undecodable bytes", good


def _frames(payload_len: int) -> int:
    return max(1, -(-payload_len // MAX_FRAME_DATA))


class ConnectionAnalyser:
    """Decodes both directions of one relayed connection into log records.

    It only ever reads copies of the bytes; a decoding failure turns that
    direction's analysis off (one ``malformed`` record) and nothing else.
    """

    def __init__(self, number: int) -> None:
        self.number = number
        self._decoders: dict[str, Decoder | None] = {
            C2S: Decoder(expect_response=False),
            S2C: Decoder(expect_response=True),
        }
        self.raw_bytes = {C2S: 0, S2C: 0}  # bytes relayed after decoding stopped
        self.total_bytes = {C2S: 0, S2C: 0}
        self.messages = {C2S: 0, S2C: 0}
        self._ids: deque[tuple[int, int, str]] = deque()  # (uid, op, session id hex)
        # Bytes fed since the last message boundary, per direction: after a
        # decoding error they are replayed frame by frame so that the messages
        # before the bad bytes are still reported.
        self._tail = {C2S: _Tail(), S2C: _Tail()}

    def feed(self, direction: str, data: bytes, now: float) -> list[tuple[Record, bytes]]:
        """Records for every message ``data`` completes, each with the message payload."""
        self.total_bytes[direction] += len(data)
        decoder = self._decoders[direction]
        if decoder is None:
            self.raw_bytes[direction] += len(data)
            return []
        try:
            messages = decoder.feed(data)
        except ProtocolError:
            self._decoders[direction] = None
            replay = self._tail[direction].take() + data
            messages, reason, good = _salvage(replay, direction == S2C)
            self.raw_bytes[direction] += len(replay) - good
            self.messages[direction] += len(messages)
            out = [(self._describe(direction, m, now), m.payload) for m in messages]
            rec: Record = {
                "time": now,
                "conn": self.number,
                "dir": direction,
                "event": "malformed",
                "reason": reason,
            }
            out.append((rec, b""))
            return out
        self._tail[direction].add(data, decoder.in_message)
        self.messages[direction] += len(messages)
        return [(self._describe(direction, m, now), m.payload) for m in messages]

    def _describe(self, direction: str, m: Message, now: float) -> Record:
        size = len(m.payload)
        rec: Record = {
            "time": now,
            "conn": self.number,
            "dir": direction,
            "uid": m.uid,
            "op": m.operation.name,
            "payload_len": size,
            "frames": _frames(size),
            "wire_len": size + HEADER_SIZE * _frames(size),
        }
        if not m.is_response:
            session_id = self._request_fields(m, rec)
            if session_id is not None:
                self._ids.append((m.uid, m.operation, session_id))
                if len(self._ids) > _MAX_REMEMBERED:
                    self._ids.popleft()
            return rec
        for i, (uid, op, sid) in enumerate(self._ids):
            if uid == m.uid and op == m.operation:
                rec["id"] = sid
                del self._ids[i]
                break
        if size == 0:
            rec["result"] = "EMPTY"  # dc_client: no server connection
        elif size == 1 and (m.operation is not Operation.GET or m.payload[0] == Result.NOTOK):
            code = m.payload[0]
            try:
                rec["result"] = Result(code).name
            except ValueError:
                rec["result"] = code
            rec["code"] = code
        elif m.operation is Operation.GET:
            rec["data_len"] = size
        return rec

    @staticmethod
    def _request_fields(m: Message, rec: Record) -> str | None:
        if m.operation is not Operation.ADD:
            rec["id"] = m.payload.hex()
            return rec["id"]  # type: ignore[no-any-return]
        if len(m.payload) < ADD_PREFIX.size:
            rec["note"] = "ADD payload shorter than 8 bytes"
            return None
        timeout_ms, id_len = ADD_PREFIX.unpack_from(m.payload)
        body = m.payload[ADD_PREFIX.size :]
        rec["timeout_ms"] = timeout_ms
        if id_len <= len(body):
            rec["id"] = body[:id_len].hex()
            rec["data_len"] = len(body) - id_len
            return rec["id"]  # type: ignore[no-any-return]
        rec["id_len"] = id_len
        rec["note"] = "id_len runs past the payload"
        return None

    def pending_bytes(self) -> int:
        """Bytes of incomplete messages left in the decoders (reported at close)."""
        return sum(d.buffered for d in self._decoders.values() if d is not None)


def format_text(rec: Record) -> str:
    """One human-readable log line for a record."""
    t = rec["time"]
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    head = f"{stamp} #{rec['conn']}"
    event = rec.get("event")
    if event == "open":
        return f"{head} open {rec['peer']} -> {rec['server']}"
    if event == "connect-failed":
        return f"{head} cannot connect to {rec['server']}: {rec['reason']}; closing the client"
    if event == "close":
        return (
            f"{head} close ({rec['by']}): {rec['messages_c2s']} requests / "
            f"{rec['messages_s2c']} answers, {rec['bytes_c2s']} / {rec['bytes_s2c']} bytes"
            + (f", {rec['raw_bytes']} bytes relayed undecoded" if rec.get("raw_bytes") else "")
        )
    if event == "malformed":
        return f"{head} {rec['dir']} MALFORMED: {rec['reason']}; relaying raw from now on"
    parts = [head, rec["dir"], f"uid={rec['uid']:#x}", rec["op"]]
    if "id" in rec:
        parts.append(f"id={rec['id'] or '(empty)'}")
    if "timeout_ms" in rec:
        parts.append(f"timeout={rec['timeout_ms']}ms")
    if "data_len" in rec:
        parts.append(f"data={rec['data_len']}")
    if "result" in rec:
        result = rec["result"]
        parts.append(
            "result=EMPTY(no server)"
            if result == "EMPTY"
            else f"result={result}(0x{rec.get('code', 0):02x})"
        )
    parts.append(f"payload={rec['payload_len']} frames={rec['frames']}")
    if "note" in rec:
        parts.append(f"[{rec['note']}]")
    return " ".join(parts)


def hexdump(data: bytes, indent: str = "    ") -> str:
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{indent}{off:04x}  {hexpart:<47}  |{text}|")
    return "\n".join(lines)


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
        self.records = 0

    def emit(self, rec: Record, payload: bytes = b"") -> None:
        self.records += 1
        if self.text is not None:
            line = format_text(rec)
            if self.dump and payload:
                line += "\n" + hexdump(payload)
            self.text.write(line + "\n")
            self.text.flush()
        if self.json_out is not None:
            self.json_out.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self.json_out.flush()


# ================================================================ asyncio relay


class _Side(asyncio.Protocol):
    """One end of a relayed pair; bytes it receives go to ``peer`` unchanged."""

    def __init__(self, pair: _Pair, direction: str) -> None:
        self.pair = pair
        self.direction = direction  # the direction of the bytes this side receives
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self is self.pair.client:
            # Hold the client until its upstream connection exists.
            self.transport.pause_reading()
            self.pair.snoop.start_upstream(self.pair)

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


class _Pair:
    """An accepted client connection and its own upstream connection."""

    def __init__(self, snoop: SnoopServer, number: int) -> None:
        self.snoop = snoop
        self.analyser = ConnectionAnalyser(number)
        self.client = _Side(self, C2S)
        self.server = _Side(self, S2C)
        self.client.peer = self.server
        self.server.peer = self.client
        self.pending: list[bytes] = []  # client bytes before the upstream is up
        self.client_eof_pending = False
        self.up_ready = False
        self.done = False
        self.closed_by = ""

    def relay(self, side: _Side, data: bytes) -> None:
        peer = side.peer
        assert peer is not None
        if side is self.client and not self.up_ready:
            self.pending.append(data)
        elif peer.transport is not None and not peer.closed:
            peer.transport.write(data)
        for rec, payload in self.analyser.feed(side.direction, data, time.time()):
            self.snoop.log.emit(rec, payload)

    def upstream_ready(self) -> None:
        transport = self.server.transport
        assert transport is not None
        self.up_ready = True
        for chunk in self.pending:
            transport.write(chunk)
        self.pending.clear()
        if self.client_eof_pending and transport.can_write_eof():
            transport.write_eof()
        if self.client.transport is not None:
            self.client.transport.resume_reading()

    def half_close(self, side: _Side) -> None:
        peer = side.peer
        assert peer is not None
        if not self.closed_by:
            self.closed_by = "client" if side is self.client else "server"
        if side is self.client and not self.up_ready:
            self.client_eof_pending = True
        elif peer.transport is not None and not peer.closed:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        if side.eof and peer.eof:
            self._close_both()

    def lost(self, side: _Side) -> None:
        if not self.closed_by:
            self.closed_by = "client" if side is self.client else "server"
        self._close_both()

    def _close_both(self) -> None:
        for s in (self.client, self.server):
            if s.transport is not None and not s.transport.is_closing():
                s.transport.close()
        if self.done:
            return
        self.done = True
        a = self.analyser
        self.snoop.log.emit(
            {
                "time": time.time(),
                "conn": a.number,
                "event": "close",
                "by": self.closed_by or "relay",
                "messages_c2s": a.messages[C2S],
                "messages_s2c": a.messages[S2C],
                "bytes_c2s": a.total_bytes[C2S],
                "bytes_s2c": a.total_bytes[S2C],
                "raw_bytes": a.raw_bytes[C2S] + a.raw_bytes[S2C],
            }
        )
        self.snoop.pair_done(self)


class SnoopServer:
    """Accepts connections on a listener and relays each to its own upstream connection."""

    def __init__(
        self,
        listener: socket.socket,
        server_address: Address,
        log: Log,
        connect_timeout: float = 5.0,
    ) -> None:
        self.listener = listener
        self.server_address = server_address
        self.log = log
        self.connect_timeout = connect_timeout
        self.connections = 0
        self.pairs: set[_Pair] = set()
        # Created up front so that a stop() before serve() runs (a signal during
        # start-up) is not lost.
        self._stopped = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _accepted(self) -> _Side:
        self.connections += 1
        pair = _Pair(self, self.connections)
        self.pairs.add(pair)
        return pair.client

    def start_upstream(self, pair: _Pair) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._open(pair))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, pair: _Pair) -> None:
        assert self._loop is not None
        loop = self._loop
        client_transport = pair.client.transport
        peer = client_transport.get_extra_info("peername") if client_transport else None
        addr = self.server_address
        factory: Callable[[], _Side] = lambda: pair.server  # noqa: E731
        try:
            if addr.kind == "unix":
                coro = loop.create_unix_connection(factory, addr.path)
            elif addr.kind == "fd":
                coro = loop.create_connection(factory, sock=socket.socket(fileno=os.dup(addr.fd)))
            else:
                assert addr.host is not None
                coro = loop.create_connection(factory, addr.host, addr.port, family=addr.family)
            await asyncio.wait_for(coro, self.connect_timeout)
        except OSError as exc:
            self.log.emit(
                {
                    "time": time.time(),
                    "conn": pair.analyser.number,
                    "event": "connect-failed",
                    "server": str(addr),
                    "reason": exc.strerror or repr(exc),
                }
            )
            pair.done = True
            self.pairs.discard(pair)
            if client_transport is not None:
                client_transport.close()
            return
        self.log.emit(
            {
                "time": time.time(),
                "conn": pair.analyser.number,
                "event": "open",
                "peer": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "local",
                "server": str(addr),
            }
        )
        if pair.client.closed:
            pair._close_both()
            return
        pair.upstream_ready()

    def pair_done(self, pair: _Pair) -> None:
        self.pairs.discard(pair)

    def stop(self) -> None:
        self._stopped.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.listener.setblocking(False)
        if self.listener.family == socket.AF_UNIX:
            srv = await loop.create_unix_server(self._accepted, sock=self.listener)
        else:
            srv = await loop.create_server(self._accepted, sock=self.listener)
        try:
            await self._stopped.wait()
        finally:
            srv.close()
            for task in list(self._tasks):
                task.cancel()
            for pair in list(self.pairs):
                pair._close_both()


__all__ = [
    "C2S",
    "S2C",
    "ConnectionAnalyser",
    "Log",
    "Record",
    "SnoopServer",
    "format_text",
    "hexdump",
]
