"""The client workload of ``--report``: clients that connect once, then reconnect offering their
session, through the balancer. Python's ``ssl`` module is the client, as in many real programs.

Each connection fetches ``/info`` with ``Connection: close``: the answer says which backend served
it and the server then closes TLS cleanly, so the client's session stays valid. Reading the answer
before reconnecting also means the server has handed the new session to the cache by then. A
connection that offers a session names the backend that made it (``X-Tlscache-Made-By``), so
that the backends can count who resumed whose (:mod:`.handshakes`).
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .config import TlsVersion, WorkloadConfig
from .handshakes import MADE_BY_HEADER, UNKNOWN, claimed_maker
from .records import ConnectionInfo, Percentiles, decode

DEFAULT_WORKLOAD = WorkloadConfig()


@dataclass
class Sample:
    """One connection as the client saw it."""

    client: int
    attempt: int
    offered: bool
    resumed: bool
    backend: str | None
    origin: str | None  # backend where the offered session was made
    handshake_ms: float
    error: str | None = None


@dataclass(frozen=True)
class BackendTally:
    """Handshakes one backend made for the workload's clients."""

    full: int = 0
    resumed: int = 0


@dataclass(frozen=True)
class WorkloadSummary:
    """What the report prints of one run."""

    connections: int
    errors: int
    skipped: int
    offered: int  # connections that offered a session
    resumed: int  # of those, resumed
    resumed_elsewhere: int  # of those, on another backend than the session's origin
    rate: float  # resumed / offered
    per_backend: dict[str, BackendTally]
    full_ms: Percentiles
    resumed_ms: Percentiles
    elapsed_s: float


@dataclass
class WorkloadResult:
    """All samples of a run plus the summary the report prints."""

    samples: list[Sample] = field(default_factory=list)
    elapsed_s: float = 0.0
    skipped: int = 0

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        return sum(1 for s in self.samples if s.error is not None)

    def summary(self) -> WorkloadSummary:
        ok = self.ok
        offered = [s for s in ok if s.offered]
        resumed = [s for s in offered if s.resumed]
        tallies: dict[str, BackendTally] = {}
        for s in ok:
            t = tallies.get(s.backend or "?", BackendTally())
            tallies[s.backend or "?"] = BackendTally(
                t.full + (not s.resumed), t.resumed + s.resumed
            )
        return WorkloadSummary(
            connections=len(self.samples),
            errors=self.errors,
            skipped=self.skipped,
            offered=len(offered),
            resumed=len(resumed),
            resumed_elsewhere=sum(1 for s in resumed if s.origin and s.origin != s.backend),
            rate=len(resumed) / len(offered) if offered else 0.0,
            per_backend=dict(sorted(tallies.items())),
            full_ms=Percentiles.of(s.handshake_ms for s in ok if not s.resumed),
            resumed_ms=Percentiles.of(s.handshake_ms for s in ok if s.resumed),
            elapsed_s=round(self.elapsed_s, 2),
        )


def client_context(ca: str | None, tls: TlsVersion) -> ssl.SSLContext:
    """One context for all connections: Python only resumes sessions made by the same context."""
    ctx = ssl.create_default_context(cafile=ca)
    if ca is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if tls == "1.2" else ssl.TLSVersion.TLSv1_3
    return ctx


def fetch_info(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    session: ssl.SSLSession | None,
    timeout: float = 5.0,
    server_hostname: str = "localhost",
    made_by: str | None = None,
) -> tuple[ConnectionInfo, ssl.SSLSession | None, bool, float]:
    """One connection: handshake (timed), GET /info, read to the server's close_notify.

    ``made_by``: the backend that made ``session``, named to the server in the request.
    Returns what the server says of the connection, the session to offer next time, whether
    this one resumed, and the handshake time in ms.
    """
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tls = ctx.wrap_socket(
            raw, server_hostname=server_hostname, session=session, do_handshake_on_connect=False
        )
        t0 = time.perf_counter()
        tls.do_handshake()
        ms = (time.perf_counter() - t0) * 1000.0
        maker = claimed_maker(made_by) if session is not None else UNKNOWN
        named = f"{MADE_BY_HEADER}: {maker}\r\n" if maker != UNKNOWN else ""
        tls.sendall(
            f"GET /info HTTP/1.1\r\nHost: {server_hostname}\r\n{named}"
            "Connection: close\r\n\r\n".encode()
        )
        data = bytearray()
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            data += chunk
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise OSError(f"bad response: {head[:40]!r}")
        return decode(ConnectionInfo, body), tls.session, bool(tls.session_reused), ms
    finally:
        raw.close()


