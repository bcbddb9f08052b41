"""``tlscache-farm --report``: the same clients against a shared and a per-backend cache.

Both farms run at once and every client alternates between them, so that both columns are
measured under the same load of the machine: run one after the other, a change of load between
the runs (another program, a CPU frequency step) would pass for a difference between the caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TextIO

from tlscache import CacheStats
from tlscache.latency import histogram_quantile

from .config import HOST, STORE_MODES, FarmConfig, WorkloadConfig
from .kinds import matrix_lines
from .orchestrator import Farm
from .procs import free_port
from .records import FarmStatus
from .workload import WorkloadResult, WorkloadSummary, run_workloads, terminal_progress

PER_BACKEND = "per-backend (memory)"
WIDTH = 30


@dataclass(frozen=True)
class Run:
    """One column of the report: a farm, what its clients saw and what its servers counted."""

    label: str
    result: WorkloadResult
    status: FarmStatus

    @property
    def summary(self) -> WorkloadSummary:
        return self.result.summary()


def _sums(status: FarmStatus, *counters: Callable[[CacheStats], int]) -> str:
    """Cache counters summed over the backends, ``a / b / ...``."""
    caches = status.caches()
    return " / ".join(str(sum(counter(c) for c in caches)) for counter in counters)


def _lookup_ms(status: FarmStatus) -> str:
    """Store lookup latency over all backends, ``p50 / p99`` ms, from the caches' histograms."""
    caches = [c for c in status.caches() if sum(c.latency_counts)]
    if not caches:
        return "-"
    counts = [sum(column) for column in zip(*(c.latency_counts for c in caches), strict=True)]
    bounds, top = caches[0].latency_buckets_ms, max(c.latency_max_ms for c in caches)
    p50 = histogram_quantile(bounds, counts, 0.5, top)
    return f"{p50:.2f} / {histogram_quantile(bounds, counts, 0.99, top):.2f}"


@dataclass(frozen=True)
class ResumedBy:
    """Resumed handshakes as the servers counted them: by ticket (the ticket key callback
    accepted the ticket: decrypted + renewed) and the rest, by session id (a cache lookup)."""

    ticket: int
    session_id: int

    @classmethod
    def of(cls, status: FarmStatus) -> ResumedBy:
        answered = [b.status for b in status.backends if b.status is not None]
        resumed = sum(s.handshakes.resumed for s in answered)
        ticket = sum(s.tickets.resumed for s in answered if s.tickets is not None)
        return cls(ticket, max(0, resumed - ticket))

    def text(self) -> str:
        return f"{self.ticket} / {self.session_id}"


def format_report(runs: list[Run], backends: int, title: str) -> str:
    """The side-by-side table."""
    sums = [r.summary for r in runs]
    lines = [title, "", f"{'':<36}" + "".join(f"{r.label:>{WIDTH}}" for r in runs)]

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"  {name:<34}" + "".join(f"{c:>{WIDTH}}" for c in cells))

    for i in range(1, backends + 1):
        tallies = [s.per_backend.get(f"backend-{i}") for s in sums]
        row(
            f"backend-{i}",
            [f"{t.full if t else 0} full / {t.resumed if t else 0} resumed" for t in tallies],
        )
    row("connections (errors)", [f"{s.connections} ({s.errors})" for s in sums])
    row("sessions offered", [str(s.offered) for s in sums])
    row("resumed (rate = resumed/offered)", [f"{s.resumed} ({100.0 * s.rate:.1f}%)" for s in sums])
    row("  of which on another backend", [str(s.resumed_elsewhere) for s in sums])
    row("full handshake ms p50 / p99", [s.full_ms.text() for s in sums])
    row("resumed handshake ms p50 / p99", [s.resumed_ms.text() for s in sums])
    statuses = [r.status for r in runs]
    row(
        "server cache hits / misses",
        [_sums(st, lambda c: c.hits, lambda c: c.misses) for st in statuses],
    )
    row("cache lookup ms p50 / p99", [_lookup_ms(st) for st in statuses])
    row("resumed by ticket / session id", [ResumedBy.of(st).text() for st in statuses])
    row(
        "cache timeouts / errors / skipped",
        [
            _sums(st, lambda c: c.timeouts, lambda c: c.errors, lambda c: c.skipped)
            for st in statuses
        ],
    )
    if any(s.skipped for s in sums):
        row("skipped (time limit)", [str(s.skipped) for s in sums])
    return "\n".join(lines) + "\n"


