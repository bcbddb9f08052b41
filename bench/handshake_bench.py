"""Handshake throughput: the shared session cache against OpenSSL's internal cache.

    python -m bench.handshake_bench [--count 50] [--rounds 7] [--s-time 1] [--markdown FILE]

Starts a dc_server, a dc_client in front of it, and four pyOpenSSL server
processes (``tlscache_farm.tlsserver``), which differ only in where sessions
live (``--writes`` picks synchronous, the default, or asynchronous session writes):

* ``internal``  — OpenSSL's own in-process cache (the baseline);
* ``memory``    — SessionCache over a MemoryStore (cost of the Python callbacks);
* ``dc_client`` — SessionCache over DistcacheStore → dc_client → dc_server (the farm set-up);
* ``dc_server`` — SessionCache over DistcacheStore → dc_server directly.

The two distcache servers seal sessions with a key ring made for the run, as deployed;
``memory`` stores them unsealed (an in-process store needs no sealing). Two more
servers store unsealed through the same dc_client and dc_server
(``--insecure-unsealed``), so that resumed handshakes sealed and unsealed are
measured side by side, through the same store, pair by pair in every round: the
``sealed ÷ unsealed`` table (target ≥ 0.95x).

A pyOpenSSL client in this process makes sequential connections: ``full`` offers
no session, ``resumed`` offers the session from the previous connection. Each
connection is handshake + one line from the server + clean shutdown. Reported per
cell (median of the rounds): handshakes/s (wall clock), server CPU µs per
handshake (the server reports ``time.process_time()`` on each connection) and the
fraction of connections the server resumed. Modes are interleaved in every round so
that machine noise hits them alike.

Then: ``openssl s_time`` (C load, TLS 1.2, 1 and ``--s-time-clients`` parallel
clients) against ``internal``, ``dc_client`` and ``dc_server``; handshakes over
memory BIOs in this process (no sockets between client and server, so only the
store hop remains: sync vs async writes, sealed vs unsealed); and the cost of one
``on_get`` hit, sealed and unsealed.

Bounded: every cell stops at ``--count`` connections or ``--cell-seconds``; the
whole run takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from OpenSSL import SSL

from tlscache_farm.procs import free_port, running, tool, wait_connectable, wait_proxy_connected
from tlscache_farm.tlsclient import (
    VERSIONS,
    client_context,
    handshake_over_memory,
    key_ring,
    server_argv,
)

ROOT = Path(__file__).resolve().parent.parent  # the TLS server runs from the checkout

MODES = ("internal", "memory", "dc_client", "dc_server")
S_TIME_MODES = ("internal", "dc_client", "dc_server")
#: The stores measured sealed (the servers of MODES) against unsealed (these servers).
SEAL_STORES = ("dc_client", "dc_server")
UNSEALED = ", unsealed"
#: The session id context of the in-process caches (the TLS server uses its own).
CONTEXT = b"tlscache-bench"


@dataclass
class Cell:
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    reused: list[float] = field(default_factory=list)

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")


@dataclass(frozen=True)
class Server:
    port: int
    pid: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_certs(d: Path) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()  # ECDSA P-256
    cert = ca.issue_cert("localhost", "127.0.0.1")
    chain, key = d / "chain.pem", d / "key.pem"
    cert.private_key_pem.write_to_path(str(key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(chain), append=i > 0)
    return chain, key


@contextlib.contextmanager
def tls_server(
    chain: Path,
    key: Path,
    store: str,
    threads: int,
    writes: str = "sync",
    keys: Path | None = None,
) -> Iterator[Server]:
    """A TLS server process; a distcache store is sealed with ``keys``, or unsealed without."""
    port = free_port()
    extra = ["--threads", str(threads), "--no-stats", f"--{writes}-writes"]
    if keys is None and store.startswith("dc:"):
        extra.append("--insecure-unsealed")
    argv = server_argv(chain, key, port, store, *extra, keys=keys)
    env = {"PYTHONPATH": str(ROOT)}
    with running(argv, ready=f"IP:127.0.0.1:{port}", env=env, stderr=subprocess.DEVNULL) as proc:
        yield Server(port, proc.pid)


def connect_once(
    ctx: SSL.Context, port: int, session: SSL.Session | None
) -> tuple[dict[str, str], SSL.Session | None]:
    """One connection: handshake, read the server's line, clean shutdown."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.settimeout(None)  # pyOpenSSL needs a blocking socket; the kernel bounds waits
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SSL.Connection(ctx, sock)
        conn.set_connect_state()
        if session is not None:
            conn.set_session(session)
        conn.do_handshake()
        data = b""
        for _ in range(64):
            data += conn.recv(4096)
            if data.endswith(b"\n"):
                break
        new_session = conn.get_session()
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
        fields = dict(f.split("=", 1) for f in data.decode().split())
        return fields, new_session
    finally:
        sock.close()


