"""``tlscache-farm --backend-kinds``: threaded, twisted and stdlib backends in one farm resume
each other's sessions (same store, key ring, certificate and session id context)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tlscache_farm import cli
from tlscache_farm.certs import ensure_demo_certs
from tlscache_farm.kinds import (
    backend_kind,
    kind_of,
    kinds_problem,
    matrix_lines,
    parse_kinds,
    resumption_matrix,
)

KINDS = ("threaded", "twisted", "stdlib")


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ensure_demo_certs(d)
    return d


def test_kinds_cycle_over_the_backends() -> None:
    kinds = parse_kinds("threaded, twisted,stdlib")
    assert kinds == KINDS
    assert [kind_of(kinds, i) for i in range(1, 7)] == [*KINDS, *KINDS]
    assert [backend_kind(kinds, n) for n in ("backend-4", "apache", None, "backend-0")] == [
        "threaded",
        None,
        None,
        None,
    ]
    with pytest.raises(ValueError, match="'gevent'"):
        parse_kinds("threaded,gevent")


def test_matrix_counts_made_by_and_resumed_by() -> None:
    pairs = [("backend-1", "backend-2"), ("backend-1", "backend-2"), ("backend-3", "backend-3")]
    pairs += [(None, "backend-1")]  # a resumption whose full handshake the client never saw
    matrix = resumption_matrix(pairs, KINDS)
    assert matrix == {("threaded", "twisted"): 2, ("stdlib", "stdlib"): 1}, matrix
    lines = matrix_lines([matrix, {}], KINDS, 10)
    assert len(lines) == 1 + 9, lines
    row = next(line for line in lines if "threaded -> twisted" in line)
    assert row.split()[-2:] == ["2", "0"], lines


def test_unknown_kind_and_unsupported_modes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--backend-kinds", "threaded,nginx", "--report"]) == 2
    assert "unknown backend kind 'nginx'" in capsys.readouterr().err
    argv = ["--backend-kinds", "stdlib", "--resumption", "stateless", "--report"]
    assert cli.main(argv) == 2
    assert "--resumption stateful" in capsys.readouterr().err


def test_twisted_is_refused_without_twisted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert kinds_problem(KINDS) is None  # installed here
    monkeypatch.setitem(sys.modules, "twisted", None)  # what an import without it meets
    monkeypatch.setitem(sys.modules, "twisted.web.server", None)
    problem = kinds_problem(KINDS)
    assert problem is not None and "'twisted' extra" in problem, problem
    assert kinds_problem(("threaded", "stdlib")) is None
    assert cli.main(["--backend-kinds", "twisted", "--report"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tlscache[twisted]" in err, err


def _matrix(out: str) -> dict[tuple[str, str], list[int]]:
    cells = {}
    for m in re.finditer(r"^ {4}(\w+) -> (\w+)\s+(\d+)\s+(\d+)$", out, re.MULTILINE):
        cells[m[1], m[2]] = [int(m[3]), int(m[4])]
    return cells


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_every_kind_resumes_every_other_kinds_sessions(certs_dir: Path) -> None:
    argv = [sys.executable, "-m", "tlscache_farm", "--report", "--backends", "3"]
    argv += ["--backend-kinds", ",".join(KINDS), "--certs-dir", str(certs_dir)]
    argv += ["--clients", "15", "--reconnects", "4", "--concurrency", "4", "--pause-ms", "5"]
    done = subprocess.run(argv, capture_output=True, timeout=80, text=True)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    errors = next(line for line in out.splitlines() if "connections (errors)" in line)
    assert re.findall(r"\((\d+)\)", errors) == ["0", "0"], out  # no connection failed
    cells = _matrix(out)
    assert set(cells) == {(a, b) for a in KINDS for b in KINDS}, out
    # Round-robin over three backends sends the reconnects of a client to every other
    # backend: each kind resumed, in the shared farm, sessions made by every other kind.
    off = {pair: shared for pair, (shared, _) in cells.items() if pair[0] != pair[1]}
    assert all(off.values()), (off, out)
    # Per-backend caches cannot resume another backend's session.
    assert all(alone == 0 for (a, b), (_, alone) in cells.items() if a != b), out
    elsewhere = next(line for line in out.splitlines() if "of which on another backend" in line)
    assert int(elsewhere.split()[-2]) == sum(off.values()), out
