"""Redis store benchmark: store/fetch/take operations per second of ``RedisStore`` against
one local redis-server and of ``RedisClusterStore`` against a local 3-master cluster.

Run as ``python -m bench.redis_bench`` (under 30 s). Each phase is bounded in count and
time. One thread runs the calls one after another (a handshake's lookup is one round
trip); "4 threads" runs fetches from four threads at once over the store's pool. A plain
redis-py ``Redis.get`` loop on the same server is the floor, and the cost of a call
refused during a down period is measured with a stopped server. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final

import redis

from tests.redisutil import redis_cluster, redis_server
from tlscache.deadline import Deadline
from tlscache.exceptions import StoreError
from tlscache.stores.redis import RedisClusterStore, RedisStore

VALUE: Final = os.urandom(180)  # a sealed TLS 1.2 session is about this size
Store = RedisStore | RedisClusterStore


def sid(i: int) -> bytes:
    return i.to_bytes(8, "big") * 4


def timed(n: int, budget_s: float, op: Callable[[int], object]) -> tuple[float, float, float]:
    """ops/s, p50 and p99 in microseconds of ``op(i)`` for up to ``n`` calls or ``budget_s``."""
    samples: list[float] = []
    stop = time.perf_counter() + budget_s
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        op(i)
        samples.append(time.perf_counter() - t0)
        if t0 > stop:
            break
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(samples, n=100)
    return len(samples) / elapsed, q[49] * 1e6, q[98] * 1e6


def threaded(store: Store, n: int, threads: int, budget_s: float) -> float:
    """Aggregate fetches/s of ``threads`` threads, each up to ``n`` calls or ``budget_s``."""
    counts = [0] * threads
    stop = time.perf_counter() + budget_s

    def work(t: int) -> None:
        for i in range(n):
            store.fetch(sid(i), Deadline.after(1.0))
            counts[t] += 1
            if time.perf_counter() > stop:
                return

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def phases(store: Store, n: int, budget_s: float) -> list[tuple[str, float, float, float]]:
    rows = []
    rows.append(
        ("store", *timed(n, budget_s, lambda i: store.store(sid(i), VALUE, 300, Deadline.after(1))))
    )
    rows.append(("fetch", *timed(n, budget_s, lambda i: store.fetch(sid(i), Deadline.after(1)))))
    rows.append(("take", *timed(n, budget_s, lambda i: store.take(sid(i), Deadline.after(1)))))
    for i in range(n):
        store.store(sid(i), VALUE, 300, Deadline.after(1))
        if i > 2000:
            break
    rows.append(("fetch, 4 threads", threaded(store, 2000, 4, budget_s), 0.0, 0.0))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.redis_bench", description=__doc__)
    p.add_argument("-n", type=int, default=5000, help="calls per phase (default 5000)")
    p.add_argument("--budget", type=float, default=1.5, help="seconds per phase at most")
    args = p.parse_args(argv)
    n, budget = args.n, args.budget
    table: list[tuple[str, str, float, float, float]] = []
    with redis_server() as srv:
        with RedisStore(srv.url) as store:
            for row in phases(store, n, budget):
                table.append(("redis-server", *row))
        plain = redis.Redis(port=srv.port, socket_timeout=1.0)
        floor = timed(n, budget, lambda i: plain.get(sid(i)))
        table.append(("redis-server", "redis-py Redis.get (floor)", *floor))
        plain.close()
        with RedisStore(srv.url) as store:
            store.fetch(sid(0), Deadline.after(1))
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                with contextlib.suppress(StoreError):  # starts the down period
                    store.fetch(sid(0), Deadline.after(0.2))

                def refused(i: int) -> None:
                    try:
                        store.fetch(sid(i), Deadline.after(1))
                    except StoreError:
                        return
                    raise AssertionError("a stopped server answered")

                table.append(("stopped server", "fetch while down", *timed(n, budget, refused)))
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
    with redis_cluster() as cluster, RedisClusterStore(cluster.nodes) as cstore:
        for row in phases(cstore, n, budget):
            table.append(("3-master cluster", *row))
    versions = f"Python {platform.python_version()}, redis-py {redis.__version__}"
    print(f"{versions}, {os.cpu_count()} CPUs")
    print("| server | operation | ops/s | p50 µs | p99 µs |")
    print("|---|---|---:|---:|---:|")
    for where, op, rate, p50, p99 in table:
        lat = f"{p50:.0f} | {p99:.0f}" if p50 else "- | -"
        print(f"| {where} | {op} | {rate:,.0f} | {lat} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
