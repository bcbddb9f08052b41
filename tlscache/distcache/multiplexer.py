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
  upstream connection;
* the one upstream connection is shared by every TLS server on the host, so
  no local client may endanger it or starve the others: a request dc_server
  would close the connection for (an ADD payload under 8 bytes) closes the
  local client instead of being forwarded; a client gets at most
  ``client_in_flight`` upstream slots, scarce slots go round-robin; a client
  whose unsent answers pass ``client_output_budget`` gets nothing more
  forwarded and is closed if it does not drain within ``write_stall_ms``;
  answers buffered for all clients together are capped at ``max_buffered``
  (the biggest holders are closed first); at ``max_clients`` a new connection
  displaces the longest-idle one (idle at least ``evict_idle_ms``) rather
  than being turned away;
* reports of what a crowd of clients can trigger over and over are limited
  to ``LOG_BURST`` per kind per ``LOG_INTERVAL`` seconds; the rest are
  counted and reported as one :class:`Suppressed` per interval.

Pipelining is only safe with a server that says so: the C dc_server drops the
connection when a request arrives while a large reply is still being written.
So (``ProxyLimits.pipeline == "probe"``, the default) every new upstream
connection starts with one capability probe (a GET for ``PROBE_PREFIX +
nonce``, a harmless miss to C) and nothing else; until its answer arrives, and
for good if the answer is not ours, one request is forwarded at a time. A
local client's probe is answered here with the capabilities of the path
(pipelining always, TAKE if the upstream has it); a TAKE the upstream cannot do
closes the local client, as a server closes the connection for an operation
it does not know. ADD and REMOVE under the reserved prefix are answered here
(``0x67`` and ``0x01``) and never forwarded, so no probe answer can be planted
through the proxy.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, NamedTuple, TypeAlias, TypeVar, cast

from tlscache.distcache.protocol import (
    ADD_PREFIX,
    MAX_UID,
    RESULT_BYTES,
    Capabilities,
    Decoder,
    Message,
    MessageFields,
    Operation,
    Result,
    encode_renumbered,
    is_reserved_add,
    is_reserved_id,
    new_probe_nonce,
    parse_probe_reply,
    probe_id,
    probe_nonce,
    probe_reply,
)

T = TypeVar("T")

DEFAULT_RETRY_MS = 5000
DEFAULT_REQUEST_TIMEOUT_MS = 1000
DEFAULT_MAX_IN_FLIGHT = 512
#: Request bytes outstanding upstream. A request waits behind at most this much of
#: other clients' work at the server (plus one round of the round-robin), so a few
#: clients pipelining 32 KiB ADDs cannot put megabytes ahead of everyone's lookups.
DEFAULT_MAX_IN_FLIGHT_BYTES = 64 * 1024
DEFAULT_MAX_CLIENTS = 1024
DEFAULT_CLIENT_IN_FLIGHT = 16
DEFAULT_CLIENT_OUTPUT_BUDGET = 256 * 1024
DEFAULT_WRITE_STALL_MS = 10_000
DEFAULT_MAX_BUFFERED = 32 * 1024 * 1024
DEFAULT_EVICT_IDLE_MS = 1000

#: Reports of one kind logged per interval; the rest are counted (see :class:`Suppressed`).
LOG_BURST = 3
LOG_INTERVAL = 10.0

_ADD = Operation.ADD
_GET = Operation.GET
_REMOVE = Operation.REMOVE
_TAKE = Operation.TAKE
_PROBE_START = b"\x00"  # the first byte of PROBE_PREFIX: a cheap test before the full one


class _Screened(enum.Enum):
    """What :meth:`Multiplexer._screen` made of a request."""

    FORWARD = "forward"
    HANDLED = "answered here"
    DROPPED = "client closed"


_FORWARD, _HANDLED, _DROPPED = _Screened.FORWARD, _Screened.HANDLED, _Screened.DROPPED

