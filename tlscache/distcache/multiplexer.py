"""dc_client's multiplexer: many local connections over one upstream connection.

This is the proxy's protocol logic with no I/O and no clock of its own. The
shell (:mod:`tlscache.distcache.proxy`) reports what happens -- a local client
connected, sent bytes or went away; the upstream connected, sent bytes or
dropped; a deadline passed -- each with the current monotonic time, and then
calls :meth:`Multiplexer.drain`, the one way anything comes out: bytes for the
upstream, bytes for local clients, and :data:`Event` values saying what to do
or report (connect the upstream, reset it, close a client, log an outage).
:meth:`Multiplexer.next_deadline` tells the shell when to call
:meth:`Multiplexer.handle_timer` next.

Wire behaviour is the C dc_client's: each forwarded request gets a fresh uid
from the proxy's own counter (1, 2, 3, ... never reset), its payload and
operation are forwarded unchanged, and the client's own uid is put back on the
answer. With no upstream connection every request is answered at once with an
empty payload; requests outstanding when the upstream drops are answered with
the one-byte result ``0x02``.

Where it deliberately differs from C:

* many requests are in flight upstream at once (pipelining, up to
  ``max_in_flight``), which is what lets one proxy connection carry the load
  of many clients; each client still gets its answers in its own order;
* a per-request upstream timeout: a server that accepts but never answers
  costs a client ``0x02`` after ``request_timeout_ms``, not a hang;
* a local client that vanishes mid-request, or sends garbage, is dropped
  alone (C aborts the whole proxy); a bad upstream reply resets only the
  upstream connection.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeAlias, TypeVar

from tlscache.distcache.protocol import (
    MAX_UID,
    RESULT_BYTES,
    Decoder,
    Message,
    MessageFields,
    Result,
    encode_renumbered,
)

T = TypeVar("T")

DEFAULT_RETRY_MS = 5000
DEFAULT_REQUEST_TIMEOUT_MS = 1000
DEFAULT_MAX_IN_FLIGHT = 512
DEFAULT_MAX_CLIENTS = 1024


class Upstream(enum.Enum):
    """The state of the connection to the server."""

    DOWN = "down"
    CONNECTING = "connecting"
    UP = "up"


# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ConnectUpstream:
    """Start connecting the upstream; report the outcome with
    :meth:`Multiplexer.upstream_connected` or :meth:`Multiplexer.upstream_failed`."""


@dataclass(frozen=True, slots=True)
class ResetUpstream:
    """Abort the upstream connection: the server broke the protocol or stopped answering.

    Its requests have been answered ``0x02`` already; bytes it still delivers are ignored.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamLost:
    """The upstream dropped (``connected``) or could not be reached, the first time in an
    outage; attempts go on every ``retry_ms``."""

    reason: str
    connected: bool
    retry_ms: float


@dataclass(frozen=True, slots=True)
class UpstreamRestored:
    """Connected again after a reported outage."""


@dataclass(frozen=True, slots=True)
class ClientRejected:
    """A local connection came in at the ``max_clients`` limit (the shell closed it)."""

    max_clients: int


@dataclass(frozen=True, slots=True)
class BadInput(Generic[T]):
    """A local client sent bytes that are not distcache requests: close it."""

    client: T
    number: int
    reason: str


@dataclass(frozen=True, slots=True)
class ClientIdle(Generic[T]):
    """A local client had nothing in progress for ``idle_ms``: close it."""

    client: T


Event: TypeAlias = (
    ConnectUpstream
    | ResetUpstream
    | UpstreamLost
    | UpstreamRestored
    | ClientRejected
    | BadInput[T]
    | ClientIdle[T]
)


class Output(NamedTuple, Generic[T]):
    """What :meth:`Multiplexer.drain` hands over: carry out ``events`` in order, then
    write ``upstream`` to the upstream connection and each of ``writes`` to its client."""

    events: Sequence[Event[T]]
    upstream: bytes
    writes: Sequence[tuple[T, bytes]]


# ---------------------------------------------------------------- state

#: A message and the uid it goes out under: requests go upstream under the
#: proxy's uids, answers go back under the client's own.
_Outgoing: TypeAlias = tuple[int, MessageFields]


