"""The capability probe and TAKE with real processes: our dc_server, our dc_client, and
a server that behaves like the C dc_server where it matters (it drops a connection
that pipelines behind a large reply, and one that sends an operation it does not know).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from tests.procs import running, tool, wait_proxy_connected
from tlscache.deadline import Deadline
from tlscache.distcache.address import parse_address
from tlscache.distcache.aioclient import AsyncClient
from tlscache.distcache.client import Client
from tlscache.distcache.multiplexer import ProxyLimits
from tlscache.distcache.protocol import (
    NO_CAPABILITIES,
    PROBE_PREFIX,
    SERVER_CAPABILITIES,
    Capabilities,
    Decoder,
    Message,
    Operation,
    Result,
    encode_response,
    encode_take,
    parse_add_request,
)
from tlscache.distcache.proxy import ProxyServer
from tlscache.distcache.sockets import connect, listen
from tlscache.exceptions import ClientError, ProtocolError, StoreError, TakeUnsupported
from tlscache.stores.distcache import DistcacheStore

pytestmark = pytest.mark.integration

#: C's per-connection send buffer: a longer reply takes several passes of its loop.
C_SEND_BUFFER = 4096
VALUE = bytes(range(256)) * 48  # 12 KiB: three passes of C's loop
WORKERS = 4
ROUNDS = 6


class _CLikeConnection(asyncio.Protocol):
    """One connection of :class:`CLikeServer`: one request at a time, in order."""

    def __init__(self, server: CLikeServer) -> None:
        self.server = server
        self.decoder = Decoder(expect_response=False)
        self.queue: deque[Message] = deque()
        self.writing = False  # a reply longer than C's send buffer is going out
        self.serving = False
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections += 1

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        if self.writing:
            self.drop("a request arrived while a large reply was being written")
            return
        try:
            self.queue += self.decoder.feed(data)
        except ProtocolError as exc:
            self.drop(f"bad frame: {exc.reason}")
            return
        if not self.serving:
            self.serving = True
            asyncio.get_running_loop().create_task(self.serve())

    def drop(self, reason: str) -> None:
        self.dead = True
        self.server.drops.append(reason)
        self.transport.abort()

    async def serve(self) -> None:
        try:
            while self.queue and not self.dead:
                m = self.queue.popleft()
                if m.operation > Operation.HAVE:  # C knows 0..3 and closes for the rest
                    self.drop(f"unknown operation {int(m.operation)}")
                    return
                self.server.seen.append((m.operation, m.payload[: len(PROBE_PREFIX)]))
                try:
                    out = encode_response(m.uid, m.operation, self.server.answer(m))
                except ProtocolError as exc:
                    self.drop(exc.reason)
                    return
                if len(out) <= C_SEND_BUFFER:
                    self.transport.write(out)
                    continue
                self.writing = True
                for start in range(0, len(out), C_SEND_BUFFER):
                    if start:
                        await asyncio.sleep(self.server.pass_s)  # C's next loop pass
                    if self.dead:
                        return
                    if self.queue:
                        self.drop("a request was buffered behind a large reply")
                        return
                    self.transport.write(out[start : start + C_SEND_BUFFER])
                self.writing = False
        finally:
            self.serving = False


class CLikeServer:
    """A cache server with the C dc_server's manners, on loopback, in its own thread."""

    def __init__(self, pass_s: float = 0.003) -> None:
        self.pass_s = pass_s
        self.table: dict[bytes, bytes] = {}
        self.connections = 0
        self.drops: list[str] = []
        self.seen: list[tuple[Operation, bytes]] = []  # operation, first bytes of the id
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.address = ""

    def answer(self, m: Message) -> bytes:
        if m.operation is Operation.ADD:
            add = parse_add_request(m.payload)
            if add.refusal is not None:
                return bytes([add.refusal])
            if add.session_id in self.table:
                return bytes([Result.ADD_MATCHING_SESSION])
            self.table[add.session_id] = add.data
            return b"\x00"
        if m.operation is Operation.GET:
            return self.table.get(m.payload, b"\x01")
        if m.operation is Operation.REMOVE:
            return b"\x00" if self.table.pop(m.payload, None) is not None else b"\x01"
        return b"\x00" if m.payload in self.table else b"\x01"

    def state(self) -> str:
        return f"connections={self.connections} drops={self.drops} seen={len(self.seen)}"

    def __enter__(self) -> CLikeServer:
        self._thread.start()
        made = asyncio.run_coroutine_threadsafe(
            self._loop.create_server(lambda: _CLikeConnection(self), "127.0.0.1", 0), self._loop
        )
        self._server = made.result(5)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"IP:127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@contextlib.contextmanager
