"""Typed records of what the farm's processes report, and their JSON form.

A backend and the balancer serve their status as JSON; the orchestrator turns that JSON back
into these records once, where it reads it (:func:`decode`), and everything after that (the
status pages, the report) works on typed fields. The JSON that the farm serves is
:func:`encode` of the same records, so machines and people see the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    TypeVar,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from tlscache import CacheStats
from tlscache.latency import nearest_rank

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

R = TypeVar("R")


@dataclass(frozen=True)
class Percentiles:
    """p50 and p99 in ms; None without samples (rather than a misleading zero)."""

    p50: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, samples: Iterable[float]) -> Percentiles:
        ordered = sorted(samples)
        return cls(nearest_rank(ordered, 0.5), nearest_rank(ordered, 0.99))

    def text(self) -> str:
        """``p50 / p99`` with two decimals, ``-`` without samples."""
        if self.p50 is None or self.p99 is None:
            return "-"
        return f"{self.p50:.2f} / {self.p99:.2f}"


@dataclass(frozen=True)
class HandshakeCounts:
    full: int = 0
    resumed: int = 0
    failed: int = 0


@dataclass(frozen=True)
class HandshakeLatency:
    """Server-side handshake time, full and resumed."""

    full: Percentiles = field(default_factory=Percentiles)
    resumed: Percentiles = field(default_factory=Percentiles)


@dataclass(frozen=True)
class Handshake:
    """One recent handshake as its backend saw it."""

    time: float
    peer: str
    resumed: bool
    version: str
    session_id: str | None
    handshake_ms: float
    backend: str | None = None  # set where handshakes of several backends are merged
    made_by: str | None = None  # resumed: the backend that made the session, as the client said


@dataclass(frozen=True)
class ConnectionInfo:
    """What ``/info`` tells a client about its own connection."""

    backend: str
    pid: int
    tls_version: str
    cipher: str | None
    resumed: bool
    session_id: str | None
    request_on_connection: int
    cache_mode: str
    cache: CacheStats | None


@dataclass(frozen=True)
class StoreServer:
    """One server of a backend's store: its health as that backend sees it, and how many
    sessions this backend stored on it (counted per ``server_for`` at each write)."""

    address: str
    up: bool
    failures: int
    retry_in_s: float | None
    keys: int


@dataclass(frozen=True)
class CacheServerEntry:
    """One cache server of the farm (memcached, redis-server): its health as the backends see
    it, and its share of the sessions they stored."""

    name: str
    address: str
    up: bool  # every backend that answered sees it up
    failures: int  # the most consecutive failures any backend counts
    keys: int  # sessions the backends stored on it
    share: float | None  # keys / sessions stored on all cache servers; None before any
    down_for: list[str] = field(default_factory=list)  # backends that skip it now


@dataclass(frozen=True)
class TicketStatus:
    """A backend's session-ticket keys (:class:`tlscache.ticketkeys.TicketKeyStats`): counters
    since start and the state now. ``decrypted + renewed`` is the handshakes resumed by ticket."""

    issued: int
    decrypted: int
    renewed: int
    rejected: int
    failed: int
    rotations: int
    store_failures: int
    local_keys: int
    retired: int
    keys_held: int
    current_period: int | None
    current_shared: bool  # the key issuing now is the farm's shared one (else local)
    period_s: float

    @property
    def resumed(self) -> int:
        """Handshakes resumed by ticket."""
        return self.decrypted + self.renewed


@dataclass(frozen=True)
class BackendStatus:
    """One backend, as its ``/status.json`` says."""

    name: str
    pid: int
    listen: str
    admin: str
    tls: str
    cache_mode: str
    dc_address: str | None
    uptime_s: float
    connections: int
    active: int
    requests: int
    handshakes: HandshakeCounts
    by_version: dict[str, int]
    recent: list[Handshake]
    handshake_ms: HandshakeLatency
    cache: CacheStats | None
    cache_error: str | None = None
    keys: str | None = None  # the key ring that seals its sessions
    store: str | None = None  # its store string (memcached/Redis modes)
    store_servers: list[StoreServer] = field(default_factory=list)
    resumption: str = "stateful"  # stateful, stateless or both (tlscache.resumption)
    tickets: TicketStatus | None = None  # None: no shared ticket keys (stateful)
    kind: str = "threaded"  # the server it runs as (--backend-kinds)
    # Resumed handshakes by the backend that made the session, as the clients named it
    # (handshakes.MADE_BY_HEADER); "unknown" where none did.
    resumed_from: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ResumptionCell:
    """Resumed handshakes of sessions made by ``made_by`` and resumed by ``resumed_by`` (two
    backend kinds, or two backend names)."""

    made_by: str
    resumed_by: str
    count: int


@dataclass(frozen=True)
class Resumptions:
    """Who resumed whose sessions in a farm (:func:`.kinds.farm_resumptions`): every pair of
    the kinds in use, and every pair of backends with a resumption."""

    kinds: list[str] = field(default_factory=list)  # the kinds in use, in --backend-kinds order
    by_kind: list[ResumptionCell] = field(default_factory=list)
    by_backend: list[ResumptionCell] = field(default_factory=list)
    unknown: int = 0  # resumptions whose maker no client named

    def by_kind_dict(self) -> dict[tuple[str, str], int]:
        return {(c.made_by, c.resumed_by): c.count for c in self.by_kind}

    def by_backend_dict(self) -> dict[tuple[str, str], int]:
        return {(c.made_by, c.resumed_by): c.count for c in self.by_backend}


@dataclass(frozen=True)
class BalancerBackend:
    """What the balancer counted for one backend."""

    address: str
    connections: int
    active: int
    connect_failures: int
    bytes_up: int
    bytes_down: int


@dataclass(frozen=True)
class BalancerStatus:
    pid: int
    uptime_s: float
    strategy: str
    accepted: int
    rejected: int
    backends: list[BalancerBackend]


@dataclass(frozen=True)
class BackendEntry:
    """A backend of the farm and its status (None: it did not answer)."""

    name: str
    address: str
    status: BackendStatus | None


@dataclass(frozen=True)
class ProcessInfo:
    """One child process of the farm."""

    name: str
    pid: int | None
    state: str
    address: str
    log: str


@dataclass(frozen=True)
class FarmStatus:
    """The whole farm, for its status page, ``/status.json`` and the report."""

    balancer_url: str
    tls: str
    cache: str
    dc_server: str | None
    run_dir: str
    balancer: BalancerStatus | None
    backends: list[BackendEntry]
    processes: list[ProcessInfo]
    keys: str | None = None  # the run's key ring, handed to every backend
    balancer_status: str | None = None  # the balancer's plain-HTTP status URL
    cache_servers: list[CacheServerEntry] = field(default_factory=list)
    resumption: str = "stateful"
    resumptions: Resumptions = field(default_factory=Resumptions)  # who resumed whose

    def caches(self) -> list[CacheStats]:
        """The cache statistics of every backend that answered and has a cache."""
        return [b.status.cache for b in self.backends if b.status and b.status.cache]


# -- JSON ----------------------------------------------------------------------------------------


def encode(record: DataclassInstance, indent: int | None = None) -> bytes:
    """A record as one line of JSON (indented on request), newline-terminated."""
    data = dataclasses.asdict(record)
    separators = (",", ":") if indent is None else None
    return json.dumps(data, indent=indent, separators=separators).encode() + b"\n"


def decode(cls: type[R], text: str | bytes) -> R:
    """The record of type ``cls`` that ``text`` holds; ValueError if it does not fit."""
    value: R = _convert(cls, json.loads(text))
    return value


def _convert(tp: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as type ``tp``: dataclasses, unions, lists, tuples, dicts."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ValueError(f"{tp.__name__}: expected an object, got {value!r:.40}")
        hints = get_type_hints(tp)
        kwargs = {
            f.name: _convert(hints[f.name], value[f.name])
            for f in dataclasses.fields(tp)
            if f.name in value
        }
        try:
            return tp(**kwargs)
        except TypeError as exc:  # a field without default is missing
            raise ValueError(f"{tp.__name__}: {exc}") from None
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(arg, value)
                except ValueError:
                    continue
        raise ValueError(f"{value!r:.40} fits none of {tp}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{value!r:.40} is not one of {args}")
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r:.40}")
        items = [_convert(args[0], v) for v in value]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected an object, got {value!r:.40}")
        return {str(k): _convert(args[1], v) for k, v in value.items()}
    return _scalar(tp, value)


def _scalar(tp: Any, value: Any) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ValueError(f"expected {getattr(tp, '__name__', tp)}, got {value!r:.40}")
