"""A layer-4 round-robin load balancer: TLS passes through untouched.

It never sees a key or a session: consecutive connections of one client land on different
backends, which is exactly the situation a shared session cache exists for. A backend that refuses
connections is skipped (the next one is tried), so losing a backend costs no client request.
Counts per backend are served as JSON on a plain-HTTP admin port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from . import httpd
from .records import BalancerBackend, BalancerStatus, encode

CONNECT_TIMEOUT = 2.0
BUFFER = 65536


@dataclass
class BackendCounters:
    """What the balancer knows about one backend."""

    host: str
    port: int
    connections: int = 0
    active: int = 0
    failures: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    last_failure: float | None = None

    def record(self) -> BalancerBackend:
        return BalancerBackend(
            address=f"{self.host}:{self.port}",
            connections=self.connections,
            active=self.active,
            connect_failures=self.failures,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
        )


@dataclass
class Balancer:
    """Round-robin over ``backends``; ``rejected`` counts clients no backend would take."""

    backends: list[BackendCounters]
    max_connections: int = 1024
    next_index: int = 0
    accepted: int = 0
    rejected: int = 0
    started: float = field(default_factory=time.time)
    _slots: asyncio.Semaphore | None = None

    def pick_order(self) -> list[int]:
        """The backends to try for one connection: the next in turn first, then the others."""
        n = len(self.backends)
        start = self.next_index
        self.next_index = (start + 1) % n
        return [(start + i) % n for i in range(n)]

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        assert self._slots is not None
        self.accepted += 1
        async with self._slots:
            for index in self.pick_order():
                b = self.backends[index]
                try:
                    up_r, up_w = await asyncio.wait_for(
                        asyncio.open_connection(b.host, b.port), CONNECT_TIMEOUT
                    )
                except (OSError, TimeoutError):
                    b.failures += 1
                    b.last_failure = time.time()
                    continue
                b.connections += 1
                b.active += 1
                try:
                    await asyncio.gather(
                        self._pipe(client_r, up_w, b, up=True),
                        self._pipe(up_r, client_w, b, up=False),
                    )
                finally:
                    b.active -= 1
                    up_w.close()
                    client_w.close()
                    with contextlib.suppress(Exception):
                        await up_w.wait_closed()
                    with contextlib.suppress(Exception):
                        await client_w.wait_closed()
                return
            self.rejected += 1
            client_w.close()

    async def _pipe(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, b: BackendCounters, up: bool
    ) -> None:
        """Copy one direction; pass an EOF on as a half-close so TLS close_notify still flows."""
        try:
            while True:
                data = await r.read(BUFFER)
                if not data:
                    break
                if up:
                    b.bytes_up += len(data)
                else:
                    b.bytes_down += len(data)
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except (OSError, RuntimeError):
            w.close()  # a reset on one side resets the other

    def status(self) -> BalancerStatus:
        """Read from the admin thread: a snapshot of counters the event loop keeps moving."""
        return BalancerStatus(
            pid=os.getpid(),
            uptime_s=round(time.time() - self.started, 1),
            strategy="round-robin",
            accepted=self.accepted,
            rejected=self.rejected,
            backends=[b.record() for b in self.backends],
        )

    def admin_route(self, request: httpd.Request) -> httpd.Response:
        """``GET /status.json`` on the plain-HTTP admin port."""
        if request.path in ("/", "/status.json"):
            return httpd.json(encode(self.status()))
        return httpd.text(404, "not found\n")


def parse_backend(text: str) -> BackendCounters:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return BackendCounters(host or "127.0.0.1", int(port))


async def run(args: argparse.Namespace) -> None:
    bal = Balancer(list(args.backend), max_connections=args.max_connections)
    bal._slots = asyncio.Semaphore(args.max_connections)
    server = await asyncio.start_server(bal.handle, args.host, args.port, backlog=511)
    admin = httpd.HttpServer(args.host, args.admin_port, bal.admin_route)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    targets = ", ".join(f"{b.host}:{b.port}" for b in bal.backends)
    print(
        f"balancer: {args.host}:{args.port} -> {targets} (round-robin), "
        f"status http://{args.host}:{args.admin_port}/status.json",
        flush=True,
    )
    try:
        async with server:
            await stop.wait()
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tlscache_farm.balancer",
        description="Round-robin TCP load balancer that passes TLS through.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--admin-port", type=int, required=True, help="plain-HTTP status port")
    p.add_argument(
        "--backend", type=parse_backend, action="append", required=True, help="HOST:PORT (repeat)"
    )
    p.add_argument("--max-connections", type=int, default=1024)
    args = p.parse_args(argv)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
