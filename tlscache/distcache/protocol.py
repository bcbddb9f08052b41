"""The distcache wire protocol, without any I/O.

Bytes go into a :class:`Decoder`, whole :class:`Message` objects come out; the
``encode_*`` functions turn requests and responses into bytes. The layout is
byte-for-byte that of the C distcache 2.0 (protocol level ``0x00110000``):

=======  ====  ===============================================
offset   size  field
=======  ====  ===============================================
0        4     proto_level (big-endian; version in the top 16 bits)
4        1     is_response (0 request, 1 response)
5        4     request_uid
9        1     op_class (only 0)
10       1     operation (ADD 0, GET 1, REMOVE 2, HAVE 3)
11       1     complete (1 on the last frame of a message)
12       2     data_len (0..2048)
14       n     data
=======  ====  ===============================================

A message payload of up to 32 KiB is split greedily into 2048-byte frames.
Unlike the C receiver, a malformed frame never aborts anything: the decoder
raises :class:`~tlscache.exceptions.ProtocolError` and the transport closes
that one connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from tlscache.exceptions import ProtocolError

PROTO_LEVEL: Final = 0x00110000
PROTO_VERSION: Final = PROTO_LEVEL >> 16

HEADER: Final = struct.Struct(">IBIBBBH")
HEADER_SIZE: Final = HEADER.size  # 14
MAX_FRAME_DATA: Final = 2048
MAX_FRAME_SIZE: Final = HEADER_SIZE + MAX_FRAME_DATA
MAX_PAYLOAD: Final = 32768

MAX_ID_LEN: Final = 64
MAX_TIMEOUT_MS: Final = 604_800_000  # 7 days, inclusive
ADD_PREFIX: Final = struct.Struct(">II")  # timeout_ms, id_len
MAX_UID: Final = 0xFFFFFFFF


class Operation(IntEnum):
    """The four operations of op_class 0 ("user")."""

    ADD = 0
    GET = 1
    REMOVE = 2
    HAVE = 3


class Result(IntEnum):
    """One-byte result codes carried in response payloads."""

    OK = 0
    NOTOK = 1
    DISCONNECTED = 2
    ADD_CORRUPT = 100
    ADD_MATCHING_SESSION = 101
    ADD_TIMEOUT_RANGE = 102
    ADD_ID_RANGE = 103
    ADD_DATA_RANGE = 104


_OPERATIONS: Final = tuple(Operation)

# Single-byte result payloads are sent constantly; build their frames once.
RESULT_BYTES: Final = {r: bytes([r]) for r in Result}


@dataclass(frozen=True, slots=True)
class Message:
    """One defragmented request or response."""

    is_response: bool
    uid: int
    operation: Operation
    payload: bytes

    def result(self) -> Result | None:
        """The result code if this is a one-byte response payload, else None."""
        if len(self.payload) == 1:
            try:
                return Result(self.payload[0])
            except ValueError:
                return None
        return None


# ---------------------------------------------------------------- encoding


def encode_message(is_response: bool, uid: int, operation: int, payload: bytes) -> bytes:
    """Frame ``payload`` exactly as the C encoder does (greedy 2048-byte chunks).

    Raises :class:`ValueError` for a payload over 32 KiB or a uid out of range:
    those are caller bugs, never peer input.
    """
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
    if not 0 <= uid <= MAX_UID:
        raise ValueError(f"request_uid {uid} out of range")
    resp = 1 if is_response else 0
    if size <= MAX_FRAME_DATA:
        return HEADER.pack(PROTO_LEVEL, resp, uid, 0, operation, 1, size) + payload
    out = bytearray()
    view = memoryview(payload)
    for start in range(0, size, MAX_FRAME_DATA):
        chunk = view[start : start + MAX_FRAME_DATA]
        last = start + MAX_FRAME_DATA >= size
        out += HEADER.pack(PROTO_LEVEL, resp, uid, 0, operation, 1 if last else 0, len(chunk))
        out += chunk
    return bytes(out)


def encode_request(uid: int, operation: int, payload: bytes) -> bytes:
    return encode_message(False, uid, operation, payload)


def encode_response(uid: int, operation: int, payload: bytes) -> bytes:
    return encode_message(True, uid, operation, payload)


def encode_result(uid: int, operation: int, result: Result) -> bytes:
    """A one-byte result response (the commonest frame of all)."""
    return HEADER.pack(PROTO_LEVEL, 1, uid, 0, operation, 1, 1) + RESULT_BYTES[result]


def add_payload(session_id: bytes, data: bytes, timeout_ms: int) -> bytes:
    """The ADD request payload: ``u32 timeout_ms | u32 id_len | id | data``."""
    return ADD_PREFIX.pack(timeout_ms, len(session_id)) + session_id + data


def encode_add(uid: int, session_id: bytes, data: bytes, timeout_ms: int) -> bytes:
    return encode_message(False, uid, Operation.ADD, add_payload(session_id, data, timeout_ms))


def encode_get(uid: int, session_id: bytes) -> bytes:
    return encode_message(False, uid, Operation.GET, session_id)


def encode_remove(uid: int, session_id: bytes) -> bytes:
    return encode_message(False, uid, Operation.REMOVE, session_id)


def encode_have(uid: int, session_id: bytes) -> bytes:
    return encode_message(False, uid, Operation.HAVE, session_id)


def validate_add_request(session_id: bytes, data: bytes, timeout_ms: int) -> None:
    """Raise :class:`ValueError` if the server would refuse this ADD.

    Clients call it before sending, so a caller bug never costs a round trip.
    """
    if not 1 <= len(session_id) <= MAX_ID_LEN:
        raise ValueError(f"session id must be 1..{MAX_ID_LEN} bytes, got {len(session_id)}")
    if not 0 <= timeout_ms <= MAX_TIMEOUT_MS:
        raise ValueError(f"timeout must be 0..{MAX_TIMEOUT_MS} ms, got {timeout_ms}")
    if not data:
        raise ValueError("session data must not be empty")
    if ADD_PREFIX.size + len(session_id) + len(data) > MAX_PAYLOAD:
        raise ValueError(
            f"session of {len(data)} bytes with a {len(session_id)}-byte id exceeds "
            f"the {MAX_PAYLOAD}-byte message limit"
        )


@dataclass(frozen=True, slots=True)
class AddRequest:
    """An ADD payload split into its fields (not yet range-checked)."""

    timeout_ms: int
    id_len: int
    body: bytes  # id followed by session data; may be shorter than id_len


def parse_add_payload(payload: bytes) -> AddRequest:
    """Split an ADD payload. Under 8 bytes is a protocol error (C closes the connection)."""
    if len(payload) < ADD_PREFIX.size:
        raise ProtocolError(
            f"ADD payload of {len(payload)} bytes is shorter than its 8-byte prefix"
        )
    timeout_ms, id_len = ADD_PREFIX.unpack_from(payload)
    return AddRequest(timeout_ms, id_len, payload[ADD_PREFIX.size :])


# ---------------------------------------------------------------- decoding


def _incompatible(level: int) -> ProtocolError:
    return ProtocolError(
        f"protocol incompatibility: my level is {PROTO_LEVEL:08x}, the peer's is {level:08x}"
    )


class Decoder:
    """Incremental frame decoder: feed any chunks, get whole messages.

    ``expect_response`` fixes the direction a receiver accepts: a server-side
    decoder (False) refuses response frames, a client-side one (True) refuses
    requests, and None (dc_snoop) accepts both. After a :class:`ProtocolError`
    the decoder is unusable; the connection must be closed.
    """

    __slots__ = (
        "_buf",
        "_expect",
        "_frag_op",
        "_frag_parts",
        "_frag_resp",
        "_frag_size",
        "_frag_uid",
    )

    def __init__(self, expect_response: bool | None = False) -> None:
        self._buf = bytearray()
        self._expect = expect_response
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
        self._frag_uid = 0
        self._frag_op = 0
        self._frag_resp = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole message (partial frame or fragments)."""
        return len(self._buf) + self._frag_size

    @property
    def in_message(self) -> bool:
        """True while a partial frame or a partial multi-frame message is buffered."""
        return bool(self._buf) or bool(self._frag_parts)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return every message they complete, in order.

        Raises :class:`ProtocolError` at the first bad frame; the messages that
        preceded it in ``data`` are then lost (see :meth:`feed_until_error`).
        """
        buf = self._buf
        if not buf and len(data) >= HEADER_SIZE:
            # Fast path: parse straight from the caller's buffer, copy only the tail.
            return self._parse(data, True, [])
        buf += data
        return self._parse(buf, False, [])

    def feed_until_error(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[Message], ProtocolError | None]:
        """:meth:`feed` that also returns the messages completed before bad input.

        The result is ``(messages, error)``; after an error the decoder is
        unusable, but a server can still answer the requests that preceded it.
        """
        messages: list[Message] = []
        try:
            buf = self._buf
            if not buf and len(data) >= HEADER_SIZE:
                self._parse(data, True, messages)
            else:
                buf += data
                self._parse(buf, False, messages)
        except ProtocolError as exc:
            return messages, exc
        return messages, None

    def _parse(
        self, src: bytes | bytearray | memoryview, external: bool, messages: list[Message]
    ) -> list[Message]:
        pos = 0
        end = len(src)
        unpack = HEADER.unpack_from
        while end - pos >= HEADER_SIZE:
            level, resp, uid, op_class, op, complete, dlen = unpack(src, pos)
            self._check_header(level, resp, op_class, op, complete, dlen)
            frame_end = pos + HEADER_SIZE + dlen
            if frame_end > end:
                break
            chunk = bytes(src[pos + HEADER_SIZE : frame_end])
            pos = frame_end
            if self._frag_parts:
                if uid != self._frag_uid or op != self._frag_op or resp != self._frag_resp:
                    raise ProtocolError(
                        f"continuation frame (uid {uid:#x}, op {op}) does not match its "
                        f"message (uid {self._frag_uid:#x}, op {self._frag_op})"
                    )
                self._frag_size += dlen
                if self._frag_size > MAX_PAYLOAD:
                    raise ProtocolError(f"message exceeds {MAX_PAYLOAD} bytes")
                self._frag_parts.append(chunk)
                if complete:
                    payload = b"".join(self._frag_parts)
                    self._frag_parts = []
                    self._frag_size = 0
                    messages.append(Message(bool(resp), uid, _OPERATIONS[op], payload))
            elif complete:
                messages.append(Message(bool(resp), uid, _OPERATIONS[op], chunk))
            else:
                self._frag_parts.append(chunk)
                self._frag_size = dlen
                self._frag_uid = uid
                self._frag_op = op
                self._frag_resp = resp
        if end - pos >= 4:
            # Reject a wrong protocol level (or plain garbage) as early as possible.
            level = int.from_bytes(src[pos : pos + 4], "big")
            if level >> 16 != PROTO_VERSION:
                raise _incompatible(level)
        if external:
            if pos < end:
                self._buf += src[pos:]
        elif pos:
            del self._buf[:pos]
        return messages

    def _check_header(
        self, level: int, resp: int, op_class: int, op: int, complete: int, dlen: int
    ) -> None:
        if level >> 16 != PROTO_VERSION:
            raise _incompatible(level)
        if resp > 1:
            raise ProtocolError(f"invalid is_response byte {resp}")
        if self._expect is not None and bool(resp) != self._expect:
            raise ProtocolError(
                "response frame sent to a server" if resp else "request frame sent to a client"
            )
        if op_class != 0:
            raise ProtocolError(f"unknown op_class {op_class}")
        if op > 3:
            raise ProtocolError(f"unknown operation {op}")
        if complete > 1:
            raise ProtocolError(f"invalid complete byte {complete}")
        if dlen > MAX_FRAME_DATA:
            raise ProtocolError(f"data_len {dlen} exceeds {MAX_FRAME_DATA}")
        if not complete and dlen != MAX_FRAME_DATA:
            raise ProtocolError(f"non-final fragment carries {dlen} bytes, not {MAX_FRAME_DATA}")
