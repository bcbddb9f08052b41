"""What mutual TLS on the cache link costs: the same dc_server, with and without TLS.

Run as ``python -m bench.link_tls_bench`` (about 30 s). For each event loop (uvloop,
dc_server's default, and asyncio) it starts one server process (``--serve``: one
``tlscache.distcache.server.Server``, one table) listening on two loopback TCP ports,
one plain and one with mutual TLS (trustme certificates made for the run), and measures
against each, alternating, the median of ``REPS`` runs:

* ADD+GET round trips, one request at a time on one persistent blocking connection
  (a backend's ``DistcacheStore`` with confirmed writes);
* requests pipelined 32 deep on one asyncio connection (dc_client's upstream pattern);
* a new connection per request (``persistent=False``): the handshake's cost.

Every loop is bounded by a count and by ``SLICE`` seconds. The server's CPU time per
operation comes from ``/proc/<pid>/stat``. Results go to stdout only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tlscache.distcache.aioclient import AsyncClient
from tlscache.distcache.client import Client
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.loops import LOOP_KINDS, LoopKind, loop_factory
from tlscache.distcache.server import Server
from tlscache_farm.procs import free_port, running

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")
#: Bound on every timed loop, in seconds.
SLICE: Final = 0.6
#: Runs of each measurement (plain and TLS alternate); the median is shown.
REPS: Final = 3
#: Requests in flight in the pipelined measurement.
DEPTH: Final = 32
VALUE: Final = b"s" * 180  # about a sealed TLS session


@dataclass(frozen=True)
class Run:
    ops: int
    seconds: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.server_cpu / self.ops * 1e6 if self.ops else 0.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def make_pki(directory: Path) -> tuple[LinkTLS, LinkTLS]:
    """The server's and one client's settings, from a CA made for this run."""
    import trustme

    ca = trustme.CA()
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    out = []
    for name, identity in (("server", "127.0.0.1"), ("client", "client.cache.test")):
        cert = ca.issue_cert(identity)
        chain, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.private_key_pem.write_to_path(str(key))
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(chain), append=i > 0)
        out.append(LinkTLS(chain, key, ca_file))
    return out[0], out[1]


# ---------------------------------------------------------------- the server process


def serve(plain: str, tls_address: str, tls: LinkTLS, loop: LoopKind) -> None:
    """One Server, one table, two listeners: ``plain`` and ``tls_address`` (mutual TLS)."""

    async def main() -> None:
        server = Server(stats=False)
        await server.start([plain])
        await server.start([tls_address], tls)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(main())


# ---------------------------------------------------------------- workloads


def round_trips(address: str, tls: LinkTLS | None) -> Callable[[], tuple[int, float]]:
    """ADD then GET, one at a time, on one persistent connection; ops counts both."""

    def go() -> tuple[int, float]:
        with Client(address, deadline_ms=5000, tls=tls) as client:
            client.have(b"warm")  # connect (and handshake) outside the timed part
            ops, i = 0, 0
            start = time.perf_counter()
            end = start + SLICE
            while ops < 200_000 and time.perf_counter() < end:
                for _ in range(50):
                    sid = b"rt-%d" % i
                    i += 1
                    client.add(sid, VALUE, 60_000)
                    if client.get(sid) is None:
                        raise RuntimeError("a stored session was not found")
                ops += 100
            return ops, time.perf_counter() - start

    return go


def pipelined(address: str, tls: LinkTLS | None) -> Callable[[], tuple[int, float]]:
    """GETs ``DEPTH`` deep on one asyncio connection."""

    async def lanes() -> tuple[int, float]:
        async with AsyncClient(address, deadline_ms=5000, tls=tls) as client:
            await client.add(b"pipe", VALUE, 60_000)
            done = 0
            start = time.perf_counter()
            end = start + SLICE

            async def lane() -> None:
                nonlocal done
                while done < 500_000 and time.perf_counter() < end:
                    if await client.get(b"pipe") is None:
                        raise RuntimeError("the pipelined session went missing")
                    done += 1

            await asyncio.gather(*(lane() for _ in range(DEPTH)))
            return done, time.perf_counter() - start

    return lambda: asyncio.run(lanes())


def per_connection(address: str, tls: LinkTLS | None) -> Callable[[], tuple[int, float]]:
    """A new connection (and handshake) for every request."""

    def go() -> tuple[int, float]:
        with Client(address, deadline_ms=5000, persistent=False, tls=tls) as client:
            ops = 0
            start = time.perf_counter()
            end = start + SLICE
            while ops < 20_000 and time.perf_counter() < end:
                client.have(b"rt-1")
                ops += 1
            return ops, time.perf_counter() - start

    return go


def measure(pid: int, fn: Callable[[], tuple[int, float]]) -> Run:
    before = cpu_seconds(pid)
    ops, seconds = fn()
    return Run(ops, seconds, cpu_seconds(pid) - before)


def median(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def suite(reps: int, loop: LoopKind) -> list[tuple[str, Run, Run]]:
    with tempfile.TemporaryDirectory(prefix="link-tls-bench-") as tmp:
        server_tls, client_tls = make_pki(Path(tmp))
        plain = f"IP:127.0.0.1:{free_port()}"
        secure = f"IP:127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "bench.link_tls_bench", "--loop", loop]
        argv += ["--serve", plain, secure]
        argv += [str(server_tls.cert), str(server_tls.key), str(server_tls.ca)]
        with running(argv, ready=secure, stdout=subprocess.DEVNULL) as proc:
            rows = []
            for name, workload in (
                ("ADD+GET round trips, 1 connection", round_trips),
                (f"GET pipelined {DEPTH} deep, 1 connection", pipelined),
                ("new connection per request (HAVE)", per_connection),
            ):
                runs: dict[bool, list[Run]] = {False: [], True: []}
                for _ in range(reps):
                    runs[False].append(measure(proc.pid, workload(plain, None)))
                    runs[True].append(measure(proc.pid, workload(secure, client_tls)))
                rows.append((name, median(runs[False]), median(runs[True])))
            return rows


def report(rows: list[tuple[str, Run, Run]]) -> list[str]:
    lines = [
        "| workload | plain ops/s | TLS ops/s | TLS/plain | server CPU/op plain | TLS |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, plain, tls in rows:
        ratio = tls.rate / plain.rate if plain.rate else 0.0
        lines.append(
            f"| {name} | {plain.rate:,.0f} | {tls.rate:,.0f} | {ratio:.2f} "
            f"| {plain.cpu_us:.1f} us | {tls.cpu_us:.1f} us |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.link_tls_bench", description=__doc__)
    p.add_argument("--reps", type=int, default=REPS, help=f"runs per row (default {REPS})")
    p.add_argument(
        "--loop",
        choices=LOOP_KINDS[1:],
        action="append",
        help="the server's event loop (repeatable; default both)",
    )
    p.add_argument("--serve", nargs=5, metavar=("PLAIN", "TLS", "CERT", "KEY", "CA"))
    args = p.parse_args(argv)
    loops: list[LoopKind] = args.loop or ["uvloop", "asyncio"]
    if args.serve:
        plain, secure, cert, key, ca = args.serve
        serve(plain, secure, LinkTLS(Path(cert), Path(key), Path(ca)), loops[0])
        return 0
    started = time.perf_counter()
    rates = []
    for loop in loops:
        rows = suite(max(1, args.reps), loop)
        print(f"\nserver event loop: {loop}\n")
        for line in report(rows):
            print(line)
        rates += [tls.rate / plain.rate for _, plain, tls in rows if plain.rate]
    print(
        f"\nmedian of {args.reps} runs per cell, {time.perf_counter() - started:.1f} s in all; "
        f"TLS/plain throughput ratio {statistics.median(rates):.2f} (median of the rows)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
