"""Run every atheris fuzz target for a few seconds (``slow``: minutes) in a subprocess.

A target fails when the fuzzer exits non-zero (an exception escaped or an invariant
broke); the message shows the crashing input in hex and the end of the fuzzer's log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.run import TARGETS
from tests.procs import ROOT

pytest.importorskip("atheris")
pytestmark = pytest.mark.fuzz

#: Seconds per target in the default run: eight targets, about a minute in all.
QUICK_SECONDS = 7
#: Seconds per target for ``pytest -m slow`` (override with TLSCACHE_FUZZ_SECONDS).
SLOW_SECONDS = int(os.environ.get("TLSCACHE_FUZZ_SECONDS", "300"))


def fuzz(target: str, seconds: int, artifacts: Path) -> None:
    """Fuzz ``target`` for ``seconds``; fail with the crashing input if there is one."""
    argv = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        target,
        "--seconds",
        str(seconds),
        "-timeout=20",
        f"-artifact_prefix={artifacts}{os.sep}",
        "-print_final_stats=1",
    ]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the runner and its fuzzing child die together
    )
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"fuzzer {target} still running after {seconds + 30} s:\n{_tail(out)}")
    if proc.returncode != 0:
        crashes = sorted(artifacts.iterdir())
        inputs = "\n".join(f"{p.name}: {p.read_bytes().hex()}" for p in crashes) or "(none)"
        pytest.fail(
            f"fuzzer {target} exited {proc.returncode}\ncrashing input (hex):\n{inputs}\n"
            f"{_tail(out)}",
            pytrace=False,
        )


def _tail(out: bytes, lines: int = 40) -> str:
    text = out.decode(errors="replace").splitlines()
    return "\n".join(line for line in text if not line.startswith("INFO: Instrumenting"))[
        -lines * 120 :
    ]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz(target: str, tmp_path: Path) -> None:
    fuzz(target, QUICK_SECONDS, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(SLOW_SECONDS + 120)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_long(target: str, tmp_path: Path) -> None:
    fuzz(target, SLOW_SECONDS, tmp_path)
