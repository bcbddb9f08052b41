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
10       1     operation (ADD 0, GET 1, REMOVE 2, HAVE 3; TAKE 0x54, ours)
11       1     complete (1 on the last frame of a message)
12       2     data_len (0..2048)
14       n     data
=======  ====  ===============================================

A message payload of up to 32 KiB is split greedily into 2048-byte frames.
Unlike the C receiver, a malformed frame never aborts anything: the decoder
raises :class:`~tlscache.exceptions.ProtocolError` and the transport closes
that one connection.

This module is the only place that knows the layout: every protocol limit, the
frame header check (in :class:`Decoder`, the one reader every role uses), the
fragmentation rule (:func:`encode_message`) and one parser per payload kind
(:func:`parse_add_request`, :func:`parse_add_reply`, :func:`parse_get_reply`,
:func:`parse_flag_reply`). Servers, clients, the proxy, the analyser and the
stores import these and never look at header bytes themselves.

It also owns the one extension of the protocol, learnt per connection: the
capability probe (a GET for ``PROBE_PREFIX + nonce``, which a C server simply
misses and our tools answer with :class:`Capabilities`) and TAKE, an atomic
get-and-delete under an operation number C never uses, sent only to a server
whose probe reply offered it.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Iterable
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeAlias, cast

from tlscache.exceptions import ProtocolError

PROTO_LEVEL: Final = 0x00110000
PROTO_VERSION: Final = PROTO_LEVEL >> 16

HEADER: Final = struct.Struct(">IBIBBBH")
HEADER_SIZE: Final = HEADER.size  # 14
MAX_FRAME_DATA: Final = 2048
MAX_PAYLOAD: Final = 32768

MAX_ID_LEN: Final = 64
MAX_TIMEOUT_MS: Final = 604_800_000  # 7 days, inclusive
ADD_PREFIX: Final = struct.Struct(">II")  # timeout_ms, id_len
#: The largest session that fits one ADD whatever its id length.
MAX_SESSION_DATA: Final = MAX_PAYLOAD - ADD_PREFIX.size - MAX_ID_LEN
MAX_UID: Final = 0xFFFFFFFF
#: GET replies shorter than this are misses, as in the C client.
MIN_SESSION_REPLY: Final = 5


def next_uid(uid: int) -> int:
    """The uid after ``uid``: request uids count up and wrap at 32 bits."""
    return (uid + 1) & MAX_UID


class Operation(IntEnum):
    """The four operations of op_class 0 ("user"), and our TAKE.

    TAKE (atomic get-and-delete) is tlscache's own: a C receiver closes the
    connection for it, so it is only ever sent to a server whose probe reply
    advertised ``take`` (:func:`parse_probe_reply`). Its number is far from
    C's 0..3, so that no future C operation would collide with it.
    """

    ADD = 0
    GET = 1
    REMOVE = 2
    HAVE = 3
    TAKE = 0x54  # "T"


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


# Operation by number, for the decoder's indexing (gaps hold None and are never indexed:
# the decoder checks the number first).
_OPERATIONS: Final = cast(
    tuple[Operation, ...],
    tuple(Operation(n) if n in Operation._value2member_map_ else None for n in range(0x55)),
)
_TAKE: Final = int(Operation.TAKE)
# Builds a named tuple (Message, AddRequest) without its Python-level ``__new__``:
# the decoder makes one per message on every server, client and proxy.
_new_record: Final = tuple.__new__

# The header as the decoder reads it: fewer fields, fewer checks per frame.
# (version, is_response, uid, op_class << 8 | operation, complete, data_len); the
# patch level is skipped, and op_class 0 with a known operation is "<= 3" (or TAKE).
_unpack_header: Final = struct.Struct(">H2xBIHBH").unpack_from
_pack_header: Final = HEADER.pack

# A one-byte result frame as three pieces: the fixed lead (level, is_response=1),
# the uid, and a prebuilt tail per operation and result (op_class, operation,
# complete=1, data_len=1, result).
_pack_result: Final = struct.Struct(">5sI6s").pack
_RESULT_LEAD: Final = HEADER.pack(PROTO_LEVEL, 1, 0, 0, 0, 0, 0)[:5]
_RESULT_TAILS: Final = tuple(
    {r: bytes([0, op, 1, 0, 1, r]) for r in Result} for op in range(len(_OPERATIONS))
)

# Single-byte result payloads are sent constantly; build their frames once.
RESULT_BYTES: Final = {r: bytes([r]) for r in Result}


