"""tlscache-keys, run as the installed console script: generate, rotate, list, retire."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tlscache.keyring import KeyRing

SCRIPT = Path(sys.executable).parent / "tlscache-keys"

pytestmark = pytest.mark.skipif(
    not SCRIPT.exists(), reason="tlscache-keys is not installed (pip install -e .)"
)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def secrets_of(ring: KeyRing) -> list[str]:
    """Every way a secret of ``ring`` could show up in text."""
    raw = [ring.lookup_secret, *(k.secret for k in ring.keys if k.secret is not None)]
    forms = []
    for secret in raw:
        forms += [base64.b64encode(secret).decode()[:12], secret.hex()[:12], repr(secret)[:12]]
    return forms


def test_generate_rotate_list_retire(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    outputs: list[str] = []
    rings: list[KeyRing] = []

    def step(*args: str | Path, rc: int = 0) -> str:
        done = run(*args)
        assert done.returncode == rc, done.stderr
        outputs.append(done.stdout + done.stderr)
        if path.exists():
            rings.append(KeyRing.load(path))
        return done.stdout + done.stderr

    out = step("generate", path)
    assert "created" in out and "sealing key 1" in out and "fingerprint" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = KeyRing.load(path)
    assert f"fingerprint {first.fingerprint()}" in out

    out = step("generate", path, rc=1)  # never replaces a ring by accident
    assert "exists" in out and "--force" in out
    assert KeyRing.load(path) == first

    out = step("rotate", path)
    assert "key 2 seals from now on" in out
    out = step("list", path)
    lines = out.splitlines()
    assert lines[0] == f"fingerprint {KeyRing.load(path).fingerprint()}"
    assert [line.split()[-1] for line in lines[2:]] == ["opening", "sealing"]

    out = step("retire", path, "2", rc=1)  # the sealing key cannot go
    assert "rotate before retiring" in out
    out = step("retire", path, "1")
    assert "retired 1" in out
    out = step("list", path)
    assert [line.split()[-1] for line in out.splitlines()[2:]] == ["retired", "sealing"]

    ring = KeyRing.load(path)
    assert ring.lookup_secret == first.lookup_secret  # rotation never moved stored sessions
    assert ring.by_id()[1].secret is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["keys.json"]

    out = step("generate", "--force", path)
    assert KeyRing.load(path).lookup_secret != first.lookup_secret

    text = "\n".join(outputs)
    for ring in rings:
        for form in secrets_of(ring):
            assert form not in text


def test_unsafe_or_missing_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    done = run("list", path)
    assert done.returncode == 1 and "tlscache-keys generate" in done.stderr
    KeyRing.generate().save(path)
    path.chmod(0o644)
    for command in ("list", "rotate"):
        done = run(command, path)
        assert done.returncode == 1
        assert "mode 0644" in done.stderr and "chmod 600" in done.stderr
        assert "Traceback" not in done.stderr
    path.chmod(0o600)
    path.write_text("{ not json")
    done = run("rotate", path)
    assert done.returncode == 1 and "not valid JSON" in done.stderr
    assert path.read_text() == "{ not json"  # a failed command writes nothing


def test_usage_errors(tmp_path: Path) -> None:
    assert run().returncode == 2
    assert run("retire", tmp_path / "k.json").returncode == 2  # no key id
    assert run("shred", tmp_path / "k.json").returncode == 2
    done = run("--help")
    assert done.returncode == 0
    for command in ("generate", "rotate", "list", "retire"):
        assert command in done.stdout
