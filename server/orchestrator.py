"""The demo farm: dc_server, one dc_client per backend, the backends and the balancer, each its
own process on loopback, as on a real set of hosts.

This module decides which processes make a farm and in which order they start, and reads their
status back as typed records; :mod:`.supervisor` starts and stops them, :mod:`.control` serves
the farm's status and control page, :mod:`.cli` is the command line.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO, TypeVar

from tlscache.exceptions import ClientError, KeyRingError
from tlscache.keyring import KeyRing

from . import apache
from .cacheservers import (
    CacheServer,
    cache_servers,
    create_cluster,
    merge_servers,
    missing_binaries,
    store_spec,
)
from .config import HOST, FarmConfig, FarmError, backend_argv
from .control import TOKEN_FILE, TOKEN_HEADER, start_control_page
from .kinds import farm_resumptions
from .ports import PortPlan, plan_ports
from .procs import exit_text, tool, wait_proxy_connected
from .records import BackendEntry, BackendStatus, BalancerStatus, FarmStatus, decode
from .supervisor import START_TIMEOUT, Proc, Supervisor, make_run_dir

R = TypeVar("R")

#: The run's key ring, in the run directory: every backend seals its sessions with it.
KEY_RING_FILE = "keyring.json"


def _poll(cls: type[R], url: str) -> R | None:
    """A process's ``/status.json`` as a record; None if it does not answer, or not sensibly."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as r:
            return decode(cls, r.read())
    except (OSError, ValueError):
        return None


