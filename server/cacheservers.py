"""The farm's memcached and Redis cache servers, and each one's share of the sessions.

``--cache memcached`` starts ``--cache-servers`` memcached processes, ``--cache redis`` one
redis-server, ``--cache redis-cluster`` three redis-servers joined into a Redis Cluster with
``redis-cli --cluster create``; all on loopback, supervised as the farm's other children. The
backends reach them through one store string (:func:`store_spec`).

Shares are counted where the keys are placed: each backend's store is wrapped in
:class:`KeyShares`, which counts every session written, per ``server_for`` of its key. The
farm adds up what the backends report (:func:`merge_servers`), so a share is what was stored,
not what a hash function promises.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tlscache.deadline import Deadline
from tlscache.stores.base import SessionStore, WrappingStore, WriteStatus

from .config import HOST, CacheMode, FarmError
from .records import BackendStatus, CacheServerEntry, StoreServer

#: The programs each mode needs, and the Debian/Ubuntu package that brings each.
BINARIES: dict[str, tuple[tuple[str, str], ...]] = {
    "memcached": (("memcached", "memcached"),),
    "redis": (("redis-server", "redis-server"),),
    "redis-cluster": (("redis-server", "redis-server"), ("redis-cli", "redis-tools")),
}
CLUSTER_TIMEOUT = 20.0


def missing_binaries(mode: CacheMode) -> str | None:
    """What to install for ``mode`` when a program it needs is not on PATH (None: nothing)."""
    missing = [(b, pkg) for b, pkg in BINARIES.get(mode, ()) if shutil.which(b) is None]
    if not missing:
        return None
    programs = ", ".join(b for b, _ in missing)
    packages = " ".join(dict.fromkeys(pkg for _, pkg in missing))
    return (
        f"--cache {mode} needs {programs}, not found on PATH; install it "
        f"(Debian/Ubuntu: apt-get install {packages})"
    )


@dataclass(frozen=True)
class CacheServer:
    """One cache server process: its name, command line and ``host:port``."""

    name: str
    argv: list[str]
    address: str  # host:port, as the store string and ServerHealth name it

    @property
    def ready(self) -> str:
        """The address a start waits on (a distcache-style address)."""
        return f"IP:{self.address}"


def cache_servers(
    mode: CacheMode, ports: Sequence[int], buses: Sequence[int], run_dir: Path
) -> list[CacheServer]:
    """The cache server processes of ``mode`` on ``ports`` (none for other modes)."""
    servers = []
    for j, port in enumerate(ports, start=1):
        address = f"{HOST}:{port}"
        if mode == "memcached":
            argv = ["memcached", "-l", HOST, "-p", str(port), "-U", "0", "-m", "64", "-c", "1024"]
            if os.geteuid() == 0:
                argv += ["-u", "root"]  # memcached refuses root without it
            servers.append(CacheServer(f"memcached-{j}", argv, address))
            continue
        data = run_dir / f"redis-{j}"
        data.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(data), "--daemonize", "no"]
        if mode == "redis-cluster":
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            argv += ["--cluster-port", str(buses[j - 1])]
        name = "redis" if mode == "redis" else f"redis-{j}"
        servers.append(CacheServer(name, argv, address))
    return servers


def store_spec(mode: CacheMode, addresses: Sequence[str]) -> str | None:
    """The store string the backends open (None for modes without cache servers)."""
    if not addresses:
        return None
    if mode == "memcached":
        return f"memcached:farm={','.join(addresses)}"
    if mode == "redis":
        return f"redis://{addresses[0]}"
    if mode == "redis-cluster":
        return f"redis-cluster://{','.join(addresses)}"
    return None


def _cluster_ok(address: str) -> bool:
    host, _, port = address.rpartition(":")
    done = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "cluster", "info"],
        capture_output=True,
        text=True,
        timeout=5,
        check=False,
    )
    return "cluster_state:ok" in done.stdout


def create_cluster(addresses: Sequence[str], timeout: float = CLUSTER_TIMEOUT) -> None:
    """Join fresh nodes into one cluster (once), then wait until every node says it is ok.

    A node restarted later keeps its ``nodes.conf`` and rejoins on its own.
    """
    if all(_cluster_ok(a) for a in addresses):
        return
    argv = ["redis-cli", "--cluster", "create", *addresses]
    argv += ["--cluster-replicas", "0", "--cluster-yes"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        tail = "\n".join("    " + line for line in done.stdout.splitlines()[-8:])
        raise FarmError(f"redis-cli --cluster create failed ({done.returncode}):\n{tail}")
    deadline = time.monotonic() + timeout
    while not all(_cluster_ok(a) for a in addresses):
        if time.monotonic() > deadline:
            raise FarmError(f"the Redis Cluster is not ok after {timeout:.0f} s")
        time.sleep(0.1)


class KeyShares(WrappingStore):
    """Counts the sessions written through it, per server that holds each one."""

    def __init__(self, inner: SessionStore) -> None:
        super().__init__(inner)
        self._lock = threading.Lock()
        self._keys: Counter[str] = Counter()

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        status = self.inner.store(session_id, value, ttl_s, deadline)
        server = self.inner.server_for(session_id)
        if server is not None:
            with self._lock:
                self._keys[server] += 1
        return status

    def shares(self) -> list[StoreServer]:
        """Every server of the store: health, and the sessions stored on it through here."""
        with self._lock:
            keys = dict(self._keys)
        return [
            StoreServer(h.address, h.up, h.failures, h.retry_in_s, keys.get(h.address, 0))
            for h in self.inner.servers()
        ]


def merge_servers(
    servers: Sequence[tuple[str, str]], backends: Sequence[BackendStatus | None]
) -> list[CacheServerEntry]:
    """The farm's view of each ``(name, address)``: sums of the backends' counts, and down if
    any backend that answered skips it."""
    total = 0
    rows = []
    for name, address in servers:
        keys = failures = 0
        down_for = []
        for b in backends:
            for s in b.store_servers if b is not None else ():
                if b is None or s.address != address:
                    continue
                keys += s.keys
                failures = max(failures, s.failures)
                if not s.up:
                    down_for.append(b.name)
        total += keys
        rows.append((name, address, keys, failures, down_for))
    return [
        CacheServerEntry(
            name, address, not down_for, failures, keys, keys / total if total else None, down_for
        )
        for name, address, keys, failures, down_for in rows
    ]
