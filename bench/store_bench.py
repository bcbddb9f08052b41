"""Every remote store side by side: store operations, lookups, and resumed handshakes.

    python -m bench.store_bench [--ops 2000] [--pairs 7] [--count 60] [--markdown FILE]

Starts the stores of :mod:`bench.stores` on loopback (dc_server; dc_client in front of it;
a group of three memcached; one Redis; a 3-master Redis Cluster) and measures, in one run:

1. **Store operations**: ``store`` (an ADD/SET of a 200-byte value under a fresh 32-byte key)
   and ``fetch`` (a hit, cycling over the newest 256 stored) through
   :func:`tlscache.stores.open_store`, one thread, one call at a time: operations per second
   and this thread's CPU per operation.
2. **One lookup**: ``SessionCache.on_get`` hits, sealed (:mod:`bench.lookup_bench`, each
   cell a fresh process): wall and CPU microseconds per lookup.
3. **Resumed handshakes**: one TLS server process per store (``bench.spec_tlsserver``: a
   sealing SessionCache, synchronous writes, 4 threads) and one with OpenSSL's internal
   cache. A pyOpenSSL client here makes sequential resumed connections (handshake, one
   line, clean shutdown). Every pair measures a store's server and the internal one back
   to back (which goes first alternates), TLS 1.2 and 1.3; the table gives the median of
   the per-pair rate ratios, so that machine load hits both sides of a ratio alike.
4. **The ceiling** (:mod:`bench.round_trip`): one no-op request to each store's server from
   a raw socket, the caller busy between requests for as long as an internal-cache
   handshake took in step 3. A resumed handshake makes that round trip for its lookup and,
   in TLS 1.3, also writes the ticket OpenSSL issues on resumption (synchronous writes),
   which costs at least one ``store`` of step 1. Internal time / (internal time + those)
   is the best ratio any lookup path could reach here, before it does any work of its own.

Bounded: every cell stops at its count or ``--cell-seconds``; the whole run takes about
two minutes, and every server it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from tlscache.deadline import Deadline
from tlscache.stores import open_store
from tlscache_farm.procs import free_port, running, wait_connectable
from tlscache_farm.tlsclient import VERSIONS, key_ring, server_argv

from . import lookup_bench, round_trip
from .handshake_bench import Server, make_certs, run_cell
from .lookup_cell import Cost
from .stores import store_fleet

ROOT = Path(__file__).resolve().parent.parent
VALUE = bytes(range(200))  # about a sealed session's size
TTL_S = 300
RECENT = 256  #: fetches cycle over this many of the newest stored sessions


class OpRate(NamedTuple):
    ops: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.ops * 1e6 if self.ops else 0.0


def store_ops(spec: str, n: int, max_s: float) -> dict[str, OpRate]:
    """``store`` then ``fetch`` rates through one store; every fetch must hit."""
    out: dict[str, OpRate] = {}
    keys = [os.urandom(32) for _ in range(n)]
    with open_store(spec) as store:
        store.store(b"\x01" * 32, VALUE, TTL_S, Deadline.after(5.0))  # connections made
        for op in ("store", "fetch"):
            done = 0
            w0, c0 = time.perf_counter(), time.thread_time()
            end = w0 + max_s
            for key in keys:
                deadline = Deadline.after(1.0)
                if op == "store":
                    store.store(key, VALUE, TTL_S, deadline)
                elif store.fetch(key, deadline) != VALUE:
                    raise AssertionError(f"{spec}: fetch {done} missed")
                done += 1
                if not done % 128 and time.perf_counter() > end:
                    break
            out[op] = OpRate(done, time.perf_counter() - w0, time.thread_time() - c0)
            # Fetch the newest sessions stored (dc_server keeps 512 by default), in turn.
            recent = keys[max(0, done - RECENT) : done]
            keys = [recent[i % len(recent)] for i in range(n)]
    return out


@contextlib.contextmanager
def tls_server(chain: Path, key: Path, store: str, keys: Path, threads: int) -> Iterator[Server]:
    """A TLS server over the store string ``store`` (sealed with ``keys``), or ``internal``."""
    port = free_port()
    extra = ["--threads", str(threads), "--no-stats", "--sync-writes"]
    if store == "internal":
        argv = server_argv(chain, key, port, "internal", *extra)
    else:
        argv = server_argv(chain, key, port, "dc:" + store, *extra, keys=keys)
        argv[2] = "bench.spec_tlsserver"  # [python, -m, module, ...]
    env = {"PYTHONPATH": str(ROOT)}
    with running(argv, ready=f"IP:127.0.0.1:{port}", env=env, stderr=subprocess.DEVNULL) as proc:
        yield Server(port, proc.pid)


@dataclass
class Pairs:
    """Resumed handshakes through one store and through the internal cache, pair by pair."""

    store_rates: list[float] = field(default_factory=list)
    internal_rates: list[float] = field(default_factory=list)
    store_cpu: list[float] = field(default_factory=list)
    internal_cpu: list[float] = field(default_factory=list)
    reused: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def handshake_pairs(
    servers: dict[str, Server], args: argparse.Namespace
) -> dict[tuple[str, str], Pairs]:
    out: dict[tuple[str, str], Pairs] = {}
    stores = [name for name in servers if name != "internal"]
    for r in range(args.pairs):
        for version in VERSIONS:
            for name in stores if r % 2 == 0 else stores[::-1]:
                pair = out.setdefault((version, name), Pairs())
                order = (
                    [name, "internal"] if (r + len(pair.ratios)) % 2 == 0 else ["internal", name]
                )
                got = {}
                for which in order:
                    cell = run_cell(
                        servers[which].port, version, True, args.count, args.cell_seconds
                    )
                    got[which] = cell
                s, i = got[name], got["internal"]
                pair.store_rates += s.rates
                pair.internal_rates += i.rates
                pair.store_cpu += s.cpu_us
                pair.internal_cpu += i.cpu_us
                pair.reused += s.reused
                pair.ratios.append(s.rates[0] / i.rates[0])
        print(f"handshake pairs {r + 1}/{args.pairs} done", file=sys.stderr, flush=True)
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def round_trips(
    specs: dict[str, str], pairs: dict[tuple[str, str], Pairs], args: argparse.Namespace
) -> dict[tuple[str, str], round_trip.RoundTrip]:
    """Each store's bare round trip, the caller busy between requests for one median
    internal-cache handshake of that TLS version (as measured in ``pairs``)."""
    out: dict[tuple[str, str], round_trip.RoundTrip] = {}
    for version in VERSIONS:
        internal = [r for (v, _), p in pairs.items() if v == version for r in p.internal_rates]
        if not internal:
            continue
        gap_s = 1.0 / _med(internal)
        for name, spec in specs.items():
            out[(version, name)] = round_trip.measure(spec, gap_s, args.ops, args.cell_seconds)
    return out


#: Resumed handshakes through a store / through OpenSSL's internal cache, at least.
TARGETS = {"dc_client": 0.80}
DIRECT_TARGET = 0.85


def report(
    ops: dict[str, dict[str, OpRate]],
    lookups: dict[tuple[str, str], list[Cost]],
    pairs: dict[tuple[str, str], Pairs],
    trips: dict[tuple[str, str], round_trip.RoundTrip],
    args: argparse.Namespace,
    load: tuple[float, float],
    seconds: float,
) -> list[str]:
    out = [
        f"Load average before / after the run: {load[0]:.2f} / {load[1]:.2f} "
        f"({os.cpu_count()} CPUs); total run time {seconds:.0f} s.",
        "",
        f"Store operations, one thread, one call at a time ({args.ops:,} per cell; "
        "200-byte values):",
        "",
        "| store | store ops/s | store CPU us/op | fetch ops/s | fetch CPU us/op |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rates in ops.items():
        st, fe = rates["store"], rates["fetch"]
        out.append(
            f"| {name} | {st.rate:,.0f} | {st.cpu_us:,.1f} | {fe.rate:,.0f} | {fe.cpu_us:,.1f} |"
        )
    out += [""]
    out += lookup_bench.table(lookups, args.lookups, args.lookup_rounds)
    out += [
        "",
        f"Resumed handshakes, store vs OpenSSL's internal cache, {args.count} sequential "
        f"connections per cell, {args.pairs} pairs per row (median; ratio: median of the "
        "per-pair ratios; target >= 0.85x direct, >= 0.80x through dc_client):",
        "",
        "| TLS | store | hs/s | internal hs/s | store / internal | target | "
        "server CPU us/hs | internal CPU us/hs | resumed |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for (version, name), p in pairs.items():
        ratio = _med(p.ratios)
        target = TARGETS.get(name, DIRECT_TARGET)
        verdict = f"{target:.2f}x {'met' if ratio >= target else 'missed'}"
        out.append(
            f"| {version} | {name} | {_med(p.store_rates):,.0f} | {_med(p.internal_rates):,.0f} "
            f"| {ratio:.2f}x | {verdict} | {_med(p.store_cpu):,.0f} | {_med(p.internal_cpu):,.0f} "
            f"| {_med(p.reused):.0%} |"
        )
    out += [
        "",
        "The ceiling: one no-op request to the store's server from a raw socket (no client "
        "library, no sealing, no callback), the caller busy between requests for one median "
        "internal-cache handshake. The best ratio is internal time / (internal time + the "
        "round trip + in TLS 1.3 the ticket's write, at the back-to-back `store` rate above, "
        "which is a reply for memcached and Redis and a send for distcache):",
        "",
        "| TLS | store | internal handshake us | round trip p50 us | p90 us | write us "
        "| best possible | measured |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (version, name), trip in trips.items():
        p = pairs[(version, name)]
        hs_s = 1.0 / _med(p.internal_rates)
        store = ops[name]["store"]
        write_s = 1.0 / store.rate if version == "1.3" and store.rate else 0.0
        best = round_trip.ceiling(hs_s, trip.p50_us / 1e6 + write_s)
        out.append(
            f"| {version} | {name} | {hs_s * 1e6:,.0f} | {trip.p50_us:,.0f} | {trip.p90_us:,.0f} "
            f"| {write_s * 1e6:,.0f} | {best:.2f}x | {_med(p.ratios):.2f}x |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--ops", type=int, default=2000, help="store operations per cell")
    p.add_argument("--lookups", type=int, default=2000, help="lookups per lookup cell")
    p.add_argument("--lookup-rounds", type=int, default=3, help="rounds of lookup cells")
    p.add_argument("--compare", type=Path, help="lookup cells with this tree's tlscache too")
    p.add_argument("--pairs", type=int, default=7, help="handshake pairs per (TLS, store)")
    p.add_argument("--count", type=int, default=200, help="connections per handshake cell")
    p.add_argument("--cell-seconds", type=float, default=2.0, help="time cap per cell")
    p.add_argument("--threads", type=int, default=4, help="TLS server threads")
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = p.parse_args(argv)
    if not (
        1 <= args.ops <= 50_000
        and 1 <= args.lookups <= 50_000
        and 1 <= args.lookup_rounds <= 9
        and 1 <= args.pairs <= 25
        and 1 <= args.count <= 2000
    ):
        p.error("--ops/--lookups 1..50000, --lookup-rounds 1..9, --pairs 1..25, --count 1..2000")
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="tlscache-stores-") as tmp:
        d = Path(tmp)
        chain, key = make_certs(d)
        keys = key_ring(d / "keys.json")
        with store_fleet(d) as specs, contextlib.ExitStack() as stack:
            ops = {
                name: store_ops(spec, args.ops, args.cell_seconds) for name, spec in specs.items()
            }
            print("store operations done", file=sys.stderr, flush=True)
            trees = {"this tree": ROOT}
            if args.compare is not None:
                trees = {"before": args.compare.resolve(), "after": ROOT}
            lookups = lookup_bench.measure(
                specs, keys, trees, args.lookups, args.lookup_rounds, args.cell_seconds
            )
            print("lookups done", file=sys.stderr, flush=True)
            servers = {
                "internal": stack.enter_context(
                    tls_server(chain, key, "internal", keys, args.threads)
                )
            }
            for name, spec in specs.items():
                servers[name] = stack.enter_context(
                    tls_server(chain, key, spec, keys, args.threads)
                )
            for srv in servers.values():
                wait_connectable(f"IP:127.0.0.1:{srv.port}")
            pairs = handshake_pairs(servers, args)
            trips = round_trips(specs, pairs, args)
            print("round trips done", file=sys.stderr, flush=True)
    lines = report(
        ops, lookups, pairs, trips, args, (load0, os.getloadavg()[0]), time.monotonic() - started
    )
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
