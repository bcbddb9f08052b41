"""dc_test: random correctness and load test for a dc_server or dc_client.

Same model as the C tool: generate sessions with random ids and data, then
run random ADD / GET / REMOVE / HAVE operations and check each answer against
what the cache must hold (ADD succeeds iff absent, GET returns identical
bytes iff present, ...). Expiry is ignored, so keep ``-timeout`` well above
the run time.

Beyond the C tool it reports the rate and latency percentiles, and it can
drive the server harder: ``-concurrency N`` runs N workers, each with its own
sessions and connection (so the model stays exact), and ``-pipeline D`` keeps
D requests in flight per connection through :class:`AsyncClient` (implies
``-persistent``). The server must hold ``concurrency x sessions`` entries
(dc_server's default is 512) or evictions show up as failures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from tlscache.cli.options import Parser, connect_address
from tlscache.cli.tlsoptions import add_server_tls_options, server_tls
from tlscache.distcache.address import Address
from tlscache.distcache.aioclient import AsyncClient
from tlscache.distcache.client import Client
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.protocol import MAX_ID_LEN, Operation, Result
from tlscache.exceptions import ClientError
from tlscache.latency import nearest_rank

MAX_OPS: Final = 1_000_000
#: Per-call deadline: generous, the tool measures the server, it does not police it.
CALL_DEADLINE_MS: Final = 30_000.0
_OPS: Final = (Operation.ADD, Operation.REMOVE, Operation.GET, Operation.HAVE)


@dataclass(slots=True)
class Config:
    """Everything one run needs (the parsed command line)."""

    address: Address
    sessions: int = 10
    ops: int = 1000
    datamin: int = 50
    datamax: int = 2100
    idmin: int = 10
    idmax: int = 63
    timeout: int = 60
    timevar: int = 5
    persistent: bool = False
    progress: int = 0
    concurrency: int = 1
    pipeline: int = 0
    seed: int | None = None
    bar: bool = False
    #: Stop after this many seconds even if ops remain (benchmarks); None: run all ops.
    max_seconds: float | None = None
    #: Print nothing (benchmarks call :func:`run` directly).
    quiet: bool = False
    #: Mutual TLS to a dc_server at an IP: address.
    tls: LinkTLS | None = None


@dataclass(slots=True)
class Session:
    sid: bytes
    data: bytes
    present: bool = False


class Failure(Exception):
    """A check failed: the server's answer contradicts the model."""


@dataclass(slots=True)
class Worker:
    """One worker's sessions, random stream, op quota and results."""

    sessions: list[Session]
    rng: random.Random
    ops: int
    issued: int = 0
    done: int = 0
    latencies: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    """The outcome of a run."""

    sessions: int
    ops: int
    done: int
    elapsed: float
    latencies_ns: list[int]
    error: str | None
    timed_out: bool = False
    #: Ids the model says the server holds at the end (for a caller's clean-up).
    stored: list[bytes] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_us(self, q: float) -> float:
        """The nearest-rank ``q`` quantile (0 < q <= 1) of the sorted latencies, in us
        (0.0 when nothing was measured)."""
        ns = nearest_rank(self.latencies_ns, q)
        return 0.0 if ns is None else ns / 1000.0


