"""What the farm says when one of its processes dies on its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tlscache_farm.orchestrator import Farm, _say_exited
from tlscache_farm.supervisor import Proc


def _died(tmp_path: Path, code: str) -> Proc:
    """A balancer process that ran ``code`` and is gone, its output in its log."""
    log = tmp_path / "balancer.log"
    argv = [sys.executable, "-c", code]
    proc = Proc("balancer", argv, "https://localhost:1/", "IP:127.0.0.1:1", log)
    with open(log, "wb") as out:
        proc.popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    proc.popen.wait(timeout=30)
    return proc


def _farm(tmp_path: Path) -> Farm:
    fake: Any = SimpleNamespace(cache_servers=[], token_file=tmp_path / "control-token")
    return cast(Farm, fake)


def test_a_process_that_fails_shows_its_last_words(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = "import sys; print('starting'); sys.exit('OSError: [Errno 98] address already in use')"
    _say_exited(_farm(tmp_path), _died(tmp_path, code), status_port=8080)
    err = capsys.readouterr().err
    assert "balancer status 1; log: " in err, err
    assert "    OSError: [Errno 98] address already in use" in err, err
    assert "/process/balancer/start" in err, err


def test_a_process_killed_by_a_signal_is_not_quoted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = "import os, signal; print('serving'); os.kill(os.getpid(), signal.SIGKILL)"
    _say_exited(_farm(tmp_path), _died(tmp_path, code), status_port=None)
    err = capsys.readouterr().err
    assert "balancer killed by SIGKILL; log: " in err, err
    assert "serving" not in err and "start it again" not in err, err