def who_resumed_whose(runs: list[Run], base: FarmConfig) -> list[str]:
    """With ``--backend-kinds``: resumptions by (kind that made the session, kind that resumed
    it), as the backends recorded them (the client names the maker in each resumed request):
    the same :class:`~.records.Resumptions` as each farm's status page."""
    matrices = [run.status.resumptions.by_kind_dict() for run in runs]
    return matrix_lines(matrices, base.backend_kinds, WIDTH)


def cache_server_lines(status: FarmStatus) -> str:
    """Each cache server of the shared farm: health and its share of the stored sessions."""
    lines = [
        f"  cache server {c.name} {c.address}: {'up' if c.up else 'DOWN'}, {c.keys} sessions "
        f"stored ({100.0 * (c.share or 0.0):.1f}%)\n"
        for c in status.cache_servers
    ]
    return "".join(lines)


def conclusion(
    shared: WorkloadSummary, per_backend: WorkloadSummary, by: ResumedBy | None = None
) -> str:
    """The report's last line: what the table means, in one sentence."""
    how = (
        f" ({by.ticket} by ticket, {by.session_id} by session id, as the servers counted)"
        if by is not None
        else ""
    )
    return (
        f"Shared cache: resumed {shared.resumed} of {shared.offered} handshakes that offered a "
        f"session{how}, {shared.resumed_elsewhere} of them on another backend; per-backend caches "
        f"only: resumed {per_backend.resumed} of {per_backend.offered}."
    )


def run_report(base: FarmConfig, workload: WorkloadConfig, out: TextIO) -> int:
    """Start both farms, run the workload against them side by side, print the table."""
    ca = str(base.certs.ca) if base.certs.ca else None
    with contextlib.ExitStack() as stack:
        # The shared column: the farm's memcached or Redis if asked for, else distcache.
        mode = base.cache.mode if base.cache.mode in STORE_MODES else "distcache"
        shared = replace(base, cache=replace(base.cache, mode=mode), status_port=None)
        label = f"shared ({mode})"
        farms = [stack.enter_context(_started(label, shared, out))]
        # Free ports, picked once the first farm holds its own.
        memory = replace(base.cache, mode="memory")
        alone = replace(shared, cache=memory, port=free_port(), base_port=0)
        farms.append(stack.enter_context(_started(PER_BACKEND, alone, out)))
        out.write("running the workload, each client alternating between the two farms...\n")
        out.flush()
        meter = terminal_progress("both farms")
        results = run_workloads(
            HOST,
            [farm.config.port for farm in farms],
            ca=ca,
            tls=base.tls,
            workload=workload,
            progress=meter,
        )
        if meter is not None:
            meter.finish()
        statuses = [farm.gather() for farm in farms]
    runs = [
        Run(label, r, st)
        for label, r, st in zip((label, PER_BACKEND), results, statuses, strict=True)
    ]
    for run in runs:
        s = run.summary
        out.write(
            f"[{run.label}] {s.connections} connections, {s.resumed}/{s.offered} resumed, "
            f"{s.errors} errors\n"
        )
        first_error = next((x.error for x in run.result.samples if x.error), None)
        if first_error:
            out.write(f"[{run.label}] first error: {first_error}\n")
    title = (
        f"tlscache farm report: {base.backends} backends behind a round-robin balancer, "
        f"TLS <= {base.tls}, resumption {base.cache.resumption}\n"
        f"workload: {workload.clients} clients x (1 + {workload.reconnects} reconnects offering "
        f"their session) on each farm, {workload.pause_ms:g} ms before each reconnect,\n"
        f"  {workload.concurrency} clients at a time, each alternating between the two farms "
        f"(same machine load for both columns); {results[0].elapsed_s:.1f} s in all\n"
        "handshake ms: measured by the client (Python ssl) through the balancer; "
        "cache lookup ms: by the backends"
    )
    out.write("\n" + format_report(runs, base.backends, title))
    if base.backend_kinds != ("threaded",):
        out.write("\n".join(who_resumed_whose(runs, base)) + "\n")
    out.write(cache_server_lines(runs[0].status))
    by = ResumedBy.of(runs[0].status)
    out.write("\n" + conclusion(runs[0].summary, runs[1].summary, by) + "\n")
    out.flush()
    return 0


@contextlib.contextmanager
def _started(label: str, cfg: FarmConfig, out: TextIO) -> Iterator[Farm]:
    out.write(f"[{label}] starting {cfg.backends} backends (TLS <= {cfg.tls})...\n")
    out.flush()
    with Farm(cfg) as farm:
        yield farm
