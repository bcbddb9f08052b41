"""Instructions per resumed handshake on the server's session-cache path, counted by callgrind.

    python -m bench.callback_cost [--versions 1.2 1.3] [--configs internal,sealed,...]
                                  [--hi 400] [--lo 100] [--compare DIR] [--markdown FILE]

Handshake rates on a shared machine move by several percent from run to run; instruction
counts do not, so this is how a change to the callback path is judged. Every cell
(:mod:`bench.callback_cell`, a fresh interpreter under ``valgrind --tool=callgrind``) makes
a server and a client Context in one process and resumes one session over memory BIOs,
``--hi`` and then ``--lo`` times; the difference of the two totals over ``hi - lo`` is what
one resumed handshake costs, start-up excluded. Client and server are counted together, and
the client's part is the same in every configuration, so the difference between two
configurations is the server's:

* ``internal``: OpenSSL's internal cache, the floor;
* ``memory``: a SessionCache over a MemoryStore, unsealed (the callbacks and the cache);
* ``sealed``: the same, sealed with a key ring, as deployed;
* ``sealed-noinfo``: sealed, without the Context's info callback: what that hook costs.

``--compare DIR`` counts every cell a second time with another copy of the library
(``DIR/tlscache``), e.g. the version before a change. Valgrind makes a cell some 50 times
slower: the defaults take a few minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tlscache_farm.tlsclient import key_ring

ROOT = Path(__file__).resolve().parent.parent
CELL = Path(__file__).resolve().parent / "callback_cell.py"
CONFIGS = ("internal", "memory", "sealed", "sealed-noinfo")
_COLLECTED = re.compile(rb"Collected : (\d+)")


def count(tree: Path, config: str, version: str, n: int, keys: Path, timeout_s: float) -> int:
    """Instructions executed by one cell of ``n`` resumed handshakes (whole process)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={Path(tmp) / 'callgrind.out'}",
            sys.executable,
            str(CELL),
            config,
            version,
            str(n),
            str(keys),
        ]
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        out = subprocess.run(argv, env=env, capture_output=True, timeout=timeout_s, check=False)
    found = _COLLECTED.findall(out.stderr)
    if out.returncode != 0 or not found:
        tail = out.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"cell {config} TLS {version} ({tree}) failed: {tail}")
    return int(found[-1])


def per_handshake(
    tree: Path, config: str, version: str, hi: int, lo: int, keys: Path, timeout_s: float
) -> int:
    """Instructions per resumed handshake: (count(hi) - count(lo)) / (hi - lo)."""
    a = count(tree, config, version, hi, keys, timeout_s)
    b = count(tree, config, version, lo, keys, timeout_s)
    return (a - b) // (hi - lo)


def table(results: dict[tuple[str, str, str], int], trees: list[str]) -> list[str]:
    """Markdown: one row per configuration and version, thousands of instructions."""
    compare = len(trees) > 1
    head = "| TLS | configuration | " + " | ".join(
        f"k instr./handshake ({t}) | over internal ({t})" for t in trees
    )
    lines = [head + (" | change |" if compare else " |")]
    lines.append("|" + "---|" * (2 + 2 * len(trees) + (1 if compare else 0)))
    versions = list(dict.fromkeys(v for v, _, _ in results))
    configs = list(dict.fromkeys(c for _, c, _ in results))
    for version in versions:
        for config in configs:
            cells = []
            for t in trees:
                value = results.get((version, config, t))
                base = results.get((version, "internal", t))
                extra = "" if value is None or base is None else f"{(value - base) / 1000:+.0f}"
                cells += ["" if value is None else f"{value / 1000:.0f}", extra]
            row = f"| {version} | {config} | " + " | ".join(cells) + " |"
            if compare:
                new, old = (results.get((version, config, t)) for t in trees[:2])
                row += f" {(new - old) / 1000:+.1f}k |" if new and old else " |"
            lines.append(row)
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--versions", nargs="+", default=["1.2", "1.3"], choices=["1.2", "1.3"])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    p.add_argument("--hi", type=int, default=400, help="handshakes of the long run")
    p.add_argument("--lo", type=int, default=100, help="handshakes of the short run")
    p.add_argument("--compare", type=Path, help="another tree holding tlscache/")
    p.add_argument("--cell-seconds", type=float, default=900.0, help="limit per cell")
    p.add_argument("--markdown", type=Path, help="also write the table here")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    configs = [c for c in args.configs.split(",") if c]
    if unknown := set(configs) - set(CONFIGS):
        p.error(f"unknown configurations: {sorted(unknown)}")
    if not 0 < args.lo < args.hi:
        p.error("need 0 < --lo < --hi")
    trees = {"this": ROOT}
    if args.compare is not None:
        if not (args.compare / "tlscache").is_dir():
            p.error(f"{args.compare} holds no tlscache/")
        trees["compared"] = args.compare.resolve()
    results: dict[tuple[str, str, str], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = key_ring(Path(tmp) / "keys.json")
        for version in args.versions:
            for config in configs:
                for label, tree in trees.items():
                    results[(version, config, label)] = per_handshake(
                        tree, config, version, args.hi, args.lo, keys, args.cell_seconds
                    )
                    value = results[(version, config, label)]
                    print(f"TLS {version} {config} ({label}): {value} instr.", file=sys.stderr)
    lines = table(results, list(trees))
    print("\n".join(lines))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
