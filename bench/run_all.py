"""Run every benchmark in turn (``make bench``); each rewrites its own results file.

The distcache and proxy benchmarks rewrite docs/bench-distcache.md and
docs/bench-proxy.md (keeping their hand-written readings); the handshake
benchmark prints its tables (``--markdown FILE`` writes them), and so does the store
benchmark (every remote store side by side). docs/benchmarks.md summarises them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCHES = (
    ["bench.distcache_bench"],
    ["bench.proxy_bench"],
    ["bench.handshake_bench"],
    ["bench.store_bench"],
)


def main() -> int:
    failed = 0
    for argv in BENCHES:
        print(f"=== python -m {' '.join(argv)}", flush=True)
        rc = subprocess.call([sys.executable, "-m", *argv], cwd=ROOT)
        if rc != 0:
            print(f"--- {argv[0]} exited with status {rc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