class _Shared:
    """State all workers see: the first failure and the progress counter."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.error: str | None = None
        self.stop = False
        self.timed_out = False
        self.lock = threading.Lock()
        self.counter = itertools.count(1)

    def fail(self, message: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = message
            self.stop = True

    def time_up(self) -> None:
        self.timed_out = True
        self.stop = True

    def completed(self) -> None:
        n = next(self.counter)
        if self.cfg.progress and n % self.cfg.progress == 0:
            print(f"Info, total operations = {n:7d}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the model


def make_workers(cfg: Config) -> list[Worker]:
    """Each worker gets its own ``cfg.sessions`` sessions; ids are unique across all."""
    master = random.Random(cfg.seed)
    seen: set[bytes] = set()
    workers = []
    per, extra = divmod(cfg.ops, cfg.concurrency)
    for w in range(cfg.concurrency):
        rng = random.Random(master.getrandbits(64))
        sessions: list[Session] = []
        while len(sessions) < cfg.sessions:
            sid = rng.randbytes(rng.randint(cfg.idmin, cfg.idmax))
            if sid in seen:
                continue
            seen.add(sid)
            span = cfg.datamax - cfg.datamin
            size = cfg.datamin + int(span * rng.random())
            sessions.append(Session(sid, rng.randbytes(size)))
        workers.append(Worker(sessions, rng, per + (1 if w < extra else 0)))
    return workers


def next_op(cfg: Config, worker: Worker) -> tuple[Operation, Session, object, int]:
    """Issue the worker's next random operation and predict its answer.

    The model (and the issue count) is updated at issue time.

    Predicting at issue time keeps the model exact under pipelining, since one
    connection's requests are handled in the order they were sent.
    """
    worker.issued += 1
    rng = worker.rng
    session = worker.sessions[rng.randrange(len(worker.sessions))]
    op = _OPS[rng.randrange(4)]
    present = session.present
    timeout_ms = 0
    expected: object
    if op is Operation.ADD:
        expected = not present
        session.present = True
        lo = cfg.timeout - cfg.timevar
        timeout_ms = int((lo + 2 * cfg.timevar * rng.random()) * 1000)
    elif op is Operation.REMOVE:
        expected = present
        session.present = False
    elif op is Operation.GET:
        expected = session.data if present else None
    else:
        expected = present
    return op, session, expected, timeout_ms


def check(op: Operation, expected: object, actual: object) -> None:
    """Raise :class:`Failure` with the C tool's wording if ``actual`` is wrong."""
    if op is Operation.ADD:
        ok = actual is Result.OK
        if expected and not ok:
            raise Failure(f"add failed! (result {actual!s})")
        if not expected and actual is not Result.ADD_MATCHING_SESSION:
            if ok:
                raise Failure("add succeeded and shouldn't have!")
            raise Failure(f"add failed with an unexpected result {actual!s}")
        return
    if op is Operation.GET:
        if expected is None:
            if actual is not None:
                raise Failure("get succeeded and shouldn't have!")
        elif actual is None:
            raise Failure("get failed!")
        elif actual != expected:
            raise Failure("received mismatched session")
        return
    name = "remove" if op is Operation.REMOVE else "have"
    if expected and not actual:
        raise Failure(f"{name} failed!")
    if actual and not expected:
        raise Failure(f"{name} succeeded and shouldn't have!")


# ---------------------------------------------------------------- workers


def _request(op: Operation, session: Session, timeout_ms: int) -> tuple[str, tuple[object, ...]]:
    """The client method and its arguments for one operation (same for both clients)."""
    if op is Operation.ADD:
        return "add", (session.sid, session.data, timeout_ms)
    return op.name.lower(), (session.sid,)


@contextlib.contextmanager
def _failures(shared: _Shared) -> Iterator[None]:
    """Turn a failed check or a failed call into the run's (first) error."""
    try:
        yield
    except Failure as exc:
        shared.fail(str(exc))
    except ClientError as exc:
        shared.fail(f"transaction failure ({exc})")


def _finish(
    worker: Worker, shared: _Shared, op: Operation, expected: object, actual: object, ns: int
) -> None:
    """Record one answered operation; raise :class:`Failure` if the answer is wrong."""
    worker.latencies.append(ns)
    check(op, expected, actual)
    worker.done += 1
    shared.completed()


def _run_sync(cfg: Config, worker: Worker, shared: _Shared) -> None:
    """A blocking worker: one operation at a time on its own :class:`Client`."""
    clock = time.perf_counter_ns
    with (
        _failures(shared),
        Client(
            cfg.address,
            deadline_ms=CALL_DEADLINE_MS,
            persistent=cfg.persistent,
            pool_size=1,
            tls=cfg.tls,
        ) as client,
    ):
        while worker.issued < worker.ops and not shared.stop:
            op, session, expected, timeout_ms = next_op(cfg, worker)
            method, args = _request(op, session, timeout_ms)
            t0 = clock()
            actual = getattr(client, method)(*args)
            _finish(worker, shared, op, expected, actual, clock() - t0)


async def _lane(cfg: Config, client: AsyncClient, worker: Worker, shared: _Shared) -> None:
    """One in-flight slot of a pipelined worker; all lanes share the worker's model."""
    clock = time.perf_counter_ns
    with _failures(shared):
        while worker.issued < worker.ops and not shared.stop:
            op, session, expected, timeout_ms = next_op(cfg, worker)
            method, args = _request(op, session, timeout_ms)
            t0 = clock()
            actual = await getattr(client, method)(*args)
            _finish(worker, shared, op, expected, actual, clock() - t0)


