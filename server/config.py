"""The farm's settings: one typed model for the orchestrator, the backends and the workload.

A backend is its own process, so its settings travel as a command line. That command line is
written (:func:`backend_argv`) and read (:func:`parse_backend_args`) here, next to each other,
and the options a backend shares with ``tlscache-farm`` are declared once
(:func:`add_backend_options`), so that the two programs cannot drift apart.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from .certs import CertPaths

HOST = "127.0.0.1"

TlsVersion = Literal["1.2", "1.3"]
CacheMode = Literal["distcache", "memory", "none", "memcached", "redis", "redis-cluster"]
WriteMode = Literal["sync", "async"]
#: How clients resume (:mod:`tlscache.resumption`; spelled out here so that the farm's command
#: line does not import OpenSSL before it has checked its arguments).
Resumption = Literal["stateful", "stateless", "both"]
RESUMPTION_MODES: tuple[Resumption, ...] = ("stateful", "stateless", "both")
TLS_VERSIONS: tuple[TlsVersion, ...] = ("1.2", "1.3")
CACHE_MODES: tuple[CacheMode, ...] = (
    "distcache",
    "memory",
    "none",
    "memcached",
    "redis",
    "redis-cluster",
)
#: The modes whose cache servers the farm starts and the backends reach by a store string.
STORE_MODES: tuple[CacheMode, ...] = ("memcached", "redis", "redis-cluster")
WRITE_MODES: tuple[WriteMode, ...] = ("sync", "async")
#: The server a backend runs as (``--backend-kinds``; :mod:`.backend_kinds`).
BackendKind = Literal["threaded", "twisted", "stdlib"]
BACKEND_KINDS: tuple[BackendKind, ...] = ("threaded", "twisted", "stdlib")
KIND_MODULES: dict[BackendKind, str] = {
    "threaded": "tlscache_farm.backend",
    "twisted": "tlscache_farm.backend_twisted",
    "stdlib": "tlscache_farm.backend_stdlib",
}


class FarmError(Exception):
    """The farm could not start (a port in use, a process that exited early, ...)."""


@dataclass(frozen=True)
class CacheConfig:
    """How every backend of a farm uses its session cache."""

    mode: CacheMode = "distcache"
    session_timeout: int = 300
    deadline_ms: float = 100.0
    writes: WriteMode = "sync"
    breaker_reset_s: float = 5.0
    resumption: Resumption = "stateful"  # session ids, shared tickets, or both
    ticket_period_s: float = 3600.0  # one shared ticket key per period


@dataclass(frozen=True)
class BackendConfig:
    """One backend: where it listens, its certificate, its cache."""

    name: str
    port: int
    admin_port: int
    cert: str
    key: str
    host: str = HOST
    tls: TlsVersion = "1.3"
    cache: CacheConfig = field(default_factory=CacheConfig)
    dc_address: str | None = None
    keys: str | None = None  # key ring file that seals sessions (needed with distcache)
    store: str | None = None  # store string (tlscache.stores.spec) of a memcached/Redis cache
    max_connections: int = 128
    idle_timeout: float = 5.0
    # Apache-compatible storage (tlscache.apache), with an Apache httpd in the farm:
    apache_server_name: str | None = None  # Apache's ServerName host:port (session id context)
    apache_session_cache: str | None = None  # Apache's SSLSessionCache argument
    kind: BackendKind = "threaded"  # which server runs it (KIND_MODULES)


@dataclass(frozen=True)
class WorkloadConfig:
    """The clients of ``--report``: how many, how often they reconnect, how fast."""

    clients: int = 60
    reconnects: int = 5
    concurrency: int = 8
    pause_ms: float = 10.0
    time_limit: float = 20.0


@dataclass(frozen=True)
class FarmConfig:
    """The farm's shape; one field per ``tlscache-farm`` option."""

    certs: CertPaths
    backends: int = 3
    tls: TlsVersion = "1.3"
    cache: CacheConfig = field(default_factory=CacheConfig)
    port: int = 8443
    status_port: int | None = 8080
    base_port: int = 9000
    run_dir: Path | None = None
    dc_retry_ms: int = 500
    sessions: int = 20000
    cache_servers: int = 2  # memcached servers with --cache memcached
    with_apache: bool = False  # an Apache httpd behind the balancer too (docs/apache.md)
    backend_kinds: tuple[BackendKind, ...] = ("threaded",)  # cycled over the backends

    def backend(
        self,
        index: int,
        port: int,
        admin_port: int,
        dc_address: str | None,
        keys: str | None = None,
        store: str | None = None,
    ) -> BackendConfig:
        """The settings of backend ``index`` (1-based) of this farm; ``keys``: the run's key
        ring."""
        return BackendConfig(
            name=f"backend-{index}",
            port=port,
            admin_port=admin_port,
            cert=str(self.certs.cert),
            key=str(self.certs.key),
            tls=self.tls,
            cache=self.cache,
            dc_address=dc_address,
            keys=keys,
            store=store,
            kind=self.backend_kinds[(index - 1) % len(self.backend_kinds)],
        )