#: How dc_client decides whether to pipeline upstream: "probe" asks the server
#: after each connect; "on" and "off" take the operator's word and learn nothing
#: (so no TAKE is offered).
PipelineMode: TypeAlias = Literal["probe", "on", "off"]
#: dc_server closes the connection for an ADD payload shorter than this
#: (:func:`~tlscache.distcache.protocol.parse_add_request` raises); every other
#: malformed request is refused by the local client's decoder already.
_MIN_ADD_PAYLOAD = ADD_PREFIX.size


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
    """A local client sent bytes that are not distcache requests, or a request
    dc_server would close the shared connection for: close it (log it if ``log``)."""

    client: T
    number: int
    reason: str
    log: bool = True


class Eviction(enum.Enum):
    """Why a well-formed local client is closed to protect the others."""

    DISPLACED = "idle connection displaced by a new one at the maximum"
    STALLED = "connection closed: does not read its answers"
    OVER_BUFFER = "connection closed: holds the most unsent answers, total over the cap"


@dataclass(frozen=True, slots=True)
class ClientEvicted(Generic[T]):
    """Abort a local client (``cause``); its buffered output is dropped, not flushed."""

    client: T
    number: int
    cause: Eviction
    log: bool


@dataclass(frozen=True, slots=True)
class Suppressed:
    """``count`` more reports of ``what`` in the last ``seconds`` were not logged one by one."""

    what: str
    count: int
    seconds: float


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
    | ClientEvicted[T]
    | Suppressed
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
        "blocked",
        "blocked_since",
        "buffered",
        "closed",
        "ctx",
        "decoder",
        "early",
        "in_ready",
        "last_active",
        "number",
        "out",
        "share",
        "unsent",
        "waiting",
    )

    def __init__(self, ctx: T, number: int, now: float, share: int) -> None:
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
        self.buffered = 0  # unsent answer bytes, as the shell last reported them
        self.blocked = False  # over its output budget: nothing more is forwarded
        # Upstream slots it may hold: ``client_in_flight``, 0 while blocked (one
        # attribute for the forwarding path to read).
        self.share = share
        self.blocked_since = 0.0

    @property
    def in_flight(self) -> int:
        """Requests forwarded and not yet answered to the client, at most ``client_in_flight``.

        Counted from the queues rather than kept as a counter, which would cost
        the fast path a store per request; answers that arrived early count
        until they are delivered.
        """
        return len(self.waiting) - len(self.unsent)

    @property
    def backlog(self) -> int:
        """Requests received from this client and not yet answered (for backpressure)."""
        return len(self.waiting)


def _answer(request: MessageFields, payload: bytes) -> _Outgoing:
    """The proxy's own answer to ``request`` (no server, or the server went away)."""
    _, uid, operation, _ = request
    return uid, Message(True, uid, operation, payload)


_NO_SERVER = b""  # dc_client's answer when it has no server connection
#: A closed client's decoder: bytes after the close are ignored, never buffered.
_CLOSED_DECODER = Decoder(expect_response=False, fields=True)
_DISCONNECTED = RESULT_BYTES[Result.DISCONNECTED]  # ... when it lost it mid-request


