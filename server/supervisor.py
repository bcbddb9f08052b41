"""Start, watch and stop the farm's child processes, leaving no orphan behind.

Children run in their own process groups (a terminal's Ctrl-C reaches only the orchestrator,
which stops them in order) and get SIGTERM from the kernel if the orchestrator dies, however it
dies. The kernel sends that signal when the *thread* that started a child exits, so children are
only ever started from the main thread: other threads (the control page's) queue their calls
with :meth:`Supervisor.on_main_thread`.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .config import FarmError
from .procs import ExitedEarly, exit_text, reap, send_signal, spawn, wait_connectable
from .records import ProcessInfo

START_TIMEOUT = 20.0
RUN_DIR_PREFIX = "tlscache-farm-"
T = TypeVar("T")


@dataclass
class Proc:
    """One child process of the farm."""

    name: str
    argv: list[str]
    address: str  # what it listens on, as printed
    ready: str  # the address to poll: IP:host:port or UNIX:path
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # stopped on purpose (not a crash)

    def state(self) -> str:
        if self.popen is None:
            return "not started"
        rc = self.popen.poll()
        if rc is None:
            return "running"
        return "stopped" if self.stopped else f"exited ({exit_text(rc)})"

    def info(self) -> ProcessInfo:
        pid = self.popen.pid if self.popen else None
        return ProcessInfo(self.name, pid, self.state(), self.address, str(self.log))

    def tail(self, lines: int = 15) -> str:
        """The end of its log, indented, for error messages."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])


def remove_stale_run_dirs() -> None:
    """Temporary run dirs of farms whose orchestrator was SIGKILLed (nothing else removes them)."""
    for d in Path(tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid = int((d / "farm.pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours, someone else's, or being created right now


def make_run_dir(chosen: Path | None) -> tuple[Path, bool]:
    """The directory for sockets and logs, and whether it is ours to remove at the end."""
    if chosen is not None:
        chosen.mkdir(parents=True, exist_ok=True)
        return chosen, False
    remove_stale_run_dirs()
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
    (run_dir / "farm.pid").write_text(f"{os.getpid()}\n")
    return run_dir, True


class Supervisor:
    """The child processes of one farm: start in stages, stop in reverse, kill and restart."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self._lock = threading.Lock()
        self._main_calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = queue.Queue()
        self._reported: set[tuple[str, int]] = set()

    def proc(self, name: str) -> Proc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    # -- starting ------------------------------------------------------------------------------

    def _spawn(self, proc: Proc) -> None:
        with open(proc.log, "ab") as log:
            proc.popen = spawn(proc.argv, stdout=log, stderr=subprocess.STDOUT, group=True)
        proc.stopped = False

    def _wait_ready(self, procs: list[Proc], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(procs):
            assert proc.popen is not None
            try:
                wait_connectable(proc.ready, max(0.0, deadline - time.monotonic()), proc.popen)
            except ExitedEarly:
                raise FarmError(f"{proc.name} exited at start:\n{proc.tail()}") from None
            except TimeoutError:
                names = ", ".join(p.name for p in procs[i:])
                raise FarmError(f"not listening after {timeout:.0f} s: {names}") from None

    def start(self, stages: list[list[Proc]], when_ready: Callable[[Proc], None]) -> None:
        """Start each stage once the previous one listens; ``when_ready`` is called for each
        process of a stage once the whole stage listens. On any failure, stop everything."""
        try:
            for stage in stages:
                for proc in stage:
                    self._spawn(proc)
                self._wait_ready(stage)
                for proc in stage:
                    when_ready(proc)
        except BaseException:
            self.stop()
            raise

    # -- stopping ------------------------------------------------------------------------------

    def stop(self) -> None:
        """The processes in reverse order of start; a second Ctrl-C (or SIGTERM) during this
        must not leave half the farm running."""
        if threading.current_thread() is not threading.main_thread():
            self._stop_all()
            return
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._stop_all()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _stop_all(self) -> None:
        for proc in reversed(self.procs):
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for proc in reversed(self.procs):
            if proc.popen is not None:
                reap(proc.popen, deadline, group=True)

    @staticmethod
    def _signal(proc: Proc, sig: int) -> None:
        if proc.popen is not None and send_signal(proc.popen, sig, group=True):
            proc.stopped = True

    # -- control (called through on_main_thread) ------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> ProcessInfo:
        """Kill one process (SIGKILL by default: a crash, not a polite exit)."""
        with self._lock:
            proc = self.proc(name)
            self._signal(proc, sig)
            if proc.popen is not None:
                reap(proc.popen, time.monotonic() + 5.0, group=True)
            return proc.info()

    def restart(self, name: str) -> ProcessInfo:
        """Start a process that is not running, with its original command line and address."""
        with self._lock:
            proc = self.proc(name)
            if proc.popen is None or proc.popen.poll() is not None:
                self._spawn(proc)
                self._wait_ready([proc], timeout=10.0)
            return proc.info()

    def on_main_thread(self, fn: Callable[[], T], timeout: float = 20.0) -> T:
        """Run ``fn`` on the thread that runs :meth:`run_main_calls` (see the module doc)."""
        if threading.current_thread() is threading.main_thread():
            return fn()
        future: Future[T] = Future()
        self._main_calls.put((fn, future))
        return future.result(timeout)

    def run_main_calls(self, wait: float) -> None:
        """Serve calls queued by :meth:`on_main_thread`, waiting up to ``wait`` for one."""
        try:
            fn, future = self._main_calls.get(timeout=wait)
        except queue.Empty:
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise  # Ctrl-C while serving a call still stops the farm

    def newly_exited(self) -> list[Proc]:
        """Processes that died on their own since the last call (each death said once)."""
        found = []
        for p in self.procs:
            if p.popen is not None and not p.stopped and p.popen.poll() is not None:
                key = (p.name, p.popen.pid)
                if key not in self._reported:
                    self._reported.add(key)
                    found.append(p)
        return found