def run_cell(port: int, version: str, resumed: bool, count: int, max_s: float) -> Cell:
    ctx = client_context(version)
    session: SSL.Session | None = None
    if resumed:
        fields, session = connect_once(ctx, port, None)
        time.sleep(0.02)  # let the store write land (the TLS 1.2 race; see docs)
    fields, _ = connect_once(ctx, port, session)  # warm-up; CPU baseline
    cpu0 = float(fields["cpu"])
    n = reused = 0
    start = time.perf_counter()
    end = start + max_s
    while n < count and time.perf_counter() < end:
        fields, new_session = connect_once(ctx, port, session)
        n += 1
        reused += fields["reused"] == "1"
        if resumed and new_session is not None:
            session = new_session
    elapsed = time.perf_counter() - start
    cpu1 = float(fields["cpu"])
    cell = Cell()
    cell.rates.append(n / elapsed)
    # CPU between the warm-up's report and the last one: n - 1 handshakes in between.
    cell.cpu_us.append((cpu1 - cpu0) / max(1, n - 1) * 1e6)
    cell.reused.append(reused / max(1, n))
    return cell


def s_time(server: Server, reuse: bool, seconds: float, clients: int) -> tuple[float, float]:
    """``clients`` parallel ``openssl s_time`` runs (TLS 1.2, handshake only).

    Returns (connections/s over all of them, server CPU us per connection).
    """
    argv = ["openssl", "s_time", "-connect", f"127.0.0.1:{server.port}", "-tls1_2"]
    argv += ["-reuse" if reuse else "-new", "-time", str(max(1, round(seconds)))]
    cpu0 = cpu_seconds(server.pid)
    start = time.perf_counter()
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        for _ in range(clients)
    ]
    total = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        m = re.search(rb"(\d+) connections in \d+ real seconds", out)
        total += int(m.group(1)) if m else 0
    elapsed = time.perf_counter() - start
    cpu = cpu_seconds(server.pid) - cpu0
    return total / elapsed, cpu / max(1, total) * 1e6


def lookup_cost(store_address: str | None, keys: Path | None, n: int = 2000) -> tuple[float, float]:
    """(wall us, this thread's CPU us) per SessionCache.on_get hit, for one store, sealed
    with ``keys`` or unsealed (a MemoryStore sealed against unsealed: what opening costs)."""
    from tlscache import DistcacheStore, MemoryStore, SessionCache, SessionStore

    store: SessionStore = MemoryStore() if store_address is None else DistcacheStore(store_address)
    with store:
        cache = SessionCache(
            store,
            deadline_ms=1000,
            async_writes=False,
            keys=keys,
            insecure_unsealed_storage=keys is None,
        )
        sid, der = b"\x5a" * 32, b"\x30\x81\x83" + bytes(131)
        cache.on_new(CONTEXT, sid, der, 300)
        for _ in range(100):
            cache.on_get(CONTEXT, sid)  # warm the connection pool
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(n):
            assert cache.on_get(CONTEXT, sid) == der
        w1, c1 = time.perf_counter(), time.thread_time()
    return (w1 - w0) / n * 1e6, (c1 - c0) / n * 1e6