class LocalClient(Generic[T]):
    """The core's view of one local connection; ``ctx`` is the shell's handle for it.

    Its requests are the decoder's records themselves (plain tuples of a
    :class:`~tlscache.distcache.protocol.Message`'s fields, the cheapest to
    build and unpack), kept until answered: identity, not value, tells two
    equal requests apart.
    """

    __slots__ = (
        "closed",
        "ctx",
        "decoder",
        "early",
        "in_ready",
        "last_active",
        "number",
        "out",
        "unsent",
        "waiting",
    )

    def __init__(self, ctx: T, number: int, now: float) -> None:
        self.ctx = ctx
        self.number = number
        self.decoder = Decoder(expect_response=False, fields=True)
        # Every request not yet answered to the client, in the client's order.
        self.waiting: deque[MessageFields] = deque()
        # The tail of ``waiting`` not yet forwarded upstream.
        self.unsent: deque[MessageFields] = deque()
        # Answers that must wait for an earlier request's: id(request) -> answer.
        self.early: dict[int, _Outgoing] = {}
        self.out: list[_Outgoing] = []  # answers due to the client, until drain()
        self.in_ready = False
        self.closed = False
        self.last_active = now

    @property
    def backlog(self) -> int:
        """Requests received from this client and not yet answered (for backpressure)."""
        return len(self.waiting)


def _answer(request: MessageFields, payload: bytes) -> _Outgoing:
    """The proxy's own answer to ``request`` (no server, or the server went away)."""
    _, uid, operation, _ = request
    return uid, Message(True, uid, operation, payload)


_NO_SERVER = b""  # dc_client's answer when it has no server connection
_DISCONNECTED = RESULT_BYTES[Result.DISCONNECTED]  # ... when it lost it mid-request


@dataclass(slots=True)
class Stats:
    """Counters the tests read."""

    discarded: int = 0  # upstream answers for clients that had gone
    rejected_clients: int = 0