class Message(NamedTuple):
    """One defragmented request or response.

    A named tuple rather than a dataclass: the decoder makes one per request on
    every server, client and proxy, and a tuple is the cheapest record to build.
    """

    is_response: bool
    uid: int
    operation: Operation
    payload: bytes


#: A message's fields in :class:`Message`'s order, as a plain tuple: what a
#: :class:`Decoder` made with ``fields=True`` returns.
MessageFields: TypeAlias = tuple[bool, int, Operation, bytes]


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
    """A response; one frame (a GET hit of a TLS session) without a detour."""
    size = len(payload)
    if size <= MAX_FRAME_DATA and 0 <= uid <= MAX_UID:
        return _pack_header(PROTO_LEVEL, 1, uid, 0, operation, 1, size) + payload
    return encode_message(True, uid, operation, payload)


def encode_result(uid: int, operation: int, result: Result) -> bytes:
    """A one-byte result response (the commonest frame of all), packed in one call."""
    return _pack_result(_RESULT_LEAD, uid, _RESULT_TAILS[operation][result])


def encode_empty_response(uid: int, operation: int) -> bytes:
    """A response with no payload: what dc_client answers when it has no server."""
    return HEADER.pack(PROTO_LEVEL, 1, uid, 0, operation, 1, 0)


def encode_renumbered(messages: Iterable[tuple[int, MessageFields]]) -> bytes:
    """Frame each message under the uid paired with it, all into one byte string.

    This is dc_client's uid rewriting: requests go upstream under the proxy's
    uids, answers go back under the client's. Direction, operation and payload
    are kept; the protocol level becomes ours. One call frames a whole batch,
    which is what keeps the proxy's per-message cost low.
    """
    out: list[bytes] = []
    append = out.append
    pack = HEADER.pack
    for uid, (is_response, _, operation, payload) in messages:
        size = len(payload)
        if size <= MAX_FRAME_DATA:
            append(pack(PROTO_LEVEL, is_response, uid, 0, operation, 1, size))
            append(payload)
        else:
            append(encode_message(is_response, uid, operation, payload))
    return b"".join(out)


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


def encode_take(uid: int, session_id: bytes) -> bytes:
    """A TAKE: only for a server that advertised ``take`` (see :class:`Operation`)."""
    return encode_message(False, uid, Operation.TAKE, session_id)


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


class AddRequest(NamedTuple):
    """An ADD payload split into its fields.

    ``refusal`` is the result dc_server answers without looking at its cache,
    found with C's checks in C's order (timeout range, then an id running past
    the payload, then id length); None when the request may be stored. A
    refused request is still split as far as its id fits in the payload
    (``session_id`` and ``data`` are empty when the id runs past it).
    """

    timeout_ms: int
    session_id: bytes
    data: bytes
    refusal: Result | None


_ADD_PREFIX_SIZE: Final = ADD_PREFIX.size
_unpack_add_prefix: Final = ADD_PREFIX.unpack_from


def parse_add_request(payload: bytes | bytearray | memoryview) -> AddRequest:
    """Split and check an ADD payload (``u32 timeout_ms | u32 id_len | id | data``).

    Under 8 bytes is a :class:`ProtocolError`: C closes the connection without
    a reply in that case.
    """
    if type(payload) is not bytes:
        payload = bytes(payload)
    size = len(payload)
    if size < _ADD_PREFIX_SIZE:
        raise ProtocolError(f"ADD payload of {size} bytes is shorter than its 8-byte prefix")
    timeout_ms, id_len = _unpack_add_prefix(payload)
    if timeout_ms > MAX_TIMEOUT_MS:
        return _refused(payload, timeout_ms, id_len, Result.ADD_TIMEOUT_RANGE)
    if id_len >= size - _ADD_PREFIX_SIZE:  # no byte of session data left
        return _refused(payload, timeout_ms, id_len, Result.ADD_CORRUPT)
    if id_len == 0 or id_len > MAX_ID_LEN:
        return _refused(payload, timeout_ms, id_len, Result.ADD_ID_RANGE)
    id_end = _ADD_PREFIX_SIZE + id_len
    return _new_record(
        AddRequest, (timeout_ms, payload[_ADD_PREFIX_SIZE:id_end], payload[id_end:], None)
    )


def _refused(payload: bytes, timeout_ms: int, id_len: int, refusal: Result) -> AddRequest:
    """A refused ADD, still split where its id fits in the payload (dc_snoop shows it)."""
    id_end = _ADD_PREFIX_SIZE + id_len
    if id_end > len(payload):
        return AddRequest(timeout_ms, b"", b"", refusal)
    return AddRequest(timeout_ms, payload[_ADD_PREFIX_SIZE:id_end], payload[id_end:], refusal)