def in_process(
    chain: Path, key: Path, proxy: str, keys: Path, rounds: int, n: int
) -> dict[tuple[str, str, str], float]:
    """CPU us per handshake (client + server) by session storage, memory BIOs.

    The dc_client caches seal with ``keys``, as deployed; "memory, sync writes, sealed"
    against "memory, sync writes" is the CPU the sealing itself costs.
    """
    from tlscache import DistcacheStore, MemoryStore, SessionCache, SessionStore

    def server(
        store: SessionStore | None, async_writes: bool = True, sealed: bool = False
    ) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(str(chain))
        ctx.use_privatekey_file(str(key))
        if store is None:
            ctx.set_session_id(b"bench")
            ctx.set_options(SSL.OP_NO_TICKET)
        else:
            cache = SessionCache(
                store,
                deadline_ms=200,
                async_writes=async_writes,
                session_id_context=CONTEXT,
                keys=keys if sealed else None,
            )
            cache.install(ctx)
        return ctx

    ctxs = {
        "internal": server(None),
        "memory, sync writes": server(MemoryStore(), False),
        "memory, sync writes, sealed": server(MemoryStore(), False, sealed=True),
        "memory, async writes": server(MemoryStore(), True),
        "dc_client, sync writes": server(DistcacheStore(proxy), False, sealed=True),
        "dc_client, async writes": server(DistcacheStore(proxy), True, sealed=True),
    }
    out: dict[tuple[str, str, str], list[float]] = {}
    for version in VERSIONS:
        cctx = client_context(version)
        for kind in ("full", "resumed"):
            for r in range(rounds):
                names = list(ctxs) if r % 2 == 0 else list(reversed(ctxs))
                for name in names:
                    ctx = ctxs[name]
                    _, session = handshake_over_memory(ctx, cctx)
                    time.sleep(0.01)  # the first session's write lands
                    cpu0 = time.process_time()
                    for _ in range(n):
                        reused, new = handshake_over_memory(
                            ctx, cctx, session if kind == "resumed" else None
                        )
                        if kind == "resumed":
                            assert reused, name
                            session = new
                    cpu = (time.process_time() - cpu0) / n * 1e6
                    out.setdefault((version, kind, name), []).append(cpu)
    return {k: statistics.median(v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=50, help="connections per cell per round")
    p.add_argument("--rounds", type=int, default=7, help="rounds; modes interleave in each")
    p.add_argument(
        "--seal-rounds", type=int, default=25, help="sealed/unsealed pairs per (TLS, store)"
    )
    p.add_argument(
        "--seal-count",
        type=int,
        default=100,
        help="connections per cell of a sealed/unsealed pair (a pair's ratio needs longer "
        "cells than the main table to rise above the machine's noise)",
    )
    p.add_argument("--cell-seconds", type=float, default=2.0, help="time cap per cell")
    p.add_argument("--s-time", type=int, default=1, help="seconds per s_time run; 0 to skip")
    p.add_argument("--s-time-reps", type=int, default=2, help="s_time repetitions (median)")
    p.add_argument("--s-time-clients", type=int, default=3, help="parallel s_time processes")
    p.add_argument("--threads", type=int, default=4, help="server threads")
    p.add_argument(
        "--writes",
        choices=("sync", "async"),
        default="sync",
        help="session writes of the SessionCache servers (default: sync, the library default)",
    )
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    args = p.parse_args(argv)
    if not (
        1 <= args.count <= 5000
        and 1 <= args.rounds <= 25
        and 1 <= args.seal_rounds <= 25
        and 1 <= args.seal_count <= 5000
        and 0 <= args.s_time <= 10
        and 1 <= args.s_time_reps <= 5
        and 1 <= args.s_time_clients <= 8
    ):
        p.error(
            "--count and --seal-count 1..5000, --rounds and --seal-rounds 1..25, "
            "--s-time 0..10, reps 1..5, "
            "clients 1..8"
        )

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tlscache-bench-") as tmp:
        d = Path(tmp)
        chain, key = make_certs(d)
        dc = f"IP:127.0.0.1:{free_port()}"
        proxy = f"UNIX:{d / 'dc_client.sock'}"
        stores = {
            "internal": "internal",
            "memory": "memory",
            "dc_client": f"dc:{proxy}",
            "dc_server": f"dc:{dc}",
        }
        keys = key_ring(d / "keys.json")  # the run's key ring, shared by its servers
        with contextlib.ExitStack() as stack:
            stack.enter_context(running(tool("dc_server", "-listen", dc), ready=dc))
            argv_proxy = tool("dc_client", "-listen", proxy, "-server", dc, "-retry", "100")
            stack.enter_context(running(argv_proxy, ready=proxy, stderr=subprocess.DEVNULL))
            wait_proxy_connected(proxy)
            servers = {}
            for m in MODES:
                sealed_by = keys if m in SEAL_STORES else None
                server = tls_server(chain, key, stores[m], args.threads, args.writes, sealed_by)
                servers[m] = stack.enter_context(server)
            for m in SEAL_STORES:  # the same stores, unsealed
                servers[m + UNSEALED] = stack.enter_context(
                    tls_server(chain, key, stores[m], args.threads, args.writes, None)
                )
            for srv in servers.values():
                wait_connectable(f"IP:127.0.0.1:{srv.port}")

            cells: dict[tuple[str, str, str], Cell] = {}
            for r in range(args.rounds):
                order = MODES if r % 2 == 0 else tuple(reversed(MODES))
                for version in VERSIONS:
                    for kind in ("full", "resumed"):
                        for mode in order:
                            got = run_cell(
                                servers[mode].port, version, kind == "resumed", args.count,
                                args.cell_seconds,
                            )  # fmt: skip
                            cell = cells.setdefault((version, kind, mode), Cell())
                            cell.rates += got.rates
                            cell.cpu_us += got.cpu_us
                            cell.reused += got.reused
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

            sealing = seal_pairs(servers, args)
            print("sealed vs unsealed done", file=sys.stderr, flush=True)
            inproc = in_process(chain, key, proxy, keys, rounds=3, n=150)
            print("in-process done", file=sys.stderr, flush=True)
            lookups = {
                "memory": lookup_cost(None, None),
                "memory, sealed": lookup_cost(None, keys),
                "dc_client": lookup_cost(proxy, keys),
                "dc_client" + UNSEALED: lookup_cost(proxy, None),
                "dc_server": lookup_cost(dc, keys),
                "dc_server" + UNSEALED: lookup_cost(dc, None),
            }

            s_runs: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
            if args.s_time and shutil.which("openssl"):
                for rep in range(args.s_time_reps):
                    for clients in sorted({1, args.s_time_clients}):
                        for kind in ("new", "reuse"):
                            order = S_TIME_MODES if rep % 2 == 0 else S_TIME_MODES[::-1]
                            for mode in order:
                                run = s_time(servers[mode], kind == "reuse", args.s_time, clients)
                                s_runs.setdefault((mode, kind, clients), []).append(run)
                print("s_time done", file=sys.stderr, flush=True)
            s_times = {
                key: (
                    statistics.median(r for r, _ in runs),
                    statistics.median(c for _, c in runs),
                )
                for key, runs in s_runs.items()
            }

    lines = report(cells, s_times, args)
    lines += seal_report(sealing, args)
    names = list(dict.fromkeys(name for _, _, name in inproc))
    lines += ["", "In-process handshakes over memory BIOs (client + server CPU us per handshake):"]
    lines += ["", "| TLS | handshake | " + " | ".join(names) + " |"]
    lines += ["|---|---|" + "---:|" * len(names)]
    for version in VERSIONS:
        for kind in ("full", "resumed"):
            row = " | ".join(f"{inproc[(version, kind, nm)]:,.0f}" for nm in names)
            lines.append(f"| {version} | {kind} | {row} |")
    lines += ["", "SessionCache.on_get hit, in this process (2,000 sequential lookups):", ""]
    lines += ["| store | wall us/lookup | CPU us/lookup |", "|---|---:|---:|"]
    lines += [f"| {m} | {w:,.0f} | {c:,.0f} |" for m, (w, c) in lookups.items()]
    lines.append(f"\n(total run time {time.monotonic() - started:.0f} s)")
    text = "\n".join(lines)
    print(text)
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")
    return 0


@dataclass
class SealPair:
    """Resumed handshakes through one store, sealed and unsealed, measured pair by pair."""

    sealed: Cell = field(default_factory=Cell)
    unsealed: Cell = field(default_factory=Cell)
    ratios: list[float] = field(default_factory=list)  # sealed / unsealed rate, per pair


def seal_pairs(
    servers: dict[str, Server], args: argparse.Namespace
) -> dict[tuple[str, str], SealPair]:
    """Resumed handshakes/s, sealed vs unsealed through the same store, per (TLS, store).

    Each round measures both servers of a store back to back (which goes first alternates), so
    the ratio of a pair sees the same machine load; the table gives the median of the ratios.
    """
    pairs: dict[tuple[str, str], SealPair] = {}
    for r in range(args.seal_rounds):
        for version in VERSIONS:
            for store in SEAL_STORES:
                pair = pairs.setdefault((version, store), SealPair())
                order = [(store, pair.sealed), (store + UNSEALED, pair.unsealed)]
                if r % 2:
                    order.reverse()
                rates = {}
                for name, cell in order:
                    port = servers[name].port
                    got = run_cell(port, version, True, args.seal_count, args.cell_seconds)
                    cell.rates += got.rates
                    cell.cpu_us += got.cpu_us
                    cell.reused += got.reused
                    rates[name] = got.rates[0]
                pair.ratios.append(rates[store] / rates[store + UNSEALED])
    return pairs


def seal_report(pairs: dict[tuple[str, str], SealPair], args: argparse.Namespace) -> list[str]:
    out = [
        "",
        f"Resumed handshakes, sealed (key ring) vs unsealed, same store, {args.seal_count} "
        f"connections x {args.seal_rounds} pairs per cell (median; sealed / unsealed: median "
        "of the per-pair ratios; target >= 0.95x):",
        "",
        "| TLS | store | sealed hs/s | unsealed hs/s | sealed / unsealed | sealed CPU us/hs "
        "| unsealed CPU us/hs | resumed (sealed / unsealed) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (version, store), p in pairs.items():
        sealed, unsealed = p.sealed, p.unsealed
        out.append(
            f"| {version} | {store} | {sealed.median(sealed.rates):,.0f} "
            f"| {unsealed.median(unsealed.rates):,.0f} | {statistics.median(p.ratios):.2f}x "
            f"| {sealed.median(sealed.cpu_us):,.0f} | {unsealed.median(unsealed.cpu_us):,.0f} "
            f"| {sealed.median(sealed.reused):.0%} / {unsealed.median(unsealed.reused):.0%} |"
        )
    return out


def report(
    cells: dict[tuple[str, str, str], Cell],
    s_times: dict[tuple[str, str, int], tuple[float, float]],
    args: argparse.Namespace,
) -> list[str]:
    out = [
        f"pyOpenSSL client, sequential, {args.count} connections x {args.rounds} rounds "
        f"per cell (median); ECDSA P-256; {args.writes} session writes",
        "",
        "| TLS | handshake | store | handshakes/s | vs internal | server CPU us/hs | resumed |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for version in VERSIONS:
        for kind in ("full", "resumed"):
            base = cells[(version, kind, "internal")]
            base_rate = base.median(base.rates)
            for mode in MODES:
                c = cells[(version, kind, mode)]
                rate = c.median(c.rates)
                out.append(
                    f"| {version} | {kind} | {mode} | {rate:,.0f} | {rate / base_rate:.2f}x "
                    f"| {c.median(c.cpu_us):,.0f} | {c.median(c.reused):.0%} |"
                )
    out += ["", "Resumed / full (same store):", ""]
    out += ["| TLS | store | resumed / full (rate) | full / resumed (server CPU) |"]
    out += ["|---|---|---:|---:|"]
    for version in VERSIONS:
        for mode in MODES:
            full, res = cells[(version, "full", mode)], cells[(version, "resumed", mode)]
            out.append(
                f"| {version} | {mode} | {res.median(res.rates) / full.median(full.rates):.2f}x "
                f"| {full.median(full.cpu_us) / res.median(res.cpu_us):.2f}x |"
            )
    if s_times:
        out += [
            "",
            f"openssl s_time (C client), TLS 1.2 session ids, {args.s_time} s per run, "
            f"server with {args.threads} threads:",
            "",
            "| s_time clients | handshake | store | conn/s | vs internal | server CPU us/conn |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for clients in sorted({k for _, _, k in s_times}):
            for kind in ("new", "reuse"):
                base_conn = s_times[("internal", kind, clients)][0]
                for mode in S_TIME_MODES:
                    rate, cpu = s_times[(mode, kind, clients)]
                    out.append(
                        f"| {clients} | {kind} | {mode} | {rate:,.0f} | {rate / base_conn:.2f}x "
                        f"| {cpu:,.0f} |"
                    )
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
