"""dc_server's request handling, without any I/O: request bytes in, response bytes out.

:class:`CacheService` is shared by every connection of a server (it owns the
cache and the operation counter); each connection gets a
:class:`ServerConnection` from :meth:`CacheService.connection` and feeds it the
bytes it receives together with the current time in milliseconds.

The common case, one complete single-frame request in one read, is answered
straight from the received buffer: no :class:`~tlscache.distcache.protocol.Message`,
no payload copy for ADD, and a response assembled from prebuilt header pieces.
Pipelined single-frame requests take a loop over the same buffer. Only partial
frames, multi-frame messages and bad input go through the general
:class:`~tlscache.distcache.protocol.Decoder`, which also owns every validity
check (the fast paths merely decline what they do not recognise).
"""

from __future__ import annotations

from typing import Final

from tlscache.distcache.cache import SessionCache
from tlscache.distcache.protocol import (
    ADD_PREFIX,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_DATA,
    PROTO_LEVEL,
    PROTO_VERSION,
    Decoder,
    Message,
    Operation,
    Result,
)
from tlscache.exceptions import ProtocolError

_ADD: Final = int(Operation.ADD)
_GET: Final = int(Operation.GET)
_REMOVE: Final = int(Operation.REMOVE)
_HAVE: Final = int(Operation.HAVE)

# A response header is _LEAD + uid(4) + op_class(1) + operation(1) + complete(1)
# + data_len(2); the middle six bytes are copied from the request header as they are.
_LEAD: Final = PROTO_LEVEL.to_bytes(4, "big") + b"\x01"
# complete=1, data_len=1, result byte: everything after the request's uid/op bytes.
_RESULT_TAIL: Final = {int(r): b"\x01\x00\x01" + bytes([r]) for r in Result}
_OK_TAIL: Final = _RESULT_TAIL[Result.OK]
_NOTOK_TAIL: Final = _RESULT_TAIL[Result.NOTOK]
_LAST: Final = b"\x01"
_MORE: Final = b"\x00"
_FULL_LEN: Final = MAX_FRAME_DATA.to_bytes(2, "big")
_unpack: Final = HEADER.unpack_from
_ADD_PREFIX_SIZE: Final = ADD_PREFIX.size

# Stop answering a batch of pipelined requests once this much output is waiting.
DEFAULT_OUTPUT_BUDGET: Final = 256 * 1024


def _data_response(uid_op: bytes, data: bytes) -> bytes:
    """A GET hit: the session data fragmented as the C encoder does."""
    size = len(data)
    if size <= MAX_FRAME_DATA:
        return b"".join((_LEAD, uid_op, _LAST, size.to_bytes(2, "big"), data))
    parts: list[bytes | memoryview] = []
    view = memoryview(data)
    head = _LEAD + uid_op
    for start in range(0, size, MAX_FRAME_DATA):
        chunk = view[start : start + MAX_FRAME_DATA]
        if start + MAX_FRAME_DATA >= size:
            parts += (head, _LAST, len(chunk).to_bytes(2, "big"), chunk)
        else:
            parts += (head, _MORE, _FULL_LEN, chunk)
    return b"".join(parts)


class CacheService:
    """The server side of the protocol over one :class:`SessionCache`."""

    __slots__ = ("cache", "operations")

    def __init__(self, cache: SessionCache) -> None:
        self.cache = cache
        self.operations = 0  # requests answered, for the statistics line

    def connection(self, output_budget: int = DEFAULT_OUTPUT_BUDGET) -> ServerConnection:
        return ServerConnection(self, output_budget)

    def handle(self, uid_op: bytes, op: int, payload: bytes, now_ms: int) -> bytes:
        """Answer one defragmented request.

        ``uid_op`` is the request's uid, op_class and operation bytes (header
        offsets 5..10), echoed verbatim. Raises :class:`ProtocolError` for an
        ADD payload under 8 bytes (C closes the connection without a reply).
        """
        cache = self.cache
        if op == _GET:
            data = cache.get(payload, now_ms)
            if data is None:
                return b"".join((_LEAD, uid_op, _NOTOK_TAIL))
            return _data_response(uid_op, data)
        if op == _ADD:
            tail = _RESULT_TAIL[cache.add_payload(payload, now_ms)]
        elif op == _HAVE:
            tail = _OK_TAIL if cache.have(payload, now_ms) else _NOTOK_TAIL
        else:
            tail = _OK_TAIL if cache.remove(payload, now_ms) else _NOTOK_TAIL
        return b"".join((_LEAD, uid_op, tail))