def add_refusal(session_id: bytes, data: bytes, timeout_ms: int) -> Result | None:
    """What dc_server answers, without looking at its cache, to an ADD of these fields.

    The same checks as :func:`parse_add_request` for fields that come without a
    payload (an id cannot run past the payload, but data can be missing or too
    large for any message); None when the session may be stored.
    """
    if not 0 <= timeout_ms <= MAX_TIMEOUT_MS:
        return Result.ADD_TIMEOUT_RANGE
    if not 1 <= len(session_id) <= MAX_ID_LEN:
        return Result.ADD_ID_RANGE
    if not data or len(data) > MAX_PAYLOAD:
        return Result.ADD_DATA_RANGE
    return None


def parse_add_reply(payload: bytes) -> Result:
    """An ADD reply: exactly one known result byte."""
    if len(payload) != 1:
        raise ProtocolError(f"ADD reply of {len(payload)} bytes, expected 1")
    try:
        return Result(payload[0])
    except ValueError:
        raise ProtocolError(f"unknown ADD result code {payload[0]}") from None


def parse_get_reply(payload: bytes) -> bytes | None:
    """A GET reply: the session data, or None for a miss (any reply under 5 bytes)."""
    return payload if len(payload) >= MIN_SESSION_REPLY else None


def parse_take_reply(payload: bytes) -> bytes | None:
    """A TAKE reply: like GET's, the session data (now deleted), or None for a miss."""
    return parse_get_reply(payload)


def parse_flag_reply(payload: bytes, operation: Operation) -> bool:
    """A REMOVE or HAVE reply: ``0x00`` yes, ``0x01`` no, anything else is an error."""
    if payload == b"\x00":
        return True
    if payload == b"\x01":
        return False
    raise ProtocolError(f"unexpected {operation.name} reply {payload[:8].hex()} ({len(payload)} B)")


# ---------------------------------------------------------------- capability probe

#: Ids starting with this are reserved: GET of ``PROBE_PREFIX + nonce`` is a probe, and our
#: server refuses to store (or remove) anything under the prefix, so nobody can plant
#: an answer through our tools. A C server just misses such a GET.
PROBE_PREFIX: Final = b"\x00tlscache-probe\x00"
#: Random bytes after the prefix, fresh per probe: a value ADDed to a C server in
#: advance under some probe id is never the one asked for.
PROBE_NONCE_SIZE: Final = 16
PROBE_TAG: Final = b"tlscache/1"


class Capabilities(NamedTuple):
    """What a server (or the path through a dc_client) offers beyond C distcache.

    ``pipeline``: many requests may be outstanding on one connection whatever the
    size of the replies (C drops the connection behind a large reply).
    ``take``: the TAKE operation.
    """

    pipeline: bool = False
    take: bool = False


#: A server we did not write: one request at a time, no TAKE.
NO_CAPABILITIES: Final = Capabilities(False, False)
#: What our dc_server offers.
SERVER_CAPABILITIES: Final = Capabilities(pipeline=True, take=True)


def new_probe_nonce() -> bytes:
    return secrets.token_bytes(PROBE_NONCE_SIZE)


def probe_id(nonce: bytes) -> bytes:
    """The session id a probe asks for."""
    if len(nonce) != PROBE_NONCE_SIZE:
        raise ValueError(f"probe nonce must be {PROBE_NONCE_SIZE} bytes, got {len(nonce)}")
    return PROBE_PREFIX + nonce


def encode_probe(uid: int, nonce: bytes) -> bytes:
    return encode_get(uid, probe_id(nonce))


def probe_nonce(session_id: bytes) -> bytes | None:
    """The nonce if ``session_id`` (of a GET) is a probe, else None."""
    if len(session_id) == len(PROBE_PREFIX) + PROBE_NONCE_SIZE and session_id.startswith(
        PROBE_PREFIX
    ):
        return session_id[len(PROBE_PREFIX) :]
    return None


def is_reserved_id(session_id: bytes) -> bool:
    """True for ids under :data:`PROBE_PREFIX`, which no ADD or REMOVE may touch."""
    return session_id.startswith(PROBE_PREFIX)


def is_reserved_add(payload: bytes) -> bool:
    """True if an ADD payload (at least 8 bytes) stores under a reserved id."""
    size = len(PROBE_PREFIX)
    id_len: int = _unpack_add_prefix(payload)[1]
    return id_len >= size and payload[_ADD_PREFIX_SIZE : _ADD_PREFIX_SIZE + size] == PROBE_PREFIX


