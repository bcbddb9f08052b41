"""The cheapest possible lookup: one no-op request to a store's server, and nothing else.

A resumed handshake through a remote store waits for at least one round trip to that store.
This measures the round trip by itself, from a raw socket with no client library, no
sealing and no callback: ``mn`` to memcached, ``PING`` to Redis, a ``HAVE`` of an unknown
id to dc_server or dc_client. Between two requests the caller keeps its CPU busy for
``gap_s`` (as a server is busy with the handshake between two lookups), so the store's side
is idle when the request arrives, as it is in the handshake benchmark.

``ceiling(handshake_s, rtt_s)`` is then the best ratio any lookup path could reach against
OpenSSL's internal cache on this machine: the internal handshake's time over that time plus
one round trip.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

from tlscache.distcache.address import connectable
from tlscache.distcache.clientconn import ClientConnection, have_request
from tlscache.distcache.sockets import connect

__all__ = ["RoundTrip", "ceiling", "measure"]

_UNKNOWN_ID = b"\x00" * 32


class RoundTrip(NamedTuple):
    """Wall microseconds of one request and its reply (p50, p90) over ``n`` requests."""

    p50_us: float
    p90_us: float
    n: int


def _probe(spec: str) -> tuple[socket.socket, Callable[[], bytes], Callable[[bytes], bool]]:
    """A connected socket to the store server ``spec`` names (its first server), the request
    to send, and a test of whether the bytes received so far are a whole reply."""
    if spec.startswith("distcache:"):
        sock = connect(connectable(spec.removeprefix("distcache:")), 5.0)
        conn = ClientConnection()

        def request() -> bytes:
            return conn.send(have_request(_UNKNOWN_ID))

        def complete(data: bytes) -> bool:
            return bool(conn.receive_data(data))

        return sock, request, complete
    if spec.startswith("memcached:"):
        hostport, reply = spec.removeprefix("memcached:").split(",")[0], b"MN\r\n"
        ping = b"mn\r\n"
    elif spec.startswith(("redis://", "redis-cluster://")):
        hostport, reply = spec.split("://", 1)[1].split(",")[0], b"+PONG\r\n"
        ping = b"PING\r\n"
    else:
        raise ValueError(f"no round-trip probe for {spec!r}")
    host, port = hostport.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5.0)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    seen = bytearray()

    def complete_text(data: bytes) -> bool:
        seen.extend(data)
        if seen.endswith(reply):
            seen.clear()
            return True
        return False

    return sock, lambda: ping, complete_text


def measure(spec: str, gap_s: float, n: int, max_s: float) -> RoundTrip:
    """``n`` round trips to ``spec``'s server (at most ``max_s`` seconds), the caller busy
    for ``gap_s`` before each."""
    sock, request, complete = _probe(spec)
    times: list[float] = []
    try:
        sock.settimeout(5.0)
        clock = time.perf_counter
        end = clock() + max_s
        for _ in range(20):  # connection warm
            sock.sendall(request())
            while not complete(sock.recv(4096)):
                pass
        while len(times) < n and (not times or clock() < end):  # at least one
            busy_until = clock() + gap_s
            while clock() < busy_until:
                pass
            t0 = clock()
            sock.sendall(request())
            while not complete(sock.recv(4096)):
                pass
            times.append(clock() - t0)
    finally:
        sock.close()
    deciles = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return RoundTrip(statistics.median(times) * 1e6, deciles[-1] * 1e6, len(times))


def ceiling(handshake_s: float, rtt_s: float) -> float:
    """The best handshake rate ratio against the internal cache with one round trip added."""
    return handshake_s / (handshake_s + rtt_s)
