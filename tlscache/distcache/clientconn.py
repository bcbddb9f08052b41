"""The client side of one distcache connection, without any I/O.

:class:`ClientConnection` is everything a client must know about one connection
except how bytes move: it numbers requests, remembers the replies the
connection owes, and checks every reply the way the C client does (same uid,
same operation; an empty payload or the result ``0x02`` means dc_client has no
server). Bytes go in through :meth:`~ClientConnection.receive_data`, finished
:class:`Request` objects come out; :meth:`~ClientConnection.send` turns a
request into the bytes to write. The blocking :class:`~tlscache.distcache.client.Client`
and the asyncio :class:`~tlscache.distcache.aioclient.AsyncClient` are shells
around it, so the reply rules exist once and are tested without sockets.

A request is built before it has a connection (:func:`add_request`, ...), so
that bad arguments are refused before any I/O, and so that a request can be
sent again, with the same uid, on a fresh connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Generic, TypeVar

from tlscache.distcache.protocol import (
    Capabilities,
    Decoder,
    Operation,
    Result,
    add_payload,
    encode_request,
    is_unavailable_reply,
    next_uid,
    parse_add_reply,
    parse_flag_reply,
    parse_get_reply,
    parse_probe_reply,
    parse_take_reply,
    probe_id,
    validate_add_request,
)
from tlscache.exceptions import ClientError, ProtocolError, ServerUnavailable

__all__ = [
    "STORED_RESULTS",
    "ClientConnection",
    "Request",
    "add_request",
    "get_request",
    "have_request",
    "probe_request",
    "remove_request",
    "take_request",
]

T = TypeVar("T")

#: ADD results that mean "stored": this session, or one with its id (ids are random,
#: so that is the same session).
STORED_RESULTS: Final = frozenset({Result.OK, Result.ADD_MATCHING_SESSION})

_parse_remove_reply: Final = partial(parse_flag_reply, operation=Operation.REMOVE)
_parse_have_reply: Final = partial(parse_flag_reply, operation=Operation.HAVE)


class Request(Generic[T]):
    """One request and, once its reply is in, what it came to.

    ``uid`` and ``data`` (the bytes on the wire) are set when a connection first
    sends it, and kept if it is sent again. A slotted class rather than a
    dataclass: one is made per call on the TLS handshake path.
    """

    __slots__ = ("data", "done", "error", "operation", "parse", "payload", "uid", "value")

    value: T

    def __init__(self, operation: Operation, payload: bytes, parse: Callable[[bytes], T]) -> None:
        self.operation = operation
        self.payload = payload
        self.parse = parse
        self.uid = -1
        self.data = b""
        self.done = False
        self.error: ClientError | None = None

    def result(self) -> T:
        """The answer; raises the :class:`ClientError` the reply came to instead."""
        if self.error is not None:
            raise self.error
        if not self.done:
            raise RuntimeError(f"no reply to {self.operation.name} request {self.uid} yet")
        return self.value

    def __repr__(self) -> str:
        state = "error" if self.error is not None else "done" if self.done else "pending"
        return f"<Request {self.operation.name} uid={self.uid} {state}>"


def add_request(session_id: bytes, data: bytes, timeout_ms: int) -> Request[Result]:
    """An ADD; raises :class:`ValueError` if the server would refuse its arguments."""
    validate_add_request(session_id, data, timeout_ms)
    return Request(Operation.ADD, add_payload(session_id, data, timeout_ms), parse_add_reply)


def get_request(session_id: bytes) -> Request[bytes | None]:
    """A GET: the session data, or None for a miss (any reply under 5 bytes, as in C)."""
    return Request(Operation.GET, session_id, parse_get_reply)


def remove_request(session_id: bytes) -> Request[bool]:
    """A REMOVE: True if the session was there."""
    return Request(Operation.REMOVE, session_id, _parse_remove_reply)


def have_request(session_id: bytes) -> Request[bool]:
    """A HAVE: True if the server holds an unexpired session with this id."""
    return Request(Operation.HAVE, session_id, _parse_have_reply)


def take_request(session_id: bytes) -> Request[bytes | None]:
    """A TAKE: the session data, deleted by the same step, or None for a miss.

    Send it only where a probe (:func:`probe_request`) offered ``take``.
    """
    return Request(Operation.TAKE, session_id, parse_take_reply)


def probe_request(nonce: bytes) -> Request[Capabilities]:
    """A capability probe (a GET of a reserved id): what the server offers beyond C.

    ``nonce`` must be fresh random bytes (:func:`~tlscache.distcache.protocol.new_probe_nonce`).
    """
    return Request(Operation.GET, probe_id(nonce), partial(parse_probe_reply, nonce))


class ClientConnection:
    """The protocol state of one client connection.

    Two kinds of request are in flight. Awaited ones (:meth:`send`) are matched
    to their replies by uid, in any order, and come back from
    :meth:`receive_data` finished. Owed ones (:meth:`send_nowait` then
    :meth:`owe`) are ADDs whose replies nobody waits for: they are checked here
    as they arrive, in order, and those not stored are counted in
    :attr:`write_failures`.

    :meth:`receive_data` raises :class:`ClientError` when the connection is out
    of step (a malformed frame, a reply to no request, an owed reply that does
    not match) and leaves the offending reply unconsumed; the connection must
    then be closed. A well-framed reply that is wrong for its request (wrong
    operation, bad payload) or dc_client's "no server" fails only that request.
    ``peer`` names the other end in error messages.
    """

    __slots__ = (
        "_decoder",
        "_owed",
        "_uid",
        "_waiting",
        "peer",
        "write_confirmations",
        "write_failures",
    )

    def __init__(self, peer: str = "the server") -> None:
        self.peer = peer
        self._decoder = Decoder(expect_response=True)
        self._uid = 0
        self._waiting: dict[int, Request[Any]] = {}
        self._owed: deque[int] = deque()
        #: Owed ADDs found not stored since the last :meth:`take_write_failures`.
        self.write_failures = 0
        #: Owed ADDs the server confirmed stored since the last :meth:`take_write_confirmations`.
        self.write_confirmations = 0

    # ------------------------------------------------------------ sending

    def send(self, request: Request[T]) -> bytes:
        """Await ``request``'s reply; the bytes to write."""
        data = request.data or self._number(request)
        uid = request.uid
        if uid in self._waiting:  # only after 2**32 requests with one still unanswered
            raise ClientError(f"request uid {uid} already in flight to {self.peer}")
        self._waiting[uid] = request
        return data

    def send_nowait(self, request: Request[Result]) -> bytes:
        """The bytes of an ADD whose reply will not be waited for; :meth:`owe` once written.

        A request that never went out is not owed, so a failed write is reported
        once, by the writer, and never again as a lost reply.
        """
        return request.data or self._number(request)

    def owe(self, request: Request[Result]) -> None:
        """``request`` (from :meth:`send_nowait`) is written: its reply is owed."""
        self._owed.append(request.uid)

    def _number(self, request: Request[Any]) -> bytes:
        uid = self._uid = next_uid(self._uid)
        request.uid = uid
        data = request.data = encode_request(uid, request.operation, request.payload)
        return data

    # ------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Request[Any]]:
        """Take received bytes; the awaited requests they finish, in reply order."""
        try:
            messages = self._decoder.feed(data)
        except ProtocolError as exc:
            raise ClientError(f"malformed reply from {self.peer}: {exc.reason}") from exc
        waiting = self._waiting
        done: list[Request[Any]] = []
        for _, uid, operation, payload in messages:
            if self._owed:
                self._settle(uid, operation, payload)
                continue
            request = waiting.pop(uid, None)
            if request is None:
                raise ClientError(
                    f"{self.peer} sent a {operation.name} reply to uid {uid:#x}, "
                    "which is not in flight"
                )
            if operation is not request.operation:
                request.error = ClientError(
                    f"reply (uid {uid:#x}, {operation.name}) does not match "
                    f"the request (uid {uid:#x}, {request.operation.name})"
                )
            elif is_unavailable_reply(payload):
                request.error = _unavailable(payload)
            else:
                try:
                    request.value = request.parse(payload)
                except ProtocolError as exc:
                    request.error = ClientError(exc.reason)
            request.done = True
            done.append(request)
        if not waiting and not self._owed and self._decoder.in_message:
            raise ClientError(f"{self.peer} sent a reply nobody asked for")
        return done

    def _settle(self, uid: int, operation: Operation, payload: bytes) -> None:
        """Check the oldest owed ADD reply; replies come in request order."""
        expected = self._owed[0]
        if uid != expected or operation is not Operation.ADD:
            raise ClientError(
                f"reply (uid {uid:#x}, {operation.name}) from {self.peer} does not match "
                f"the owed ADD reply (uid {expected:#x})"
            )
        if is_unavailable_reply(payload):
            stored = False  # the write is lost; the connection is fine
        else:
            try:
                stored = parse_add_reply(payload) in STORED_RESULTS
            except ProtocolError as exc:
                raise ClientError(f"malformed owed reply from {self.peer}: {exc.reason}") from exc
        self._owed.popleft()
        if stored:
            self.write_confirmations += 1
        else:
            self.write_failures += 1

    # ------------------------------------------------------------ state

    @property
    def owed(self) -> int:
        """Replies to :meth:`owe`-d ADDs not read yet."""
        return len(self._owed)

    @property
    def reply_started(self) -> bool:
        """Whether bytes of an awaited reply (after every owed one) have arrived.

        Until they have, a request on a connection that broke can be sent again
        on a fresh one: the server never answered it.
        """
        return not self._owed and self._decoder.in_message

    def take_write_failures(self) -> int:
        """:attr:`write_failures`, reset to zero: each failure is reported once."""
        n, self.write_failures = self.write_failures, 0
        return n

    def take_write_confirmations(self) -> int:
        """:attr:`write_confirmations`, reset to zero: each confirmation is reported once."""
        n, self.write_confirmations = self.write_confirmations, 0
        return n

    def abandon(self) -> int:
        """The connection is closing: forget what is in flight.

        Returns the write failures not yet taken, the owed replies that will now
        never be read included.
        """
        self.write_failures += len(self._owed)
        self._owed.clear()
        self._waiting.clear()
        return self.take_write_failures()


def _unavailable(payload: bytes) -> ServerUnavailable:
    if not payload:
        return ServerUnavailable("the proxy has no connection to the cache server (empty reply)")
    return ServerUnavailable("the proxy lost its cache server with the request outstanding")