def probe_reply(nonce: bytes, capabilities: Capabilities) -> bytes:
    """The GET reply payload answering a probe: tag, the nonce in hex, the capabilities."""
    words = [PROBE_TAG, nonce.hex().encode()]
    if capabilities.pipeline:
        words.append(b"pipeline")
    if capabilities.take:
        words.append(b"take")
    return b" ".join(words)


def parse_probe_reply(nonce: bytes, payload: bytes) -> Capabilities:
    """What a probe's GET reply says; :data:`NO_CAPABILITIES` for anything but ours.

    A miss, an error, an empty reply, or a payload that does not echo this very
    nonce means a server we did not write (or a planted value): nothing beyond C.
    Unknown words are ignored, so later versions can add capabilities.
    """
    words = payload.split(b" ")
    if len(words) < 2 or words[0] != PROBE_TAG or words[1] != nonce.hex().encode():
        return NO_CAPABILITIES
    offered = set(words[2:])
    return Capabilities(pipeline=b"pipeline" in offered, take=b"take" in offered)


def is_unavailable_reply(payload: bytes) -> bool:
    """True for dc_client's "no server" answers: an empty payload, or the result 0x02."""
    return not payload or (len(payload) == 1 and payload[0] == Result.DISCONNECTED)


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

    Every role reads through this one class, so its commonest case (a read
    holding exactly one whole single-frame message) skips the general loop.

    With ``fields=True`` the messages are plain tuples of :class:`Message`'s
    fields, read with :meth:`feed_fields`: a named tuple is a tuple subclass,
    which the interpreter's fast paths for building and unpacking tuples skip,
    and the proxy builds and unpacks two per request it forwards.
    """

    __slots__ = (
        "_buf",
        "_expect",
        "_fields",
        "_frag_op",
        "_frag_parts",
        "_frag_resp",
        "_frag_size",
        "_frag_uid",
        "backlog",
        "in_message",
        "limit",
    )

    def __init__(self, expect_response: bool | None = False, *, fields: bool = False) -> None:
        self._buf = bytearray()
        # The is_response byte every frame must carry; None accepts both.
        self._expect = None if expect_response is None else int(expect_response)
        self._fields = fields
        self._frag_parts: list[bytes] = []
        self._frag_size = 0
        self._frag_uid = 0
        self._frag_op = 0
        self._frag_resp = 0
        #: True while a partial frame or a partial multi-frame message is buffered
        #: (or whole messages held back by ``limit``: see ``backlog``).
        #: An attribute, not a property: servers look at it after every read.
        self.in_message = False
        #: Most messages one call returns (0: all). The rest stay here as bytes, 14 to
        #: 30 per request rather than a tuple each: a server that reads hundreds of
        #: pipelined requests from a peer that does not read its answers holds them
        #: compactly until their turn comes.
        self.limit = 0
        #: True when ``limit`` stopped the last call with whole messages still buffered;
        #: feeding ``b""`` returns the next ones.
        self.backlog = False

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole message (partial frame or fragments)."""
        return len(self._buf) + self._frag_size

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Add received bytes; return every message they complete, in order.

        Raises :class:`ProtocolError` at the first bad frame; the messages that
        preceded it in ``data`` are then lost (see :meth:`feed_until_error`).
        """
        messages, error = self.feed_until_error(data)
        if error is not None:
            raise error
        return messages

    def feed_one(self, data: bytes | bytearray | memoryview) -> MessageFields | None:
        """The fields of the message ``data`` holds if it is exactly one whole frame, else None.

        The commonest read of all (one client, one request) without the list and
        the result tuple of :meth:`feed_until_error`. None consumes nothing: the
        caller then feeds the same bytes to :meth:`feed_until_error`.
        """
        if type(data) is bytes and len(data) >= HEADER_SIZE and not self.in_message:
            version, resp, uid, op, complete, dlen = _unpack_header(data)
            if (
                len(data) - HEADER_SIZE == dlen <= MAX_FRAME_DATA
                and complete == 1
                and resp == self._expect
                and (op <= 3 or op == _TAKE)
                and version == PROTO_VERSION
            ):
                return (resp == 1, uid, _OPERATIONS[op], data[HEADER_SIZE:])
        return None

    def feed_until_error(
        self, data: bytes | bytearray | memoryview
    ) -> tuple[list[Message], ProtocolError | None]:
        """:meth:`feed` that also returns the messages completed before bad input.

        The result is ``(messages, error)``; after an error the decoder is
        unusable, but a server can still answer the requests that preceded it.
        """
        record = self.feed_one(data)
        if record is not None:
            one: list[Any] = [record if self._fields else _new_record(Message, record)]
            return one, None
        messages: list[Any] = []  # Messages, or plain tuples of their fields (fields=True)
        try:
            buf = self._buf
            if buf:
                buf += data
                self._parse(buf, False, messages)
            else:
                # Parse straight from the caller's buffer, copy only the tail.
                self._parse(data, True, messages)
        except ProtocolError as exc:
            return messages, exc
        return messages, None

    if TYPE_CHECKING:

        def feed_fields(
            self, data: bytes | bytearray | memoryview
        ) -> tuple[list[MessageFields], ProtocolError | None]:
            """:meth:`feed_until_error` of a decoder made with ``fields=True``."""

    else:
        feed_fields = feed_until_error  # the same method, typed for plain tuples

    def _parse(
        self, src: bytes | bytearray | memoryview, external: bool, messages: list[Any]
    ) -> None:
        if type(src) is not bytes:
            # One copy of the read, so that every payload below is a plain slice.
            src = bytes(src)
        pos = 0
        end = len(src)
        unpack = _unpack_header
        new = _new_record
        fields = self._fields
        operations = _OPERATIONS
        want = self._expect
        is_response = want == 1
        append = messages.append
        fragments = bool(self._frag_parts)
        limit = self.limit or end
        backlog = self.backlog = False  # stays False if this call raises
        while end - pos >= HEADER_SIZE:
            if len(messages) >= limit:
                backlog = True
                break
            version, resp, uid, op, complete, dlen = unpack(src, pos)
            body = pos + HEADER_SIZE
            frame_end = body + dlen
            if (
                frame_end <= end
                and complete == 1
                and resp == want
                and dlen <= MAX_FRAME_DATA
                and (op <= 3 or op == _TAKE)
                and version == PROTO_VERSION
                and not fragments
            ):
                # The common case: a whole single-frame message in the expected direction.
                record = (is_response, uid, operations[op], src[body:frame_end])
                append(record if fields else new(Message, record))
                pos = frame_end
                continue
            # A fragment, a frame dc_snoop accepts either way, a partial frame or bad input.
            self._check_header(src, pos)
            if frame_end > end:
                break
            chunk = src[body:frame_end]
            pos = frame_end
            if fragments:
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
                    fragments = False
                    record = (resp == 1, uid, operations[op], payload)
                    append(record if fields else new(Message, record))
            elif complete:
                record = (resp == 1, uid, operations[op], chunk)
                append(record if fields else new(Message, record))
            else:
                self._frag_parts.append(chunk)
                self._frag_size = dlen
                self._frag_uid = uid
                self._frag_op = op
                self._frag_resp = resp
                fragments = True
        self.backlog = backlog
        if end - pos >= 4 and not backlog:
            # Reject a wrong protocol level (or plain garbage) as early as possible.
            level = int.from_bytes(src[pos : pos + 4], "big")
            if level >> 16 != PROTO_VERSION:
                raise _incompatible(level)
        if external:
            if pos < end:
                self._buf += src[pos:]
        elif pos:
            del self._buf[:pos]
        self.in_message = fragments or bool(self._buf)

    def _check_header(self, src: bytes, pos: int) -> None:
        """The frame header rule: raise with the reason, or return for a valid header."""
        level, resp, _, op_class, op, complete, dlen = HEADER.unpack_from(src, pos)
        if level >> 16 != PROTO_VERSION:
            raise _incompatible(level)
        if resp > 1:
            raise ProtocolError(f"invalid is_response byte {resp}")
        if self._expect is not None and resp != self._expect:
            raise ProtocolError(
                "response frame sent to a server" if resp else "request frame sent to a client"
            )
        if op_class != 0:
            raise ProtocolError(f"unknown op_class {op_class}")
        if op > 3 and op != _TAKE:
            raise ProtocolError(f"unknown operation {op}")
        if complete > 1:
            raise ProtocolError(f"invalid complete byte {complete}")
        if dlen > MAX_FRAME_DATA:
            raise ProtocolError(f"data_len {dlen} exceeds {MAX_FRAME_DATA}")
        if not complete and dlen != MAX_FRAME_DATA:
            raise ProtocolError(f"non-final fragment carries {dlen} bytes, not {MAX_FRAME_DATA}")
