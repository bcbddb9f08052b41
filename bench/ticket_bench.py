"""Resumption by session ticket: the farm's shared ticket keys against OpenSSL's own keys.

    python -m bench.ticket_bench [--count 300] [--rounds 7] [--cell-seconds 3] [--markdown FILE]

Two pyOpenSSL server processes (this module with ``--serve``), alike but for who holds the
ticket keys; both have OpenSSL's session cache off, so every resumption is by ticket:

* ``openssl`` -- OpenSSL's own ticket keys (made at start, never shared): the baseline;
* ``shared``  -- :func:`tlscache.resumption.configure_resumption` ``stateless`` with
  :class:`tlscache.ticketkeys.TicketKeys` over a dc_server, sealed with a key ring made for
  the run, as the farm runs it: the ticket key callback runs in Python on every ticket
  issued or accepted, the store only once per key period.

A pyOpenSSL client in this process connects sequentially, each connection offering the
ticket of the one before (handshake, one line from the server, clean shutdown). In every
round the two cells of a version run back to back, in alternating order, and the round's
ratio is ``shared / openssl`` handshakes/s; the table gives the median of those ratios
(target >= 0.95x), with the median rates and the server CPU per handshake.

Bounded: each cell stops at ``--count`` connections or ``--cell-seconds``; the whole run
takes well under a minute on two cores.
"""

from __future__ import annotations

import argparse
import contextlib
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

from bench.handshake_bench import ROOT, Server, connect_once, make_certs
from tlscache_farm.procs import free_port, running, tool
from tlscache_farm.tlsclient import client_context, key_ring

SERVERS = ("openssl", "shared")
VERSIONS = ("1.2", "1.3")


# -- the server process ---------------------------------------------------------------------------


def server_context(mode: str, cert: str, key: str, dc: str | None, keys: str | None) -> SSL.Context:
    """A server Context resuming by ticket only: OpenSSL's keys or the shared ones."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(cert)
    ctx.use_privatekey_file(key)
    ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    if mode == "openssl":
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)  # tickets stay on, under OpenSSL's keys
        return ctx
    from tlscache import DistcacheStore
    from tlscache.keyring import KeyRingFile
    from tlscache.resumption import configure_resumption
    from tlscache.sealing import Sealer
    from tlscache.ticketkeys import TicketKeys

    if dc is None or keys is None:
        raise SystemExit("--serve shared needs --dc ADDRESS and --keys PATH")
    ticket_keys = TicketKeys(DistcacheStore(dc), Sealer(KeyRingFile(keys)))
    configure_resumption(ctx, "stateless", ticket_keys=ticket_keys)
    return ctx


def serve(ctx: SSL.Context, port: int) -> None:
    """One connection at a time: handshake, one line (resumed? CPU so far), clean shutdown."""
    from OpenSSL._util import lib

    listener = socket.create_server(("127.0.0.1", port), backlog=128)
    while True:
        sock, _ = listener.accept()
        with contextlib.suppress(SSL.Error, OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # pyOpenSSL needs a blocking socket; the kernel bounds a silent client.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
            conn = SSL.Connection(ctx, sock)
            conn.set_accept_state()
            conn.do_handshake()
            reused = int(lib.SSL_session_reused(conn._ssl))
            conn.sendall(f"reused={reused} cpu={time.process_time():.6f}\n".encode())
            conn.shutdown()
        sock.close()


# -- the client side ------------------------------------------------------------------------------


@dataclass
class Cell:
    """One server and version: per round, handshakes/s, server CPU µs and resumed share."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    reused: list[float] = field(default_factory=list)


