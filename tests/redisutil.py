"""Real redis-server processes on loopback for tests and benchmarks: one server, or a
3-master Redis Cluster, each in a temporary directory, on free ports, stopped by pid."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.procs import free_port, running

__all__ = ["REDIS_SERVER", "RedisCluster", "RedisServer", "redis_cluster", "redis_server"]

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


@dataclass(frozen=True)
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class RedisCluster:
    masters: tuple[RedisServer, ...]

    @property
    def nodes(self) -> list[str]:
        return [m.address for m in self.masters]

    def by_address(self, address: str) -> RedisServer:
        return next(m for m in self.masters if m.address == address)


def _argv(port: int, directory: Path, *extra: str) -> list[str]:
    assert REDIS_SERVER is not None, "redis-server is not installed"
    return [
        REDIS_SERVER,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
        "--logfile",
        str(directory / f"redis-{port}.log"),
        *extra,
    ]


@contextlib.contextmanager
def redis_server(directory: Path | None = None, *extra: str) -> Iterator[RedisServer]:
    """One redis-server on a free port; SIGTERM (then SIGKILL) by pid when the block ends."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-")))
        port = free_port()
        argv = _argv(port, directory, *extra)
        proc = stack.enter_context(running(argv, ready=f"IP:127.0.0.1:{port}"))
        yield RedisServer(port, proc)


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    assert REDIS_CLI is not None, "redis-cli is not installed"
    out = subprocess.run(
        [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    return out.stdout.decode()


def _wait_cluster_ok(ports: list[int], timeout: float) -> None:
    """Until every node says ``cluster_state:ok`` and knows all masters' slots."""
    deadline = time.monotonic() + timeout
    while True:
        states = {}
        for port in ports:
            info = _cli(port, "cluster", "info")
            states[port] = "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info
            states[port] = states[port] and f"cluster_known_nodes:{len(ports)}" in info
        if all(states.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster not ok after {timeout:g} s: {states}")
        time.sleep(0.05)


@contextlib.contextmanager
def redis_cluster(directory: Path | None = None, masters: int = 3) -> Iterator[RedisCluster]:
    """A Redis Cluster of ``masters`` masters, no replicas, on free ports.

    ``cluster-require-full-coverage no`` keeps the live masters answering once a
    stopped one is marked as failed (``cluster-node-timeout`` 2 s).
    """
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-")))
        nodes = []
        for _ in range(masters):
            port, bus = free_port(), free_port()
            argv = _argv(
                port,
                directory,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-port",
                str(bus),
                "--cluster-node-timeout",
                "2000",
                "--cluster-require-full-coverage",
                "no",
            )
            proc = stack.enter_context(running(argv, ready=f"IP:127.0.0.1:{port}"))
            nodes.append(RedisServer(port, proc))
        ports = [n.port for n in nodes]
        _cli(
            ports[0],
            "--cluster",
            "create",
            *(f"127.0.0.1:{p}" for p in ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            timeout=30.0,
        )
        _wait_cluster_ok(ports, timeout=20.0)
        yield RedisCluster(tuple(nodes))
