"""dc_snoop's analyser: both directions of a relayed connection into typed records.

No I/O: the relay (:mod:`tlscache.distcache.snoop`) hands over copies of the
bytes it carries, with the time, and gets back one record per message
(:class:`MessageRecord`) or a :class:`Malformed` record when a direction stops
decoding. Records of the connection's life (:class:`Opened`,
:class:`ConnectFailed`, :class:`Closed`) come from the same analyser, which
holds the counts. Every record prints as one text line (:func:`format_text`)
and converts to the JSON object ``dc_snoop -json`` writes (``to_json``).

Decoding uses the protocol's own :class:`~tlscache.distcache.protocol.Decoder`
and payload parser. A direction that fails to decode is reported once, with
the messages that preceded the bad bytes, and from then on only counted: the
relay never depends on what the analyser makes of the traffic.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from tlscache.distcache.protocol import (
    ADD_PREFIX,
    HEADER_SIZE,
    MAX_FRAME_DATA,
    Decoder,
    Message,
    Operation,
    Result,
    parse_add_request,
)
from tlscache.exceptions import ProtocolError

Direction: TypeAlias = Literal["client->server", "server->client"]
C2S: Final = "client->server"
S2C: Final = "server->client"

_MAX_REMEMBERED = 4096  # requests per connection whose ids are kept to label the answers


def _frames(payload_len: int) -> int:
    """How many frames a message of this size takes (the greedy fragmentation rule)."""
    return max(1, -(-payload_len // MAX_FRAME_DATA))


def _wire_len(payload_len: int) -> int:
    return payload_len + HEADER_SIZE * _frames(payload_len)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """One decoded message and what it says.

    ``session_id`` is hex (requests, and answers matched to a request);
    ``code`` is a one-byte result; ``empty`` marks dc_client's "no server"
    answer; ``note`` flags an ADD the server will refuse as corrupt.
    """

    time: float
    conn: int
    direction: Direction
    uid: int
    op: Operation
    payload: bytes
    session_id: str | None = None
    timeout_ms: int | None = None
    data_len: int | None = None
    code: int | None = None
    empty: bool = False
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        size = len(self.payload)
        out: dict[str, Any] = {
            "time": self.time,
            "conn": self.conn,
            "dir": self.direction,
            "uid": self.uid,
            "op": self.op.name,
            "payload_len": size,
            "frames": _frames(size),
            "wire_len": _wire_len(size),
        }
        if self.timeout_ms is not None:
            out["timeout_ms"] = self.timeout_ms
        if self.session_id is not None:
            out["id"] = self.session_id
        if self.empty:
            out["result"] = "EMPTY"
        elif self.code is not None:
            out["result"] = _result_name(self.code)
            out["code"] = self.code
        if self.data_len is not None:
            out["data_len"] = self.data_len
        if self.note is not None:
            out["note"] = self.note
        return out


@dataclass(frozen=True, slots=True)
class Malformed:
    """A direction stopped decoding; its bytes are relayed raw from here on."""

    time: float
    conn: int
    direction: Direction
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "conn": self.conn,
            "dir": self.direction,
            "event": "malformed",
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Opened:
    """The relay reached the server for this client."""

    time: float
    conn: int
    peer: str
    server: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "conn": self.conn,
            "event": "open",
            "peer": self.peer,
            "server": self.server,
        }


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """The relay could not reach the server; the client is closed."""

    time: float
    conn: int
    server: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "conn": self.conn,
            "event": "connect-failed",
            "server": self.server,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Closed:
    """The relayed pair is gone; ``by`` says which side ended it."""

    time: float
    conn: int
    by: str
    messages_c2s: int
    messages_s2c: int
    bytes_c2s: int
    bytes_s2c: int
    raw_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "conn": self.conn,
            "event": "close",
            "by": self.by,
            "messages_c2s": self.messages_c2s,
            "messages_s2c": self.messages_s2c,
            "bytes_c2s": self.bytes_c2s,
            "bytes_s2c": self.bytes_s2c,
            "raw_bytes": self.raw_bytes,
        }


Record: TypeAlias = MessageRecord | Malformed | Opened | ConnectFailed | Closed


def _result_name(code: int) -> str | int:
    try:
        return Result(code).name
    except ValueError:
        return code


class ConnectionAnalyser:
    """Decodes both directions of one relayed connection into records.

    It only ever reads copies of the bytes; a decoding failure turns that
    direction's analysis off (one :class:`Malformed` record) and nothing else.
    """

    def __init__(self, number: int) -> None:
        self.number = number
        self._decoders: dict[Direction, Decoder | None] = {
            C2S: Decoder(expect_response=False),
            S2C: Decoder(expect_response=True),
        }
        self._total_bytes: dict[Direction, int] = {C2S: 0, S2C: 0}
        self.messages: dict[Direction, int] = {C2S: 0, S2C: 0}
        # Bytes relayed undecoded: everything after the last message before bad input.
        self.raw_bytes: dict[Direction, int] = {C2S: 0, S2C: 0}
        self._decoded_bytes: dict[Direction, int] = {C2S: 0, S2C: 0}
        self._ids: deque[tuple[int, Operation, str]] = deque()  # (uid, op, session id hex)

    def feed(self, direction: Direction, data: bytes, now: float) -> list[Record]:
        """Records for every message ``data`` completes (and a :class:`Malformed` one
        if it holds the first bad bytes of this direction)."""
        self._total_bytes[direction] += len(data)
        decoder = self._decoders[direction]
        if decoder is None:
            self.raw_bytes[direction] += len(data)
            return []
        messages, error = decoder.feed_until_error(data)
        self.messages[direction] += len(messages)
        records: list[Record] = [self._describe(direction, m, now) for m in messages]
        self._decoded_bytes[direction] += sum(_wire_len(len(m.payload)) for m in messages)
        if error is not None:
            self._decoders[direction] = None
            undecoded = self._total_bytes[direction] - self._decoded_bytes[direction]
            self.raw_bytes[direction] = undecoded
            records.append(Malformed(now, self.number, direction, error.reason))
        return records

    def opened(self, now: float, peer: str, server: str) -> Opened:
        return Opened(now, self.number, peer, server)

    def connect_failed(self, now: float, server: str, reason: str) -> ConnectFailed:
        return ConnectFailed(now, self.number, server, reason)

    def closed(self, now: float, by: str) -> Closed:
        return Closed(
            now,
            self.number,
            by,
            self.messages[C2S],
            self.messages[S2C],
            self._total_bytes[C2S],
            self._total_bytes[S2C],
            self.raw_bytes[C2S] + self.raw_bytes[S2C],
        )

    def _describe(self, direction: Direction, m: Message, now: float) -> MessageRecord:
        if not m.is_response:
            return self._request(direction, m, now)
        session_id = None
        for i, (uid, op, sid) in enumerate(self._ids):
            if uid == m.uid and op is m.operation:
                session_id = sid
                del self._ids[i]
                break
        payload = m.payload
        size = len(payload)
        code = None
        data_len = None
        if size == 1 and (m.operation is not Operation.GET or payload[0] == Result.NOTOK):
            code = payload[0]
        elif size and m.operation is Operation.GET:
            data_len = size
        return MessageRecord(
            now,
            self.number,
            direction,
            m.uid,
            m.operation,
            payload,
            session_id=session_id,
            data_len=data_len,
            code=code,
            empty=not size,
        )

    def _request(self, direction: Direction, m: Message, now: float) -> MessageRecord:
        base = (now, self.number, direction, m.uid, m.operation, m.payload)
        if m.operation is not Operation.ADD:
            rec = MessageRecord(*base, session_id=m.payload.hex())
        else:
            try:
                add = parse_add_request(m.payload)
            except ProtocolError:
                return MessageRecord(*base, note="ADD payload shorter than 8 bytes")
            if len(m.payload) != ADD_PREFIX.size + len(add.session_id) + len(add.data):
                return MessageRecord(
                    *base, timeout_ms=add.timeout_ms, note="id_len runs past the payload"
                )
            rec = MessageRecord(
                *base,
                timeout_ms=add.timeout_ms,
                session_id=add.session_id.hex(),
                data_len=len(add.data),
            )
        assert rec.session_id is not None
        self._ids.append((m.uid, m.operation, rec.session_id))
        if len(self._ids) > _MAX_REMEMBERED:
            self._ids.popleft()
        return rec


def format_text(rec: Record) -> str:
    """One human-readable log line for a record."""
    t = rec.time
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"
    head = f"{stamp} #{rec.conn}"
    if isinstance(rec, Opened):
        return f"{head} open {rec.peer} -> {rec.server}"
    if isinstance(rec, ConnectFailed):
        return f"{head} cannot connect to {rec.server}: {rec.reason}; closing the client"
    if isinstance(rec, Closed):
        return (
            f"{head} close ({rec.by}): {rec.messages_c2s} requests / "
            f"{rec.messages_s2c} answers, {rec.bytes_c2s} / {rec.bytes_s2c} bytes"
            + (f", {rec.raw_bytes} bytes relayed undecoded" if rec.raw_bytes else "")
        )
    if isinstance(rec, Malformed):
        return f"{head} {rec.direction} MALFORMED: {rec.reason}; relaying raw from now on"
    parts = [head, rec.direction, f"uid={rec.uid:#x}", rec.op.name]
    if rec.session_id is not None:
        parts.append(f"id={rec.session_id or '(empty)'}")
    if rec.timeout_ms is not None:
        parts.append(f"timeout={rec.timeout_ms}ms")
    if rec.data_len is not None:
        parts.append(f"data={rec.data_len}")
    if rec.empty:
        parts.append("result=EMPTY(no server)")
    elif rec.code is not None:
        parts.append(f"result={_result_name(rec.code)}(0x{rec.code:02x})")
    size = len(rec.payload)
    parts.append(f"payload={size} frames={_frames(size)}")
    if rec.note is not None:
        parts.append(f"[{rec.note}]")
    return " ".join(parts)


def hexdump(data: bytes, indent: str = "    ") -> str:
    """``data`` as offset, hex and printable-text columns, 16 bytes a line."""
    lines = []
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        hexpart = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{indent}{off:04x}  {hexpart:<47}  |{text}|")
    return "\n".join(lines)


__all__ = [
    "C2S",
    "S2C",
    "Closed",
    "ConnectFailed",
    "ConnectionAnalyser",
    "Direction",
    "Malformed",
    "MessageRecord",
    "Opened",
    "Record",
    "format_text",
    "hexdump",
]
