"""Start, watch and stop the demo farm: dc_server, one dc_client per backend, the backends and the
balancer, each its own process on loopback, as on a real set of hosts.

Children run in their own process groups (a terminal's Ctrl-C reaches only us, and we stop them in
order) and get SIGTERM from the kernel if this process dies, however it dies, so nothing outlives
the farm. ``--report`` runs a client workload with the shared cache and then without it and prints
both side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from . import status as status_page
from .certs import CertPaths, ensure_demo_certs
from .workload import WorkloadResult, run_workloads, terminal_progress

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
PR_SET_PDEATHSIG = 1
ACTIONS = ("stop", "start", "restart")
RUN_DIR_PREFIX = "tlscache-farm-"


class FarmError(Exception):
    """The farm could not start (a port in use, a process that exited early, ...)."""


@dataclass
class FarmConfig:
    """The farm's shape; one field per command-line option."""

    backends: int = 3
    tls: str = "1.3"
    cache: str = "distcache"
    port: int = 8443
    status_port: int | None = 8080
    base_port: int = 9000
    certs: CertPaths | None = None
    run_dir: Path | None = None
    dc_retry_ms: int = 500
    sessions: int = 20000
    session_timeout: int = 300
    cache_deadline_ms: float = 100.0
    cache_writes: str = "sync"


@dataclass
class Proc:
    """One child process of the farm."""

    name: str
    argv: list[str]
    address: str  # what it listens on, as printed
    ready: tuple[str, int] | str  # TCP (host, port) or unix socket path to poll
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


def exit_text(rc: int) -> str:
    """A return code as people say it: ``status 1``, ``killed by SIGKILL``."""
    if rc >= 0:
        return f"status {rc}"
    try:
        return f"killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"killed by signal {-rc}"


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


def _libc_prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl() if sys.platform.startswith("linux") else None


def _child_setup(parent: int) -> None:
    """In the child, before exec: die with the parent (Linux), even on SIGKILL of the parent."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _connectable(target: tuple[str, int] | str) -> bool:
    if isinstance(target, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        addr: Any = target
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        addr = target
    sock.settimeout(0.5)
    try:
        sock.connect(addr)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> str | None:
    """Why ``port`` cannot be bound on loopback right now (None: it can)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _check_free(ports: list[tuple[int, str, str]]) -> None:
    """Raise one FarmError naming the ports of ``(port, what, option)`` that are taken, with the
    options that would move them."""
    busy = [(p, what, opt, why) for p, what, opt in ports if (why := _port_in_use(p))]
    if not busy:
        return
    lines = [f"  {port:<6} {what} ({option}): {why}" for port, what, option, why in busy[:4]]
    if len(busy) > 4:
        lines.append(f"  and {len(busy) - 4} more")
    fixes = []
    for option in dict.fromkeys(opt for _, _, opt, _ in busy):
        if option == "--base-port":
            fixes.append("--base-port 0")  # any free ports for the internal processes
            continue
        port = next(p for p, _, opt, _ in busy if opt == option)
        free = next((c for c in range(port + 1, min(port + 50, 65536)) if not _port_in_use(c)), 0)
        fixes.append(f"{option} {free}")
    raise FarmError(
        "cannot start: ports in use (is another farm still running?)\n"
        + "\n".join(lines)
        + f"\nfree alternatives: {' '.join(fixes)}"
    )


