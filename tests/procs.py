"""Start and stop real tlscache processes (dc_server, dc_client, ...) for tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "data" / "distcache-vectors.json"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_connectable(
    address: str, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``address`` (``IP:host:port`` or ``UNIX:path``) accepts connections."""
    from tlscache.distcache.address import connect, parse_address

    addr = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with status {proc.returncode} before listening")
        try:
            connect(addr, timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def wait_proxy_connected(address: str, timeout: float = 5.0) -> None:
    """Block until the dc_client at ``address`` has reached its dc_server.

    Until its first connect to dc_server succeeds, dc_client answers every request
    with "no server" (:class:`~tlscache.exceptions.ServerUnavailable`). Any
    :class:`~tlscache.exceptions.ClientError` counts as "not connected yet"; the
    last one is raised once ``timeout`` seconds have passed.
    """
    from tlscache.distcache.client import Client
    from tlscache.exceptions import ClientError

    deadline = time.monotonic() + timeout
    with Client(address) as client:
        while True:
            try:
                client.have(b"probe")
                return
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)


def tool(name: str, *args: str) -> list[str]:
    """The command line that runs one of our console tools with this interpreter."""
    return [sys.executable, "-m", f"tlscache.cli.{name}", *args]


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    ready: str | None = None,
    env: dict[str, str] | None = None,
    stderr: int | None = subprocess.PIPE,
    stdout: int | None = subprocess.PIPE,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the duration of the block; wait until ``ready`` accepts connections.

    The process gets SIGTERM on exit (SIGKILL if it lingers), so no test leaks one.
    """
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    proc = subprocess.Popen(list(argv), stdout=stdout, stderr=stderr, env=full_env)
    try:
        if ready is not None:
            wait_connectable(ready, proc=proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