@dataclass(slots=True)
class Stats:
    """Counters the tests read."""

    discarded: int = 0  # upstream answers for clients that had gone
    rejected_clients: int = 0
    bad_requests: int = 0  # clients closed for bad bytes or a request unsafe to forward
    displaced: int = 0  # idle clients closed to make room at max_clients
    stalled: int = 0  # clients closed for not reading their answers
    over_buffer: int = 0  # clients closed to bring the total buffered under the cap
    suppressed_logs: int = 0
    probes_sent: int = 0  # capability probes sent upstream
    answered_locally: int = 0  # local probes and reserved-id ADD/REMOVE, never forwarded
    refused_takes: int = 0  # clients closed for a TAKE the upstream cannot do


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """dc_client's policy, one value object shared by the core, the shell and the CLI."""

    retry_ms: int = DEFAULT_RETRY_MS  # between attempts to reach the server
    idle_ms: int = 0  # close a local connection idle this long (0: never)
    request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS  # answer 0x02 after this long
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # requests outstanding upstream
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES  # their bytes (one always goes)
    max_clients: int = DEFAULT_MAX_CLIENTS  # local connections at once
    client_in_flight: int = DEFAULT_CLIENT_IN_FLIGHT  # upstream slots of one connection
    client_output_budget: int = DEFAULT_CLIENT_OUTPUT_BUDGET  # unsent answers of one
    write_stall_ms: int = DEFAULT_WRITE_STALL_MS  # over budget this long: closed
    max_buffered: int = DEFAULT_MAX_BUFFERED  # unsent answers of all connections
    evict_idle_ms: int = DEFAULT_EVICT_IDLE_MS  # at the cap, idle this long: displaceable
    pipeline: PipelineMode = "probe"  # see PipelineMode

    def __post_init__(self) -> None:
        if self.pipeline not in ("probe", "on", "off"):
            raise ValueError(f"pipeline must be 'probe', 'on' or 'off', not {self.pipeline!r}")
        if (
            min(
                self.max_in_flight,
                self.max_in_flight_bytes,
                self.max_clients,
                self.retry_ms,
                self.client_in_flight,
            )
            < 1
        ):
            raise ValueError(
                "max_in_flight, max_in_flight_bytes, max_clients, client_in_flight and "
                "retry_ms must be positive"
            )
        if (
            min(self.client_output_budget, self.write_stall_ms, self.max_buffered) < 1
            or self.evict_idle_ms < 0
        ):
            raise ValueError("output budget, stall timeout and buffer cap must be positive")


