"""One cell of :mod:`bench.lookup_bench`: ``on_get`` hits through one store, in this process.

    python bench/lookup_cell.py STORE KEYS|- N MAX_SECONDS

Prints ``wall_us cpu_us`` per lookup. Imports nothing but :mod:`tlscache`, so that the
lookup bench can run it against another copy of the library (``PYTHONPATH``) and compare
two versions side by side against the same running stores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

from tlscache import SessionCache
from tlscache.stores import open_store

CONTEXT = b"tlscache-bench"
SESSION_ID = b"\x5a" * 32
DER = b"\x30\x81\x83" + bytes(131)  # a plausible DER SEQUENCE of a session's size


class Cost(NamedTuple):
    wall_us: float
    cpu_us: float


def lookup_cost(spec: str, keys: Path | None, n: int, max_s: float) -> Cost:
    """Wall and thread-CPU microseconds per ``on_get`` hit through the store ``spec``.

    Sealed with ``keys`` (as deployed), or unsealed without.
    """
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


def main(argv: list[str]) -> int:
    spec, keys, n, max_s = argv
    cost = lookup_cost(spec, None if keys == "-" else Path(keys), int(n), float(max_s))
    print(f"{cost.wall_us:.3f} {cost.cpu_us:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