def dc_client(server: str, tmp_path: Path) -> Iterator[str]:
    """Our dc_client process in front of ``server``; yields its local address."""
    address = f"UNIX:{tmp_path / 'proxy.sock'}"
    with running(tool("dc_client", "-listen", address, "-server", server, "-retry", "300")):
        wait_proxy_connected(address)
        yield address


@contextlib.contextmanager
def in_process_dc_client(server: str, tmp_path: Path, limits: ProxyLimits) -> Iterator[str]:
    """dc_client's shell in a thread of this process, with ``limits`` the CLI cannot set."""
    address = f"UNIX:{tmp_path / 'inproc.sock'}"
    sock = listen(parse_address(address))
    proxy = ProxyServer(sock, parse_address(server), limits)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(proxy.serve(),), daemon=True)
    thread.start()
    try:
        wait_proxy_connected(address)
        yield address
    finally:
        loop.call_soon_threadsafe(proxy.stop)
        thread.join(5)
        sock.close()


def workload(address: str) -> list[str]:
    """``WORKERS`` clients at once, each ADDing and GETting large values; the wrong answers."""
    errors: list[str] = []

    def worker(n: int) -> None:
        with Client(address, deadline_ms=5000) as client:
            for r in range(ROUNDS):
                sid = b"worker-%d-round-%d" % (n, r)
                value = bytes([n, r]) + VALUE
                try:
                    added = client.add(sid, value, 60_000)
                    got = client.get(sid)
                except ClientError as exc:
                    errors.append(f"{sid!r}: {type(exc).__name__}")
                    continue
                if added != Result.OK or got != value:
                    errors.append(
                        f"{sid!r}: add {added!r}, get {None if got is None else len(got)}"
                    )

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_our_dc_client_never_pipelines_into_a_c_like_server(tmp_path: Path) -> None:
    with CLikeServer() as fake, dc_client(fake.address, tmp_path) as proxy:
        errors = workload(proxy)
        state = fake.state()
        assert errors == [] and fake.drops == [] and fake.connections == 1, (errors, state)
        assert fake.seen[0] == (Operation.GET, PROBE_PREFIX), fake.seen[:3]  # the probe first
        assert len(fake.seen) >= 1 + 2 * WORKERS * ROUNDS, state


def test_the_c_like_server_does_drop_a_proxy_that_pipelines(tmp_path: Path) -> None:
    """The control for the test above: the fake is strict enough to catch pipelining."""
    with CLikeServer() as fake:
        limits = ProxyLimits(pipeline="on", retry_ms=100)
        with in_process_dc_client(fake.address, tmp_path, limits) as proxy:
            errors = workload(proxy)
        assert fake.drops and errors, (errors, fake.state())


def test_probe_is_harmless_to_a_c_like_server_and_offers_nothing(tmp_path: Path) -> None:
    with CLikeServer() as fake, Client(fake.address) as client:
        assert client.capabilities() == NO_CAPABILITIES
        with pytest.raises(TakeUnsupported):
            client.take(b"sid")
        assert client.add(b"sid", VALUE, 60_000) == Result.OK and client.get(b"sid") == VALUE
        assert fake.drops == [] and fake.connections == 1, fake.state()