class Multiplexer(Generic[T]):
    """The sans-IO proxy core. ``now`` arguments are monotonic seconds.

    ``nonce`` makes the random part of each capability probe (injected for tests).
    """

    def __init__(
        self, limits: ProxyLimits | None = None, nonce: Callable[[], bytes] = new_probe_nonce
    ) -> None:
        limits = ProxyLimits() if limits is None else limits
        self.limits = limits
        self.retry = limits.retry_ms / 1000.0
        self.idle = limits.idle_ms / 1000.0
        self.request_timeout = limits.request_timeout_ms / 1000.0
        self.max_in_flight = limits.max_in_flight
        self.max_in_flight_bytes = limits.max_in_flight_bytes
        self.max_clients = limits.max_clients
        self.client_in_flight = limits.client_in_flight
        self.client_output_budget = limits.client_output_budget
        #: A blocked client is forwarded to again once its output is down to this.
        self.client_output_low = limits.client_output_budget // 4
        self.write_stall = limits.write_stall_ms / 1000.0
        self.max_buffered = limits.max_buffered
        self.evict_idle = limits.evict_idle_ms / 1000.0
        self.stats = Stats()
        self.buffered = 0  # unsent answer bytes of all clients together
        # Clients over their output budget, in the order they became so.
        self._blocked: dict[LocalClient[T], None] = {}
        # Rate-limited reports: the current window, counts logged and suppressed.
        self._log_window_end = 0.0
        self._logged: dict[str, int] = {}
        self._suppressed: dict[str, int] = {}
        self._log_due: float | None = None
        self.state = Upstream.DOWN
        self._uid = 1  # the next upstream uid: 1, 2, 3, ... for the life of the proxy
        self._next_attempt = 0.0  # the first attempt is due at once
        self._outage_reported = False
        self._clients: dict[LocalClient[T], None] = {}
        self._numbers = 0
        # Upstream uid -> (client, its request, time sent), in send order.
        self._inflight: dict[int, tuple[LocalClient[T], MessageFields, float]] = {}
        self._inflight_bytes = 0  # payload bytes of those requests
        self._ready: deque[LocalClient[T]] = deque()  # clients with unsent requests
        self._up_decoder = Decoder(expect_response=True, fields=True)
        # Output, until drain().
        self._events: list[Event[T]] = []
        self._up_out: list[_Outgoing] = []
        self._dirty: list[LocalClient[T]] = []  # clients with answers in ``out``
        # No idle client can expire before this (None: no client to watch).
        self._idle_due: float | None = None
        self._new_nonce = nonce
        #: What the upstream offers: None while down or while its probe is unanswered.
        self.upstream_capabilities: Capabilities | None = None
        self._probe_nonce = b""
        # Stands for the probe in ``_inflight``: a closed client no answer is ever
        # delivered to, recognised by identity when the probe's answer comes.
        self._prober: LocalClient[T] = LocalClient(cast(T, None), 0, 0.0, 1)
        self._prober.closed = True
        # Local probes that came while the upstream's own was unanswered.
        self._probe_waiters: list[tuple[LocalClient[T], MessageFields]] = []
        # The upstream uid of the unanswered probe, and whether a client waits for it.
        self._probe_uid: int | None = None
        self._probe_waited = False

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
        """Register a new local connection; None means "at the limit, close it".

        At the limit the longest-idle client makes room if it has been idle for
        ``evict_idle``: idle connections must not lock out the active ones.
        """
        if len(self._clients) >= self.max_clients:
            victim = self._longest_idle(now)
            if victim is None:
                self.stats.rejected_clients += 1
                if self._may_log(
                    f"new connections rejected at the maximum ({self.max_clients})", now
                ):
                    self._events.append(ClientRejected(self.max_clients))
                return None
            self.stats.displaced += 1
            self._evict(victim, Eviction.DISPLACED, now)
        self._numbers += 1
        client = LocalClient(ctx, self._numbers, now, self.client_in_flight)
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
            self._bad_input(client, error.reason, now)
            return
        if not messages:
            return
        client.last_active = now
        waiting = client.waiting
        if self.state is not Upstream.UP:
            early = client.early
            for m in messages:
                if m[2] is _ADD and len(m[3]) < _MIN_ADD_PAYLOAD:
                    self._bad_add(client, m, now)
                    return
                waiting.append(m)
                early[id(m)] = _answer(m, _NO_SERVER)
            self._flush(client)
            if self.idle and not client.decoder.in_message:
                self._watch_idle(now + self.idle)
            return
        unsent = client.unsent
        inflight = self._inflight
        # Free slots, within this client's own share (what it has forwarded and
        # not had answered, see LocalClient.in_flight); none while it is blocked.
        room = self.max_in_flight - len(inflight)
        if self._inflight_bytes >= self.max_in_flight_bytes and inflight:
            room = 0
        own = client.share - len(waiting) + len(unsent)
        if own < room:
            room = own
        up_out = self._up_out
        uid = self._uid
        for m in messages:
            # GET, the commonest request, costs one byte compare; the rest a look each.
            if m[2] is not _GET or m[3][:1] == _PROBE_START:
                screened = self._screen(client, m, now)
                if screened is _DROPPED:
                    self._uid = uid
                    return
                if screened is _HANDLED:
                    continue
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
            size = self._inflight_bytes = self._inflight_bytes + len(m[3])
            if size >= self.max_in_flight_bytes:
                room = 0
        self._uid = uid
        if unsent and not client.in_ready:
            client.in_ready = True
            self._ready.append(client)
        if self._probe_uid is not None:
            self._probe_awaited(now)

    def _screen(self, client: LocalClient[T], m: MessageFields, now: float) -> _Screened:
        """Handle here what must not be forwarded as it is.

        An ADD dc_server would close the shared connection for closes the client
        instead; a local probe and ADD/REMOVE under the reserved prefix are
        answered here (in the client's order); a TAKE the upstream cannot do
        closes the client.
        """
        _, _, op, payload = m
        if op is _ADD:
            if len(payload) < _MIN_ADD_PAYLOAD:
                self._bad_add(client, m, now)
                return _DROPPED
            if is_reserved_add(payload):
                self._answer_here(client, m, RESULT_BYTES[Result.ADD_ID_RANGE])
                return _HANDLED
        elif op is _GET:
            nonce = probe_nonce(payload)
            if nonce is None:
                return _FORWARD
            caps = self.upstream_capabilities
            if caps is None:  # the upstream's own probe is unanswered: wait for it
                self.stats.answered_locally += 1
                client.waiting.append(m)
                self._probe_waiters.append((client, m))
            else:
                self._answer_here(client, m, probe_reply(nonce, self._path(caps)))
            return _HANDLED
        elif op is _REMOVE:
            if is_reserved_id(payload):
                self._answer_here(client, m, RESULT_BYTES[Result.NOTOK])
                return _HANDLED
        elif op is _TAKE:
            caps = self.upstream_capabilities
            if caps is not None and not caps.take:
                self._refuse_take(client, now)
                return _DROPPED
        return _FORWARD

    def _answer_here(self, client: LocalClient[T], m: MessageFields, payload: bytes) -> None:
        """Answer ``m`` without the server, after the client's earlier requests."""
        self.stats.answered_locally += 1
        client.waiting.append(m)
        client.early[id(m)] = _answer(m, payload)
        self._flush(client)

    @staticmethod
    def _path(upstream: Capabilities) -> Capabilities:
        """What a local client gets through this proxy: it pipelines safely itself."""
        return Capabilities(pipeline=True, take=upstream.take)

    def _refuse_take(self, client: LocalClient[T], now: float) -> None:
        self.stats.refused_takes += 1
        self._bad_input(client, "TAKE, which the cache server does not offer; not forwarded", now)

    def client_closed(self, client: LocalClient[T]) -> None:
        """The local connection is gone; answers still due to it are discarded."""
        if not client.closed:
            self._drop(client)

    def client_output(self, client: LocalClient[T], buffered: int, now: float) -> None:
        """The shell reports ``buffered`` bytes of answers not yet taken by the client.

        Over ``client_output_budget`` nothing more of the client's is forwarded
        (the shell stops reading it too) and the write-stall clock runs; down to
        a quarter of it, forwarding resumes. Over ``max_buffered`` in total, the
        clients holding the most are closed.
        """
        if client.closed:
            return
        self.buffered += buffered - client.buffered
        client.buffered = buffered
        if buffered > self.client_output_budget:
            if not client.blocked:
                client.blocked = True
                client.share = 0
                client.blocked_since = now
                self._blocked[client] = None
        elif client.blocked and buffered <= self.client_output_low:
            client.blocked = False
            client.share = self.client_in_flight
            del self._blocked[client]
            if client.unsent:
                if not client.in_ready:
                    client.in_ready = True
                    self._ready.append(client)
                if self.state is Upstream.UP:
                    self._pump(now)
        if self.buffered > self.max_buffered:
            self._shed(now)

    def _shed(self, now: float) -> None:
        """Close the clients holding the most output until the total is under the cap."""
        holders = sorted(
            (c for c in self._clients if c.buffered), key=lambda c: c.buffered, reverse=True
        )
        for c in holders:
            if self.buffered <= self.max_buffered:
                break
            self.stats.over_buffer += 1
            self._evict(c, Eviction.OVER_BUFFER, now)

    def _longest_idle(self, now: float) -> LocalClient[T] | None:
        """The client idle longest, if idle for ``evict_idle``: nothing owed, nothing buffered."""
        best: LocalClient[T] | None = None
        limit = now - self.evict_idle
        for c in self._clients:
            if (
                c.last_active <= limit
                and not c.waiting
                and not c.buffered
                and (best is None or c.last_active < best.last_active)
            ):
                best = c
        return best

    def _evict(self, client: LocalClient[T], cause: Eviction, now: float) -> None:
        self._drop(client)
        log = self._may_log(cause.value, now)
        self._events.append(ClientEvicted(client.ctx, client.number, cause, log))

    def _bad_input(self, client: LocalClient[T], reason: str, now: float) -> None:
        self.stats.bad_requests += 1
        self._drop(client)
        log = self._may_log("local connections closed for bad data", now)
        self._events.append(BadInput(client.ctx, client.number, reason, log))

    def _bad_add(self, client: LocalClient[T], m: MessageFields, now: float) -> None:
        reason = (
            f"ADD (uid {m[1]:#x}) payload of {len(m[3])} bytes is shorter than its "
            f"{_MIN_ADD_PAYLOAD}-byte prefix; not forwarded"
        )
        self._bad_input(client, reason, now)

    def _drop(self, client: LocalClient[T]) -> None:
        client.closed = True
        self._clients.pop(client, None)
        client.waiting.clear()
        client.unsent.clear()
        client.early.clear()
        client.out.clear()
        # Give back what a big burst may have grown: the decoder's buffer and fragments.
        client.decoder = _CLOSED_DECODER
        if client.buffered:
            self.buffered -= client.buffered
            client.buffered = 0
        if client.blocked:
            client.blocked = False
            del self._blocked[client]
        # In-flight requests stay in the table: their answers must still be
        # consumed in order, then they are discarded.

    def _may_log(self, what: str, now: float) -> bool:
        """True if a report of ``what`` may be logged now; else count it for the summary."""
        if now >= self._log_window_end:
            self._report_suppressed()
            self._log_window_end = now + LOG_INTERVAL
            self._logged.clear()
        logged = self._logged.get(what, 0)
        if logged < LOG_BURST:
            self._logged[what] = logged + 1
            return True
        self._suppressed[what] = self._suppressed.get(what, 0) + 1
        self.stats.suppressed_logs += 1
        self._log_due = self._log_window_end
        return False

    def _report_suppressed(self) -> None:
        for what, count in self._suppressed.items():
            self._events.append(Suppressed(what, count, LOG_INTERVAL))
        self._suppressed.clear()
        self._log_due = None

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
        mode = self.limits.pipeline
        if mode != "probe":
            self.upstream_capabilities = Capabilities(pipeline=mode == "on", take=False)
            self.max_in_flight = self.limits.max_in_flight if mode == "on" else 1
            return
        # The probe goes first and alone: nothing is forwarded until it is answered.
        self.upstream_capabilities = None
        self.max_in_flight = 1
        nonce = self._probe_nonce = self._new_nonce()
        uid = self._uid
        while uid in self._inflight:
            uid = (uid + 1) & MAX_UID
        self._uid = (uid + 1) & MAX_UID
        probe: MessageFields = (False, uid, _GET, probe_id(nonce))
        self._inflight[uid] = (self._prober, probe, now)
        self._inflight_bytes += len(probe[3])
        self._up_out.append((uid, probe))
        self._probe_uid = uid
        self._probe_waited = False
        self.stats.probes_sent += 1

    def _probe_awaited(self, now: float) -> None:
        """A client now waits for the unanswered probe: its request timeout starts now.

        The timeout measures how long a client waits, so a probe nobody waits
        for never resets the connection, and the first request queued behind it
        gets the full ``request_timeout``.
        """
        uid = self._probe_uid
        if uid is not None and not self._probe_waited:
            self._probe_waited = True
            prober, probe, _ = self._inflight[uid]
            self._inflight[uid] = (prober, probe, now)

    def _probe_answered(self, payload: bytes, now: float) -> None:
        """The upstream answered its probe: set the in-flight limit, settle what waited."""
        self._probe_uid = None
        caps = parse_probe_reply(self._probe_nonce, payload)
        self.upstream_capabilities = caps
        self.max_in_flight = self.limits.max_in_flight if caps.pipeline else 1
        if not caps.take:
            for c in [c for c in self._clients if any(m[2] is _TAKE for m in c.unsent)]:
                self._refuse_take(c, now)
        waiters, self._probe_waiters = self._probe_waiters, []
        path = self._path(caps)
        for c, m in waiters:
            nonce = probe_nonce(m[3])
            if c.closed or nonce is None:
                continue
            c.early[id(m)] = _answer(m, probe_reply(nonce, path))
            self._flush(c)
            if self.idle:
                self._watch_idle(c.last_active + self.idle)

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
        # Requests held back only by the probe were accepted by a connected proxy:
        # for their clients the server went away with them outstanding.
        held = _DISCONNECTED if self._probe_uid is not None else _NO_SERVER
        self._probe_uid = None
        self.upstream_capabilities = None
        touched: dict[LocalClient[T], None] = {}
        for c, m in self._probe_waiters:
            if not c.closed:
                c.early[id(m)] = _answer(m, _DISCONNECTED)
                touched[c] = None
        self._probe_waiters.clear()
        for c, m, _ in self._inflight.values():
            if not c.closed:
                c.early[id(m)] = _answer(m, _DISCONNECTED)
                touched[c] = None
        self._inflight.clear()
        self._inflight_bytes = 0
        # Every client, not just the ready ones: a blocked or capped one may be waiting too.
        for c in self._clients:
            c.in_ready = False
            if c.unsent:
                for m in c.unsent:
                    c.early[id(m)] = _answer(m, held)
                c.unsent.clear()
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
            _, client_uid, request_op, payload = request
            self._inflight_bytes -= len(payload)
            if op is not request_op:
                inflight[uid] = entry  # answered 0x02 with the rest
                self._reset_upstream(
                    now, f"answer to request_uid {uid} has operation {op}, expected {request_op}"
                )
                return
            if c.closed:
                if c is self._prober:
                    self._probe_answered(answer[3], now)
                    continue
                self.stats.discarded += 1
                continue
            if c.unsent and not c.in_ready and not c.blocked:
                c.in_ready = True  # a slot of its own share is free again
                self._ready.append(c)
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
        share = self.client_in_flight
        cap = self.max_in_flight_bytes
        while (
            ready
            and len(inflight) < self.max_in_flight
            and (self._inflight_bytes < cap or not inflight)
        ):
            c = ready.popleft()
            if c.closed or not c.unsent or c.blocked or len(c.waiting) - len(c.unsent) >= share:
                # Back in the queue when it has work, an answer frees a slot of
                # its share, or its output drains (see upstream_data, client_output).
                c.in_ready = False
                continue
            m = c.unsent.popleft()
            uid = self._uid
            while uid in inflight:
                uid = (uid + 1) & MAX_UID
            self._uid = (uid + 1) & MAX_UID
            inflight[uid] = (c, m, now)
            self._inflight_bytes += len(m[3])
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
            if self._inflight and (self._probe_waited or self._probe_uid is None):
                _, _, sent = next(iter(self._inflight.values()))
                due = sent + self.request_timeout
        elif state is Upstream.DOWN:
            due = self._next_attempt
        idle_due = self._idle_due
        if idle_due is not None and (due is None or idle_due < due):
            due = idle_due
        if self._blocked:
            first = next(iter(self._blocked))
            stall_due = first.blocked_since + self.write_stall
            if due is None or stall_due < due:
                due = stall_due
        log_due = self._log_due
        if log_due is not None and (due is None or log_due < due):
            due = log_due
        return due

    def handle_timer(self, now: float) -> None:
        """Time-driven work: upstream request timeout, idle clients, reconnect."""
        inflight = self._inflight
        if (
            inflight
            and self.state is Upstream.UP
            and (self._probe_waited or self._probe_uid is None)  # see _probe_awaited
        ):
            _, _, sent = next(iter(inflight.values()))
            if now >= sent + self.request_timeout:
                self._reset_upstream(
                    now,
                    f"no answer within {self.request_timeout * 1000:g} ms "
                    f"({len(inflight)} requests outstanding)",
                )
        if self._idle_due is not None and now >= self._idle_due:
            self._close_idle(now)
        if self._blocked:
            stall = self.write_stall
            for c in list(self._blocked):
                if now < c.blocked_since + stall:
                    break  # in the order they became blocked
                self.stats.stalled += 1
                self._evict(c, Eviction.STALLED, now)
        if self._log_due is not None and now >= self._log_due:
            self._report_suppressed()
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
    "DEFAULT_CLIENT_IN_FLIGHT",
    "DEFAULT_CLIENT_OUTPUT_BUDGET",
    "DEFAULT_EVICT_IDLE_MS",
    "DEFAULT_MAX_BUFFERED",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_IN_FLIGHT_BYTES",
    "DEFAULT_REQUEST_TIMEOUT_MS",
    "DEFAULT_RETRY_MS",
    "DEFAULT_WRITE_STALL_MS",
    "LOG_BURST",
    "LOG_INTERVAL",
    "BadInput",
    "ClientEvicted",
    "ClientIdle",
    "ClientRejected",
    "ConnectUpstream",
    "Event",
    "Eviction",
    "LocalClient",
    "Multiplexer",
    "Output",
    "PipelineMode",
    "ResetUpstream",
    "Stats",
    "Suppressed",
    "Upstream",
    "UpstreamLost",
    "UpstreamRestored",
]