class Farm:
    """The processes of one farm; ``start()``/``stop()`` or use as a context manager."""

    def __init__(self, config: FarmConfig) -> None:
        self.config = config
        self.supervisor = Supervisor()
        self.ports = PortPlan(0, (), 0)
        self.run_dir = Path()
        self._own_run_dir = False
        self.dc_server_address = ""
        self.keys: Path | None = None
        self.cache_servers: list[CacheServer] = []  # memcached / redis-server, if any
        self.store: str | None = None  # the backends' store string, with cache servers

    def __enter__(self) -> Farm:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def procs(self) -> list[Proc]:
        return self.supervisor.procs

    def plan(self) -> None:
        """Ports (checked before any directory is made), the run directory, the key ring, the
        processes."""
        missing = missing_binaries(self.config.cache.mode)
        if missing:
            raise FarmError(missing)
        self.ports = plan_ports(self.config)
        self.run_dir, self._own_run_dir = make_run_dir(self.config.run_dir)
        try:
            self.keys = self._make_key_ring()
        except BaseException:
            self._remove_run_dir()
            raise
        procs = self._cache_server()
        for i in range(1, self.config.backends + 1):
            procs += self._host(i)
        procs += self._apache()
        procs.append(self._balancer())
        self.supervisor.procs = procs

    def _make_key_ring(self) -> Path | None:
        """A fresh ring for this run (mode 0600), when the backends have a session cache.

        Fresh each run: the ring never outlives the sessions it sealed, and nothing from an
        earlier farm in the same ``--run-dir`` opens under it.
        """
        if self.config.cache.mode == "none":
            return None
        path = self.run_dir / KEY_RING_FILE
        try:
            KeyRing.generate().save(path)
        except (OSError, KeyRingError) as exc:
            raise FarmError(f"cannot write the key ring {path}: {exc}") from None
        return path

    def _proc(self, name: str, argv: list[str], address: str, ready: str | None = None) -> Proc:
        return Proc(name, argv, address, ready or address, self.run_dir / f"{name}.log")

    def _cache_server(self) -> list[Proc]:
        """dc_server with ``--cache distcache``; memcached or redis-servers with those modes."""
        mode = self.config.cache.mode
        if mode != "distcache":
            self.cache_servers = cache_servers(
                mode, self.ports.cache_servers, self.ports.cluster_buses, self.run_dir
            )
            self.store = store_spec(mode, [c.address for c in self.cache_servers])
            return [self._proc(c.name, c.argv, c.address, c.ready) for c in self.cache_servers]
        self.dc_server_address = address = f"IP:{HOST}:{self.ports.dc_server}"
        argv = tool("dc_server", "-listen", address, "-sessions", str(self.config.sessions))
        return [self._proc("dc_server", argv, address)]

    def _host(self, i: int) -> list[Proc]:
        """What one host of a real farm runs: its dc_client (if any) and backend ``i``."""
        procs = []
        dcc = None
        if self.dc_server_address:
            dcc = f"UNIX:{self.run_dir / f'dc_client-{i}.sock'}"
            argv = tool("dc_client", "-listen", dcc, "-server", self.dc_server_address)
            argv += ["-retry", str(self.config.dc_retry_ms)]
            procs.append(self._proc(f"dc_client-{i}", argv, dcc))
        ports = self.ports.backends[i - 1]
        keys = str(self.keys) if self.keys else None
        backend = self.config.backend(i, ports.tls, ports.admin, dcc, keys, self.store)
        if self.config.with_apache:
            # Apache's ServerName is the balancer's: one session id context for the farm.
            backend = dataclasses.replace(
                backend,
                apache_server_name=f"{apache.SERVER_NAME}:{self.config.port}",
                apache_session_cache=self._apache_session_cache(),
            )
        url = f"https://{HOST}:{ports.tls}/"
        # Probing the TLS port would count as a failed handshake: poll the status port.
        procs.append(
            self._proc(backend.name, backend_argv(backend), url, f"IP:{HOST}:{ports.admin}")
        )
        return procs

    def _apache_session_cache(self) -> str:
        """The farm's cache servers as Apache's ``SSLSessionCache`` names them."""
        return apache.session_cache_directive(
            self.config.cache.mode, [c.address for c in self.cache_servers]
        )

    def _apache(self) -> list[Proc]:
        """Apache httpd behind the balancer with ``--with-apache`` (see :mod:`.apache`)."""
        if not self.config.with_apache or self.ports.apache is None:
            return []
        cfg = apache.ApacheConfig(
            run_dir=self.run_dir,
            port=self.ports.apache,
            cert=str(self.config.certs.cert),
            key=str(self.config.certs.key),
            session_cache=self._apache_session_cache(),
            server_name=apache.SERVER_NAME,
            public_port=self.config.port,
            session_timeout=self.config.cache.session_timeout,
            tls=self.config.tls,
        )
        binary = apache.find_apache()
        if binary is None:
            raise FarmError(apache.MISSING)
        argv = apache.apache_argv(apache.write_config(cfg), binary)
        return [self._proc(cfg.name, argv, f"https://{HOST}:{cfg.port}/", f"IP:{HOST}:{cfg.port}")]

    def _balancer(self) -> Proc:
        port, admin = self.config.port, self.ports.balancer_admin
        argv = [sys.executable, "-m", "tlscache_farm.balancer", "--host", HOST]
        argv += ["--port", str(port), "--admin-port", str(admin)]
        for ports in self.ports.backends:
            argv += ["--backend", f"{HOST}:{ports.tls}"]
        if self.ports.apache is not None:
            argv += ["--backend", f"{HOST}:{self.ports.apache}"]
        # A probe of the TLS port would reach a backend: poll the status port.
        return self._proc("balancer", argv, f"https://localhost:{port}/", f"IP:{HOST}:{admin}")

    def start(self) -> None:
        """Start in stages, so that the first handshake finds the whole cache path working:
        dc_server; then dc_clients and backends, until each dc_client answers through
        dc_server; then the balancer, which lets clients in.

        Starting everything at once would let early handshakes meet a dc_client that is not yet
        connected, open the backends' circuit breakers, and cost seconds of resumption.
        """
        self.plan()
        caches = {c.name for c in self.cache_servers}
        stages = [
            [p for p in self.procs if p.name == "dc_server" or p.name in caches],
            [p for p in self.procs if p.name.startswith(("dc_client", "backend", "apache"))],
            [p for p in self.procs if p.name == "balancer"],
        ]
        try:
            self.supervisor.start(stages, self._when_ready)
        except BaseException:
            self._remove_run_dir()
            raise

    def _when_ready(self, proc: Proc) -> None:
        """Until a lookup through a dc_client reaches dc_server (a miss, not an error); once
        the last node of a Redis Cluster listens, until the cluster is formed."""
        last = self.cache_servers[-1].name if self.cache_servers else None
        if self.config.cache.mode == "redis-cluster" and proc.name == last:
            create_cluster([c.address for c in self.cache_servers])
        if proc.name.startswith("dc_client"):
            try:
                wait_proxy_connected(proc.address, START_TIMEOUT)
            except ClientError as exc:
                raise FarmError(f"{proc.name} cannot reach dc_server: {exc}") from None

    def stop(self) -> None:
        """Balancer first (no new clients), then backends, proxies and the cache server."""
        self.supervisor.stop()
        self._remove_run_dir()

    @property
    def token_file(self) -> Path:
        """Where the control page keeps its token (see :mod:`.control`)."""
        return self.run_dir / TOKEN_FILE

    def _remove_run_dir(self) -> None:
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self._own_run_dir = False

    # -- status --------------------------------------------------------------------------------

    def gather(self) -> FarmStatus:
        """Everything the status page shows, polled from each process's admin port."""
        cfg = self.config
        urls = [f"http://{HOST}:{p.admin}/status.json" for p in self.ports.backends]
        with ThreadPoolExecutor(max_workers=len(urls) + 1) as pool:
            balancer = pool.submit(
                _poll, BalancerStatus, f"http://{HOST}:{self.ports.balancer_admin}/status.json"
            )
            backends = list(pool.map(lambda url: _poll(BackendStatus, url), urls))
        return FarmStatus(
            balancer_url=f"https://localhost:{cfg.port}/",
            tls=cfg.tls,
            cache=cfg.cache.mode,
            dc_server=self.dc_server_address or None,
            run_dir=str(self.run_dir),
            balancer=balancer.result(),
            backends=[
                BackendEntry(f"backend-{i}", f"{HOST}:{p.tls}", status)
                for i, (p, status) in enumerate(zip(self.ports.backends, backends, strict=True), 1)
            ],
            processes=[p.info() for p in self.procs],
            keys=str(self.keys) if self.keys else None,
            balancer_status=f"http://{HOST}:{self.ports.balancer_admin}/status.json",
            cache_servers=merge_servers(
                [(c.name, c.address) for c in self.cache_servers], backends
            ),
            resumption=cfg.cache.resumption,
            resumptions=farm_resumptions(backends, cfg.backend_kinds),
        )

    def describe(self, out: TextIO, status_port: int | None = None) -> None:
        """Where everything listens, for people: entry points first, then the parts."""
        cfg = self.config
        out.write(
            f"tlscache farm: {cfg.backends} backends, TLS <= {cfg.tls}, cache {cfg.cache.mode}, "
            f"resumption {cfg.cache.resumption}\n"
        )
        balancer = self.supervisor.proc("balancer")
        out.write(f"  {'balancer':<12} {balancer.address}\n")
        if status_port is not None:
            out.write(f"  {'farm status':<12} http://{HOST}:{status_port}/ (JSON: /status.json)\n")
        admin = {f"backend-{i}": p.admin for i, p in enumerate(self.ports.backends, start=1)}
        for p in self.procs:
            if p is balancer:
                continue
            extra = f" (status http://{HOST}:{admin[p.name]}/status)" if p.name in admin else ""
            out.write(f"  {p.name:<12} {p.address}{extra}\n")
        out.write(f"  {'logs':<12} {self.run_dir}\n")
        if self.store is not None:
            out.write(f"  {'store':<12} {self.store}\n")
        if cfg.with_apache:
            out.write(
                f"  {'UNSEALED':<12} backends store sessions as Apache mod_ssl does: master "
                "secrets readable in the cache servers (docs/apache.md)\n"
            )
        elif self.keys is not None:
            out.write(f"  {'key ring':<12} {self.keys} (new sealing key: tlscache-keys rotate)\n")
        if status_port is not None:
            token = f'-H "{TOKEN_HEADER}: $(cat {self.token_file})"'
            url = f"http://{HOST}:{status_port}/process/NAME/stop"
            out.write(f"  {'control':<12} curl -X POST {token} {url}\n")
        ca = f"--cacert {cfg.certs.ca}" if cfg.certs.ca else "-k"
        url = f"https://localhost:{cfg.port}/info"
        out.write(f"try: curl {ca} -H 'Connection: close' {url} {url} {url}\n")
        out.flush()


