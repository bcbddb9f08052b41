"""The farm on memcached, Redis and a Redis Cluster: real servers started by the farm.

A client makes a full handshake on one backend and resumes it on the others, straight at their
TLS ports (so every resumption is cross-backend by construction, whatever the balancer does);
the farm's status JSON must then list every cache server healthy, with shares that add up to
the sessions the backends stored. ``--report`` is run once per kind, with a small workload.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.farmctl import HOST, wait_gone
from tlscache_farm.certs import ensure_demo_certs
from tlscache_farm.procs import free_port
from tlscache_farm.workload import client_context, fetch_info

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

KINDS = {
    "memcached": (("memcached",), 2),
    "redis": (("redis-server",), 1),
    "redis-cluster": (("redis-server", "redis-cli"), 3),
}


def _need(kind: str) -> None:
    missing = [b for b in KINDS[kind][0] if shutil.which(b) is None]
    if missing:
        pytest.skip(f"--cache {kind} needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    ensure_demo_certs(d)
    return d


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/status.json", timeout=5) as r:
        data: dict[str, Any] = json.loads(r.read())
    return data


@contextlib.contextmanager
def _farm(tmp: Path, certs_dir: Path, kind: str, backends: int) -> Iterator[int]:
    """A farm with ``--cache kind`` until the block ends; yields its status port. Every
    process it started (cache servers included) must be gone after SIGTERM."""
    status_port = free_port()
    argv = [sys.executable, "-m", "tlscache_farm", "--cache", kind, "--port", str(free_port())]
    argv += ["--status-port", str(status_port), "--base-port", "0"]
    argv += ["--certs-dir", str(certs_dir), "--backends", str(backends)]
    log = tmp / f"farm-{kind}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    expected = backends + 1 + KINDS[kind][1]
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 40
        while True:
            assert proc.poll() is None, f"farm exited ({proc.returncode}):\n{log.read_text()}"
            with contextlib.suppress(OSError, ValueError):
                st = _status(status_port)
                running = [p for p in st["processes"] if p["state"] == "running"]
                if len(running) == expected and all(b["status"] for b in st["backends"]):
                    break
            assert time.monotonic() < deadline, f"farm not up:\n{log.read_text()}"
            time.sleep(0.1)
        pids = [p["pid"] for p in st["processes"] if p["pid"]]
        yield status_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers = wait_gone(pids)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes outlived the farm: {leftovers}"


@pytest.mark.parametrize("kind", list(KINDS))
def test_sessions_resume_across_backends(tmp_path: Path, certs_dir: Path, kind: str) -> None:
    _need(kind)
    with _farm(tmp_path, certs_dir, kind, backends=3) as status_port:
        st = _status(status_port)
        ports = [int(b["address"].rsplit(":", 1)[1]) for b in st["backends"]]
        ctx = client_context(str(certs_dir / "ca.pem"), "1.3")
        seen = []
        for client in range(4):  # bounded: 4 clients x 3 backends
            first = client % len(ports)
            info, session, resumed, _ = fetch_info(ctx, HOST, ports[first], None, timeout=10)
            seen.append((info.backend, resumed))
            for other in (p for i, p in enumerate(ports) if i != first):
                info, session, resumed, _ = fetch_info(ctx, HOST, other, session, timeout=10)
                seen.append((info.backend, resumed))
        st = _status(status_port)
        caches = [b["status"]["cache"] for b in st["backends"]]
        failures = sum(c[k] for c in caches for k in ("timeouts", "errors", "store_errors"))
        state = {"seen": seen, "caches": caches, "servers": st["cache_servers"]}
        # 8 of the 12 connections offered a session made on another backend.
        resumed = sum(r for _, r in seen)
        assert resumed == 8 or (failures and resumed >= 4), state
        stored = sum(c["stores"] for c in caches)
        servers = st["cache_servers"]
        assert [s["name"] for s in servers] == [p["name"] for p in st["processes"]][: len(servers)]
        assert len(servers) == KINDS[kind][1], state
        assert all(s["up"] and s["down_for"] == [] for s in servers), state
        assert stored >= 4 and sum(s["keys"] for s in servers) == stored, state
        assert abs(sum(s["share"] for s in servers) - 1.0) < 1e-9, state
        for b in st["backends"]:
            assert b["status"]["store"], state
            listed = [s["address"] for s in b["status"]["store_servers"]]
            assert listed == [s["address"] for s in servers], state
        page = urllib.request.urlopen(f"http://{HOST}:{status_port}/", timeout=5).read().decode()
        assert "Cache servers" in page and servers[0]["address"] in page


@pytest.mark.parametrize("kind", list(KINDS))
def test_report(certs_dir: Path, kind: str) -> None:
    _need(kind)
    argv = [sys.executable, "-m", "tlscache_farm", "--report", "--cache", kind]
    argv += ["--certs-dir", str(certs_dir), "--clients", "6", "--reconnects", "3"]
    argv += ["--concurrency", "3", "--backends", "2"]
    done = subprocess.run(argv, capture_output=True, timeout=80, text=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"shared ({kind})" in out and "per-backend (memory)" in out, out
    row = next(line for line in out.splitlines() if "resumed (rate" in line)
    shared = int(re.findall(r"(\d+) \([\d.]+%\)", row)[0])
    assert shared >= 12, out  # of 18 offered; a busy machine may cost a few
    lines = re.findall(r"cache server (\S+) \S+: (up|DOWN), (\d+) sessions stored", out)
    assert len(lines) == KINDS[kind][1] and all(up == "up" for _, up, _ in lines), out
    assert sum(int(n) for _, _, n in lines) >= 6, out  # at least one session per client


def test_missing_program_names_the_package(tmp_path: Path, certs_dir: Path) -> None:
    argv = [sys.executable, "-m", "tlscache_farm", "--cache", "redis-cluster", "--report"]
    argv += ["--certs-dir", str(certs_dir)]
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing to find on it
    done = subprocess.run(argv, capture_output=True, timeout=60, text=True, env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "needs redis-server, redis-cli" in done.stderr, done.stderr
    assert "apt-get install redis-server redis-tools" in done.stderr, done.stderr
