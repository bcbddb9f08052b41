"""``tlscache-farm``: the command line of the demo farm.

The farm needs the ``farm`` extra (trustme for the demo certificate, h11 for HTTP), which a
plain ``pip install tlscache`` does not bring: :func:`main` says so, and how to install it,
before it creates any file or directory. The modules that need the extra are imported only
after that check.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import cast

from .certs import CertPaths, ensure_demo_certs
from .config import (
    FarmConfig,
    FarmError,
    TlsVersion,
    WorkloadConfig,
    add_backend_options,
    cache_config,
)
from .kinds import kinds_problem, parse_kinds
from .procs import free_port

EXTRA_MODULES = ("trustme", "h11")

#: The options of ``--report``, one per WorkloadConfig field: (metavar, help).
WORKLOAD_OPTIONS = {
    "clients": ("N", "--report clients (default 60)"),
    "reconnects": ("N", "--report reconnects per client (5)"),
    "concurrency": ("N", "--report clients at a time (8)"),
    "pause_ms": (
        "MS",
        "--report pause before each reconnect, ms (default 10; 0 exposes the TLS 1.2 race "
        "between a server's store write and a client that reconnects at once)",
    ),
    "time_limit": (
        "S",
        "--report: seconds for the whole workload; connections not started by then are "
        "skipped and counted (default 20)",
    ),
}
INSTALL_EXTRA = "pip install 'tlscache[farm]'"


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
    add_backend_options(p)
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
        "--cache-servers",
        type=int,
        metavar="N",
        default=2,
        help="memcached servers with --cache memcached (1-16, default 2)",
    )
    p.add_argument(
        "--with-apache",
        action="store_true",
        help="add Apache httpd (mod_ssl) behind the balancer, sharing sessions with the backends "
        "through --cache memcached or redis; the backends then store sessions as mod_ssl does, "
        "UNSEALED (see docs/apache.md)",
    )
    p.add_argument(
        "--backend-kinds",
        metavar="KIND,...",
        default="threaded",
        help="server of each backend, cycled over them: threaded (pyOpenSSL, default), twisted "
        "(twisted.web), stdlib (asyncio on ssl.SSLContext); e.g. threaded,twisted,stdlib",
    )
    p.add_argument("--report", action="store_true", help="run the workload, print the table, exit")
    defaults = WorkloadConfig()
    for f in dataclasses.fields(WorkloadConfig):
        metavar, text = WORKLOAD_OPTIONS[f.name]
        value = getattr(defaults, f.name)
        option = "--" + f.name.replace("_", "-")
        p.add_argument(option, type=type(value), metavar=metavar, default=value, help=text)
    return p


def check_args(args: argparse.Namespace) -> str | None:
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
    if not 1 <= args.cache_servers <= 16:
        return "--cache-servers must be 1..16"
    if not 64 <= args.sessions <= 60000:
        return "--sessions must be 64..60000"
    if args.session_timeout < 1 or args.dc_retry < 1 or args.cache_deadline_ms <= 0:
        return "--session-timeout, --dc-retry and --cache-deadline-ms must be positive"
    if args.cache_breaker_reset_s <= 0:
        return "--cache-breaker-reset-s must be positive"
    if args.clients < 1 or args.reconnects < 0 or args.concurrency < 1:
        return "--clients and --concurrency must be at least 1, --reconnects at least 0"
    if args.with_apache and args.cache not in ("memcached", "redis"):
        return "--with-apache needs --cache memcached or --cache redis (what mod_ssl can share)"
    if args.with_apache and args.report:
        return "--with-apache is for a farm to use, not --report (which compares cache modes)"
    if args.resumption != "stateful" and (args.cache == "none" or args.with_apache):
        return "--resumption stateless/both needs a cache (not --cache none, not --with-apache)"
    if not 0 < args.ticket_period <= 366 * 86400:
        return "--ticket-period must be more than 0 and at most a year (seconds)"
    if bool(args.cert) != bool(args.key):
        return "--cert and --key go together"
    try:
        kinds = parse_kinds(args.backend_kinds)
    except ValueError as exc:
        return f"--backend-kinds: {exc}"
    if set(kinds) != {"threaded"} and (
        args.cache == "none" or args.with_apache or args.resumption != "stateful"
    ):
        return (
            "--backend-kinds twisted/stdlib need a session cache and --resumption stateful "
            "(not --cache none, not --with-apache)"
        )
    for option, path in (("--cert", args.cert), ("--key", args.key), ("--ca", args.ca)):
        if path and not os.access(path, os.R_OK):
            return f"{option} {path}: no such file, or not readable"
    return None


def missing_extra() -> list[str]:
    """The modules of the ``farm`` extra that cannot be imported."""
    missing = []
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def farm_config(args: argparse.Namespace, certs: CertPaths) -> FarmConfig:
    """Defaults as documented: fixed ports for a farm to play with, free ones for --report."""
    free = args.report
    status_port = args.status_port if args.status_port is not None else (None if free else 8080)
    return FarmConfig(
        certs=certs,
        backends=args.backends,
        tls=cast(TlsVersion, args.tls),
        cache=cache_config(args),
        port=args.port if args.port is not None else (free_port() if free else 8443),
        status_port=status_port or None,  # 0: no status page
        base_port=args.base_port if args.base_port is not None else (0 if free else 9000),
        run_dir=args.run_dir,
        dc_retry_ms=args.dc_retry,
        sessions=args.sessions,
        cache_servers=args.cache_servers,
        with_apache=args.with_apache,
        backend_kinds=parse_kinds(args.backend_kinds),
    )


_interrupted = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT/SIGTERM/SIGHUP unwinds into the clean stop; later ones are ignored, so a
    second Ctrl-C (or ``timeout`` signalling its whole process group) cannot cut the stop short."""
    global _interrupted
    if _interrupted:
        return
    _interrupted = True
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"tlscache-farm: {problem} (see tlscache-farm --help)", file=sys.stderr)
        return 2
    missing = missing_extra()
    if missing:
        print(
            f"tlscache-farm: the demo farm needs the 'farm' extra of tlscache "
            f"(missing: {', '.join(missing)}). Install it with:\n  {INSTALL_EXTRA}",
            file=sys.stderr,
        )
        return 1
    kinds_missing = kinds_problem(parse_kinds(args.backend_kinds))
    if kinds_missing:
        print(f"tlscache-farm: {kinds_missing}", file=sys.stderr)
        return 1
    from .orchestrator import serve
    from .report import run_report

    if args.cert:
        certs = CertPaths(Path(args.cert), Path(args.key), Path(args.ca) if args.ca else None)
    else:
        certs = ensure_demo_certs(args.certs_dir)
    config = farm_config(args, certs)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    try:
        if args.report:
            fields = dataclasses.fields(WorkloadConfig)
            workload = WorkloadConfig(**{f.name: getattr(args, f.name) for f in fields})
            return run_report(config, workload, sys.stdout)
        return serve(config)
    except FarmError as exc:
        print(f"tlscache-farm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