class Multiplexer(Generic[T]):
    """The sans-IO proxy core. ``now`` arguments are monotonic seconds."""

    def __init__(
        self,
        retry_ms: int = DEFAULT_RETRY_MS,
        idle_ms: int = 0,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        if max_in_flight < 1 or max_clients < 1 or retry_ms < 1:
            raise ValueError("max_in_flight, max_clients and retry_ms must be positive")
        self.retry = retry_ms / 1000.0
        self.idle = idle_ms / 1000.0
        self.request_timeout = request_timeout_ms / 1000.0
        self.max_in_flight = max_in_flight
        self.max_clients = max_clients
        self.stats = Stats()
        self.state = Upstream.DOWN
        self._uid = 1  # the next upstream uid: 1, 2, 3, ... for the life of the proxy
        self._next_attempt = 0.0  # the first attempt is due at once
        self._outage_reported = False
        self._clients: dict[LocalClient[T], None] = {}
        self._numbers = 0
        # Upstream uid -> (client, its request, time sent), in send order.
        self._inflight: dict[int, tuple[LocalClient[T], MessageFields, float]] = {}
        self._ready: deque[LocalClient[T]] = deque()  # clients with unsent requests
        self._up_decoder = Decoder(expect_response=True, fields=True)
        # Output, until drain().
        self._events: list[Event[T]] = []
        self._up_out: list[_Outgoing] = []
        self._dirty: list[LocalClient[T]] = []  # clients with answers in ``out``
        # No idle client can expire before this (None: no client to watch).
        self._idle_due: float | None = None

    # ------------------------------------------------------------ inspection

    @property
    def clients(self) -> int:
        return len(self._clients)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def queued(self) -> int:
        return sum(len(c.unsent) for c in self._ready)

    # ------------------------------------------------------------ local side

    def add_client(self, ctx: T, now: float) -> LocalClient[T] | None:
        """Register a new local connection; None means "at the limit, close it"."""
        if len(self._clients) >= self.max_clients:
            self.stats.rejected_clients += 1
            self._events.append(ClientRejected(self.max_clients))
            return None
        self._numbers += 1
        client = LocalClient(ctx, self._numbers, now)
        self._clients[client] = None
        if self.idle:
            self._watch_idle(now + self.idle)
        return client

    def client_data(self, client: LocalClient[T], data: bytes, now: float) -> None:
        """Bytes from a local client: forward, queue or answer each whole request."""
        if client.closed:
            return
        messages, error = client.decoder.feed_fields(data)
        if error is not None:  # what came before the bad bytes is dropped with the client
            self._drop(client)
            self._events.append(BadInput(client.ctx, client.number, error.reason))
            return
        if not messages:
            return
        client.last_active = now
        waiting = client.waiting
        if self.state is not Upstream.UP:
            early = client.early
            for m in messages:
                waiting.append(m)
                early[id(m)] = _answer(m, _NO_SERVER)
            self._flush(client)
            if self.idle and not client.decoder.in_message:
                self._watch_idle(now + self.idle)
            return
        unsent = client.unsent
        inflight = self._inflight
        room = self.max_in_flight - len(inflight)
        up_out = self._up_out
        uid = self._uid
        for m in messages:
            waiting.append(m)
            if unsent or room <= 0:
                unsent.append(m)
                continue
            while uid in inflight:  # only after 2**32 requests with one stuck
                uid = (uid + 1) & MAX_UID
            inflight[uid] = (client, m, now)
            up_out.append((uid, m))
            uid = (uid + 1) & MAX_UID
            room -= 1
        self._uid = uid
        if unsent and not client.in_ready:
            client.in_ready = True
            self._ready.append(client)

    def client_closed(self, client: LocalClient[T]) -> None:
        """The local connection is gone; answers still due to it are discarded."""
        if not client.closed:
            self._drop(client)

    def _drop(self, client: LocalClient[T]) -> None:
        client.closed = True
        self._clients.pop(client, None)
        client.waiting.clear()
        client.unsent.clear()
        client.early.clear()
        client.out.clear()
        # In-flight requests stay in the table: their answers must still be
        # consumed in order, then they are discarded.

    # ------------------------------------------------------------ upstream side

    def upstream_connected(self, now: float) -> None:
        """The connection attempt asked for by :class:`ConnectUpstream` succeeded."""
        if self.state is Upstream.UP:
            return
        if self._outage_reported:
            self._events.append(UpstreamRestored())
        self._outage_reported = False
        self.state = Upstream.UP
        self._up_decoder = Decoder(expect_response=True, fields=True)
        self._up_out.clear()

    def upstream_failed(self, now: float, reason: str) -> None:
        """A connection attempt failed or the established connection dropped."""
        if self.state is Upstream.DOWN:
            return
        was_up = self.state is Upstream.UP
        self._go_down(now)
        if was_up or not self._outage_reported:
            self._events.append(UpstreamLost(reason, was_up, self.retry * 1000))
            self._outage_reported = True

    def _reset_upstream(self, now: float, reason: str) -> None:
        self._events.append(ResetUpstream(reason))
        self._outage_reported = True
        self._go_down(now)

    def _go_down(self, now: float) -> None:
        """Answer everything forwarded ``0x02`` and everything queued "no server"."""
        self.state = Upstream.DOWN
        self._next_attempt = now + self.retry
        self._up_out.clear()
        touched: dict[LocalClient[T], None] = {}
        for c, m, _ in self._inflight.values():
            if not c.closed:
                c.early[id(m)] = _answer(m, _DISCONNECTED)
                touched[c] = None
        self._inflight.clear()
        for c in self._ready:
            for m in c.unsent:
                c.early[id(m)] = _answer(m, _NO_SERVER)
            c.unsent.clear()
            c.in_ready = False
            touched[c] = None
        self._ready.clear()
        for c in touched:
            self._flush(c)
            if self.idle:
                self._watch_idle(c.last_active + self.idle)

    def upstream_data(self, data: bytes, now: float) -> None:
        """Bytes from the server: hand each answer to its client, in that client's order."""
        if self.state is not Upstream.UP:
            return
        messages, error = self._up_decoder.feed_fields(data)
        if error is not None:
            self._reset_upstream(now, f"bad data from the server ({error.reason})")
            return
        inflight = self._inflight
        dirty = self._dirty
        idle = self.idle
        for answer in messages:
            _, uid, op, _ = answer
            entry = inflight.pop(uid, None)
            if entry is None:
                self._reset_upstream(now, f"answer with unknown request_uid {uid}")
                return
            c, request, _ = entry
            _, client_uid, request_op, _ = request
            if op is not request_op:
                inflight[uid] = entry  # answered 0x02 with the rest
                self._reset_upstream(
                    now, f"answer to request_uid {uid} has operation {op}, expected {request_op}"
                )
                return
            if c.closed:
                self.stats.discarded += 1
                continue
            c.last_active = now
            waiting = c.waiting
            if waiting[0] is request:
                # Answered in the client's order (always, from a server that
                # answers in order): straight out.
                waiting.popleft()
                out = c.out
                if not out:
                    dirty.append(c)
                out.append((client_uid, answer))
                if c.early:
                    self._flush(c)
                elif idle and not waiting and not c.decoder.in_message:
                    self._watch_idle(now + idle)
            else:
                c.early[id(request)] = (client_uid, answer)
        if self._ready:
            self._pump(now)

    def _pump(self, now: float) -> None:
        """Fill free upstream slots from the waiting clients, round-robin."""
        ready = self._ready
        inflight = self._inflight
        while ready and len(inflight) < self.max_in_flight:
            c = ready.popleft()
            if c.closed or not c.unsent:
                c.in_ready = False
                continue
            m = c.unsent.popleft()
            uid = self._uid
            while uid in inflight:
                uid = (uid + 1) & MAX_UID
            self._uid = (uid + 1) & MAX_UID
            inflight[uid] = (c, m, now)
            self._up_out.append((uid, m))
            if c.unsent:
                ready.append(c)
            else:
                c.in_ready = False

    def _flush(self, c: LocalClient[T]) -> None:
        """Move the answers now due to ``c``, in its order, to its output."""
        waiting = c.waiting
        early = c.early
        out = c.out
        was_empty = not out
        while waiting and id(waiting[0]) in early:
            out.append(early.pop(id(waiting.popleft())))
        if was_empty and out:
            self._dirty.append(c)

    # ------------------------------------------------------------ clock

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` next has work (a request timing out, a reconnect
        due, an idle client), or None if nothing is timed."""
        state = self.state
        due: float | None = None
        if state is Upstream.UP:
            if self._inflight:
                _, _, sent = next(iter(self._inflight.values()))
                due = sent + self.request_timeout
        elif state is Upstream.DOWN:
            due = self._next_attempt
        idle_due = self._idle_due
        if idle_due is not None and (due is None or idle_due < due):
            return idle_due
        return due

    def handle_timer(self, now: float) -> None:
        """Time-driven work: upstream request timeout, idle clients, reconnect."""
        inflight = self._inflight
        if inflight and self.state is Upstream.UP:
            _, _, sent = next(iter(inflight.values()))
            if now >= sent + self.request_timeout:
                self._reset_upstream(
                    now,
                    f"no answer within {self.request_timeout * 1000:g} ms "
                    f"({len(inflight)} requests outstanding)",
                )
        if self._idle_due is not None and now >= self._idle_due:
            self._close_idle(now)
        if self.state is Upstream.DOWN and now >= self._next_attempt:
            self.state = Upstream.CONNECTING
            self._next_attempt = now + self.retry
            self._events.append(ConnectUpstream())

    def _watch_idle(self, expiry: float) -> None:
        """A client may expire at ``expiry``: make sure a check is due by then."""
        if self._idle_due is None or expiry < self._idle_due:
            self._idle_due = expiry

    def _close_idle(self, now: float) -> None:
        """Close the clients idle for ``idle``; note when the next one can expire.

        A client with a request in progress is not idle; when its last answer
        arrives, :meth:`_watch_idle` brings the check forward as needed.
        """
        idle = self.idle
        due: float | None = None
        for c in list(self._clients):
            if c.waiting or c.decoder.in_message:
                continue
            expiry = c.last_active + idle
            if expiry <= now:
                self._drop(c)
                self._events.append(ClientIdle(c.ctx))
            elif due is None or expiry < due:
                due = expiry
        self._idle_due = due

    # ------------------------------------------------------------ output

    def drain(self) -> Output[T]:
        """Everything the shell must do now; clears the core's output."""
        events: Sequence[Event[T]] = self._events
        if events:
            self._events = []
        else:
            events = ()
        up = self._up_out
        if up:
            upstream = encode_renumbered(up)
            up.clear()
        else:
            upstream = b""
        dirty = self._dirty
        if not dirty:
            return Output(events, upstream, ())
        writes = []
        for c in dirty:
            out = c.out
            if out and not c.closed:
                writes.append((c.ctx, encode_renumbered(out)))
                out.clear()
        dirty.clear()
        return Output(events, upstream, writes)


__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_REQUEST_TIMEOUT_MS",
    "DEFAULT_RETRY_MS",
    "BadInput",
    "ClientIdle",
    "ClientRejected",
    "ConnectUpstream",
    "Event",
    "LocalClient",
    "Multiplexer",
    "Output",
    "ResetUpstream",
    "Stats",
    "Upstream",
    "UpstreamLost",
    "UpstreamRestored",
]
