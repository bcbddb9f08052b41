"""memcached: the meta-protocol store against pymemcache, on one local memcached.

Run as ``python -m bench.memcached_bench`` (under 30 seconds). It starts one memcached on
127.0.0.1 and measures, one thread, one operation at a time, with every answer checked:

* ``meta``: :class:`~tlscache.stores.memcached.MemcachedStore` (``ms`` / ``mg`` /
  ``mg v c`` + ``md C<cas>`` for take);
* ``pymemcache Client``: ``set`` / ``get`` / ``gets`` + ``cas(key, b"", cas, expire=1)``
  (the classic take: the winner's ``cas`` answers True, an empty value counts as a miss);
* ``pymemcache HashClient``: the same through its thread-safe pooled placement client.

Each line gives operations per second and this process's CPU time per operation. Every
phase is bounded in count (``--ops``) and in time (``--seconds`` per phase).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple

from tlscache.deadline import Deadline
from tlscache.stores.memcached import MemcachedStore
from tlscache_farm.procs import free_port, running

VALUE: Final = bytes(range(256)) * 1  # a sealed TLS 1.3 session is about this size
TTL: Final = 300


class Result(NamedTuple):
    client: str
    op: str
    ops: int
    seconds: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.ops * 1e6 if self.ops else 0.0


def timed(
    client: str, op: str, keys: Sequence[bytes], fn: Callable[[bytes], Any], limit_s: float
) -> Result:
    """Run ``fn`` over ``keys`` (stopping after ``limit_s``); every call must return truthy."""
    start, cpu0 = time.perf_counter(), time.process_time()
    done = 0
    for key in keys:
        if not fn(key):
            raise AssertionError(f"{client} {op}: a call failed")
        done += 1
        if done % 256 == 0 and time.perf_counter() - start > limit_s:
            break
    return Result(client, op, done, time.perf_counter() - start, time.process_time() - cpu0)


def bench_meta(address: str, ids: Sequence[bytes], limit_s: float) -> list[Result]:
    store = MemcachedStore([address], key_prefix="bm:")

    def dl() -> Deadline:
        return Deadline.after(2.0)

    try:
        out = [timed("meta", "store", ids, lambda i: store.store(i, VALUE, TTL, dl()), limit_s)]
        ids = ids[: out[0].ops]  # what was stored within the time limit
        out.append(timed("meta", "fetch", ids, lambda i: store.fetch(i, dl()) == VALUE, limit_s))
        out.append(timed("meta", "take", ids, lambda i: store.take(i, dl()) == VALUE, limit_s))
    finally:
        store.close()
    return out


def bench_pymemcache(name: str, client: Any, ids: Sequence[bytes], limit_s: float) -> list[Result]:
    keys = [b"pm:" + i.hex().encode() for i in ids]

    def take(key: bytes) -> bool:
        value, cas = client.gets(key)
        if not value:
            return False
        return bool(client.cas(key, b"", cas, expire=1, noreply=False)) and value == VALUE

    try:
        out = [
            timed(name, "store", keys, lambda k: client.set(k, VALUE, TTL, noreply=False), limit_s)
        ]
        keys = keys[: out[0].ops]  # what was stored within the time limit
        out.append(timed(name, "fetch", keys, lambda k: client.get(k) == VALUE, limit_s))
        out.append(timed(name, "take", keys, take, limit_s))
    finally:
        client.close()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memcached_bench", description=__doc__)
    p.add_argument("--ops", type=int, default=5000, help="operations per phase (5000)")
    p.add_argument("--seconds", type=float, default=2.0, help="time limit per phase (2)")
    args = p.parse_args(argv)

    from pymemcache.client import base, hash  # type: ignore[import-untyped]

    Client: Any = base.Client
    HashClient: Any = hash.HashClient

    binary = shutil.which("memcached") or "/usr/bin/memcached"
    port = free_port()
    cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-t", "2"]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    results: list[Result] = []
    with running(cmd, ready=f"IP:127.0.0.1:{port}", stdout=subprocess.DEVNULL):
        for round_ in range(2):  # the second round is reported: caches and sockets are warm
            ids = [os.urandom(32) for _ in range(args.ops)]
            timeouts = {"connect_timeout": 1.0, "timeout": 2.0}
            pm = Client(("127.0.0.1", port), no_delay=True, **timeouts)
            hc = HashClient([("127.0.0.1", port)], use_pooling=True, no_delay=True, **timeouts)
            runs = bench_meta(f"127.0.0.1:{port}", ids, args.seconds)
            runs += bench_pymemcache("pymemcache Client", pm, ids, args.seconds)
            runs += bench_pymemcache("pymemcache HashClient", hc, ids, args.seconds)
            if round_:
                results = runs
    print(f"one memcached 1.6 on 127.0.0.1, one thread, {len(VALUE)}-byte values")
    print(f"{'client':<24}{'op':<8}{'ops':>7}{'ops/s':>10}{'CPU us/op':>11}")
    for r in results:
        print(f"{r.client:<24}{r.op:<8}{r.ops:>7}{r.rate:>10.0f}{r.cpu_us:>11.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