# -- the options a backend shares with tlscache-farm ---------------------------------------------


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """The options both programs take: ``--tls``, ``--cache``, ``--session-timeout``,
    ``--cache-deadline-ms``, ``--cache-writes``, ``--resumption``, ``--ticket-period``."""
    default = CacheConfig()
    p.add_argument(
        "--tls",
        choices=TLS_VERSIONS,
        default="1.3",
        help="highest TLS version (default 1.3; 1.2 is the lowest)",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_MODES,
        default=default.mode,
        help="distcache: shared through dc_server (default); memcached, redis, redis-cluster: "
        "shared through servers the farm starts (memcached, redis-server); memory: each backend "
        "its own in-process cache (not shared); none: no session cache",
    )
    p.add_argument(
        "--session-timeout",
        type=int,
        metavar="S",
        default=default.session_timeout,
        help=f"session lifetime, s ({default.session_timeout})",
    )
    p.add_argument(
        "--cache-deadline-ms",
        type=float,
        metavar="MS",
        default=default.deadline_ms,
        help="each backend's bound on one cache lookup or write, ms (default 100: a laptop "
        "running the whole farm is busier than a server; the library default is 20)",
    )
    p.add_argument(
        "--cache-writes",
        choices=WRITE_MODES,
        default=default.writes,
        help="sync (default): backends store a new session inside the handshake, before the "
        "first response, so a client that reconnects right after it finds the session; async: "
        "from a writer thread (a fast reconnect can then miss)",
    )
    p.add_argument(
        "--cache-breaker-reset-s",
        type=float,
        metavar="S",
        default=default.breaker_reset_s,
        help="after the circuit breaker opens, seconds before a backend tries its cache again "
        f"(default {default.breaker_reset_s:g}, as the library)",
    )
    p.add_argument(
        "--resumption",
        choices=RESUMPTION_MODES,
        default=default.resumption,
        help="stateful (default): session ids (and TLS 1.3 tickets) looked up in the cache; "
        "stateless: session tickets under ticket keys shared through the cache, no lookup; "
        "both: tickets, and session ids for TLS 1.2 clients without tickets (docs/tickets.md)",
    )
    p.add_argument(
        "--ticket-period",
        type=float,
        metavar="S",
        default=default.ticket_period_s,
        help="with --resumption stateless or both: seconds each shared ticket key issues "
        f"tickets before the next one takes over (default {default.ticket_period_s:g})",
    )


def cache_config(args: argparse.Namespace) -> CacheConfig:
    """The cache settings of a command line parsed with :func:`add_backend_options`."""
    return CacheConfig(
        mode=cast(CacheMode, args.cache),
        session_timeout=args.session_timeout,
        deadline_ms=args.cache_deadline_ms,
        writes=cast(WriteMode, args.cache_writes),
        breaker_reset_s=args.cache_breaker_reset_s,
        resumption=cast(Resumption, args.resumption),
        ticket_period_s=args.ticket_period,
    )


