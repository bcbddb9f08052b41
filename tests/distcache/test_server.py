"""A real dc_server process on loopback: the recorded conversation, bad input, load shapes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.procs import VECTORS, free_port, running, tool
from tlscache.distcache.address import parse_address
from tlscache.distcache.protocol import (
    HEADER,
    Decoder,
    Message,
    encode_add,
    encode_get,
    encode_have,
)
from tlscache.distcache.server import Server
from tlscache.distcache.sockets import connect
from tlscache.distcache.table import SessionTable

DATA: dict[str, Any] = json.loads(VECTORS.read_text())
ALL_VECTORS: list[dict[str, Any]] = DATA["vectors"]
READ_TIMEOUT = 0.5


@contextlib.contextmanager
def server(
    *args: str, tmp_path: Path | None = None, stderr: int | None = subprocess.PIPE
) -> Iterator[tuple[str, Any]]:
    """A dc_server with extra arguments on a free TCP port (or a unix socket under tmp_path)."""
    if tmp_path is not None:
        address = f"UNIX:{tmp_path / 'srv.sock'}"
    else:
        address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_server", "-listen", address, "--read-timeout", str(READ_TIMEOUT), *args)
    with running(argv, ready=address, stderr=stderr) as proc:
        yield address, proc


def conn(address: str, timeout: float = 5.0) -> socket.socket:
    return connect(parse_address(address), timeout=timeout)


def recv_messages(sock: socket.socket, count: int) -> list[Message]:
    decoder = Decoder(expect_response=True)
    got: list[Message] = []
    while len(got) < count:
        chunk = sock.recv(1 << 20)
        assert chunk, f"connection closed after {len(got)} of {count} responses"
        got += decoder.feed(chunk)
    return got


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def closed_by_peer(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Wait up to ``timeout`` for EOF (or a reset); return (closed, bytes received)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return True, got
    except TimeoutError:
        return False, got


def still_serves(address: str) -> None:
    with conn(address) as sock:
        sock.sendall(encode_add(77, b"probe", b"probe-data", 60_000) + encode_get(78, b"probe"))
        first, second = recv_messages(sock, 2)
        assert first.uid == 77 and first.payload in (b"\x00", b"\x65")
        assert (second.uid, second.payload) == (78, b"probe-data")


pytestmark = pytest.mark.integration


def test_replay_vectors_one_connection(dc_server: str) -> None:
    """Every recorded request, in order, on one connection: byte-identical answers."""
    with conn(dc_server) as sock:
        for vector in ALL_VECTORS:
            if vector["name"] == "get_timeout_zero_expired":
                time.sleep(0.01)
            sock.sendall(bytes.fromhex(vector["request_hex"]))
            want = bytes.fromhex(vector["response_hex"])
            assert recv_exactly(sock, len(want)) == want, vector["name"]


def test_bad_input_affects_only_its_connection() -> None:
    cases = [
        c
        for c in DATA["bad_input"]["cases"]
        if "." not in c["request_hex"] and c["name"] != "half_close_after_request"
    ]
    head = HEADER.pack(0x00110000, 0, 1, 0, 0, 0, 2048)
    over = (head + bytes(2048)) * 16 + HEADER.pack(0x00110000, 0, 1, 0, 0, 1, 1) + b"x"
    cases.append({"name": "request_over_32768", "request_hex": over.hex()})
    with server() as (address, proc):
        bystander = conn(address)  # an unrelated client, connected the whole time
        for case in cases:
            with conn(address) as sock:
                sock.sendall(bytes.fromhex(case["request_hex"]))
                # Malformed input closes at once; truncated frames after the read timeout.
                closed, got = closed_by_peer(sock, READ_TIMEOUT + 3)
                assert closed, case["name"]
                assert got == b"", case["name"]
            assert proc.poll() is None, case["name"]
            still_serves(address)
        bystander.sendall(encode_have(5, b"probe"))
        assert recv_messages(bystander, 1)[0].payload == b"\x00"
        bystander.close()


def test_http_garbage_is_logged_once(tmp_path: Path) -> None:
    with server(tmp_path=tmp_path) as (address, proc):
        with conn(address) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert closed_by_peer(sock, 3)[0]
        still_serves(address)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    lines = [line for line in err.decode().splitlines() if "closing connection" in line]
    assert len(lines) == 1, err
    assert "UNIX:" in lines[0] and "protocol incompatibility" in lines[0]


def test_plain_asyncio_loop() -> None:
    """The same conversation, a big pipeline and a half-close without uvloop."""
    with server("--loop", "asyncio") as (address, _):
        test_replay_vectors_one_connection(address)
        test_huge_pipeline_is_answered_in_full(address)
        test_half_close_is_answered(address)


def test_half_close_is_answered(dc_server: str) -> None:
    with conn(dc_server) as sock:
        sock.sendall(encode_have(9, b"abc"))
        sock.shutdown(socket.SHUT_WR)
        closed, got = closed_by_peer(sock, 5)
    assert closed
    assert got.hex() == "001100000100000009000301000101"


def test_stalled_half_frame_is_dropped() -> None:
    with server() as (address, proc), conn(address) as sock:
        frame = encode_have(3, b"stalled-id")
        sock.sendall(frame[:20])
        start = time.monotonic()
        closed, got = closed_by_peer(sock, READ_TIMEOUT + 5)
        elapsed = time.monotonic() - start
        assert closed and got == b""
        assert READ_TIMEOUT * 0.8 <= elapsed < READ_TIMEOUT + 3
        assert proc.poll() is None


def test_slow_but_progressing_sender_is_kept() -> None:
    with server() as (address, _), conn(address) as sock:
        frame = encode_have(3, b"slowly")
        for i in range(len(frame)):
            sock.sendall(frame[i : i + 1])
            time.sleep(READ_TIMEOUT / 5)
            if i > 8:
                break
        sock.sendall(frame[i + 1 :])
        assert recv_messages(sock, 1)[0].uid == 3


def test_idle_connections_and_a_normal_client() -> None:
    with server() as (address, proc):
        idle: list[socket.socket] = []
        try:
            for _ in range(2000):
                idle.append(conn(address))
            time.sleep(READ_TIMEOUT * 2)  # idle connections must outlive the read timeout
            still_serves(address)
            for sock in idle[::400]:
                sock.sendall(encode_have(1, b"probe"))
                assert recv_messages(sock, 1)[0].payload == b"\x00"
            assert proc.poll() is None
        finally:
            for sock in idle:
                sock.close()


def test_pipelining_with_large_responses(dc_server: str) -> None:
    big = os.urandom(20_000)
    small = b"s" * 100
    with conn(dc_server) as sock:
        sock.sendall(encode_add(1, b"big", big, 60_000) + encode_add(2, b"small", small, 60_000))
        assert [m.payload for m in recv_messages(sock, 2)] == [b"\x00", b"\x00"]
        batch = b""
        expected: list[tuple[int, bytes]] = []
        for uid in range(3, 203):
            if uid % 3 == 0:
                batch += encode_get(uid, b"big")
                expected.append((uid, big))
            elif uid % 3 == 1:
                batch += encode_get(uid, b"small")
                expected.append((uid, small))
            else:
                batch += encode_have(uid, b"missing")
                expected.append((uid, b"\x01"))
        sock.sendall(batch)
        got = recv_messages(sock, len(expected))
    assert [(m.uid, m.payload) for m in got] == expected


def test_huge_pipeline_is_answered_in_full(dc_server: str) -> None:
    """400 GETs of a 30 KB session in one write: 12 MB of answers, all delivered in order."""
    big = os.urandom(30_000)
    with conn(dc_server, timeout=20) as sock:
        sock.sendall(encode_add(1, b"big", big, 60_000))
        recv_messages(sock, 1)
        sock.sendall(b"".join(encode_get(uid, b"big") for uid in range(2, 402)))
        got = recv_messages(sock, 400)
    assert [m.uid for m in got] == list(range(2, 402))
    assert all(m.payload == big for m in got)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_peer_that_never_reads_is_dropped(loop: str) -> None:
    big = os.urandom(30_000)
    with server("--loop", loop) as (address, proc):
        with conn(address) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(encode_add(1, b"big", big, 60_000))
            recv_messages(sock, 1)
            requests = b"".join(encode_get(uid, b"big") for uid in range(2, 2002))
            with contextlib.suppress(OSError):
                sock.sendall(requests)
            time.sleep(READ_TIMEOUT * 4)
            still_serves(address)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"has not read its responses" in err


def test_max_connections() -> None:
    with server("--max-connections", "2") as (address, proc):
        first, second = conn(address), conn(address)
        try:
            for s in (first, second):
                s.sendall(encode_have(1, b"x"))
                recv_messages(s, 1)
            with conn(address) as third:
                assert closed_by_peer(third, 3)[0]
        finally:
            first.close()
            second.close()
        time.sleep(0.2)
        still_serves(address)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"rejected connection" in err


def test_statistics_line() -> None:
    with server("-progress", "1") as (address, proc):
        with conn(address) as sock:
            sock.sendall(encode_add(1, b"a", b"data", 60_000))
            recv_messages(sock, 1)
        time.sleep(1.5)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert b"Info, total operations =       1  (+     1), total sessions =     1  (+  1)" in err


FRAME = st.builds(
    lambda level, resp, uid, cls, op, complete, dlen, body: (
        HEADER.pack(level, resp, uid, cls, op, complete, dlen) + body
    ),
    st.sampled_from([0x00110000, 0x0011ABCD, 0x00100000, 0]),
    st.integers(0, 2),
    st.integers(0, 0xFFFFFFFF),
    st.integers(0, 1),
    st.integers(0, 5),
    st.integers(0, 2),
    st.sampled_from([0, 1, 8, 20, 2048, 2049, 0xFFFF]),
    st.binary(max_size=64),
)
VALID = st.sampled_from([bytes.fromhex(v["request_hex"]) for v in ALL_VECTORS])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(VALID))
    pos = draw(st.integers(0, min(len(raw) - 1, 30)))
    raw[pos] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(1, len(raw)))])


PAYLOADS = st.lists(
    st.one_of(st.binary(min_size=1, max_size=300), FRAME, VALID, mutated()), min_size=1, max_size=4
)


def fuzz(address: str, proc: subprocess.Popen[bytes], examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(PAYLOADS)
    def check(chunks: list[bytes]) -> None:
        with conn(address, timeout=2) as sock:
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            closed_by_peer(sock, 0.02)
        assert proc.poll() is None

    check()
    assert proc.poll() is None
    still_serves(address)


def test_fuzz_running_server() -> None:
    with server(stderr=subprocess.DEVNULL) as (address, proc):
        start = time.monotonic()
        fuzz(address, proc, 150)
        assert time.monotonic() - start < 20


@pytest.mark.slow
def test_fuzz_running_server_long() -> None:
    with server(stderr=subprocess.DEVNULL) as (address, proc):
        fuzz(address, proc, 5000)


def test_embedded_server() -> None:
    """The in-process API: start on an ephemeral port, talk to it, close."""

    async def scenario() -> bytes:
        srv = Server(SessionTable(64), read_timeout=1.0, stats=False)
        await srv.start(["IP:127.0.0.1:0"])
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(encode_add(1, b"k", b"v" * 10, 1000) + encode_get(2, b"k"))
        data = await reader.readexactly(15 + 24)
        writer.close()
        assert srv.operations == 2
        assert len(srv.table) == 1
        await srv.close()
        return data

    data = asyncio.run(scenario())
    assert data[-10:] == b"v" * 10


def test_bad_connection_warnings_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    srv = Server(SessionTable(64), stats=False)
    srv.max_warnings_per_second = 5
    with caplog.at_level(logging.WARNING, logger="tlscache.dc_server"):
        now = int(time.monotonic())
        for k in range(20):
            srv.warn("Warning, closing connection from %s: %s", f"peer{k}", "garbage")
        logged = [r for r in caplog.records if "closing connection" in r.getMessage()]
        assert 5 <= len(logged) <= 10  # 10 if the loop straddled a second boundary
        while int(time.monotonic()) == now:
            time.sleep(0.05)
        srv.warn("Warning, closing connection from %s: %s", "late", "garbage")
    summary = [r for r in caplog.records if "without being logged" in r.getMessage()]
    assert len(summary) >= 1


@pytest.mark.parametrize("tail", ["garbage", "half-close inside a frame"])
def test_answers_before_bad_input_are_flushed(tail: str) -> None:
    """Pipelined requests followed by bad input: every answer arrives, then the close."""
    big = os.urandom(30_000)
    with server() as (address, _), conn(address, timeout=10) as sock:
        sock.sendall(encode_add(1, b"big", big, 60_000))
        recv_messages(sock, 1)
        requests = b"".join(encode_get(uid, b"big") for uid in range(2, 202))
        if tail == "garbage":
            sock.sendall(requests + b"GET / HTTP/1.0\r\n\r\n")
        else:
            sock.sendall(requests + encode_have(999, b"big")[:10])
            sock.shutdown(socket.SHUT_WR)
        closed, got = closed_by_peer(sock, 10)
    assert closed
    messages = Decoder(expect_response=True).feed(got)
    assert [m.uid for m in messages] == list(range(2, 202))
    assert all(m.payload == big for m in messages)


class _SlowTransport(asyncio.Transport):
    """A transport whose peer has not taken the last answers yet."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written = b""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4242) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def get_write_buffer_size(self) -> int:
        return len(self.written)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return bool(self.calls)

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