def test_dc_server_answers_the_probe_and_two_takers_get_one_value(dc_server_tcp: str) -> None:
    sids = [b"take-%d" % i for i in range(20)]
    with Client(dc_server_tcp) as client:
        assert client.capabilities() == SERVER_CAPABILITIES
        for sid in sids:
            assert client.add(sid, sid + VALUE, 60_000) == Result.OK
    results: dict[int, list[bytes | None]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def taker(n: int) -> None:
        with Client(dc_server_tcp, deadline_ms=5000) as c:
            c.capabilities()
            start.wait(5)
            results[n] = [c.take(sid) for sid in sids]

    threads = [threading.Thread(target=taker, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, sid in enumerate(sids):
        got = [results[0][i], results[1][i]]
        assert sorted(got, key=lambda v: v is None) == [sid + VALUE, None], (sid, results)
    with Client(dc_server_tcp) as client:
        assert not any(client.have(sid) for sid in sids)


def test_async_client_probe_and_take(dc_server_tcp: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(dc_server_tcp) as client:
            assert await client.capabilities() == SERVER_CAPABILITIES
            assert await client.add(b"sid", VALUE, 60_000) == Result.OK
            assert await client.take(b"sid") == VALUE
            assert await client.take(b"sid") is None

    asyncio.run(scenario())


def store_round_trip(address: str) -> tuple[bool, bool, bytes | None, bytes | None]:
    """supports_take before and after the first fetch, then two takes of one session."""
    store = DistcacheStore(address)
    try:
        store.store(b"sid", VALUE, 60.0, Deadline.after_ms(5000))  # pipelined: no probe
        before = store.supports_take
        assert store.fetch(b"sid", Deadline.after_ms(5000)) == VALUE
        after = store.supports_take
        first = store.take(b"sid", Deadline.after_ms(5000))
        second = store.take(b"sid", Deadline.after_ms(5000))
        return before, after, first, second
    finally:
        store.close()


def test_store_takes_straight_from_dc_server_and_through_dc_client(
    dc_server_tcp: str, tmp_path: Path
) -> None:
    assert DistcacheStore.supports_take is False  # the static default
    assert store_round_trip(dc_server_tcp) == (False, True, VALUE, None)
    with dc_client(dc_server_tcp, tmp_path) as proxy:
        with Client(proxy) as client:
            assert client.capabilities() == Capabilities(pipeline=True, take=True)
        assert store_round_trip(proxy) == (False, True, VALUE, None)


def test_through_dc_client_to_a_c_like_server_take_is_not_offered(tmp_path: Path) -> None:
    with CLikeServer() as fake, dc_client(fake.address, tmp_path) as proxy:
        store = DistcacheStore(proxy, confirm_writes=True)
        try:
            caps = store.capabilities(Deadline.after_ms(5000))
            assert caps == Capabilities(pipeline=True, take=False) and not store.supports_take
            store.store(b"sid", VALUE, 60.0, Deadline.after_ms(5000))
            with pytest.raises(StoreError):
                store.take(b"sid", Deadline.after_ms(5000))
            assert store.fetch(b"sid", Deadline.after_ms(5000)) == VALUE  # still there
        finally:
            store.close()
        # A client that sends TAKE anyway is closed, as a server closes for an unknown op.
        raw = connect(parse_address(proxy), timeout=5.0)
        with raw:
            raw.sendall(encode_take(1, b"sid"))
            assert recv_or_eof(raw) == b""
        assert all(op is not Operation.TAKE for op, _ in fake.seen), fake.seen
        assert fake.drops == [] and fake.connections == 1, fake.state()


def recv_or_eof(sock: socket.socket) -> bytes:
    """What the peer sends before closing (b"" for a close without a reply)."""
    sock.settimeout(5.0)
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""
