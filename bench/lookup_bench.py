"""What one session lookup costs the TLS server: ``SessionCache.on_get`` hits, per store.

    python -m bench.lookup_bench [--n 2000] [--rounds 3] [--markdown FILE]

Starts every store of :mod:`bench.stores` (dc_server, dc_client, three memcached, Redis, a
3-master Redis Cluster) and, for each, a sealing :class:`~tlscache.SessionCache` (a key ring
made for the run, as deployed) with synchronous writes. One session is stored, then looked
up ``--n`` times in a row on one thread; per lookup: the wall time and this thread's CPU
time (``time.thread_time``), which is what the lookup takes from the handshake's thread.
Stores are measured in turn, ``--rounds`` times (the order alternates), and the median is
reported. ``memory`` (an in-process MemoryStore, unsealed) is the floor: the Python
callbacks without any I/O.

Bounded: every cell stops after ``--n`` lookups or ``--cell-seconds``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from tlscache import SessionCache
from tlscache.stores import open_store
from tlscache_farm.tlsclient import key_ring

from .stores import STORE_NAMES, store_fleet

CONTEXT = b"tlscache-bench"
SESSION_ID = b"\x5a" * 32
DER = b"\x30\x81\x83" + bytes(131)  # a plausible DER SEQUENCE of a session's size


class Cost(NamedTuple):
    wall_us: float
    cpu_us: float


def lookup_cost(spec: str, keys: Path | None, n: int, max_s: float) -> Cost:
    """Wall and thread-CPU microseconds per ``on_get`` hit through the store ``spec``."""
    with open_store(spec) as store:
        cache = SessionCache(
            store,
            deadline_ms=1000,
            async_writes=False,
            keys=keys,
            insecure_unsealed_storage=keys is None,
        )
        try:
            cache.on_new(CONTEXT, SESSION_ID, DER, 300)
            for _ in range(100):  # connections opened, caches warm
                if cache.on_get(CONTEXT, SESSION_ID) != DER:
                    raise AssertionError(f"{spec}: warm-up lookup missed: {cache.stats()}")
            done = 0
            w0, c0 = time.perf_counter(), time.thread_time()
            end = w0 + max_s
            while done < n:
                if cache.on_get(CONTEXT, SESSION_ID) != DER:
                    raise AssertionError(f"{spec}: lookup {done} missed: {cache.stats()}")
                done += 1
                if not done % 128 and time.perf_counter() > end:
                    break
            w1, c1 = time.perf_counter(), time.thread_time()
        finally:
            cache.close()
    return Cost((w1 - w0) / done * 1e6, (c1 - c0) / done * 1e6)


def measure(
    specs: dict[str, str], keys: Path, n: int, rounds: int, max_s: float
) -> dict[str, Cost]:
    """Median cost per store over ``rounds`` (stores interleaved, order alternating)."""
    runs: dict[str, list[Cost]] = {}
    names = ["memory", *specs]
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if name == "memory":
                cost = lookup_cost("memory:", None, n, max_s)
            else:
                cost = lookup_cost(specs[name], keys, n, max_s)
            runs.setdefault(name, []).append(cost)
    return {
        name: Cost(
            statistics.median(c.wall_us for c in costs), statistics.median(c.cpu_us for c in costs)
        )
        for name, costs in runs.items()
    }


def table(costs: dict[str, Cost], n: int, rounds: int) -> list[str]:
    out = [
        f"SessionCache.on_get hit, sealed, one thread ({n:,} lookups x {rounds} rounds, median):",
        "",
        "| store | wall us/lookup | CPU us/lookup |",
        "|---|---:|---:|",
    ]
    order = ["memory", *STORE_NAMES]
    for name in sorted(costs, key=lambda k: order.index(k) if k in order else len(order)):
        c = costs[name]
        label = "memory (unsealed, no I/O)" if name == "memory" else name
        out.append(f"| {label} | {c.wall_us:,.0f} | {c.cpu_us:,.1f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="lookups per cell")
    p.add_argument("--rounds", type=int, default=3, help="rounds (median)")
    p.add_argument("--cell-seconds", type=float, default=5.0, help="time cap per cell")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if not (1 <= args.n <= 100_000 and 1 <= args.rounds <= 15):
        p.error("--n 1..100000, --rounds 1..15")
    with tempfile.TemporaryDirectory(prefix="tlscache-lookup-") as tmp:
        d = Path(tmp)
        keys = key_ring(d / "keys.json")
        with store_fleet(d) as specs:
            costs = measure(specs, keys, args.n, args.rounds, args.cell_seconds)
    text = "\n".join(table(costs, args.n, args.rounds))
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