class ServerConnection:
    """Protocol state of one server connection.

    :meth:`feed` returns the bytes to send back. After a protocol error it
    still returns the answers to the requests that preceded the bad input,
    and sets :attr:`error`: the caller must send those bytes and then close
    the connection; nothing more is accepted.

    A small request can ask for a 32 KiB answer, so one read of pipelined
    requests could demand hundreds of megabytes of output. :meth:`feed`
    therefore stops once it has produced ``output_budget`` bytes and keeps the
    rest of the input (:attr:`pending`); the caller stops reading, sends what
    it got and calls ``feed(b"", now)`` again once the peer has caught up.
    """

    __slots__ = (
        "_backlog",
        "_decoder",
        "_failure",
        "_queued",
        "_service",
        "busy",
        "error",
        "output_budget",
        "partial",
        "pending",
    )

    def __init__(self, service: CacheService, output_budget: int = DEFAULT_OUTPUT_BUDGET) -> None:
        self._service = service
        # Created on first use: most connections only ever take the fast paths.
        self._decoder: Decoder | None = None
        self.output_budget = output_budget
        self.error: ProtocolError | None = None
        # A bad frame seen after requests that still wait for the output budget:
        # it becomes ``error`` once they are answered.
        self._failure: ProtocolError | None = None
        # True while part of a frame or of a multi-frame message is buffered.
        self.partial = False
        # True while received requests wait for the output budget (see class doc).
        self.pending = False
        # error, partial or pending: the one flag the per-request path looks at.
        self.busy = False
        self._backlog = b""  # unparsed input held back by the output budget
        self._queued: list[Message] = []  # decoded requests held back by the budget

    def feed(self, data: bytes | bytearray | memoryview, now_ms: int) -> bytes:
        """Consume received bytes; return the responses they complete, in order."""
        if not self.busy and type(data) is bytes and len(data) >= HEADER_SIZE:
            # Fastest path: exactly one whole single-frame request (one client, one op).
            level, resp, _uid, op_class, op, complete, dlen = _unpack(data)
            if (
                len(data) == HEADER_SIZE + dlen
                and complete == 1
                and level >> 16 == PROTO_VERSION
                and not resp
                and not op_class
                and dlen <= MAX_FRAME_DATA
            ):
                service = self._service
                if op == _GET:
                    found = service.cache.get(data[HEADER_SIZE:], now_ms)
                    service.operations += 1
                    if found is None:
                        return b"".join((_LEAD, data[5:11], _NOTOK_TAIL))
                    return _data_response(data[5:11], found)
                if op == _HAVE:
                    yes = service.cache.have(data[HEADER_SIZE:], now_ms)
                    service.operations += 1
                    return b"".join((_LEAD, data[5:11], _OK_TAIL if yes else _NOTOK_TAIL))
                if op == _ADD and dlen >= _ADD_PREFIX_SIZE:  # shorter: error, handled below
                    result = service.cache.add_from(data, HEADER_SIZE, len(data), now_ms)
                    service.operations += 1
                    return b"".join((_LEAD, data[5:11], _RESULT_TAIL[result]))
                if op == _REMOVE:
                    yes = service.cache.remove(data[HEADER_SIZE:], now_ms)
                    service.operations += 1
                    return b"".join((_LEAD, data[5:11], _OK_TAIL if yes else _NOTOK_TAIL))
        out: list[bytes] = []
        self._feed(data, now_ms, out)
        self.pending = bool(self._backlog or self._queued)
        self.busy = self.pending or self.partial or self.error is not None
        return out[0] if len(out) == 1 else b"".join(out)

    def _feed(self, data: bytes | bytearray | memoryview, now_ms: int, out: list[bytes]) -> None:
        if self.error is not None:
            return
        budget = self.output_budget
        size = 0
        if self._queued:
            size = self._answer_queued(now_ms, out, 0)
            if self._queued:
                if data and self._failure is None:
                    self._backlog += bytes(data)
                return
            if self._failure is not None:
                return  # nothing after the bad frame counts
        if self._backlog:
            data = self._backlog + bytes(data)
            self._backlog = b""
        n = len(data)
        pos = 0
        if not self.partial:
            # Fast path: whole single-frame requests straight from the buffer.
            service = self._service
            cache = service.cache
            unpack = HEADER.unpack_from
            answered = 0
            while n - pos >= HEADER_SIZE:
                level, resp, _uid, op_class, op, complete, dlen = unpack(data, pos)
                end = pos + HEADER_SIZE + dlen
                if (
                    end > n
                    or complete != 1
                    or level >> 16 != PROTO_VERSION
                    or resp
                    or op_class
                    or op > 3
                    or dlen > MAX_FRAME_DATA
                ):
                    break
                uid_op = bytes(data[pos + 5 : pos + 11])
                body = pos + HEADER_SIZE
                if op == _ADD:
                    try:
                        result = cache.add_from(data, body, end, now_ms)
                    except ProtocolError as exc:
                        self.error = exc
                        service.operations += answered
                        return
                    answer = b"".join((_LEAD, uid_op, _RESULT_TAIL[result]))
                elif op == _GET:
                    found = cache.get(bytes(data[body:end]), now_ms)
                    if found is None:
                        answer = b"".join((_LEAD, uid_op, _NOTOK_TAIL))
                    else:
                        answer = _data_response(uid_op, found)
                elif op == _HAVE:
                    yes = cache.have(bytes(data[body:end]), now_ms)
                    answer = b"".join((_LEAD, uid_op, _OK_TAIL if yes else _NOTOK_TAIL))
                else:
                    yes = cache.remove(bytes(data[body:end]), now_ms)
                    answer = b"".join((_LEAD, uid_op, _OK_TAIL if yes else _NOTOK_TAIL))
                out.append(answer)
                answered += 1
                pos = end
                size += len(answer)
                if size >= budget and pos < n:
                    self._backlog = bytes(data[pos:])
                    service.operations += answered
                    return
            service.operations += answered
            if pos == n:
                return
        rest = memoryview(data)[pos:] if pos else data
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = Decoder(expect_response=False)
        self._queued, failure = decoder.feed_until_error(rest)
        if failure is None:
            self.partial = decoder.in_message
        else:
            # The requests before the bad frame are still answered (budget permitting,
            # over several calls); the error takes effect once they all are.
            self._failure = failure
            self.partial = False
        self._answer_queued(now_ms, out, size)

    def _answer_queued(self, now_ms: int, out: list[bytes], size: int) -> int:
        """Answer decoded requests in order until the output budget is spent."""
        service = self._service
        queued = self._queued
        done = 0
        for msg in queued:
            uid_op = msg.uid.to_bytes(4, "big") + b"\x00" + bytes([msg.operation])
            try:
                answer = service.handle(uid_op, msg.operation, msg.payload, now_ms)
            except ProtocolError as exc:
                self.error = exc
                self._queued = []
                return size
            out.append(answer)
            service.operations += 1
            done += 1
            size += len(answer)
            if size >= self.output_budget:
                break
        if done < len(queued):
            self._queued = queued[done:]
        else:
            self._queued = []
            if self._failure is not None:
                self.error = self._failure
        return size

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete request."""
        return 0 if self._decoder is None else self._decoder.buffered