def run_workload(
    host: str,
    port: int,
    *,
    ca: str | None,
    tls: TlsVersion,
    workload: WorkloadConfig = DEFAULT_WORKLOAD,
    progress: Callable[[int, int], None] | None = None,
) -> WorkloadResult:
    """Each client: one full handshake, then ``reconnects`` connections offering its latest session.

    Bounded in count (clients x (1 + reconnects)) and in time (connections not started before
    ``time_limit`` are skipped and counted). The pause before each reconnect stands for a real
    client's think time; with none, a TLS 1.2 client can beat the server's store write.
    """
    (result,) = run_workloads(host, [port], ca=ca, tls=tls, workload=workload, progress=progress)
    return result


def run_workloads(
    host: str,
    ports: list[int],
    *,
    ca: str | None,
    tls: TlsVersion,
    workload: WorkloadConfig = DEFAULT_WORKLOAD,
    progress: Callable[[int, int], None] | None = None,
) -> list[WorkloadResult]:
    """:func:`run_workload` against several farms at once, one result per port.

    Every client keeps one session per farm and takes its turns on them alternately (connection
    1 on each farm, then connection 2 on each, ...; the farm that goes first alternates from
    client to client). The farms are thus measured side by side, under the same load of the
    machine, which results measured one after the other cannot promise.
    """
    ctx = client_context(ca, tls)
    clients, reconnects = workload.clients, workload.reconnects
    pause = workload.pause_ms / 1000.0
    results = [WorkloadResult() for _ in ports]
    lock = threading.Lock()
    total = clients * (1 + reconnects) * len(ports)
    done = 0
    deadline = time.monotonic() + workload.time_limit
    start = time.monotonic()

    def one_client(n: int) -> None:
        nonlocal done
        sessions: list[ssl.SSLSession | None] = [None] * len(ports)
        origins: list[str | None] = [None] * len(ports)
        order = list(range(len(ports)))
        if n % 2:
            order.reverse()
        made = [0] * len(ports)
        for attempt in range(1 + reconnects):
            for i in order:
                if time.monotonic() > deadline:
                    with lock:
                        for j, count in enumerate(made):
                            results[j].skipped += 1 + reconnects - count
                            done += 1 + reconnects - count
                    return
                made[i] += 1
                session = sessions[i]
                offered = session is not None
                if offered and pause > 0:
                    time.sleep(pause)
                try:
                    info, new_session, resumed, ms = fetch_info(
                        ctx, host, ports[i], session, made_by=origins[i]
                    )
                    backend = info.backend
                    sample = Sample(n, attempt, offered, resumed, backend, origins[i], ms)
                    if not resumed:
                        origins[i] = backend
                    sessions[i] = new_session or session
                except (OSError, ssl.SSLError, ValueError) as exc:
                    sample = Sample(n, attempt, offered, False, None, origins[i], 0.0, repr(exc))
                with lock:
                    results[i].samples.append(sample)
                    done += 1
                    so_far = done
                if progress is not None:
                    progress(so_far, total)

    with ThreadPoolExecutor(max_workers=max(1, workload.concurrency)) as pool:
        list(pool.map(one_client, range(clients)))
    elapsed = time.monotonic() - start
    for result in results:
        result.elapsed_s = elapsed
    return results


class TerminalProgress:
    """A one-line progress meter, redrawn at most ten times a second."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        self.shown = True
        sys.stderr.write(f"\r  {self.label}: {done}/{total} connections")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def terminal_progress(label: str) -> TerminalProgress | None:
    """Progress on a terminal; nothing when output is captured (logs, tests, CI)."""
    return TerminalProgress(label) if sys.stderr.isatty() else None
