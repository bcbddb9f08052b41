"""Non-blocking resumption with the lookups on the event loop (no threads).

Real parts: the asyncio shell (:mod:`tlscache.aio_server`), Python ``ssl`` clients, and a
real dc_server on loopback read through :class:`~tlscache.stores.aio.AsyncDistcacheStore`
(sessions sealed, written through the blocking store as the callbacks do). Each test shows
through counters that the lookup ran as a task on the loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from tests.procs import free_port, running, tool
from tests.tlsutil import client_context, handshake_over_memory
from tests.tlsutil import ssl_connect as connect
from tlscache import Deadline, DistcacheStore, MemoryStore, SessionCache
from tlscache.aio_server import TLSStream, serve
from tlscache.exceptions import ConfigurationError
from tlscache.keyring import KeyRing
from tlscache.openssl.clienthello import NonblockingResumption
from tlscache.stores.aio import AsyncDistcacheStore, AsyncMemoryStore

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: Generous: a loaded machine meets it, so no expected resumption is lost to a timeout.
DEADLINE_MS = 5000.0

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cert") / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


@pytest.fixture
def dc_server() -> Iterator[tuple[str, int]]:
    """A dc_server on loopback: (its address, its pid for SIGSTOP)."""
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address) as proc:
        try:
            yield address, proc.pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)


class Recording(AsyncDistcacheStore):
    """Notes the thread each lookup ran on; ``tamper`` flips a bit of every value read."""

    def __init__(self, address: str, *, tamper: bool = False) -> None:
        super().__init__(address)
        self.threads: list[str] = []
        self.tamper = tamper

    async def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self.threads.append(threading.current_thread().name)
        value = await super().fetch(session_id, deadline)
        if value and self.tamper:
            value = value[:-1] + bytes([value[-1] ^ 1])
        return value

    async def take(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        self.threads.append(threading.current_thread().name)
        return await super().take(session_id, deadline)


def server_context(pem: Path) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pem))
    ctx.use_privatekey_file(str(pem))
    return ctx


def client(ca: trustme.CA, version: str) -> ssl.SSLContext:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(c)
    c.minimum_version = c.maximum_version = VERSIONS[version]
    return c


async def report(stream: TLSStream) -> None:
    await stream.send(b"reused=%d waits=%d\n" % (stream.resumed, stream.lookup_waits))


@dataclass
class Server:
    """A loop-mode server over a dc_server: the cache, its async store, the resumption."""

    cache: SessionCache
    store: Recording
    nb: NonblockingResumption
    ctx: SSL.Context
    lines: list[tuple[bytes, bool]] = field(default_factory=list)

    def state(self) -> str:
        return (
            f"cache={self.cache.stats().as_dict()}\nnonblocking={self.nb.stats()._asdict()}\n"
            f"lookup threads={self.store.threads}\nconnections={self.lines}"
        )


def loop_server(pem: Path, address: str, *, tamper: bool = False, **options: object) -> Server:
    store = Recording(address, tamper=tamper)
    cache = SessionCache(
        DistcacheStore(address, confirm_writes=True),  # written before the next lookup
        keys=KeyRing.generate(),
        async_store=store,
        **{"deadline_ms": DEADLINE_MS, **options},  # type: ignore[arg-type]
    )
    nb = NonblockingResumption(cache)
    ctx = server_context(pem)
    nb.install(ctx)
    return Server(cache, store, nb, ctx)


def run_connections(
    server: Server, ca: trustme.CA, version: str, rounds: int, *, stall: int | None = None
) -> list[tuple[bytes, bool]]:
    """A full handshake, then ``rounds`` connections offering its session. With ``stall``
    (a pid), that process is stopped after the full handshake."""
    c = client(ca, version)

    async def main() -> None:
        srv = await serve(server.ctx, report, "127.0.0.1", 0, resumption=server.nb)
        port = srv.sockets[0].getsockname()[1]
        try:
            line, sess, reused = await asyncio.to_thread(connect, c, port)
            server.lines.append((line, reused))
            if stall is not None:
                os.kill(stall, signal.SIGSTOP)
            for _ in range(rounds):
                line, _, reused = await asyncio.to_thread(connect, c, port, sess)
                server.lines.append((line, reused))
        finally:
            srv.close()
            await server.store.aclose()

    asyncio.run(main())
    return server.lines


def assert_on_loop(server: Server, lookups: int) -> None:
    """Every lookup ran as a task on the loop's thread; no lookup thread exists."""
    stats = server.nb.stats()
    assert server.nb.lookups == "loop" and server.nb._pool is None, server.state()
    assert (stats.started, stats.on_loop) == (lookups, lookups), server.state()
    assert set(server.store.threads) <= {threading.main_thread().name}, server.state()
    assert not [t for t in threading.enumerate() if t.name.startswith("tlscache-lookup")]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resumes_with_the_lookup_on_the_loop(
    pem: Path, ca: trustme.CA, dc_server: tuple[str, int], version: str
) -> None:
    server = loop_server(pem, dc_server[0])
    lines = run_connections(server, ca, version, 1)
    assert [r for _, r in lines] == [False, True], server.state()
    assert lines[1][0] == b"reused=1 waits=1\n", server.state()
    assert_on_loop(server, 1)
    s, nb = server.cache.stats(), server.nb.stats()
    assert (s.hits, s.misses, nb.answered, nb.paused) == (1, 0, 1, 1), server.state()
    assert len(server.store.threads) == 1, server.state()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_session_the_store_lacks_is_a_full_handshake(
    pem: Path, ca: trustme.CA, dc_server: tuple[str, int], version: str
) -> None:
    """A session made on another server (its own in-process store) is not in the dc_server:
    a miss, then a full handshake."""
    other_store = MemoryStore()
    other = SessionCache(other_store, async_store=AsyncMemoryStore(other_store))
    other_nb = NonblockingResumption(other)
    other_ctx = server_context(pem)
    other_nb.install(other_ctx)
    server = loop_server(pem, dc_server[0])
    c = client(ca, version)

    async def main() -> None:
        a = await serve(other_ctx, report, "127.0.0.1", 0, resumption=other_nb)
        b = await serve(server.ctx, report, "127.0.0.1", 0, resumption=server.nb)
        try:
            _, sess, _ = await asyncio.to_thread(connect, c, a.sockets[0].getsockname()[1])
            line, _, reused = await asyncio.to_thread(
                connect, c, b.sockets[0].getsockname()[1], sess
            )
            server.lines.append((line, reused))
        finally:
            a.close()
            b.close()
            await server.store.aclose()

    asyncio.run(main())
    assert server.lines == [(b"reused=0 waits=1\n", False)], server.state()
    s = server.cache.stats()
    assert (s.misses, s.hits, s.lookups) == (1, 0, 1), server.state()
    assert_on_loop(server, 1)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_stalled_dc_server_costs_one_deadline_then_the_breaker_skips(
    pem: Path, ca: trustme.CA, dc_server: tuple[str, int], version: str
) -> None:
    """dc_server stopped (SIGSTOP): the first lookup times out at its 1 s deadline and
    opens the breaker (threshold 1); the second is skipped without a store call. Both are
    full handshakes, and the loop kept running while the first waited."""
    address, pid = dc_server
    server = loop_server(pem, address, deadline_ms=1000, breaker_threshold=1, breaker_reset_s=600)
    ticks: list[float] = []

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(100_000):  # bounded
            await asyncio.sleep(0.005)
            ticks.append(loop.time())

    c = client(ca, version)

    async def main() -> float:
        srv = await serve(server.ctx, report, "127.0.0.1", 0, resumption=server.nb)
        port = srv.sockets[0].getsockname()[1]
        tick = asyncio.create_task(ticker())
        try:
            _, sess, _ = await asyncio.to_thread(connect, c, port)
            os.kill(pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for _ in range(2):
                line, _, reused = await asyncio.to_thread(connect, c, port, sess)
                server.lines.append((line, reused))
            return loop.time() - start
        finally:
            tick.cancel()
            srv.close()
            os.kill(pid, signal.SIGCONT)
            await server.store.aclose()

    took = asyncio.run(main())
    assert [r for _, r in server.lines] == [False, False], server.state()
    s = server.cache.stats()
    assert (s.timeouts, s.skipped, s.breaker_opens, s.hits) == (1, 1, 1, 0), server.state()
    assert len(server.store.threads) == 1, server.state()  # the skipped one never called it
    assert took < 20, (took, server.state())  # nowhere near the 30 s client timeout
    assert len(ticks) >= 10, (len(ticks), server.state())  # the loop ran meanwhile
    assert_on_loop(server, 2)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_tampered_sealed_value_is_refused(
    pem: Path, ca: trustme.CA, dc_server: tuple[str, int], version: str
) -> None:
    """The cache opens the value, not the store: a flipped bit in what the dc_server
    returns fails authentication, and the handshake is a full one."""
    server = loop_server(pem, dc_server[0], tamper=True)
    lines = run_connections(server, ca, version, 1)
    assert [r for _, r in lines] == [False, False], server.state()
    s = server.cache.stats()
    assert (s.sealed_tampered, s.sealed_refused, s.hits) == (1, 1, 0), server.state()
    assert s.breaker_state == "closed", server.state()  # the store answered: it is healthy
    assert_on_loop(server, 1)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_single_use_takes_tls13_tickets_with_take(
    pem: Path, ca: trustme.CA, dc_server: tuple[str, int], version: str
) -> None:
    """single_use over dc_server's TAKE: a TLS 1.3 ticket resumes once, then is gone; a
    TLS 1.2 session id is read, not taken, and resumes again."""
    server = loop_server(pem, dc_server[0], single_use=True)
    lines = run_connections(server, ca, version, 2)
    s = server.cache.stats()
    if version == "1.3":
        assert [r for _, r in lines] == [False, True, False], server.state()
        assert (s.takes, s.take_misses, s.hits, s.misses) == (1, 1, 1, 1), server.state()
        assert server.store.supports_take, server.state()
    else:
        assert [r for _, r in lines] == [False, True, True], server.state()
        assert (s.takes, s.put_back, s.hits) == (0, 0, 2), server.state()
    assert_on_loop(server, 2)


def test_loop_mode_needs_an_async_store() -> None:
    cache = SessionCache(MemoryStore())
    with pytest.raises(ConfigurationError):
        NonblockingResumption(cache, lookups="loop")
    assert NonblockingResumption(cache).lookups == "threads"
    store = MemoryStore()
    with_async = SessionCache(store, async_store=AsyncMemoryStore(store))
    assert NonblockingResumption(with_async).lookups == "loop"
    threads = NonblockingResumption(with_async, lookups="threads")
    assert threads.lookups == "threads" and threads._pool is not None
    threads.close()


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_loop_mode_without_a_running_loop_gives_a_full_handshake(pem: Path, version: str) -> None:
    """A handshake driven with no event loop running (a thread, another framework): no
    lookup can start on the loop, so the handshake is a full one, counted, never stuck."""
    store = MemoryStore()
    cache = SessionCache(store, async_store=AsyncMemoryStore(store))
    nb = NonblockingResumption(cache)
    ctx = server_context(pem)
    nb.install(ctx)
    client_ctx = client_context(version)
    resumed_first, sess = handshake_over_memory(ctx, client_ctx)
    resumed, _ = handshake_over_memory(ctx, client_ctx, sess)
    stats = nb.stats()
    assert (resumed_first, resumed) == (False, False), stats
    assert (stats.no_loop, stats.started, stats.on_loop) == (1, 0, 0), stats
    assert cache.stats().lookups == 0, cache.stats().as_dict()