def run_cell(port: int, version: str, count: int, max_s: float, cell: Cell) -> float:
    """Resumed handshakes against ``port``; appends to ``cell`` and returns the rate."""
    ctx = client_context(version)
    fields, session = connect_once(ctx, port, None)  # full handshake: the first ticket
    fields, session = connect_once(ctx, port, session)  # warm-up; CPU baseline
    cpu0 = float(fields["cpu"])
    n = reused = 0
    start = time.perf_counter()
    while n < count and time.perf_counter() < start + max_s:
        fields, new_session = connect_once(ctx, port, session)
        n += 1
        reused += fields["reused"] == "1"
        session = new_session or session
    elapsed = time.perf_counter() - start
    rate = n / elapsed
    cell.rates.append(rate)
    cell.cpu_us.append((float(fields["cpu"]) - cpu0) / max(1, n) * 1e6)
    cell.reused.append(reused / max(1, n))
    return rate


@contextlib.contextmanager
def servers(d: Path) -> Iterator[dict[str, Server]]:
    chain, key = make_certs(d)
    keys = key_ring(d / "keyring.json")
    dc_port = free_port()
    dc = f"IP:127.0.0.1:{dc_port}"
    env = {"PYTHONPATH": str(ROOT)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(tool("dc_server", "-listen", dc), ready=dc))
        started = {}
        for mode in SERVERS:
            port = free_port()
            argv = [sys.executable, "-m", "bench.ticket_bench", "--serve", mode]
            argv += ["--port", str(port), "--cert", str(chain), "--key", str(key)]
            argv += ["--dc", dc, "--keys", str(keys)]
            proc = stack.enter_context(
                running(argv, ready=f"IP:127.0.0.1:{port}", env=env, stderr=subprocess.DEVNULL)
            )
            started[mode] = Server(port, proc.pid)
        yield started


def report(
    cells: dict[tuple[str, str], Cell], ratios: dict[str, list[float]], args: argparse.Namespace
) -> str:
    lines = [
        f"Resumed handshakes by ticket, shared keys vs OpenSSL's own: {args.count} connections "
        f"x {args.rounds} rounds per cell (median; ratio: median of the per-round ratios; "
        "target >= 0.95x):",
        "",
        "| TLS | openssl hs/s | shared hs/s | shared / openssl | server CPU µs openssl / shared "
        "| resumed |",
        "|---|---|---|---|---|---|",
    ]
    for version in VERSIONS:
        base, shared = cells[(version, "openssl")], cells[(version, "shared")]
        lines.append(
            f"| {version} | {statistics.median(base.rates):,.0f} "
            f"| {statistics.median(shared.rates):,.0f} "
            f"| {statistics.median(ratios[version]):.2f}x "
            f"| {statistics.median(base.cpu_us):,.0f} / {statistics.median(shared.cpu_us):,.0f} "
            f"| {statistics.median(base.reused):.0%} / {statistics.median(shared.reused):.0%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ticket_bench", description=__doc__)
    p.add_argument("--count", type=int, default=300, help="connections per cell (300)")
    p.add_argument("--rounds", type=int, default=7, help="pairs per version (7)")
    p.add_argument("--cell-seconds", type=float, default=3.0, help="time bound of a cell (3)")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    p.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cert", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--dc", help=argparse.SUPPRESS)
    p.add_argument("--keys", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(server_context(args.serve, args.cert, args.key, args.dc, args.keys), args.port)
        return 0

    cells = {(v, s): Cell() for v in VERSIONS for s in SERVERS}
    ratios: dict[str, list[float]] = {v: [] for v in VERSIONS}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, servers(Path(tmp)) as running_servers:
        for r in range(args.rounds):
            for version in VERSIONS:
                order = SERVERS if r % 2 == 0 else SERVERS[::-1]
                rates = {
                    s: run_cell(
                        running_servers[s].port,
                        version,
                        args.count,
                        args.cell_seconds,
                        cells[(version, s)],
                    )
                    for s in order
                }
                ratios[version].append(rates["shared"] / rates["openssl"])
    table = report(cells, ratios, args)
    print(table + f"\n({time.monotonic() - started:.1f} s in all)")
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
