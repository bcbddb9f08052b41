"""What one session lookup costs the TLS server: ``SessionCache.on_get`` hits, per store.

    python -m bench.lookup_bench [--n 2000] [--rounds 5] [--compare DIR] [--markdown FILE]

Starts every store of :mod:`bench.stores` (dc_server, dc_client, three memcached, Redis, a
3-master Redis Cluster). Each cell (:mod:`bench.lookup_cell`, a fresh process) makes a
sealing :class:`~tlscache.SessionCache` over one store (a key ring made for the run, as
deployed; synchronous writes), stores one session and looks it up ``--n`` times in a row on
one thread. Per lookup: the wall time and the thread's CPU time (``time.thread_time``),
which is what the lookup takes from the handshake's thread. ``memory`` (an in-process
MemoryStore, unsealed) is the floor: the Python callbacks without any I/O.

``--compare DIR`` runs every cell a second time with another copy of the library
(``DIR/tlscache``, e.g. an older version) against the same running stores, the two
interleaved in every round (which goes first alternates), so that machine load hits both
alike; the table then shows both and the per-round ratios' median.

Bounded: every cell stops after ``--n`` lookups or ``--cell-seconds``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tlscache_farm.tlsclient import key_ring

from .lookup_cell import Cost
from .stores import STORE_NAMES, store_fleet

ROOT = Path(__file__).resolve().parent.parent
CELL = Path(__file__).resolve().parent / "lookup_cell.py"


def run_cell(tree: Path, spec: str, keys: Path | None, n: int, max_s: float) -> Cost:
    """One cell in a fresh interpreter that imports ``tree/tlscache``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, str(CELL), spec, str(keys or "-"), str(n), str(max_s)]
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=max_s + 60, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"lookup cell {spec} ({tree}) failed: {out.stderr[-2000:]}")
    wall, cpu = out.stdout.split()
    return Cost(float(wall), float(cpu))


def measure(
    specs: dict[str, str],
    keys: Path,
    trees: dict[str, Path],
    n: int,
    rounds: int,
    max_s: float,
) -> dict[tuple[str, str], list[Cost]]:
    """(store, tree label) -> one cost per round; stores and trees interleaved."""
    runs: dict[tuple[str, str], list[Cost]] = {}
    cells = {"memory": ("memory:", None), **{name: (spec, keys) for name, spec in specs.items()}}
    labels = list(trees)
    for r in range(rounds):
        for name in cells if r % 2 == 0 else reversed(cells):
            spec, sealed_by = cells[name]
            for label in labels if r % 2 == 0 else labels[::-1]:
                cost = run_cell(trees[label], spec, sealed_by, n, max_s)
                runs.setdefault((name, label), []).append(cost)
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return runs


def table(runs: dict[tuple[str, str], list[Cost]], n: int, rounds: int) -> list[str]:
    labels = list(dict.fromkeys(label for _, label in runs))
    names = list(dict.fromkeys(name for name, _ in runs))
    order = ["memory", *STORE_NAMES]
    names.sort(key=lambda k: order.index(k) if k in order else len(order))
    head = "| store |"
    rule = "|---|"
    for label in labels:
        head += f" wall us ({label}) | CPU us ({label}) |"
        rule += "---:|---:|"
    if len(labels) == 2:
        head += f" CPU {labels[1]} / {labels[0]} (median of rounds) |"
        rule += "---:|"
    out = [
        f"SessionCache.on_get hit, sealed, one thread ({n:,} lookups x {rounds} rounds, "
        "median; each cell a fresh process):",
        "",
        head,
        rule,
    ]
    for name in names:
        row = f"| {'memory (unsealed, no I/O)' if name == 'memory' else name} |"
        for label in labels:
            costs = runs[(name, label)]
            wall = statistics.median(c.wall_us for c in costs)
            cpu = statistics.median(c.cpu_us for c in costs)
            row += f" {wall:,.0f} | {cpu:,.1f} |"
        if len(labels) == 2:
            a, b = runs[(name, labels[0])], runs[(name, labels[1])]
            ratio = statistics.median(y.cpu_us / x.cpu_us for x, y in zip(a, b, strict=True))
            row += f" {ratio:.2f}x |"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=2000, help="lookups per cell")
    p.add_argument("--rounds", type=int, default=5, help="rounds (median)")
    p.add_argument("--cell-seconds", type=float, default=5.0, help="time cap per cell")
    p.add_argument("--compare", type=Path, help="another tree holding tlscache/ to measure too")
    p.add_argument("--label", default="this tree", help="the checkout's label in the table")
    p.add_argument("--compare-label", default="other", help="the --compare tree's label")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if not (1 <= args.n <= 100_000 and 1 <= args.rounds <= 15):
        p.error("--n 1..100000, --rounds 1..15")
    trees = {args.label: ROOT}
    if args.compare is not None:
        if not (args.compare / "tlscache" / "__init__.py").is_file():
            p.error(f"{args.compare} holds no tlscache/")
        trees = {args.compare_label: args.compare.resolve(), args.label: ROOT}
    with tempfile.TemporaryDirectory(prefix="tlscache-lookup-") as tmp:
        d = Path(tmp)
        keys = key_ring(d / "keys.json")
        with store_fleet(d) as specs:
            runs = measure(specs, keys, trees, args.n, args.rounds, args.cell_seconds)
    text = "\n".join(table(runs, args.n, args.rounds))
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
