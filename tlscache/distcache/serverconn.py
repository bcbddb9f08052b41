"""One dc_server connection, without any I/O: request bytes and a clock in, response bytes out.

Named for the role it plays, the server end of one connection (the client end
is :mod:`tlscache.distcache.clientconn`), so that the asyncio shell in
:mod:`tlscache.distcache.server` only moves bytes, times peers out and logs.

:class:`CacheService` is what every connection of one server shares (the
:class:`~tlscache.distcache.table.SessionTable` and the operation counter);
each connection gets a :class:`ServerConnection` from
:meth:`CacheService.connection` and feeds it what it receives together with
the current time in milliseconds. Bytes are read by the protocol's
:class:`~tlscache.distcache.protocol.Decoder` alone, every request is answered
by :meth:`ServerConnection._answer` alone, and the output budget decides how
many answers one call may produce.

Besides C's four operations it answers our extension: a capability probe (a
GET for ``PROBE_PREFIX + nonce``, answered with
:data:`~tlscache.distcache.protocol.SERVER_CAPABILITIES`) and TAKE. ADDs under
the reserved prefix are refused (``0x67``, id out of range), so nobody can
plant a probe answer; REMOVEs there simply miss, since nothing is stored there.
"""

from __future__ import annotations

from typing import Final

from tlscache.distcache.protocol import (
    SERVER_CAPABILITIES,
    Decoder,
    MessageFields,
    Operation,
    Result,
    encode_response,
    encode_result,
    is_reserved_id,
    parse_add_request,
    probe_nonce,
    probe_reply,
)
from tlscache.distcache.table import SessionTable
from tlscache.exceptions import ProtocolError

#: Stop answering a batch of pipelined requests once this much output is waiting.
DEFAULT_OUTPUT_BUDGET: Final = 256 * 1024
#: Decode at most this many received requests ahead of answering them.
DECODE_AHEAD: Final = 64
#: Answer at most this many pipelined requests per call: requests that produce
#: little output (a storm of 32 KiB ADDs) must not hold the caller for long either.
DEFAULT_MAX_BATCH: Final = 64

_ADD: Final = Operation.ADD
_GET: Final = Operation.GET
_HAVE: Final = Operation.HAVE
_TAKE: Final = Operation.TAKE
_PROBE_START: Final = b"\x00"  # the first byte of PROBE_PREFIX: a cheap test before the full one
_OK: Final = Result.OK
_NOTOK: Final = Result.NOTOK
_ID_RANGE: Final = Result.ADD_ID_RANGE


class CacheService:
    """The server side of the protocol over one :class:`SessionTable`."""

    __slots__ = ("operations", "table")

    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self.operations = 0  # requests answered, for the statistics line

    def connection(
        self, output_budget: int = DEFAULT_OUTPUT_BUDGET, max_batch: int = DEFAULT_MAX_BATCH
    ) -> ServerConnection:
        return ServerConnection(self, output_budget, max_batch)