async def _run_async_worker(cfg: Config, worker: Worker, shared: _Shared) -> None:
    with _failures(shared):
        async with AsyncClient(cfg.address, deadline_ms=CALL_DEADLINE_MS, tls=cfg.tls) as client:
            await asyncio.gather(*(_lane(cfg, client, worker, shared) for _ in range(cfg.pipeline)))


async def _run_async(cfg: Config, workers: list[Worker], shared: _Shared) -> None:
    bar = asyncio.ensure_future(_bar_async(cfg, workers, shared)) if cfg.bar else None
    try:
        await asyncio.gather(*(_run_async_worker(cfg, w, shared) for w in workers))
    finally:
        if bar is not None:
            bar.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bar  # the bar is cleared before the summary is printed


# ---------------------------------------------------------------- progress bar


def _draw_bar(cfg: Config, workers: list[Worker], started: float) -> None:
    done = sum(w.done for w in workers)
    frac = done / cfg.ops if cfg.ops else 1.0
    width = 30
    filled = int(width * frac)
    rate = done / max(1e-9, time.perf_counter() - started)
    line = (
        f"\r[{'#' * filled}{'.' * (width - filled)}] {frac:4.0%} {done}/{cfg.ops} {rate:,.0f} ops/s"
    )
    sys.stderr.write(line)
    sys.stderr.flush()


def _clear_bar() -> None:
    sys.stderr.write("\r\x1b[K")
    sys.stderr.flush()


async def _bar_async(cfg: Config, workers: list[Worker], shared: _Shared) -> None:
    started = time.perf_counter()
    try:
        while not shared.stop:
            _draw_bar(cfg, workers, started)
            await asyncio.sleep(0.2)
    finally:
        _clear_bar()


def _bar_thread(cfg: Config, workers: list[Worker], done: threading.Event) -> None:
    started = time.perf_counter()
    _draw_bar(cfg, workers, started)
    while not done.wait(0.2):
        _draw_bar(cfg, workers, started)
    _clear_bar()


# ---------------------------------------------------------------- entry points


