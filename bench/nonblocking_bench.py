"""Blocking against non-blocking session lookups in an asyncio TLS server.

    python -m bench.nonblocking_bench [--clients 50] [--seconds 4] [--delay-ms 10]
                                      [--pause-ms 0] [--modes internal,blocking,...]

One asyncio server (:mod:`tlscache.aio_server`, pyOpenSSL over memory BIOs) in this process;
its session store answers each lookup after ``--delay-ms`` (an in-process store behind an
artificial delay, standing in for a distant cache). ``--clients`` concurrent clients (Python
``ssl``, threads of one child process) reconnect in a loop, each offering the session of its
previous connection, so nearly every handshake is a resumption that needs a lookup. With
``--pause-ms`` each client waits between connections (0.5 to 1.5 times that, at random,
and the clients start spread over one pause): a load below what the server can do, where
the loop's lateness is no longer the queue of a saturated server.

Four servers are measured in turn, for TLS 1.2 and 1.3:

* ``internal``: OpenSSL's own in-process cache, no lookups: what the handshakes alone cost
  the loop (each ``do_handshake`` step runs on it);
* ``blocking``: ``SessionCache.install``; the lookup runs inside OpenSSL's get callback, on
  the loop thread, which waits for the store;
* ``nonblocking``: ``NonblockingResumption.install`` with ``lookups="threads"``; the
  ClientHello callback starts ``on_get`` on a worker thread (4 by default), whose store
  sleeps (``time.sleep``), and the handshake awaits it;
* ``async``: the same with the cache's ``async_store``: the lookup is a task on the loop
  (``on_get_async``), whose store awaits ``asyncio.sleep``; no threads.

The store's delay is a sleep in both cases: nothing else competes for the CPU. With two or
more CPUs the server (this process, its threads included) is pinned to one CPU and the
client process to another (``os.sched_setaffinity``), so that the loop's lateness is the
server's own doing, not the load generator's; the output says whether it was.

Reported: handshakes/s completed by the server, the fraction resumed, the event loop's
lateness (a ticker task sleeps 1 ms in a loop and records how late each wake-up is: p50,
p99, max), and the loop's longest steps (every callback the loop runs is timed: p99 and
max), which say how much of the lateness one step of the server's own work makes.
Bounded: each cell runs ``--seconds``; the whole run takes about a minute. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL

from tlscache import Deadline, MemoryStore, SessionCache, WrappingStore
from tlscache.aio_server import TLSStream, serve
from tlscache.openssl.clienthello import NonblockingResumption
from tlscache.stores.aio import AsyncMemoryStore

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
MODES = ("internal", "blocking", "nonblocking", "async")
LABELS = {
    "internal": "internal",
    "blocking": "blocking",
    "nonblocking": "threads (4)",
    "async": "on the loop",
}
TICK_S = 0.001


class DelayedStore(WrappingStore):
    """A store whose lookups take ``delay_s`` (a sleep: the calling thread waits)."""

    def __init__(self, inner: MemoryStore, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        time.sleep(self.delay_s)
        return self.inner.fetch(session_id, deadline)


class DelayedAsyncStore(AsyncMemoryStore):
    """The async twin: lookups take ``delay_s`` (``asyncio.sleep``: the loop goes on)."""

    def __init__(self, inner: MemoryStore, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        await asyncio.sleep(self.delay_s)
        return self.inner.fetch(session_id, deadline)


class StepTimer:
    """Times every callback the event loop runs (``Handle._run``), while ``on``.

    Each handshake step, lookup task step and ticker wake-up is one callback; the longest
    ones are what keeps the loop from everything else. Costs about a microsecond a step.
    """

    def __init__(self) -> None:
        self.on = False
        self.steps_ms: list[float] = []
        self._original = asyncio.events.Handle._run

    def __enter__(self) -> StepTimer:
        original, perf, steps = self._original, time.perf_counter, self.steps_ms
        timer = self

        def timed_run(handle: asyncio.events.Handle) -> None:
            if not timer.on:
                original(handle)
                return
            start = perf()
            original(handle)
            steps.append((perf() - start) * 1000.0)

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.events.Handle._run = self._original  # type: ignore[method-assign]


@dataclass(frozen=True)
class Cell:
    version: str
    mode: str
    handshakes: int
    resumed: int
    seconds: float
    lateness_ms: list[float]
    steps_ms: list[float]
    timeouts: int  #: lookups that timed out (the cache's counter, whole cell)
    skipped: int  #: lookups skipped by an open breaker

    @property
    def rate(self) -> float:
        return self.handshakes / self.seconds

    def lateness(self, q: float) -> float:
        return quantile(self.lateness_ms, q)

    def step(self, q: float) -> float:
        return quantile(self.steps_ms, q)


def quantile(samples: list[float], q: float) -> float:
    values = sorted(samples)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def server_context(pem: Path) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pem))
    ctx.use_privatekey_file(str(pem))
    return ctx


async def measure(args: argparse.Namespace, pem: Path, ca: Path, version: str, mode: str) -> Cell:
    inner, delay_s = MemoryStore(), args.delay_ms / 1000.0
    cache = SessionCache(
        DelayedStore(inner, delay_s),
        deadline_ms=args.delay_ms * 5,
        async_store=DelayedAsyncStore(inner, delay_s) if mode == "async" else None,
    )
    ctx = server_context(pem)
    nb: NonblockingResumption | None = None
    if mode in ("nonblocking", "async"):
        nb = NonblockingResumption(cache, lookups="loop" if mode == "async" else "threads")
        nb.install(ctx)
    elif mode == "blocking":
        cache.install(ctx)
    else:  # OpenSSL's own cache: no lookups at all, the handshakes' own cost on the loop
        ctx.set_session_id(b"nonblocking-bench")
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    counts = {"handshakes": 0, "resumed": 0}
    measuring = False

    async def handle(stream: TLSStream) -> None:
        if measuring:
            counts["handshakes"] += 1
            counts["resumed"] += stream.resumed
        await stream.send(b"ok\n")

    lateness: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(TICK_S)
            if measuring:
                lateness.append(max(0.0, (loop.time() - before - TICK_S) * 1000.0))

    server = await serve(ctx, handle, "127.0.0.1", 0, resumption=nb)
    port = server.sockets[0].getsockname()[1]
    tick = asyncio.create_task(ticker())
    warmup = 1.0
    pin = [] if args.client_cpu is None else ["--cpu", str(args.client_cpu)]
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.nonblocking_bench",
        "--client",
        str(port),
        "--ca",
        str(ca),
        "--version",
        version,
        "--clients",
        str(args.clients),
        "--seconds",
        str(args.seconds + warmup + 1.0),
        "--pause-ms",
        str(args.pause_ms),
        *pin,
        stdout=subprocess.DEVNULL,
    )
    steps = StepTimer()
    try:
        await asyncio.sleep(warmup)  # every client has made its first, full handshake
        with steps:
            measuring = steps.on = True
            start = time.perf_counter()
            await asyncio.sleep(args.seconds)
            measuring = steps.on = False
        elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            client.terminate()
        await client.wait()
        await asyncio.sleep(0.2)  # connections in progress finish
        tick.cancel()
        server.close()
        if nb is not None:
            nb.close()
    stats = cache.stats()
    return Cell(
        version,
        mode,
        counts["handshakes"],
        counts["resumed"],
        elapsed,
        lateness,
        steps.steps_ms,
        stats.timeouts,
        stats.skipped,
    )


# ---------------------------------------------------------------- client process


def run_clients(
    port: int,
    ca: Path,
    version: str,
    clients: int,
    seconds: float,
    cpu: int | None,
    pause_s: float,
) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # before any thread starts: they inherit it
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    stop = time.monotonic() + seconds

    def one_client(n: int) -> None:
        # Pauses vary (0.5-1.5 times --pause-ms) and starts are spread over one pause:
        # independent clients, not 50 in lockstep arriving as one burst.
        rng = random.Random(n)
        time.sleep(rng.uniform(0.0, pause_s))
        session: ssl.SSLSession | None = None
        for _ in range(100_000):  # bounded in count and in time
            if time.monotonic() >= stop:
                return
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
                ):
                    s.recv(16)
                    session = s.session
                    with contextlib.suppress(OSError, ssl.SSLError):
                        s.unwrap()
            except (OSError, ssl.SSLError):
                session = None
            if pause_s:
                time.sleep(pause_s * rng.uniform(0.5, 1.5))

    threads = [threading.Thread(target=one_client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)


# ---------------------------------------------------------------- main


def table(cells: list[Cell], args: argparse.Namespace) -> str:
    if args.server_cpu is None:
        pinned = "not pinned" + ("" if args.no_pin else " (fewer than 2 CPUs available)")
    else:
        pinned = f"server pinned to CPU {args.server_cpu}, clients to CPU {args.client_cpu}"
    lines = [
        f"{args.clients} clients pausing {args.pause_ms:g} ms between connections, "
        f"store lookups take {args.delay_ms:g} ms, "
        f"{args.seconds:g} s per cell, os.cpu_count()={os.cpu_count()}, {pinned}",
        "",
        "| TLS | lookups | handshakes/s | resumed | loop lateness p50 / p99 / max (ms) "
        "| loop steps p99 / max (ms) | lookups timed out / skipped |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for c in cells:
        share = c.resumed / c.handshakes if c.handshakes else 0.0
        lines.append(
            f"| {c.version} | {LABELS[c.mode]} | {c.rate:,.0f} | {share:.0%} | "
            f"{statistics.median(c.lateness_ms) if c.lateness_ms else 0:.2f} / "
            f"{c.lateness(0.99):.2f} / {max(c.lateness_ms, default=0):.1f} | "
            f"{c.step(0.99):.2f} / {max(c.steps_ms, default=0):.1f} | "
            f"{c.timeouts} / {c.skipped} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--delay-ms", type=float, default=10.0)
    p.add_argument(
        "--pause-ms",
        type=float,
        default=0.0,
        help="each client waits this long between connections (0: as fast as it can)",
    )
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the child's server port
    p.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--version", default="1.2", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)  # the child's CPU
    p.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}"
    )
    p.add_argument("--no-pin", action="store_true", help="leave both processes on every CPU")
    p.add_argument("--server-cpu", type=int, help="the server's CPU (default: the first)")
    args = p.parse_args()
    if args.client is not None:
        run_clients(
            args.client,
            args.ca,
            args.version,
            args.clients,
            args.seconds,
            args.cpu,
            args.pause_ms / 1000.0,
        )
        return
    args.seconds = min(args.seconds, 10.0)  # eight cells: the run stays a few minutes at most
    modes = [m for m in args.modes.split(",") if m]
    if not modes or not set(modes) <= set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    args.client_cpu = None
    if len(cpus) < 2 or args.no_pin:
        args.server_cpu = None
    else:
        server_cpu = cpus[0] if args.server_cpu is None else args.server_cpu
        if server_cpu not in cpus:
            p.error(f"--server-cpu: choose from {cpus}")
        args.server_cpu = server_cpu
        args.client_cpu = next(c for c in cpus if c != server_cpu)
        os.sched_setaffinity(0, {args.server_cpu})  # before any thread: they inherit it

    import trustme

    with tempfile.TemporaryDirectory() as d:
        authority = trustme.CA()
        pem, ca = Path(d) / "server.pem", Path(d) / "ca.pem"
        authority.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
        authority.cert_pem.write_to_path(str(ca))
        cells = []
        for version in ("1.2", "1.3"):
            for mode in modes:
                cells.append(asyncio.run(measure(args, pem, ca, version, mode)))
    print(table(cells, args))


if __name__ == "__main__":
    main()