def _get_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Farm:
    """The processes of one farm; ``start()``/``stop()`` or use as a context manager."""

    config: FarmConfig
    procs: list[Proc] = field(default_factory=list)
    backend_ports: list[tuple[int, int]] = field(default_factory=list)  # (tls, admin)
    balancer_admin: int = 0
    dc_server_address: str = ""
    run_dir: Path = Path()
    _own_run_dir: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _main_calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = field(
        default_factory=queue.Queue
    )

    def __enter__(self) -> Farm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plan --------------------------------------------------------------------------------

    def _ports(self) -> tuple[int, list[tuple[int, int]], int]:
        """dc_server, (TLS, status) per backend, balancer status; every fixed port checked."""
        cfg = self.config
        n = cfg.backends
        wanted = [(cfg.port, "balancer", "--port")]
        if cfg.status_port is not None:
            wanted.append((cfg.status_port, "farm status page", "--status-port"))
        if cfg.base_port == 0:
            _check_free(wanted)
            return _free_port(), [(_free_port(), _free_port()) for _ in range(n)], _free_port()
        b = cfg.base_port
        ports = (b, [(b + i, b + 100 + i) for i in range(1, n + 1)], b + 100)
        base = "--base-port"
        if cfg.cache == "distcache":
            wanted.append((ports[0], "dc_server", base))
        for i, (tls_port, admin) in enumerate(ports[1], start=1):
            wanted.append((tls_port, f"backend-{i}", base))
            wanted.append((admin, f"backend-{i} status", base))
        wanted.append((ports[2], "balancer status", base))
        _check_free(wanted)
        return ports

    def plan(self) -> None:
        cfg = self.config
        assert cfg.certs is not None
        dc_port, self.backend_ports, self.balancer_admin = self._ports()  # before any mkdir
        if cfg.run_dir is None:
            remove_stale_run_dirs()
            self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX))
            (self.run_dir / "farm.pid").write_text(f"{os.getpid()}\n")
            self._own_run_dir = True
        else:
            self.run_dir = cfg.run_dir
            self.run_dir.mkdir(parents=True, exist_ok=True)
        py = sys.executable
        self.procs = []
        if cfg.cache == "distcache":
            self.dc_server_address = f"IP:{HOST}:{dc_port}"
            self.procs.append(
                Proc(
                    "dc_server",
                    [
                        *(py, "-m", "tlscache.cli.dc_server"),
                        *("-listen", self.dc_server_address, "-sessions", str(cfg.sessions)),
                    ],
                    self.dc_server_address,
                    (HOST, dc_port),
                    self.run_dir / "dc_server.log",
                )
            )
        for i, (tls_port, admin) in enumerate(self.backend_ports, start=1):
            name = f"backend-{i}"
            dcc: str | None = None
            if cfg.cache == "distcache":
                sock = self.run_dir / f"dc_client-{i}.sock"
                dcc = f"UNIX:{sock}"
                self.procs.append(
                    Proc(
                        f"dc_client-{i}",
                        [
                            *(py, "-m", "tlscache.cli.dc_client", "-listen", dcc),
                            *("-server", self.dc_server_address, "-retry", str(cfg.dc_retry_ms)),
                        ],
                        dcc,
                        str(sock),
                        self.run_dir / f"dc_client-{i}.log",
                    )
                )
            argv = [py, "-m", "tlscache_farm.backend", "--name", name]
            argv += ["--host", HOST, "--port", str(tls_port), "--admin-port", str(admin)]
            argv += ["--cert", str(cfg.certs.cert), "--key", str(cfg.certs.key)]
            argv += ["--tls", cfg.tls, "--cache", cfg.cache]
            argv += ["--session-timeout", str(cfg.session_timeout)]
            argv += ["--cache-deadline-ms", str(cfg.cache_deadline_ms)]
            argv += ["--cache-writes", cfg.cache_writes]
            if dcc:
                argv += ["--dc-address", dcc]
            self.procs.append(
                Proc(
                    name,
                    argv,
                    f"https://{HOST}:{tls_port}/",
                    (HOST, admin),  # probing the TLS port would count as a failed handshake
                    self.run_dir / f"{name}.log",
                )
            )
        argv = [py, "-m", "tlscache_farm.balancer", "--host", HOST, "--port", str(cfg.port)]
        argv += ["--admin-port", str(self.balancer_admin)]
        for tls_port, _ in self.backend_ports:
            argv += ["--backend", f"{HOST}:{tls_port}"]
        self.procs.append(
            Proc(
                "balancer",
                argv,
                f"https://localhost:{cfg.port}/",
                (HOST, self.balancer_admin),  # a probe of the TLS port would reach a backend
                self.run_dir / "balancer.log",
            )
        )

    # -- lifecycle ---------------------------------------------------------------------------

    def _spawn(self, proc: Proc) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        parent = os.getpid()
        with open(proc.log, "ab") as log:
            proc.popen = subprocess.Popen(
                proc.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=lambda: _child_setup(parent),
            )
        proc.stopped = False

    def _wait_ready(self, procs: list[Proc], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        pending = list(procs)
        while pending:
            for proc in list(pending):
                assert proc.popen is not None
                if proc.popen.poll() is not None:
                    raise FarmError(f"{proc.name} exited at start:\n{self._tail(proc)}")
                if _connectable(proc.ready):
                    pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise FarmError(f"not listening after {timeout:.0f} s: {names}")
            if pending:
                time.sleep(0.05)

    @staticmethod
    def _tail(proc: Proc, lines: int = 15) -> str:
        try:
            text = proc.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def start(self) -> None:
        """Start in stages, so that the first handshake finds the whole cache path working:
        dc_server; then dc_clients and backends, until each dc_client answers through
        dc_server; then the balancer, which lets clients in.

        Starting everything at once would let early handshakes meet a dc_client that is not yet
        connected, open the backends' circuit breakers, and cost seconds of resumption.
        """
        self.plan()
        stages = [
            [p for p in self.procs if p.name == "dc_server"],
            [p for p in self.procs if p.name.startswith(("dc_client", "backend"))],
            [p for p in self.procs if p.name == "balancer"],
        ]
        try:
            for stage in stages:
                for proc in stage:
                    self._spawn(proc)
                self._wait_ready(stage)
                for proc in stage:
                    if proc.name.startswith("dc_client"):
                        self._wait_cache_path(proc)
        except BaseException:
            self.stop()
            raise

    def _wait_cache_path(self, proc: Proc, timeout: float = START_TIMEOUT) -> None:
        """Until a lookup through this dc_client reaches dc_server (a miss, not an error)."""
        import tlscache

        store = tlscache.DistcacheStore(proc.address)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    store.fetch(b"tlscache-farm-readiness-probe", 1.0)
                    return
                except tlscache.TlsCacheError as exc:
                    if time.monotonic() > deadline:
                        raise FarmError(f"{proc.name} cannot reach dc_server: {exc}") from None
                    time.sleep(0.05)
        finally:
            store.close()

    def stop(self) -> None:
        """Balancer first (no new clients), then backends, proxies and the cache server.

        A second Ctrl-C (or SIGTERM) during this must not leave half the farm running.
        """
        if threading.current_thread() is not threading.main_thread():
            self._stop()
            return
        saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._stop()
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    def _stop(self) -> None:
        for proc in reversed(self.procs):
            self._terminate(proc)
        deadline = time.monotonic() + 5.0
        for proc in reversed(self.procs):
            self._reap(proc, deadline)
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self._own_run_dir = False

    @staticmethod
    def _terminate(proc: Proc, sig: int = signal.SIGTERM) -> None:
        if proc.popen is not None and proc.popen.poll() is None:
            proc.stopped = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, sig)

    @staticmethod
    def _reap(proc: Proc, deadline: float) -> None:
        if proc.popen is None:
            return
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait()

    def proc(self, name: str) -> Proc:
        for p in self.procs:
            if p.name == name:
                return p
        raise KeyError(name)

    # -- dc_server control (for demos of the cache going away) -------------------------------

    def on_main_thread(self, fn: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Run ``fn`` on the thread that runs :meth:`run_main_calls`.

        Children must be started by a thread that lives as long as the farm: the kernel sends
        PR_SET_PDEATHSIG when the *thread* that forked a child exits, and the status page's
        request threads are short-lived.
        """
        if threading.current_thread() is threading.main_thread():
            return fn()
        future: Future[Any] = Future()
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

    def kill(self, name: str, sig: int = signal.SIGKILL) -> dict[str, Any]:
        """Kill one process of the farm (SIGKILL by default: a crash, not a polite exit)."""
        with self._lock:
            proc = self.proc(name)
            self._terminate(proc, sig)
            self._reap(proc, time.monotonic() + 5.0)
            return {"name": name, "state": proc.state()}

    def restart(self, name: str) -> dict[str, Any]:
        """Start a process that is not running, with its original command line and address.

        A restarted dc_server is empty: its sessions died with the old one.
        """
        with self._lock:
            proc = self.proc(name)
            if proc.popen is None or proc.popen.poll() is not None:
                self._spawn(proc)
                self._wait_ready([proc], timeout=10.0)
            assert proc.popen is not None
            return {"name": name, "state": proc.state(), "pid": proc.popen.pid}

    # -- status ------------------------------------------------------------------------------

    def gather(self) -> dict[str, Any]:
        """Everything the status page shows, polled from each process's admin port."""
        cfg = self.config
        urls = [f"http://{HOST}:{admin}/status.json" for _, admin in self.backend_ports]
        urls.append(f"http://{HOST}:{self.balancer_admin}/status.json")

        def fetch(url: str) -> Any:
            try:
                return _get_json(url)
            except (OSError, ValueError):
                return None

        with ThreadPoolExecutor(max_workers=len(urls)) as pool:
            results = list(pool.map(fetch, urls))
        backends = [
            {
                "name": f"backend-{i}",
                "address": f"{HOST}:{tls_port}",
                "status": results[i - 1],
            }
            for i, (tls_port, _) in enumerate(self.backend_ports, start=1)
        ]
        return {
            "balancer_url": f"https://localhost:{cfg.port}/",
            "tls": cfg.tls,
            "cache": cfg.cache,
            "dc_server": self.dc_server_address or None,
            "run_dir": str(self.run_dir),
            "balancer": results[-1],
            "backends": backends,
            "processes": [
                {
                    "name": p.name,
                    "pid": p.popen.pid if p.popen else None,
                    "state": p.state(),
                    "address": p.address,
                    "log": str(p.log),
                }
                for p in self.procs
            ],
        }

    def describe(self, out: TextIO, status_port: int | None = None) -> None:
        """Where everything listens, for people: entry points first, then the parts."""
        cfg = self.config
        assert cfg.certs is not None
        out.write(f"tlscache farm: {cfg.backends} backends, TLS <= {cfg.tls}, cache {cfg.cache}\n")
        balancer = self.proc("balancer")
        out.write(f"  {'balancer':<12} {balancer.address}\n")
        if status_port is not None:
            out.write(f"  {'farm status':<12} http://{HOST}:{status_port}/ (JSON: /status.json)\n")
        admin = {f"backend-{i}": a for i, (_, a) in enumerate(self.backend_ports, start=1)}
        for p in self.procs:
            if p is balancer:
                continue
            extra = f" (status http://{HOST}:{admin[p.name]}/status)" if p.name in admin else ""
            out.write(f"  {p.name:<12} {p.address}{extra}\n")
        out.write(f"  {'logs':<12} {self.run_dir}\n")
        ca = f"--cacert {cfg.certs.ca}" if cfg.certs.ca else "-k"
        url = f"https://localhost:{cfg.port}/info"
        out.write(f"try: curl {ca} -H 'Connection: close' {url} {url} {url}\n")
        out.flush()


class _StatusHandler(BaseHTTPRequestHandler):
    """The farm's status page, plus POST /process/NAME/{stop,start,restart} (loopback only)."""

    farm: Farm

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/status.json":
            data = json.dumps(self.farm.gather(), indent=1).encode() + b"\n"
            self._reply(200, "application/json", data)
        elif path in ("/", "/status"):
            html_text = status_page.render_farm(self.farm.gather())
            self._reply(200, "text/html; charset=utf-8", html_text.encode())
        else:
            self._reply(404, "text/plain", b"not found\n")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        # /process/NAME/stop|start|restart; /dc_server/... is short for /process/dc_server/...
        parts = path.strip("/").split("/")
        if len(parts) == 2:
            parts = ["process", *parts]
        if len(parts) != 3 or parts[0] != "process" or parts[2] not in ACTIONS:
            self._reply(404, "text/plain", b"POST /process/NAME/{stop,start,restart}\n")
            return
        farm, name, action = self.farm, parts[1], parts[2]
        try:
            if action in ("stop", "restart"):
                result = farm.on_main_thread(lambda: farm.kill(name))
            if action in ("start", "restart"):
                result = farm.on_main_thread(lambda: farm.restart(name))
        except KeyError:
            self._reply(404, "text/plain", f"no process {name!r} in this farm\n".encode())
            return
        except FarmError as exc:
            self._reply(500, "text/plain", f"{exc}\n".encode())
            return
        if self._from_form():
            # A button of the status page: back to the page, which shows the new state.
            self.send_response(303)
            self.send_header("Location", "/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._reply(200, "application/json", json.dumps(result).encode() + b"\n")

    def _from_form(self) -> bool:
        """Whether a button of the status page sent this request (``?then=page``)."""
        length = int(self.headers.get("Content-Length") or 0)
        if 0 < length <= 4096:
            self.rfile.read(length)  # a form's (empty) body
        return "then=page" in self.path.partition("?")[2].split("&")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_status_server(farm: Farm, port: int) -> ThreadingHTTPServer:
    handler = type("StatusHandler", (_StatusHandler,), {"farm": farm})
    try:
        server = ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        raise FarmError(f"farm status page: port {port} (--status-port): {exc.strerror}") from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.daemon = True
    thread.start()
    return server


# -- report --------------------------------------------------------------------------------------


def _fmt_ms(d: dict[str, float | None]) -> str:
    p50, p99 = d["p50"], d["p99"]
    if p50 is None or p99 is None:
        return "-"
    return f"{p50:.2f} / {p99:.2f}"


def _cache_sum(status: dict[str, Any], *keys: str) -> str:
    """Cache counters summed over the backends, ``a / b / ...``."""
    totals = dict.fromkeys(keys, 0)
    for b in status.get("backends", []):
        cache = (b.get("status") or {}).get("cache") or {}
        if isinstance(cache, dict):
            for k in keys:
                totals[k] += int(cache.get(k) or 0)
    return " / ".join(str(v) for v in totals.values())


def _lookup_ms(status: dict[str, Any]) -> str:
    """Store lookup latency over all backends, ``p50 / p99`` ms, from the caches' histograms."""
    buckets: list[float] = []
    counts: list[int] = []
    top = 0.0
    for b in status.get("backends", []):
        cache = (b.get("status") or {}).get("cache")
        if not isinstance(cache, dict) or not cache.get("latency_counts"):
            continue
        buckets = [float(x) for x in cache["latency_buckets_ms"]]
        row = [int(x) for x in cache["latency_counts"]]
        counts = [a + b for a, b in zip(counts, row, strict=True)] if counts else row
        top = max(top, float(cache.get("latency_max_ms") or 0.0))
    if not counts or not sum(counts):
        return "-"
    return f"{_histogram_quantile(buckets, counts, 0.5, top):.2f} / " + (
        f"{_histogram_quantile(buckets, counts, 0.99, top):.2f}"
    )


def _histogram_quantile(buckets: list[float], counts: list[int], q: float, top: float) -> float:
    """Interpolated within the bucket, as the session cache computes its own p50/p99."""
    target = q * sum(counts)
    seen, lower = 0, 0.0
    for i, count in enumerate(counts):
        upper = buckets[i] if i < len(buckets) else max(top, lower)
        if count and seen + count >= target:
            return min(lower + (upper - lower) * (target - seen) / count, top)
        seen += count
        lower = upper
    return top


def format_report(
    runs: list[tuple[str, WorkloadResult, dict[str, Any]]], backends: int, title: str
) -> str:
    """The side-by-side table of ``--report``."""
    sums = [(label, r.summary(), st) for label, r, st in runs]
    width = 30
    lines = [title, ""]
    lines.append(f"{'':<36}" + "".join(f"{label:>{width}}" for label, _, _ in sums))

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"  {name:<34}" + "".join(f"{c:>{width}}" for c in cells))

    for i in range(1, backends + 1):
        name = f"backend-{i}"
        cells = []
        for _, s, _ in sums:
            b = s["per_backend"].get(name, {"full": 0, "resumed": 0})
            cells.append(f"{b['full']} full / {b['resumed']} resumed")
        row(name, cells)
    row("connections (errors)", [f"{s['connections']} ({s['errors']})" for _, s, _ in sums])
    row("sessions offered", [str(s["offered"]) for _, s, _ in sums])
    row(
        "resumed (rate = resumed/offered)",
        [f"{s['resumed']} ({100.0 * s['rate']:.1f}%)" for _, s, _ in sums],
    )
    row("  of which on another backend", [str(s["resumed_elsewhere"]) for _, s, _ in sums])
    row("full handshake ms p50 / p99", [_fmt_ms(s["full_ms"]) for _, s, _ in sums])
    row("resumed handshake ms p50 / p99", [_fmt_ms(s["resumed_ms"]) for _, s, _ in sums])
    row("server cache hits / misses", [_cache_sum(st, "hits", "misses") for _, _, st in sums])
    row("cache lookup ms p50 / p99", [_lookup_ms(st) for _, _, st in sums])
    row(
        "cache timeouts / errors / skipped",
        [_cache_sum(st, "timeouts", "errors", "skipped") for _, _, st in sums],
    )
    if any(s["skipped"] for _, s, _ in sums):
        row("skipped (time limit)", [str(s["skipped"]) for _, s, _ in sums])
    return "\n".join(lines) + "\n"


def run_report(base: FarmConfig, args: argparse.Namespace, out: TextIO) -> int:
    """The same workload with the shared cache and with a per-backend in-process cache.

    Both farms run at once and every client alternates between them, so that both columns are
    measured under the same load of the machine: run one after the other, a change of load
    between the runs (another program, a CPU frequency step) would pass for a difference
    between the caches.
    """
    assert base.certs is not None
    ca = str(base.certs.ca) if base.certs.ca else None
    labels = ["shared (distcache)", "per-backend (memory)"]
    with contextlib.ExitStack() as stack:
        farms: list[Farm] = []
        for label in labels:
            if not farms:
                cfg = replace(base, cache="distcache", status_port=None)
            else:  # free ports, picked once the first farm holds its own
                port = _free_port()
                cfg = replace(base, cache="memory", status_port=None, port=port, base_port=0)
            out.write(f"[{label}] starting {cfg.backends} backends (TLS <= {cfg.tls})...\n")
            out.flush()
            farms.append(stack.enter_context(Farm(cfg)))
        out.write("running the workload, each client alternating between the two farms...\n")
        out.flush()
        meter = terminal_progress("both farms")
        results = run_workloads(
            HOST,
            [farm.config.port for farm in farms],
            ca=ca,
            tls=base.tls,
            clients=args.clients,
            reconnects=args.reconnects,
            concurrency=args.concurrency,
            time_limit=args.time_limit,
            pause=args.pause_ms / 1000.0,
            progress=meter,
        )
        if meter is not None:
            meter.finish()
        statuses = [farm.gather() for farm in farms]
    runs: list[tuple[str, WorkloadResult, dict[str, Any]]] = []
    for label, result, status in zip(labels, results, statuses, strict=True):
        s = result.summary()
        out.write(
            f"[{label}] {s['connections']} connections, {s['resumed']}/{s['offered']} resumed, "
            f"{s['errors']} errors\n"
        )
        if result.errors:
            first_error = next(x.error for x in result.samples if x.error)
            out.write(f"[{label}] first error: {first_error}\n")
        runs.append((label, result, status))
    title = (
        f"tlscache farm report: {base.backends} backends behind a round-robin balancer, "
        f"TLS <= {base.tls}\n"
        f"workload: {args.clients} clients x (1 + {args.reconnects} reconnects offering their "
        f"session) on each farm, {args.pause_ms:g} ms before each reconnect,\n"
        f"  {args.concurrency} clients at a time, each alternating between the two farms "
        f"(same machine load for both columns); {results[0].elapsed_s:.1f} s in all\n"
        "handshake ms: measured by the client (Python ssl) through the balancer; "
        "cache lookup ms: by the backends"
    )
    out.write("\n" + format_report(runs, base.backends, title))
    out.flush()
    return 0


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tlscache-farm",
        description=(
            "Demo HTTPS farm: N pyOpenSSL backends behind a round-robin TCP balancer, sharing "
            "TLS sessions through dc_server/dc_client. Ctrl-C stops everything."
        ),
    )
    p.add_argument(
        "--backends", type=int, metavar="N", default=3, help="number of backends (1-32, default 3)"
    )
    p.add_argument(
        "--tls",
        choices=("1.2", "1.3"),
        default="1.3",
        help="highest TLS version (default 1.3; 1.2 is the lowest)",
    )
    p.add_argument(
        "--cache",
        choices=("distcache", "memory", "none"),
        default="distcache",
        help="distcache: shared through dc_server (default); memory: each backend its own "
        "in-process cache (not shared); none: no session cache",
    )
    p.add_argument(
        "--port", type=int, metavar="PORT", help="balancer TLS port (default 8443; --report: free)"
    )
    p.add_argument(
        "--status-port",
        type=int,
        metavar="PORT",
        help="farm status page port (default 8080; 0: none)",
    )
    p.add_argument(
        "--base-port",
        type=int,
        metavar="PORT",
        help="dc_server on BASE, backend i on BASE+i, its status on BASE+100+i, balancer status "
        "on BASE+100 (default 9000; 0: any free ports; --report: free)",
    )
    p.add_argument(
        "--cert", metavar="PEM", help="PEM certificate chain (default: the demo certificate)"
    )
    p.add_argument("--key", metavar="PEM", help="PEM private key for --cert")
    p.add_argument(
        "--ca", metavar="PEM", help="CA file clients should trust (--report with --cert)"
    )
    p.add_argument("--certs-dir", type=Path, metavar="DIR", help="where demo certificates are kept")
    p.add_argument(
        "--run-dir", type=Path, metavar="DIR", help="sockets and logs (default: a temporary dir)"
    )
    p.add_argument(
        "--dc-retry", type=int, metavar="MS", default=500, help="dc_client -retry, ms (default 500)"
    )
    p.add_argument(
        "--sessions",
        type=int,
        metavar="N",
        default=20000,
        help="dc_server -sessions (64-60000; default 20000)",
    )
    p.add_argument(
        "--session-timeout", type=int, metavar="S", default=300, help="session lifetime, s (300)"
    )
    p.add_argument(
        "--cache-deadline-ms",
        type=float,
        metavar="MS",
        default=100.0,
        help="each backend's bound on one cache lookup or write, ms (default 100: a laptop "
        "running the whole farm is busier than a server; the library default is 20)",
    )
    p.add_argument(
        "--cache-writes",
        choices=("async", "sync"),
        default="sync",
        help="sync (default): backends store a new session inside the handshake, before the "
        "first response, so a client that reconnects right after it finds the session; async: "
        "from a writer thread (a fast reconnect can then miss)",
    )
    p.add_argument("--report", action="store_true", help="run the workload, print the table, exit")
    p.add_argument(
        "--clients", type=int, metavar="N", default=60, help="--report clients (default 60)"
    )
    p.add_argument(
        "--reconnects", type=int, metavar="N", default=5, help="--report reconnects per client (5)"
    )
    p.add_argument(
        "--concurrency", type=int, metavar="N", default=8, help="--report clients at a time (8)"
    )
    p.add_argument(
        "--pause-ms",
        type=float,
        metavar="MS",
        default=10.0,
        help="--report pause before each reconnect, ms (default 10; 0 exposes the TLS 1.2 race "
        "between a server's store write and a client that reconnects at once)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        metavar="S",
        default=20.0,
        help="--report: seconds for the whole workload; connections not started by then are "
        "skipped and counted (default 20)",
    )
    return p