def run(cfg: Config) -> Report:
    """Run the whole test; never raises for server misbehaviour (see ``Report.error``)."""
    workers = make_workers(cfg)
    shared = _Shared(cfg)
    total_sessions = sum(len(w.sessions) for w in workers)
    if not cfg.quiet:
        print(
            f"Info, {total_sessions} sessions generated, will run {cfg.ops} random tests",
            file=sys.stderr,
            flush=True,
        )
    timer = None
    if cfg.max_seconds is not None:
        timer = threading.Timer(cfg.max_seconds, shared.time_up)
        timer.daemon = True
        timer.start()
    started = time.perf_counter()
    if cfg.pipeline:
        asyncio.run(_run_async(cfg, workers, shared))
    else:
        finished = threading.Event()
        bar = None
        if cfg.bar:
            bar = threading.Thread(target=_bar_thread, args=(cfg, workers, finished), daemon=True)
            bar.start()
        if len(workers) == 1:
            _run_sync(cfg, workers[0], shared)
        else:
            threads = [
                threading.Thread(target=_run_sync, args=(cfg, w, shared), daemon=True)
                for w in workers
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finished.set()
        if bar is not None:
            bar.join()
    elapsed = time.perf_counter() - started
    if timer is not None:
        timer.cancel()
    latencies = sorted(itertools.chain.from_iterable(w.latencies for w in workers))
    done = sum(w.done for w in workers)
    if shared.error is None and not shared.timed_out and done < cfg.ops:
        # A worker thread died of something unforeseen (its traceback is on stderr):
        # never call a run complete that did not check every operation.
        shared.fail(f"only {done} of {cfg.ops} operations were checked")
    return Report(
        sessions=total_sessions,
        ops=cfg.ops,
        done=done,
        elapsed=elapsed,
        latencies_ns=latencies,
        error=shared.error,
        timed_out=shared.timed_out,
        stored=[s.sid for w in workers for s in w.sessions if s.present],
    )


#: The numeric switches: (switch, metavar, lowest, highest, default, help).
_NUMBERS: Final[tuple[tuple[str, str, int, int, int | None, str], ...]] = (
    ("-sessions", "N", 1, 512, 10, "sessions per worker, 1..512 (default 10)"),
    ("-ops", "N", 1, MAX_OPS, None, "operations in all, <= 1000000 (default 10 x sessions^2)"),
    ("-datamin", "N", 4, 4096, 50, "minimum session size in bytes, >= 4 (default 50)"),
    ("-datamax", "N", 4, 4096, 2100, "maximum session size in bytes, <= 4096 (default 2100)"),
    ("-idmin", "N", 1, MAX_ID_LEN, 10, "minimum session id length (default 10)"),
    ("-idmax", "N", 1, MAX_ID_LEN, 63, "maximum session id length, <= 64 (default 63)"),
    ("-timeout", "S", 0, 3600, 60, "mean ADD timeout in seconds, <= 3600 (default 60)"),
    ("-timevar", "S", 0, 3600, 5, "ADD timeout jitter in seconds, < timeout (default 5)"),
)
_EXTRA_NUMBERS: Final[tuple[tuple[str, str, int, int, int | None, str], ...]] = (
    ("-progress", "N", 0, MAX_OPS, 0, "print the operation count every N operations"),
    (
        "-concurrency",
        "N",
        1,
        256,
        1,
        "independent workers, each with its own sessions and connection (default 1)",
    ),
    (
        "-pipeline",
        "D",
        1,
        4096,
        0,
        "requests in flight per connection, via asyncio (implies -persistent)",
    ),
    ("-seed", "N", 0, 2**63, None, "random seed, for a reproducible run"),
)


def _add_numbers(p: Parser, specs: Sequence[tuple[str, str, int, int, int | None, str]]) -> None:
    for switch, metavar, lo, hi, default, text in specs:
        p.add_number(switch, lo, hi, default, text, metavar=metavar)


def _parser() -> Parser:
    p = Parser(
        "dc_test",
        "Random correctness and load test for a distcache server.\n"
        "Checks every answer against a model of what the cache must hold.",
    )
    p.add_argument(
        "-connect",
        metavar="ADDR",
        type=connect_address,
        required=True,
        help="server address (IP:host:port or UNIX:path); required",
    )
    _add_numbers(p, _NUMBERS)
    p.add_argument(
        "-persistent",
        action="store_true",
        help="one connection per worker instead of one per operation",
    )
    _add_numbers(p, _EXTRA_NUMBERS)
    add_server_tls_options(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse and cross-check the command line (exit 1 with a message on errors)."""
    p = _parser()
    ns: argparse.Namespace = p.parse_args(argv)
    if ns.datamin > ns.datamax:
        p.error(f"-datamin ({ns.datamin}) must not exceed -datamax ({ns.datamax})")
    if ns.idmin > ns.idmax:
        p.error(f"-idmin ({ns.idmin}) must not exceed -idmax ({ns.idmax})")
    if ns.timevar >= ns.timeout:
        p.error(f"-timevar ({ns.timevar}) must be less than -timeout ({ns.timeout})")
    ops = ns.ops if ns.ops is not None else min(MAX_OPS, 10 * ns.sessions**2)
    if ops < ns.concurrency:
        p.error(f"-ops ({ops}) must be at least -concurrency ({ns.concurrency})")
    return Config(
        address=ns.connect,
        sessions=ns.sessions,
        ops=ops,
        datamin=ns.datamin,
        datamax=ns.datamax,
        idmin=ns.idmin,
        idmax=ns.idmax,
        timeout=ns.timeout,
        timevar=ns.timevar,
        persistent=ns.persistent or ns.pipeline > 0,
        progress=ns.progress,
        concurrency=ns.concurrency,
        pipeline=ns.pipeline,
        seed=ns.seed,
        bar=sys.stderr.isatty() and not ns.progress,
        tls=server_tls(ns, ns.connect),
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = run(cfg)
    if report.error is not None:
        print(f"Error, {report.error}", file=sys.stderr)
        print(f"Info, {report.done} tests succeeded before the first failure", file=sys.stderr)
        return 1
    print("Info, all tests complete", file=sys.stderr)
    print(
        f"Info, {report.done} operations in {report.elapsed:.3f} s: {report.rate:,.0f} ops/s, "
        f"latency p50 {report.percentile_us(0.5):.1f} us, p99 {report.percentile_us(0.99):.1f} us",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
