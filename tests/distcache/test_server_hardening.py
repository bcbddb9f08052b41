"""A real dc_server under abuse: peers that never read, ADD storms, more connections than fds.

Each test checks that a well-behaved client is still served meanwhile. The long
variants are marked slow; the default run uses fewer connections.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.procs import free_port, running
from tlscache.distcache.address import parse_address
from tlscache.distcache.protocol import Decoder, Message, encode_add, encode_get
from tlscache.distcache.sockets import connect

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


def _raise_own_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def dc_server(*args: str, nofile: int | None = None) -> Iterator[tuple[str, Any]]:
    """A dc_server on a free port, its fd limit (soft and hard) lowered to ``nofile``."""
    address = f"IP:127.0.0.1:{free_port()}"
    argv = ["-listen", address, "--read-timeout", "60", *args]
    code = (
        "import resource, runpy, sys\n"
        f"n = {nofile!r}\n"
        "if n: resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
        f"sys.argv = ['dc_server', *{argv!r}]\n"
        "runpy.run_module('tlscache.cli.dc_server', run_name='__main__')\n"
    )
    with running([sys.executable, "-c", code], ready=address) as proc:
        yield address, proc


def conn(address: str, timeout: float = 10.0) -> socket.socket:
    return connect(parse_address(address), timeout=timeout)


def recv_messages(sock: socket.socket, count: int) -> list[Message]:
    decoder = Decoder(expect_response=True)
    got: list[Message] = []
    while len(got) < count:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(got)} of {count} responses"
        got += decoder.feed(chunk)
    return got


def add_get(sock: socket.socket, key: bytes, data: bytes, uid: int) -> float:
    """One ADD and one GET, pipelined; the round trip in seconds."""
    start = time.perf_counter()
    sock.sendall(encode_add(uid, key, data, 60_000) + encode_get(uid + 1, key))
    added, got = recv_messages(sock, 2)
    elapsed = time.perf_counter() - start
    assert added.payload in (b"\x00", b"\x65")
    assert got.payload == data
    return elapsed


def rss(pid: int) -> int:
    """Resident set size in bytes (VmRSS)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stop_and_read_log(proc: subprocess.Popen[bytes]) -> list[str]:
    proc.terminate()
    _, err = proc.communicate(timeout=15)
    return err.decode(errors="replace").splitlines()


# ---------------------------------------------------------------- peers that never read


def never_readers(address: str, count: int, duration: float) -> None:
    """``count`` connections pipeline GETs of a 30 KB session and never read the answers."""
    big = os.urandom(30_000)
    requests = b"".join(encode_get(uid, b"big") for uid in range(2, 1002))  # 1000 x 30 KB
    with conn(address) as setup:
        setup.sendall(encode_add(1, b"big", big, 600_000))
        recv_messages(setup, 1)
    _raise_own_fd_limit()
    with dc_probe(address) as probe:
        pid = probe["pid"]
        base = rss(pid)
        peak = base
        socks: list[socket.socket] = []
        latencies: list[float] = []
        try:
            for k in range(count):
                sock = conn(address)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.send(requests)
                socks.append(sock)
                if k % 100 == 99:
                    peak = max(peak, rss(pid))
            end = time.monotonic() + duration
            uid = 10_000
            while time.monotonic() < end:
                latencies.append(add_get(probe["sock"], b"probe", b"p" * 200, uid))
                uid += 2
                peak = max(peak, rss(pid))
                time.sleep(0.05)
        finally:
            for sock in socks:
                sock.close()
        growth = peak - base
        print(
            f"{count} never-reading connections: RSS {base / MiB:.1f} -> peak "
            f"{peak / MiB:.1f} MiB (+{growth / MiB:.1f}); probe p50 "
            f"{statistics.median(latencies) * 1000:.2f} ms over {len(latencies)} requests"
        )
        assert growth < 64 * MiB
        assert len(latencies) >= duration / 0.5
        # Closing them frees what they held. The allocator keeps some pages, so the
        # check is that RSS stops growing, not that it drops to where it started.
        time.sleep(1.0)
        after = rss(pid)
        print(f"after close: RSS {after / MiB:.1f} MiB")
        assert after <= peak + 8 * MiB
        add_get(probe["sock"], b"probe", b"p" * 200, 1)


@contextlib.contextmanager
def dc_probe(address: str) -> Iterator[dict[str, Any]]:
    """A well-behaved client on ``address`` and the pid of the server it talks to."""
    with conn(address) as sock:
        yield {"sock": sock, "pid": _server_pid}


