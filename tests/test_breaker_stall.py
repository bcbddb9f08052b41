"""The circuit breaker against a stalled (SIGSTOP) dc_client or dc_server, real processes.

The callbacks come in the order OpenSSL makes them for a full handshake of a client that
offers a session the store no longer has: one lookup (a miss), then one new session (TLS
1.2) or two tickets (TLS 1.3). Assertions are on counters only; the deadline is generous,
and the breaker's cool-down is skipped by moving the cache's clock, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from pprint import pformat

import pytest

from tests.procs import free_port, running, tool, wait_proxy_connected
from tlscache import DistcacheStore, SessionCache
from tlscache.session_cache import CacheStats

pytestmark = pytest.mark.integration

CTX = b"stall-test"
DER = b"\x30\x81\x83" + b"s" * 131
THRESHOLD = 5
RESET_S = 30.0
DEADLINE_MS = 1000.0  # generous: a healthy lookup never comes near it, a stalled one always does


class ShiftedClock:
    """Monotonic time plus an offset the test moves forward to end a cool-down."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class Farm:
    """One dc_server and one dc_client in front of it."""

    def __init__(
        self, server: subprocess.Popen[bytes], proxy: subprocess.Popen[bytes], address: str
    ):
        self.server = server
        self.proxy = proxy
        self.address = address


@contextmanager
def farm(tmp_path: Path) -> Iterator[Farm]:
    server_address = f"IP:127.0.0.1:{free_port()}"
    proxy_address = f"UNIX:{tmp_path / 'dc_client.sock'}"
    with ExitStack() as stack:
        server = stack.enter_context(
            running(
                tool("dc_server", "-listen", server_address),
                ready=server_address,
                stderr=subprocess.DEVNULL,
            )
        )
        proxy = stack.enter_context(
            running(
                tool(
                    "dc_client", "-listen", proxy_address, "-server", server_address, "-retry", "50"
                ),
                ready=proxy_address,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_proxy_connected(proxy_address, timeout=30.0)
        yield Farm(server, proxy, proxy_address)


def full_handshake(cache: SessionCache, n: int, tickets: int) -> None:
    """The callbacks of one full handshake: a lookup that misses, then ``tickets`` writes."""
    cache.on_get(CTX, b"gone-%06d" % n + b"\x00" * 21)
    for t in range(tickets):
        cache.on_new(CTX, b"new-%06d-%d" % (n, t) + b"\x00" * 20, DER, 300)


def expect(ok: bool, s: CacheStats) -> None:
    """Fail showing every counter (pytest would shorten an assertion's message)."""
    if not ok:
        pytest.fail("counters:\n" + pformat(s.as_dict(), width=100))


def lookup_failures(s: CacheStats) -> int:
    return s.timeouts + s.errors


@pytest.mark.parametrize("stalled", ["dc_client", "dc_server"])
@pytest.mark.parametrize("tickets", [1, 2], ids=["tls1.2", "tls1.3"])
def test_a_stalled_cache_opens_the_breaker_and_recovery_closes_it(
    tmp_path: Path, stalled: str, tickets: int
) -> None:
    clock = ShiftedClock()
    with farm(tmp_path) as f, DistcacheStore(f.address) as store:
        cache = SessionCache(
            store,
            deadline_ms=DEADLINE_MS,
            breaker_threshold=THRESHOLD,
            breaker_reset_s=RESET_S,
            clock=clock,
        )
        for n in range(5):  # healthy: writes pipelined, lookups answered
            full_handshake(cache, n, tickets)
        s = cache.stats()
        expect(s.breaker_state == "closed" and s.misses >= 1, s)

        proc = f.proxy if stalled == "dc_client" else f.server
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            before = cache.stats()
            handshakes = 3 * THRESHOLD
            for n in range(100, 100 + handshakes):
                full_handshake(cache, n, tickets)
            s = cache.stats()
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Open within a few lookups: at most `threshold` lookups paid for the stall, and
        # every later one was skipped at once.
        expect(s.breaker_opens == before.breaker_opens + 1, s)
        expect(s.breaker_state == "open", s)
        failed = lookup_failures(s) - lookup_failures(before)
        expect(1 <= failed <= THRESHOLD, s)
        expect(s.skipped - before.skipped >= handshakes - THRESHOLD, s)

        # Recovery: once dc_client answers through dc_server again, one cool-down and a
        # single probe close the breaker.
        wait_proxy_connected(f.address, timeout=30.0)
        clock.offset += RESET_S
        recovered = cache.stats()
        full_handshake(cache, 1000, tickets)
        s = cache.stats()
        expect(s.breaker_state == "closed", s)
        expect(s.misses == recovered.misses + 1, s)
        expect(s.breaker_opens == recovered.breaker_opens, s)
        for n in range(1001, 1005):
            full_handshake(cache, n, tickets)
        s = cache.stats()
        expect(s.breaker_state == "closed" and s.skipped == recovered.skipped, s)
        cache.close()