class ServerConnection:
    """Protocol state of one server connection.

    :meth:`feed` returns the bytes to send back. After bad input it still
    returns the answers to the requests that preceded it, and then sets
    :attr:`error`: the caller sends those bytes and closes the connection;
    nothing more is accepted.

    A small request can ask for a 32 KiB answer, so one read of pipelined
    requests could demand hundreds of megabytes of output. :meth:`feed`
    therefore stops once it has produced ``output_budget`` bytes (or answered
    ``max_batch`` requests) and keeps the remaining requests (:attr:`pending`);
    the caller stops reading, sends what it got and calls ``feed(b"", now)``
    again once the peer has caught up and the other connections had their turn.
    A budget of 0 answers exactly one request per call.
    """

    __slots__ = (
        "_decode",
        "_decoder",
        "_failure",
        "_next",
        "_queue",
        "_service",
        "_table",
        "busy",
        "error",
        "max_batch",
        "output_budget",
        "partial",
        "pending",
    )

    def __init__(
        self,
        service: CacheService,
        output_budget: int = DEFAULT_OUTPUT_BUDGET,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self._service = service
        self._table = service.table
        # Plain tuples rather than Messages: a named tuple costs more to build and
        # to unpack, and this is the per-request path of every dc_server.
        self._decoder = Decoder(expect_response=False, fields=True)
        # Requests beyond the first few dozen stay undecoded (a few bytes each, not a
        # tuple each) until their turn: what a peer that does not read its answers can
        # make us hold, times thousands of such peers.
        self._decoder.limit = DECODE_AHEAD
        self._decode = self._decoder.feed_fields
        self.output_budget = output_budget
        self.max_batch = max(1, max_batch)
        #: Why the connection must be closed once the bytes returned so far are sent.
        self.error: ProtocolError | None = None
        # Bad input seen behind requests that still wait for the output budget:
        # it becomes ``error`` once they are answered.
        self._failure: ProtocolError | None = None
        self._queue: list[MessageFields] = []  # decoded requests held back by the budget
        self._next = 0  # the first request of the queue still to answer
        #: True while part of a frame or of a multi-frame message is buffered.
        self.partial = False
        #: True while received requests wait for the output budget (see class doc).
        self.pending = False
        #: error, partial or pending: the one flag the shell looks at after each read.
        self.busy = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete request."""
        return self._decoder.buffered

    def feed(self, data: bytes | bytearray | memoryview, now_ms: int) -> bytes:
        """Consume received bytes; return the answers they complete, in order."""
        if self.busy:
            self._receive_behind(data)
        else:
            message = self._decoder.feed_one(data)
            if message is not None:
                # One request per read (one client, one operation): nothing to hold back.
                try:
                    out = self._answer(message, now_ms)
                except ProtocolError as exc:
                    self.error = exc
                    self.busy = True
                    return b""
                self._service.operations += 1
                return out
            self._queue, self._failure = self._decode(data)
        return self._answer_queue(now_ms)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Queue the requests in ``data`` without answering any (the caller is out of
        output room); later ``feed(b"", now)`` calls answer them."""
        if self.busy:
            self._receive_behind(data)
        elif data:
            self._queue, self._failure = self._decode(data)
            self._next = 0
        self._settle()

    def end_of_input(self) -> None:
        """The peer will send nothing more: a stream that ends inside a message is an error.

        Like any bad input, it takes effect once the requests before it are answered.
        """
        if self.partial:
            reason = f"end of stream inside a message ({self.buffered} bytes buffered)"
            self._fail(ProtocolError(reason))

    def _receive_behind(self, data: bytes | bytearray | memoryview) -> None:
        """Queue the requests in ``data`` behind those held back, unless input is over."""
        if self.error is not None or self._failure is not None or not data:
            return
        messages, failure = self._decode(data)
        self._queue += messages
        if failure is not None:
            self._fail(failure)

    def _fail(self, failure: ProtocolError) -> None:
        self._failure = failure
        self.partial = False
        self._settle()

    def _answer_queue(self, now_ms: int) -> bytes:
        """Answer queued requests in order until the output budget or the batch is spent."""
        answer = self._answer
        budget = self.output_budget
        left = self.max_batch
        out: list[bytes] = []
        append = out.append
        size = 0
        try:
            while True:
                queue = self._queue
                start = self._next
                if start >= len(queue):
                    if not self._decoder.backlog or self._failure is not None:
                        break
                    queue, failure = self._decode(b"")
                    self._queue = queue
                    start = self._next = 0
                    if failure is not None:
                        self._failure = failure
                    if not queue:
                        break
                done = start
                for message in queue[start : start + left]:
                    response = answer(message, now_ms)
                    done += 1
                    append(response)
                    size += len(response)
                    if size >= budget:
                        break
                self._next = done
                left -= done - start
                if size >= budget or left <= 0:
                    break
        except ProtocolError as exc:
            # Nothing after this request counts, not even a later bad frame.
            self.error = exc
            self._failure = None
        if self.error is not None or self._next >= len(self._queue):
            self._queue = []
            self._next = 0
        self._service.operations += len(out)
        self._settle()
        return out[0] if len(out) == 1 else b"".join(out)

    def _settle(self) -> None:
        """Derive the flags the shell reads from the queue, the decoder and any failure."""
        backlog = self._decoder.backlog and self.error is None
        self.pending = len(self._queue) > self._next or backlog
        if self._failure is not None and not self.pending:
            self.error, self._failure = self._failure, None
        if self.error is not None or self._failure is not None:
            self.partial = False
        else:
            self.partial = self._decoder.in_message and not backlog
        self.busy = self.pending or self.partial or self.error is not None

    def _answer(self, message: MessageFields, now_ms: int) -> bytes:
        """The response to one request: the only place that dispatches on the operation.

        Raises :class:`ProtocolError` for an ADD payload under 8 bytes (C closes
        the connection without a reply).
        """
        _, uid, operation, payload = message
        if operation is _GET:
            data = self._table.get(payload, now_ms)
            if data is None:
                # The table never holds a reserved id, so a probe is always a miss first.
                nonce = probe_nonce(payload) if payload[:1] == _PROBE_START else None
                if nonce is not None:
                    return encode_response(uid, operation, probe_reply(nonce, SERVER_CAPABILITIES))
                return encode_result(uid, operation, _NOTOK)
            return encode_response(uid, operation, data)
        if operation is _HAVE:
            found = self._table.have(payload, now_ms)
        elif operation is _ADD:
            request = parse_add_request(payload)
            if request.refusal is None and is_reserved_id(request.session_id):
                return encode_result(uid, operation, _ID_RANGE)
            added = self._table.add_request(request, now_ms)
            return encode_result(uid, operation, added)
        elif operation is _TAKE:
            data = self._table.take(payload, now_ms)
            if data is None:
                return encode_result(uid, operation, _NOTOK)
            return encode_response(uid, operation, data)
        else:
            found = self._table.remove(payload, now_ms)
        return encode_result(uid, operation, _OK if found else _NOTOK)