_server_pid = 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_never_reading_peers_do_not_exhaust_memory(loop: str) -> None:
    global _server_pid
    with dc_server("--loop", loop) as (address, proc):
        _server_pid = proc.pid
        never_readers(address, 300, 10.0)
        assert proc.poll() is None


@pytest.mark.slow
def test_never_reading_peers_do_not_exhaust_memory_long() -> None:
    global _server_pid
    with dc_server() as (address, proc):
        _server_pid = proc.pid
        never_readers(address, 2000, 30.0)
        assert proc.poll() is None


# ---------------------------------------------------------------- ADD storms


def storm(address: str, stop: threading.Event, index: int) -> None:
    """Pipeline 32 KiB ADDs in batches of 16 as fast as the server takes them."""
    data = os.urandom(32 * 1024 - 64)
    with conn(address, timeout=30) as sock:
        uid = 1
        while not stop.is_set():
            batch = b"".join(
                encode_add(uid + k, f"storm-{index}-{uid + k}".encode(), data, 60_000)
                for k in range(16)
            )
            sock.sendall(batch)
            recv_messages(sock, 16)
            uid += 16


def test_add_storm_does_not_starve_other_clients() -> None:
    with dc_server() as (address, proc):
        stop = threading.Event()
        threads = [
            threading.Thread(target=storm, args=(address, stop, k), daemon=True) for k in range(8)
        ]
        with conn(address) as probe:
            quiet = [add_get(probe, b"probe", b"p" * 300, 2 * k + 1) for k in range(50)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            try:
                loaded = [add_get(probe, b"probe", b"p" * 300, 2 * k + 1) for k in range(200)]
            finally:
                stop.set()
                for thread in threads:
                    thread.join(timeout=30)
        p50_quiet = statistics.median(quiet) * 1000
        p50 = statistics.median(loaded) * 1000
        print(f"ADD+GET p50: {p50_quiet:.2f} ms quiet, {p50:.2f} ms under 8 x 32 KiB ADD storms")
        assert p50 < 50
        assert proc.poll() is None


# ---------------------------------------------------------------- more connections than fds


def idle_flood(address: str, count: int) -> list[socket.socket]:
    """Open ``count`` connections that say nothing (some will be refused)."""
    socks: list[socket.socket] = []
    for _ in range(count):
        try:
            socks.append(conn(address, timeout=5))
        except OSError:
            break
    return socks


def probe_served(address: str, uid: int, timeout: float = 15.0) -> None:
    """A new client is served within ``timeout`` (retrying refused attempts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with conn(address, timeout=5) as sock:
                add_get(sock, b"probe", b"p" * 100, uid)
                return
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def check_flood(nofile: int, count: int, *args: str, free: bool = False) -> None:
    """Flood a dc_server limited to ``nofile`` fds with idle connections; a newcomer is
    served (after closing some of them when ``free``: the server is out of fds)."""
    _raise_own_fd_limit()
    started = time.monotonic()
    with dc_server(*args, nofile=nofile) as (address, proc):
        socks = idle_flood(address, count)
        opened = len(socks)
        try:
            time.sleep(1.5)  # old enough to be closed for newcomers
            if free:
                # The clients still waiting in the listen backlog (and some served) go away.
                for sock in socks[100:]:
                    sock.close()
                del socks[100:]
            probe_served(address, 1)
            probe_served(address, 3)
            assert proc.poll() is None
        finally:
            for sock in socks:
                sock.close()
        time.sleep(0.5)
        probe_served(address, 5)
        lines = stop_and_read_log(proc)
    seconds = time.monotonic() - started
    print(
        f"{opened} idle connections opened against {nofile} fds: {len(lines)} log lines "
        f"in {seconds:.1f} s"
    )
    # 50 warnings a second at most, plus one summary line a second (and the start-up lines).
    assert len(lines) <= 51 * (int(seconds) + 1) + 5, (seconds, lines[-20:])


def test_more_idle_connections_than_fds() -> None:
    check_flood(256, 600)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_out_of_fds_keeps_serving(loop: str) -> None:
    """A connection cap above the fd limit: accept fails with EMFILE, serving goes on."""
    check_flood(256, 600, "--max-connections", "100000", "--loop", loop, free=True)


@pytest.mark.slow
def test_twenty_thousand_idle_connections() -> None:
    limit = _raise_own_fd_limit()
    check_flood(min(10_000, limit // 2), limit - 200)