def _say_exited(farm: Farm, proc: Proc, status_port: int | None) -> None:
    """A child died on its own (or by someone else's hand): what it means and how to undo it."""
    assert proc.popen is not None and proc.popen.returncode is not None
    lines = [f"tlscache-farm: {proc.name} {exit_text(proc.popen.returncode)}; log: {proc.log}"]
    if proc.popen.returncode > 0:  # its own error, not a signal: its last words say why
        lines.append(proc.tail(5))
    if proc.name == "dc_server":
        lines.append("  until it is back, handshakes are full (no request fails)")
    elif proc.name.startswith("dc_client"):
        backend = f"backend-{proc.name.rsplit('-', 1)[1]}"
        lines.append(f"  {backend} makes full handshakes until it is back")
    elif proc.name in {c.name for c in farm.cache_servers}:
        lines.append("  sessions it held are lost; the backends skip it until it is back")
    if status_port is not None:
        url = f"http://{HOST}:{status_port}/process/{proc.name}/start"
        token = f'-H "{TOKEN_HEADER}: $(cat {farm.token_file})"'
        lines.append(f"  start it again: curl -X POST {token} {url}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def serve(config: FarmConfig) -> int:
    """Run until Ctrl-C/SIGTERM, saying when a process dies."""
    farm = Farm(config)
    page = None
    try:
        farm.start()
        if config.status_port is not None:
            page = start_control_page(farm, config.status_port)
        farm.describe(sys.stdout, config.status_port)
        print("Ctrl-C stops every process of the farm.", flush=True)
        while True:
            farm.supervisor.run_main_calls(wait=0.5)
            for proc in farm.supervisor.newly_exited():
                _say_exited(farm, proc, config.status_port)
    except KeyboardInterrupt:
        print("\nstopping the farm...", file=sys.stderr, flush=True)
        return 0
    finally:
        if page is not None:
            page.close()
        farm.stop()
