"""dc_client as a real process between real clients and a real dc_server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, running, tool, wait_connectable, wait_proxy_connected
from tlscache.distcache.address import parse_address
from tlscache.distcache.client import Client
from tlscache.distcache.protocol import (
    Decoder,
    Message,
    Operation,
    Result,
    encode_add,
    encode_get,
    encode_have,
)
from tlscache.distcache.sockets import connect

pytestmark = pytest.mark.integration

RETRY_MS = 300


@contextlib.contextmanager
def dc_client(
    server: str, tmp_path: Path, *extra: str, name: str = "proxy.sock"
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    address = f"UNIX:{tmp_path / name}"
    argv = tool("dc_client", "-listen", address, "-server", server, "-retry", str(RETRY_MS))
    with running([*argv, *extra], ready=address) as proc:
        yield address, proc


class Raw:
    """A raw local connection that reads whole replies (to see 0x02 and empty payloads)."""

    def __init__(self, address: str) -> None:
        self.sock = connect(parse_address(address), timeout=5.0)
        self.decoder = Decoder(expect_response=True)
        self.pending: list[Message] = []

    def request(self, frame: bytes) -> Message:
        self.sock.sendall(frame)
        return self.read()

    def read(self) -> Message:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def closed(self, timeout: float = 2.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture
def proxy(dc_server_tcp: str, tmp_path: Path) -> Iterator[str]:
    with dc_client(dc_server_tcp, tmp_path) as (address, _):
        wait_proxy_connected(address)
        yield address


def test_twenty_clients_at_once(proxy: str) -> None:
    errors: list[str] = []
    start = threading.Barrier(20)

    def worker(n: int) -> None:
        try:
            with Client(proxy, deadline_ms=5000, persistent=n % 2 == 0) as c:
                start.wait()
                for i in range(40):
                    sid = f"w{n}-s{i}".encode()
                    data = bytes([n, i]) * (50 + 37 * i)
                    assert c.add(sid, data, 60_000) is Result.OK
                    assert c.add(sid, data, 60_000) is Result.ADD_MATCHING_SESSION
                    assert c.get(sid) == data
                    assert c.have(sid)
                    assert c.remove(sid)
                    assert not c.have(sid)
                    assert c.get(sid) is None
        except BaseException as exc:  # report everything from the threads
            errors.append(f"worker {n}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_answers_keep_each_clients_uids_and_order(proxy: str) -> None:
    a, b = Raw(proxy), Raw(proxy)
    try:
        a.sock.sendall(b"".join(encode_have(uid, b"nope") for uid in (5, 0xCAFEBABE, 0, 5)))
        b.sock.sendall(encode_add(77, b"sid", b"x" * 100, 60_000) + encode_get(78, b"sid"))
        assert [a.read().uid for _ in range(4)] == [5, 0xCAFEBABE, 0, 5]
        add, get = b.read(), b.read()
        assert (add.uid, add.payload) == (77, b"\x00")
        assert (get.uid, get.operation, get.payload) == (78, Operation.GET, b"x" * 100)
    finally:
        a.close()
        b.close()


def test_server_killed_then_restarted(tmp_path: Path) -> None:
    port = free_port()
    server = f"IP:127.0.0.1:{port}"
    argv = tool("dc_server", "-listen", server)
    stop = threading.Event()
    # (time sent, seconds to answer, payload) per request, from 3 busy clients.
    log: list[tuple[float, float, bytes]] = []
    errors: list[BaseException] = []

    def hammer(proxy: str, n: int) -> None:
        try:
            raw = Raw(proxy)
            uid = n << 24
            while not stop.is_set():
                uid += 1
                t0 = time.monotonic()
                reply = raw.request(encode_have(uid, b"x"))
                assert reply.uid == uid
                log.append((t0, time.monotonic() - t0, reply.payload))
            raw.close()
        except BaseException as exc:
            errors.append(exc)

    # A 30 s request timeout: a request left hanging by the kill would show as a 5 s
    # socket timeout in Raw (an error), not as a quick 0x02.
    with dc_client(server, tmp_path, "--request-timeout", "30000") as (proxy, proc):
        threads = [threading.Thread(target=hammer, args=(proxy, n)) for n in range(3)]
        try:
            with running(argv, ready=server, stderr=subprocess.DEVNULL) as srv:
                wait_proxy_connected(proxy)
                for t in threads:
                    t.start()
                time.sleep(0.3)
                killed = time.monotonic()
                srv.kill()
                srv.wait()
            time.sleep(0.3)
            with running(argv, ready=server, stderr=subprocess.DEVNULL):
                restarted = time.monotonic()
                deadline = restarted + RETRY_MS / 1000 + 10.0
                while not any(t > restarted and p == b"\x01" for t, _, p in log[-50:]):
                    assert time.monotonic() < deadline, "no success after the restart"
                    time.sleep(0.01)
                back = time.monotonic() - restarted
        finally:
            stop.set()
            for t in threads:
                t.join(5)
        assert proc.poll() is None
    assert not errors, errors
    before = [p for t, _, p in log if t < killed - 0.05]
    during = [p for t, _, p in log if killed + 0.05 < t < restarted]
    assert before and set(before) == {b"\x01"}
    assert during and set(during) <= {b"", b"\x02", b"\x01"}
    assert b"" in during  # answered "no server" while it was down
    # Nobody hung: a request caught by the kill is answered when the link drops, not after
    # dc_client's 30 s request timeout; back on the 300 ms retry, not the 5 s default.
    # The bounds are loose: a loaded machine adds scheduling delay, not seconds.
    slowest = max(d for _, d, _ in log)
    state = f"slowest answer {slowest:.3f} s, back after {back:.3f} s, {len(log)} requests"
    assert slowest < 4.0, state
    assert back < 4.0, state


class FakeServer:
    """Accepts dc_client's connection, reads requests and never answers them."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address = f"IP:127.0.0.1:{self.listener.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        self.received = bytearray()
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.listener.settimeout(0.05)
        while not self._stop:
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.listener.accept()
                conn.settimeout(0.05)
                self.conns.append(conn)
            for conn in list(self.conns):
                with contextlib.suppress(TimeoutError, OSError):
                    self.received += conn.recv(65536)

    def wait_connected(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.conns:
            assert time.monotonic() < deadline, "dc_client never connected"
            time.sleep(0.01)
        time.sleep(0.2)  # let dc_client see its connect complete

    def wait_received(self, n: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, "dc_client forwarded nothing"
            time.sleep(0.01)

    def drop_all(self) -> None:
        for conn in list(self.conns):
            conn.close()
        self.conns.clear()

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.drop_all()
        self.listener.close()


def test_drop_with_requests_outstanding_gives_0x02(tmp_path: Path) -> None:
    fake = FakeServer()
    try:
        # A 30 s request timeout: the 0x02 comes from the drop, not from the timer.
        with dc_client(fake.address, tmp_path, "--request-timeout", "30000") as (proxy, proc):
            raw = Raw(proxy)
            raw.sock.settimeout(60.0)
            fake.wait_connected()
            raw.sock.sendall(encode_get(9, b"whatever"))
            fake.wait_received(len(encode_get(9, b"whatever")))
            t0 = time.monotonic()
            fake.drop_all()
            reply = raw.read()
            took = time.monotonic() - t0
            assert (reply.uid, reply.operation, reply.payload) == (9, Operation.GET, b"\x02")
            assert took < 15.0, f"0x02 after {took:.3f} s: the request timer, not the drop"
            assert proc.poll() is None
            raw.close()
    finally:
        fake.close()


def test_request_timeout_when_the_server_never_answers(tmp_path: Path) -> None:
    fake = FakeServer()
    try:
        with dc_client(fake.address, tmp_path, "--request-timeout", "300") as (proxy, _):
            raw = Raw(proxy)
            raw.sock.settimeout(60.0)
            fake.wait_connected()
            t0 = time.monotonic()
            raw.sock.sendall(encode_have(4, b"x"))
            reply = raw.read()
            elapsed = time.monotonic() - t0
            assert (reply.uid, reply.payload) == (4, b"\x02")
            # Never before the 300 ms; after it, "not never" (loose for a loaded machine).
            assert 0.2 < elapsed < 15.0, f"answered after {elapsed:.3f} s (timeout 300 ms)"
            raw.close()
    finally:
        fake.close()


def test_bad_or_vanishing_clients_disturb_no_other(proxy: str) -> None:
    good = Raw(proxy)
    assert good.request(encode_add(1, b"keep", b"k" * 200, 60_000)).payload == b"\x00"
    garbage = Raw(proxy)
    garbage.sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert garbage.closed()
    garbage.close()
    for _ in range(5):  # vanish with a burst of requests outstanding
        gone = Raw(proxy)
        gone.sock.sendall(b"".join(encode_get(i, b"keep") for i in range(300)))
        gone.close()
    for i in range(50):
        reply = good.request(encode_get(1000 + i, b"keep"))
        assert (reply.uid, reply.payload) == (1000 + i, b"k" * 200)
    good.close()


def test_idle_connections_are_closed(dc_server_tcp: str, tmp_path: Path) -> None:
    with dc_client(dc_server_tcp, tmp_path, "-idle", "300") as (proxy, _):
        wait_proxy_connected(proxy)
        raw = Raw(proxy)
        assert raw.request(encode_have(1, b"x")).payload == b"\x01"
        t0 = time.monotonic()
        assert raw.closed(timeout=30.0)  # True on a timeout too: the time tells them apart
        took = time.monotonic() - t0
        assert 0.25 < took < 15.0, f"closed after {took:.3f} s (idle 300 ms)"
        raw.close()


def test_max_clients(dc_server_tcp: str, tmp_path: Path) -> None:
    with dc_client(dc_server_tcp, tmp_path, "--max-clients", "2") as (proxy, proc):
        wait_proxy_connected(proxy)
        keep = [Raw(proxy), Raw(proxy)]
        assert keep[0].request(encode_have(1, b"x")).payload == b"\x01"
        assert keep[1].request(encode_have(1, b"x")).payload == b"\x01"
        extra = Raw(proxy)
        assert extra.closed()
        extra.close()
        for r in keep:
            r.close()
        proc.terminate()
        _, err = proc.communicate(timeout=5)
        assert b"Error, rejected new client connection already at maximum (2)" in err


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-op"])
def test_dc_test_through_dc_client(proxy: str, persistent: bool) -> None:
    argv = tool("dc_test", "-connect", proxy, "-sessions", "20", "-ops", "600")
    if persistent:
        argv.append("-persistent")
    result = subprocess.run(argv, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert b"all tests complete" in result.stderr


def test_sigterm_removes_the_socket_file(dc_server_tcp: str, tmp_path: Path) -> None:
    path = tmp_path / "gone.sock"
    with running(
        tool("dc_client", "-listen", f"UNIX:{path}", "-server", dc_server_tcp),
        ready=f"UNIX:{path}",
    ) as proc:
        wait_connectable(f"UNIX:{path}")
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert not path.exists()


def test_pipelining_client_gets_every_answer_in_order(proxy: str) -> None:
    raw, other = Raw(proxy), Raw(proxy)
    n = 5000  # more than the proxy's per-client backlog and its in-flight table
    frames = b"".join(encode_have(i, b"p%d" % i) for i in range(n))
    sender = threading.Thread(target=raw.sock.sendall, args=(frames,))
    sender.start()
    assert other.request(encode_have(99, b"x")).payload == b"\x01"
    uids = [raw.read().uid for _ in range(n)]
    sender.join(10)
    assert uids == list(range(n))
    raw.close()
    other.close()


def test_a_burst_of_connects_fits_the_listen_backlog(proxy: str) -> None:
    """300 clients connecting at once (the proxy stopped meanwhile) all get in and are served."""
    with Raw(proxy) as probe:  # the dc_client process is the peer of this connection
        pid = peer_pid(probe.sock)
    path = proxy.removeprefix("UNIX:")
    socks: list[socket.socket] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.setblocking(False)
            s.connect(path)  # a full backlog: BlockingIOError (EAGAIN)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        for uid, s in enumerate(socks):
            s.settimeout(5.0)
            s.sendall(encode_have(uid, b"x"))
        for uid, s in enumerate(socks):
            reply = Decoder(expect_response=True).feed(s.recv(65536))
            assert [(m.uid, m.payload) for m in reply] == [(uid, b"\x01")]
    finally:
        for s in socks:
            s.close()


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a unix socket (SO_PEERCRED)."""
    cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", cred)[0])


def test_half_closed_client_still_gets_its_answers(proxy: str) -> None:
    raw = Raw(proxy)
    raw.sock.sendall(encode_have(1, b"a") + encode_have(2, b"b"))
    raw.sock.shutdown(socket.SHUT_WR)
    assert [raw.read().uid, raw.read().uid] == [1, 2]
    assert raw.closed()
    raw.close()


@pytest.mark.parametrize("kind", ["proxy", "snoop"])
def test_stop_before_serve_is_not_lost(kind: str, tmp_path: Path) -> None:
    """A stop request that arrives while the tool starts up (before serve runs) still stops it."""
    from tlscache.distcache.address import parse_address
    from tlscache.distcache.proxy import ProxyServer
    from tlscache.distcache.snoop import Log, SnoopServer
    from tlscache.distcache.sockets import listen

    sock = listen(parse_address(f"UNIX:{tmp_path / 'l.sock'}"))
    upstream = parse_address(f"IP:127.0.0.1:{free_port()}")
    server: ProxyServer | SnoopServer = (
        ProxyServer(sock, upstream) if kind == "proxy" else SnoopServer(sock, upstream, Log(None))
    )

    async def scenario() -> None:
        server.stop()
        await asyncio.wait_for(server.serve(), timeout=5)

    try:
        asyncio.run(scenario())
    finally:
        sock.close()
