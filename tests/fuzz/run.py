"""Run one fuzz target, or all of them, under atheris (libFuzzer).

    python -m tests.fuzz.run TARGET [--seconds N] [libFuzzer flags...]
    python -m tests.fuzz.run all --seconds 600     # every target, N seconds each

TARGET is a module name without ``fuzz_`` (``decoder``, ``serverconn``, ...).
The seed corpus is written to a temporary directory, which libFuzzer also fills
with the inputs it finds; crashing inputs go to ``-artifact_prefix`` (default: the
current directory). Exit status 0 means no crash was found.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from types import ModuleType

TARGETS: tuple[str, ...] = (
    "decoder",
    "serverconn",
    "multiplexer",
    "add_request",
    "replies",
    "analyser",
    "sealer",
    "keyring",
)


def load(target: str) -> ModuleType:
    return importlib.import_module(f"tests.fuzz.fuzz_{target}")


def write_seeds(target: str, directory: str) -> int:
    """Write the target's seeds into ``directory``; return how many."""
    found = load(target).seeds()
    for i, seed in enumerate(found):
        with open(os.path.join(directory, f"seed-{i:04d}"), "wb") as f:
            f.write(seed)
    return len(found)


def fuzz_in_process(target: str, corpus: str, flags: Sequence[str]) -> None:
    """Instrument tlscache, then fuzz; libFuzzer exits the process when done."""
    import atheris

    with atheris.instrument_imports(include=["tlscache"]):
        module = load(target)
    one_input: Callable[[bytes], None] = module.test_one_input
    atheris.Setup([sys.argv[0], *flags, corpus], one_input)
    atheris.Fuzz()


def run_target(target: str, flags: Sequence[str], timeout: float | None) -> int:
    """Fuzz ``target`` in a child process over a fresh seed corpus; its exit status."""
    with tempfile.TemporaryDirectory(prefix=f"tlscache-fuzz-{target}-") as corpus:
        count = write_seeds(target, corpus)
        print(f"fuzz {target}: {count} seeds", file=sys.stderr, flush=True)
        argv = [sys.executable, "-m", "tests.fuzz.run", "--child", target, corpus, *flags]
        proc = subprocess.Popen(argv)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            print(f"fuzz {target}: killed after {timeout:g} s", file=sys.stderr)
            return 124
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        fuzz_in_process(args[1], args[2], args[3:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__)
    parser.add_argument("target", choices=[*TARGETS, "all"])
    parser.add_argument("--seconds", type=int, help="fuzz this long (each target, for 'all')")
    options, flags = parser.parse_known_args(args)
    if options.seconds is not None:
        flags = [f"-max_total_time={options.seconds}", *flags]
    # A hung child is killed well after libFuzzer's own time limit should have stopped it.
    timeout = None if options.seconds is None else options.seconds * 2 + 30
    failed = []
    for target in TARGETS if options.target == "all" else (options.target,):
        status = run_target(target, flags, timeout)
        if status != 0:
            failed.append(f"{target} (exit {status})")
    if failed:
        print("fuzz: crashes in " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
