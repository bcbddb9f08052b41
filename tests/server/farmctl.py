"""Run the demo farm as a user would (``python -m tlscache_farm``) and talk to it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlscache_farm.config import TlsVersion
from tlscache_farm.procs import free_port
from tlscache_farm.workload import client_context

HOST = "127.0.0.1"


@dataclass
class FarmProc:
    """A running orchestrator and the addresses it was told to use."""

    proc: subprocess.Popen[bytes]
    port: int
    status_port: int
    ca: Path
    log: Path
    tls: TlsVersion

    @property
    def status_url(self) -> str:
        return f"http://{HOST}:{self.status_port}"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.status_url}/status.json", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
        return data

    def page(self) -> str:
        """The farm's HTML status page."""
        with urllib.request.urlopen(f"{self.status_url}/", timeout=5) as r:
            text: str = r.read().decode()
        return text

    def token(self) -> str:
        """The control token, read from the page's own forms as a browser would."""
        found = set(re.findall(r'name="token" value="([^"]+)"', self.page()))
        assert len(found) == 1, found
        return found.pop()

    def post(self, path: str) -> dict[str, Any]:
        """A control POST as a script sends it: the token in its header."""
        req = urllib.request.Request(
            f"{self.status_url}{path}",
            data=b"",
            method="POST",
            headers={"X-Tlscache-Token": self.token()},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            data: dict[str, Any] = json.loads(r.read())
        return data

    def handshakes(self) -> dict[str, dict[str, int]]:
        """Per backend: full / resumed handshake counters as the servers count them."""
        return {b["name"]: dict(b["status"]["handshakes"]) for b in self.status()["backends"]}

    def pids(self) -> list[int]:
        return [p["pid"] for p in self.status()["processes"] if p["pid"]]

    def client_context(self, tls: TlsVersion = "1.3") -> ssl.SSLContext:
        return client_context(str(self.ca), tls)


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
) -> tuple[int, bytes]:
    """One request to a plain-HTTP port on loopback, with exactly the ``Host`` (if any) and
    other headers given: (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if method == "POST":
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body if method == "POST" else None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _wait_up(farm: FarmProc, expected: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if farm.proc.poll() is not None:
            raise RuntimeError(f"farm exited ({farm.proc.returncode}):\n{farm.log.read_text()}")
        with contextlib.suppress(OSError, ValueError):
            st = farm.status()
            running = [p for p in st["processes"] if p["state"] == "running"]
            if len(running) == expected and all(b["status"] for b in st["backends"]):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"farm not up after {timeout} s:\n{farm.log.read_text()}")
        time.sleep(0.1)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie child of someone else still answers kill(0); look at its state.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still alive after ``timeout`` (empty: all gone)."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if not _gone(p)]
        if alive:
            time.sleep(0.05)
    return alive


@contextlib.contextmanager
def farm(
    tmp: Path,
    certs_dir: Path,
    *,
    cache: str = "distcache",
    tls: TlsVersion = "1.3",
    backends: int = 3,
    extra: tuple[str, ...] = (),
) -> Iterator[FarmProc]:
    """The farm for the duration of the block; on exit SIGTERM, and no process may survive it."""
    port, status_port = free_port(), free_port()
    log = tmp / f"farm-{port}.log"
    argv = [sys.executable, "-m", "tlscache_farm", "--port", str(port)]
    argv += ["--status-port", str(status_port), "--base-port", "0", "--certs-dir", str(certs_dir)]
    argv += ["--cache", cache, "--tls", tls, "--backends", str(backends), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    fp = FarmProc(proc, port, status_port, certs_dir / "ca.pem", log, tls)
    expected = backends * (2 if cache == "distcache" else 1) + 1 + (cache == "distcache")
    pids: list[int] = []
    try:
        _wait_up(fp, expected)
        pids = fp.pids()
        yield fp
    finally:
        with contextlib.suppress(OSError, ValueError):
            pids = fp.pids()  # again: a test may have restarted dc_server
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
