"""Start, wait for and stop real processes (dc_server, dc_client, backends, ...) on loopback.

One set of helpers for the farm's supervisor, the tests and the benchmarks: each starts
processes with this interpreter, waits until they accept connections with a bounded loop, and
stops them with SIGTERM first and SIGKILL only if they linger.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import IO

PR_SET_PDEATHSIG = 1

Output = int | IO[bytes] | None


class ExitedEarly(RuntimeError):
    """The process exited before it accepted connections."""


#: Where free ports are picked: below Linux's ephemeral range (32768-60999), which the
#: kernel hands to outgoing connections. A port picked there (what bind to port 0 gives)
#: can be taken by any connection made before the process it is meant for binds it.
_PICK_RANGE = range(20000, 32768)
_handed_out: set[int] = set()


def _pick_range(env: Mapping[str, str]) -> range:
    """:data:`_PICK_RANGE`, or under pytest-xdist this worker's share of it: a port picked
    and released by one worker can be bound by another worker's server before the first
    worker's server binds it; disjoint shares keep the workers apart. Processes a worker
    starts inherit its share (the variables are in their environment)."""
    worker, count = env.get("PYTEST_XDIST_WORKER", ""), env.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and count.isdigit()):
        return _PICK_RANGE
    index, workers = int(worker[2:]), int(count)
    if not 0 <= index < workers:
        return _PICK_RANGE
    size = len(_PICK_RANGE) // workers
    start = _PICK_RANGE.start + index * size
    return range(start, start + size)


_PICK = _pick_range(os.environ)


def free_port(avoid: Collection[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nobody uses right now, not handed out before by this
    process, and outside the range outgoing connections take their ports from.

    ``avoid``: ports that are promised to a process which has not bound them yet (a farm's
    ``--port`` while its internal processes start), so free now but not free to hand out.
    """
    for _ in range(200):
        port = random.choice(_PICK)
        if port in _handed_out or port in avoid:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    for _ in range(200):  # a crowded range: let the kernel choose
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid and port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on 127.0.0.1 outside {sorted(avoid)}")


def connectable(address: str, timeout: float = 1.0) -> bool:
    """Whether ``address`` (``IP:host:port`` or ``UNIX:path``) accepts a connection now."""
    from tlscache.distcache.address import parse_address
    from tlscache.distcache.sockets import connect

    try:
        connect(parse_address(address), timeout=timeout).close()
    except OSError:
        return False
    return True


def wait_connectable(
    address: str, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until ``address`` accepts connections; ExitedEarly if ``proc`` exits first,
    TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ExitedEarly(f"process exited with {exit_text(proc.returncode)} before listening")
        if connectable(address):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address}: not accepting connections after {timeout:g} s")
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
    """The command line that runs one of tlscache's console tools with this interpreter."""
    return [sys.executable, "-m", f"tlscache.cli.{name}", *args]


def exit_text(rc: int) -> str:
    """A return code as people say it: ``status 1``, ``killed by SIGKILL``."""
    if rc >= 0:
        return f"status {rc}"
    try:
        return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"killed by signal {-rc}"


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


_PRCTL = _libc_prctl()


def _die_with(parent: int) -> None:
    """In the child, before exec: die with the parent (Linux), even on SIGKILL of the parent."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def spawn(
    argv: Sequence[str],
    *,
    stdout: Output = None,
    stderr: Output = None,
    env: Mapping[str, str] | None = None,
    group: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` with unbuffered Python output.

    ``group``: in its own process group (a terminal's Ctrl-C reaches only us), and SIGTERM
    from the kernel when the thread that started it dies, however it dies.
    """
    full_env = dict(os.environ, PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    parent = os.getpid()
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        env=full_env,
        process_group=0 if group else None,
        preexec_fn=(lambda: _die_with(parent)) if group else None,
    )


def send_signal(proc: subprocess.Popen[bytes], sig: int, group: bool = False) -> bool:
    """Signal a running process (its whole group with ``group``); False if it had exited."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    return True


def reap(proc: subprocess.Popen[bytes], deadline: float, group: bool = False) -> None:
    """Wait for ``proc`` until ``deadline`` (time.monotonic), then SIGKILL it."""
    try:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        send_signal(proc, signal.SIGKILL, group)
        proc.wait()


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    ready: str | None = None,
    env: dict[str, str] | None = None,
    stderr: int | None = subprocess.PIPE,
    stdout: int | None = subprocess.PIPE,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` for the duration of the block; wait until ``ready`` accepts connections.

    The process gets SIGTERM on exit (SIGKILL if it lingers), so none outlives the block.
    """
    proc = spawn(argv, stdout=stdout, stderr=stderr, env=env)
    try:
        if ready is not None:
            wait_connectable(ready, proc=proc)
        yield proc
    finally:
        send_signal(proc, signal.SIGTERM)
        reap(proc, time.monotonic() + 5.0)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
