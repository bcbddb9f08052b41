"""Real memcached processes on loopback for tests and benchmarks.

``memcached_servers(n)`` starts ``n`` servers on free 127.0.0.1 ports and stops them all
at the end; each :class:`MemcachedServer` can be killed and started again on its port.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator

from tlscache_farm.procs import free_port, reap, send_signal, spawn, wait_connectable

__all__ = ["MEMCACHED", "MemcachedServer", "memcached_servers"]

#: The memcached binary, or None when it is not installed.
MEMCACHED = shutil.which("memcached") or (
    "/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None
)


class MemcachedServer:
    """One memcached process on ``127.0.0.1:port`` (a port chosen once, kept on restart)."""

    def __init__(self, port: int | None = None, memory_mb: int = 16) -> None:
        if MEMCACHED is None:
            raise RuntimeError("memcached is not installed")
        self.port = free_port() if port is None else port
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """As :class:`~tlscache.stores.memcached.MemcachedStore` takes it."""
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        assert MEMCACHED is not None
        argv = [MEMCACHED, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0"]
        argv += ["-m", str(self.memory_mb), "-t", "2"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]
        return argv

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = spawn(self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_connectable(f"IP:127.0.0.1:{self.port}", timeout=timeout, proc=self.proc)

    def kill(self) -> None:
        """SIGKILL: gone at once, its data with it."""
        if self.proc is not None:
            send_signal(self.proc, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc is not None:
            send_signal(self.proc, signal.SIGTERM)
            reap(self.proc, time.monotonic() + 5.0)


@contextlib.contextmanager
def memcached_servers(n: int, memory_mb: int = 16) -> Iterator[list[MemcachedServer]]:
    """``n`` running memcached servers, all stopped when the block ends."""
    servers = [MemcachedServer(memory_mb=memory_mb) for _ in range(n)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()
