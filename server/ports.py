"""Which loopback ports a farm uses, checked before anything starts.

With fixed ports (the default layout) every port is tried first, so that a farm still running
in another terminal is reported as one clear message naming the options that move each port,
rather than as a child process dying of "address in use" halfway through the start.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .config import HOST, FarmConfig, FarmError
from .procs import free_port


@dataclass(frozen=True)
class BackendPorts:
    tls: int
    admin: int  # plain-HTTP status


@dataclass(frozen=True)
class PortPlan:
    """Every internal port of one farm (the balancer's TLS port is ``FarmConfig.port``)."""

    dc_server: int
    backends: tuple[BackendPorts, ...]
    balancer_admin: int
    cache_servers: tuple[int, ...] = ()  # memcached or redis-server (--cache memcached/redis...)
    cluster_buses: tuple[int, ...] = ()  # the cluster bus of each Redis Cluster node
    apache: int | None = None  # Apache httpd's TLS port (--with-apache)


def cache_server_count(cfg: FarmConfig) -> tuple[int, bool]:
    """How many cache servers ``--cache`` needs, and whether they form a Redis Cluster."""
    mode = cfg.cache.mode
    if mode == "memcached":
        return cfg.cache_servers, False
    if mode == "redis":
        return 1, False
    if mode == "redis-cluster":
        return 3, True
    return 0, False


def port_in_use(port: int) -> str | None:
    """Why ``port`` cannot be bound on loopback right now (None: it can)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def check_free(ports: list[tuple[int, str, str]]) -> None:
    """Raise one FarmError naming the ports of ``(port, what, option)`` that are taken, with the
    options that would move them."""
    busy = [(p, what, opt, why) for p, what, opt in ports if (why := port_in_use(p))]
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
        free = next((c for c in range(port + 1, min(port + 50, 65536)) if not port_in_use(c)), 0)
        fixes.append(f"{option} {free}")
    raise FarmError(
        "cannot start: ports in use (is another farm still running?)\n"
        + "\n".join(lines)
        + f"\nfree alternatives: {' '.join(fixes)}"
    )


def plan_ports(cfg: FarmConfig) -> PortPlan:
    """dc_server, (TLS, status) per backend, balancer status; every fixed port checked.

    ``base_port`` 0 picks free ports; otherwise dc_server is on BASE, backend i on BASE+i, its
    status on BASE+100+i and the balancer's status on BASE+100; cache server j (memcached,
    redis-server) on BASE+50+j, a Redis Cluster node's bus on BASE+70+j, and Apache httpd
    (``--with-apache``) on BASE+N+1, after the N backends.
    """
    count, cluster = cache_server_count(cfg)
    wanted = [(cfg.port, "balancer", "--port")]
    if cfg.status_port is not None:
        wanted.append((cfg.status_port, "farm status page", "--status-port"))
    if cfg.base_port == 0:
        check_free(wanted)
        # --port (the balancer starts last) and --status-port (bound once all is up) look
        # free until then: no internal process may be given them.
        promised = {port for port, _, _ in wanted}

        def pick() -> int:
            return free_port(avoid=promised)

        backends = tuple(BackendPorts(pick(), pick()) for _ in range(cfg.backends))
        servers = tuple(pick() for _ in range(count))
        buses = tuple(pick() for _ in range(count if cluster else 0))
        apache = pick() if cfg.with_apache else None
        return PortPlan(pick(), backends, pick(), servers, buses, apache)
    b = cfg.base_port
    plan = PortPlan(
        b,
        tuple(BackendPorts(b + i, b + 100 + i) for i in range(1, cfg.backends + 1)),
        b + 100,
        tuple(b + 50 + j for j in range(1, count + 1)),
        tuple(b + 70 + j for j in range(1, count + 1)) if cluster else (),
        b + cfg.backends + 1 if cfg.with_apache else None,  # right after the last backend
    )
    if cfg.cache.mode == "distcache":
        wanted.append((plan.dc_server, "dc_server", "--base-port"))
    for i, ports in enumerate(plan.backends, start=1):
        wanted.append((ports.tls, f"backend-{i}", "--base-port"))
        wanted.append((ports.admin, f"backend-{i} status", "--base-port"))
    wanted.append((plan.balancer_admin, "balancer status", "--base-port"))
    for j, port in enumerate(plan.cache_servers, start=1):
        wanted.append((port, f"cache server {j}", "--base-port"))
    for j, port in enumerate(plan.cluster_buses, start=1):
        wanted.append((port, f"cluster bus {j}", "--base-port"))
    if plan.apache is not None:
        wanted.append((plan.apache, "apache", "--base-port"))
    check_free(wanted)
    return plan
