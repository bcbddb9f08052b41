"""Blocking against non-blocking session lookups in an asyncio TLS server.

    python -m bench.nonblocking_bench [--clients 50] [--seconds 4] [--delay-ms 10]

One asyncio server (:mod:`tlscache.aio_server`, pyOpenSSL over memory BIOs) in this process;
its session store answers each lookup after ``--delay-ms`` (an in-process store behind an
artificial delay, standing in for a distant cache). ``--clients`` concurrent clients (Python
``ssl``, threads of one child process) reconnect in a loop, each offering the session of its
previous connection, so nearly every handshake is a resumption that needs a lookup.

Three servers are measured in turn, for TLS 1.2 and 1.3:

* ``internal``: OpenSSL's own in-process cache, no lookups: what the handshakes alone cost
  the loop (each ``do_handshake`` step runs on it);
* ``blocking``: ``SessionCache.install``; the lookup runs inside OpenSSL's get callback, on
  the loop thread, which waits for the store;
* ``nonblocking``: ``NonblockingResumption.install``; the ClientHello callback starts the
  lookup on a worker thread (4 by default) and the handshake awaits it.

Reported: handshakes/s completed by the server, the fraction resumed, and the event loop's
lateness: a ticker task sleeps 1 ms in a loop and records how late each wake-up is (p50,
p99, max). Bounded: each cell runs ``--seconds``; the whole run takes about 40 s.
Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from OpenSSL import SSL

from tlscache import Deadline, MemoryStore, SessionCache, WrappingStore
from tlscache.aio_server import TLSStream, serve
from tlscache.openssl.clienthello import NonblockingResumption

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
TICK_S = 0.001


class DelayedStore(WrappingStore):
    """A store whose lookups take ``delay_s`` (a sleep: the calling thread waits)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(MemoryStore())
        self.delay_s = delay_s

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        time.sleep(self.delay_s)
        return self.inner.fetch(session_id, deadline)


@dataclass(frozen=True)
class Cell:
    version: str
    mode: str
    handshakes: int
    resumed: int
    seconds: float
    lateness_ms: list[float]

    @property
    def rate(self) -> float:
        return self.handshakes / self.seconds

    def lateness(self, q: float) -> float:
        values = sorted(self.lateness_ms)
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def server_context(pem: Path) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pem))
    ctx.use_privatekey_file(str(pem))
    return ctx


async def measure(args: argparse.Namespace, pem: Path, ca: Path, version: str, mode: str) -> Cell:
    cache = SessionCache(DelayedStore(args.delay_ms / 1000.0), deadline_ms=args.delay_ms * 5)
    ctx = server_context(pem)
    nb: NonblockingResumption | None = None
    if mode == "nonblocking":
        nb = NonblockingResumption(cache)
        nb.install(ctx)
    elif mode == "blocking":
        cache.install(ctx)
    else:  # OpenSSL's own cache: no lookups at all, the handshakes' own cost on the loop
        ctx.set_session_id(b"nonblocking-bench")
        ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    counts = {"handshakes": 0, "resumed": 0}
    measuring = False

    async def handle(stream: TLSStream) -> None:
        if measuring:
            counts["handshakes"] += 1
            counts["resumed"] += stream.resumed
        await stream.send(b"ok\n")

    lateness: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(TICK_S)
            if measuring:
                lateness.append(max(0.0, (loop.time() - before - TICK_S) * 1000.0))

    server = await serve(ctx, handle, "127.0.0.1", 0, resumption=nb)
    port = server.sockets[0].getsockname()[1]
    tick = asyncio.create_task(ticker())
    warmup = 1.0
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.nonblocking_bench",
        "--client",
        str(port),
        "--ca",
        str(ca),
        "--version",
        version,
        "--clients",
        str(args.clients),
        "--seconds",
        str(args.seconds + warmup + 1.0),
        stdout=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(warmup)  # every client has made its first, full handshake
        measuring = True
        start = time.perf_counter()
        await asyncio.sleep(args.seconds)
        measuring = False
        elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(ProcessLookupError):
            client.terminate()
        await client.wait()
        await asyncio.sleep(0.2)  # connections in progress finish
        tick.cancel()
        server.close()
        if nb is not None:
            nb.close()
    return Cell(version, mode, counts["handshakes"], counts["resumed"], elapsed, lateness)


# ---------------------------------------------------------------- client process


def run_clients(port: int, ca: Path, version: str, clients: int, seconds: float) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    stop = time.monotonic() + seconds

    def one_client() -> None:
        session: ssl.SSLSession | None = None
        for _ in range(100_000):  # bounded in count and in time
            if time.monotonic() >= stop:
                return
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
                ):
                    s.recv(16)
                    session = s.session
                    with contextlib.suppress(OSError, ssl.SSLError):
                        s.unwrap()
            except (OSError, ssl.SSLError):
                session = None

    threads = [threading.Thread(target=one_client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 15)


# ---------------------------------------------------------------- main


def table(cells: list[Cell], args: argparse.Namespace) -> str:
    lines = [
        f"{args.clients} clients, store lookups take {args.delay_ms:g} ms, "
        f"{args.seconds:g} s per cell, os.cpu_count()={os.cpu_count()}",
        "",
        "| TLS | lookups | handshakes/s | resumed | loop lateness p50 / p99 / max (ms) |",
        "|---|---|---:|---:|---|",
    ]
    for c in cells:
        share = c.resumed / c.handshakes if c.handshakes else 0.0
        lines.append(
            f"| {c.version} | {c.mode} | {c.rate:,.0f} | {share:.0%} | "
            f"{statistics.median(c.lateness_ms) if c.lateness_ms else 0:.2f} / "
            f"{c.lateness(0.99):.2f} / {max(c.lateness_ms, default=0):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--delay-ms", type=float, default=10.0)
    p.add_argument("--client", type=int, help=argparse.SUPPRESS)  # the child's server port
    p.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--version", default="1.2", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client is not None:
        run_clients(args.client, args.ca, args.version, args.clients, args.seconds)
        return
    args.seconds = min(args.seconds, 10.0)  # six cells: the run stays about a minute at most

    import trustme

    with tempfile.TemporaryDirectory() as d:
        authority = trustme.CA()
        pem, ca = Path(d) / "server.pem", Path(d) / "ca.pem"
        authority.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
        authority.cert_pem.write_to_path(str(ca))
        cells = []
        for version in ("1.2", "1.3"):
            for mode in ("internal", "blocking", "nonblocking"):
                cells.append(asyncio.run(measure(args, pem, ca, version, mode)))
    print(table(cells, args))


if __name__ == "__main__":
    main()