@pytest.mark.parametrize("read_timeout", [0.05, None])
def test_bad_input_closes_after_the_queued_answers(read_timeout: float | None) -> None:
    """Answers still buffered when bad input arrives are sent (within read_timeout)."""

    async def scenario() -> list[str]:
        srv = Server(SessionTable(), read_timeout=read_timeout, stats=False)
        protocol = srv._protocol()
        transport = _SlowTransport()
        protocol.connection_made(transport)
        protocol.data_received(encode_have(1, b"x") + b"GET / HTTP/1.0\r\n\r\n")
        assert len(transport.written) == 15  # the HAVE answer, then the close
        await asyncio.sleep(0.2)
        return transport.calls

    calls = asyncio.run(scenario())
    # Graceful close first; cut off only if the peer does not take them in time.
    assert calls == (["close", "abort"] if read_timeout else ["abort"])


def test_serve_closes_started_listeners_when_a_later_one_fails(tmp_path: Path) -> None:
    from tlscache.distcache.server import serve

    good = tmp_path / "good.sock"
    bad = tmp_path / "not-a-socket"
    bad.write_text("keep")

    async def scenario() -> None:
        with pytest.raises(ValueError):
            await serve([f"UNIX:{good}", f"UNIX:{bad}"], stats=False)

    asyncio.run(scenario())
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(str(good))  # nobody listens there any more