_interrupted = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT/SIGTERM/SIGHUP unwinds into the clean stop; later ones are ignored, so a
    second Ctrl-C (or ``timeout`` signalling its whole process group) cannot cut the stop short."""
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    raise KeyboardInterrupt


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the command line, before anything starts (None: nothing)."""
    if not 1 <= args.backends <= 32:
        return "--backends must be 1..32"
    if args.port is not None and not 1 <= args.port <= 65535:
        return "--port must be 1..65535"
    if args.status_port is not None and not 0 <= args.status_port <= 65535:
        return "--status-port must be 1..65535 (0: no status page)"
    top = 65535 - 100 - args.backends
    if args.base_port is not None and args.base_port != 0 and not 1 <= args.base_port <= top:
        return f"--base-port must be 1..{top} with {args.backends} backends (0: any free ports)"
    if not 64 <= args.sessions <= 60000:
        return "--sessions must be 64..60000"
    if args.session_timeout < 1 or args.dc_retry < 1 or args.cache_deadline_ms <= 0:
        return "--session-timeout, --dc-retry and --cache-deadline-ms must be positive"
    if args.clients < 1 or args.reconnects < 0 or args.concurrency < 1:
        return "--clients and --concurrency must be at least 1, --reconnects at least 0"
    if bool(args.cert) != bool(args.key):
        return "--cert and --key go together"
    for option, path in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca)):
        if path and not os.access(path, os.R_OK):
            return f"{option} {path}: no such file, or not readable"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"tlscache-farm: {problem} (see tlscache-farm --help)", file=sys.stderr)
        return 2
    if args.cert:
        certs = CertPaths(Path(args.cert), Path(args.key), Path(args.ca) if args.ca else None)
    else:
        certs = ensure_demo_certs(args.certs_dir)
    free = args.report
    config = FarmConfig(
        backends=args.backends,
        tls=args.tls,
        cache=args.cache,
        port=args.port if args.port is not None else (_free_port() if free else 8443),
        status_port=args.status_port if args.status_port is not None else (None if free else 8080),
        base_port=args.base_port if args.base_port is not None else (0 if free else 9000),
        certs=certs,
        run_dir=args.run_dir,
        dc_retry_ms=args.dc_retry,
        sessions=args.sessions,
        session_timeout=args.session_timeout,
        cache_deadline_ms=args.cache_deadline_ms,
        cache_writes=args.cache_writes,
    )
    if config.status_port == 0:
        config.status_port = None
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        if args.report:
            return run_report(config, args, sys.stdout)
        return serve(config)
    except FarmError as exc:
        print(f"tlscache-farm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _say_exited(proc: Proc, status_port: int | None) -> None:
    """A child died on its own (or by someone else's hand): what it means and how to undo it."""
    assert proc.popen is not None and proc.popen.returncode is not None
    lines = [f"tlscache-farm: {proc.name} {exit_text(proc.popen.returncode)}; log: {proc.log}"]
    if proc.name == "dc_server":
        lines.append("  until it is back, handshakes are full (no request fails)")
    elif proc.name.startswith("dc_client"):
        backend = f"backend-{proc.name.rsplit('-', 1)[1]}"
        lines.append(f"  {backend} makes full handshakes until it is back")
    if status_port is not None:
        url = f"http://{HOST}:{status_port}/process/{proc.name}/start"
        lines.append(f"  start it again: curl -X POST {url}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def serve(config: FarmConfig) -> int:
    """Run until Ctrl-C/SIGTERM, saying when a process dies."""
    farm = Farm(config)
    status: ThreadingHTTPServer | None = None
    try:
        farm.start()
        if config.status_port is not None:
            status = start_status_server(farm, config.status_port)
        farm.describe(sys.stdout, config.status_port)
        print("Ctrl-C stops every process of the farm.", flush=True)
        reported: set[tuple[str, int]] = set()
        while True:
            farm.run_main_calls(wait=0.5)
            for p in farm.procs:
                if p.popen is not None and not p.stopped and p.popen.poll() is not None:
                    key = (p.name, p.popen.pid)
                    if key not in reported:
                        reported.add(key)
                        _say_exited(p, config.status_port)
    except KeyboardInterrupt:
        print("\nstopping the farm...", file=sys.stderr, flush=True)
        return 0
    finally:
        if status is not None:
            status.shutdown()
            status.server_close()
        farm.stop()


if __name__ == "__main__":
    sys.exit(main())
