"""``tlscache-farm`` without the ``farm`` extra: a clear message, and nothing left on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest


def farm_command() -> list[str]:
    """The installed ``tlscache-farm`` script, or the module it runs."""
    script = Path(sys.executable).with_name("tlscache-farm")
    return [str(script)] if script.exists() else [sys.executable, "-m", "tlscache_farm"]


def test_console_script_points_at_the_cli() -> None:
    (script,) = entry_points(group="console_scripts", name="tlscache-farm")
    assert script.value == "tlscache_farm.cli:main"


@pytest.mark.parametrize("module", ["trustme", "h11"])
def test_missing_extra_is_named_before_any_directory_is_made(tmp_path: Path, module: str) -> None:
    # sitecustomize runs before the program: it makes ``import MODULE`` fail, as on a machine
    # where only ``pip install tlscache`` was run.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    work = tmp_path / "work"
    work.mkdir()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    argv = [*farm_command(), "--report", "--certs-dir", str(work / "certs")]
    done = subprocess.run(
        argv,
        cwd=work,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"missing: {module}" in done.stderr, done.stderr
    assert "pip install 'tlscache[farm]'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert list(work.iterdir()) == []  # no certs/, no run directory, nothing