# -- the backend's command line ------------------------------------------------------------------


def backend_argv(cfg: BackendConfig) -> list[str]:
    """The command line that starts the backend ``cfg`` describes, with this interpreter."""
    c = cfg.cache
    argv = [sys.executable, "-m", KIND_MODULES[cfg.kind], "--name", cfg.name]
    argv += ["--host", cfg.host, "--port", str(cfg.port), "--admin-port", str(cfg.admin_port)]
    argv += ["--cert", cfg.cert, "--key", cfg.key, "--tls", cfg.tls, "--cache", c.mode]
    argv += ["--session-timeout", str(c.session_timeout)]
    argv += ["--cache-deadline-ms", str(c.deadline_ms), "--cache-writes", c.writes]
    argv += ["--cache-breaker-reset-s", str(c.breaker_reset_s)]
    argv += ["--resumption", c.resumption, "--ticket-period", repr(c.ticket_period_s)]
    argv += ["--max-connections", str(cfg.max_connections)]
    argv += ["--idle-timeout", str(cfg.idle_timeout)]
    if cfg.dc_address:
        argv += ["--dc-address", cfg.dc_address]
    if cfg.keys:
        argv += ["--keys", cfg.keys]
    if cfg.store:
        argv += ["--store", cfg.store]
    if cfg.apache_server_name and cfg.apache_session_cache:
        argv += ["--apache-server-name", cfg.apache_server_name]
        argv += ["--apache-session-cache", cfg.apache_session_cache]
    return argv


def parse_backend_args(argv: list[str] | None) -> BackendConfig:
    """The other end of :func:`backend_argv`."""
    default = BackendConfig("", 0, 0, "", "")
    p = argparse.ArgumentParser(
        prog="python -m tlscache_farm.backend", description="One HTTPS backend of the demo farm."
    )
    p.add_argument("--name", default="backend-1")
    p.add_argument("--host", default=default.host)
    p.add_argument("--port", type=int, required=True, help="TLS port")
    p.add_argument("--admin-port", type=int, required=True, help="plain-HTTP status port")
    p.add_argument("--cert", required=True, help="PEM certificate chain")
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--dc-address", help="dc_client address, e.g. UNIX:/run/dcc.sock")
    p.add_argument(
        "--keys",
        metavar="PATH",
        help="key ring that seals sessions in the store (tlscache-keys generate PATH); "
        "required with --cache distcache, re-read when it changes",
    )
    p.add_argument(
        "--store",
        metavar="SPEC",
        help="store string of the shared cache with --cache memcached/redis/redis-cluster, "
        "e.g. memcached:127.0.0.1:11211,127.0.0.1:11212 (see docs/configuration.md)",
    )
    p.add_argument(
        "--apache-server-name",
        metavar="HOST:PORT",
        help="store sessions as Apache mod_ssl does (unsealed; see docs/apache.md), with the "
        "session id context of this ServerName; needs --apache-session-cache",
    )
    p.add_argument(
        "--apache-session-cache",
        metavar="SPEC",
        help="Apache's SSLSessionCache argument (memcache:H:P,H:P or redis:H:P)",
    )
    p.add_argument("--max-connections", type=int, default=default.max_connections)
    p.add_argument(
        "--idle-timeout", type=float, default=default.idle_timeout, help="keep-alive idle, s"
    )
    add_backend_options(p)
    a = p.parse_args(argv)
    return BackendConfig(
        name=a.name,
        port=a.port,
        admin_port=a.admin_port,
        cert=a.cert,
        key=a.key,
        host=a.host,
        tls=cast(TlsVersion, a.tls),
        cache=cache_config(a),
        dc_address=a.dc_address,
        keys=a.keys,
        store=a.store,
        apache_server_name=a.apache_server_name,
        apache_session_cache=a.apache_session_cache,
        max_connections=a.max_connections,
        idle_timeout=a.idle_timeout,
    )
