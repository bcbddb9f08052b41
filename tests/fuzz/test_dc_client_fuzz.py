"""Arbitrary byte streams at a real dc_client in front of a real dc_server.

One connection per example sends the bytes; meanwhile a well-behaved client stays
connected to the same dc_client, and after every example it must still get correct
answers (an ADD stored, then read back), and both processes must still run.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.seeds import recorded_requests
from tests.procs import free_port, running, tool, wait_proxy_connected
from tlscache.distcache.address import parse_address
from tlscache.distcache.protocol import (
    HEADER,
    Decoder,
    Message,
    Operation,
    encode_add,
    encode_get,
)
from tlscache.distcache.sockets import connect

pytestmark = pytest.mark.integration


RECORDED = recorded_requests()
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
VALID = st.sampled_from(RECORDED)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A recorded request with one byte changed, cut short at random."""
    raw = bytearray(draw(VALID))
    pos = draw(st.integers(0, min(len(raw) - 1, 40)))
    raw[pos] = draw(st.integers(0, 255))
    return bytes(raw[: draw(st.integers(1, len(raw)))])


STREAMS = st.lists(
    st.one_of(st.binary(min_size=1, max_size=300), FRAME, VALID, mutated()), min_size=1, max_size=6
)


@contextlib.contextmanager
def proxy_farm(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Any]]:
    """dc_server on loopback TCP and a dc_client in front of it on a unix socket."""
    server = f"IP:127.0.0.1:{free_port()}"
    proxy = f"UNIX:{tmp_path / 'dc_client.sock'}"
    with (
        running(
            tool("dc_server", "-listen", server), ready=server, stderr=subprocess.DEVNULL
        ) as server_proc,
        running(
            tool("dc_client", "-listen", proxy, "-server", server, "-retry", "100"),
            ready=proxy,
            stderr=subprocess.DEVNULL,
        ) as proxy_proc,
    ):
        wait_proxy_connected(proxy)
        yield proxy, proxy_proc, server_proc


def recv_messages(sock: socket.socket, decoder: Decoder, count: int) -> list[Message]:
    got: list[Message] = []
    while len(got) < count:
        chunk = sock.recv(65536)
        assert chunk, f"dc_client closed the good connection after {len(got)} of {count}"
        got += decoder.feed(chunk)
    return got


def drain_and_close(sock: socket.socket, timeout: float) -> None:
    """Read what dc_client answers until it closes or ``timeout`` passes, then close."""
    sock.settimeout(timeout)
    with contextlib.suppress(OSError):
        while sock.recv(65536):
            pass
    sock.close()


def fuzz_dc_client(tmp_path: Path, examples: int) -> None:
    with proxy_farm(tmp_path) as (proxy, proxy_proc, server_proc):
        address = parse_address(proxy)
        good = connect(address, timeout=5.0)
        decoder = Decoder(expect_response=True)
        uids = itertools.count(1)

        def still_correct(n: int) -> None:
            key = f"good-{n}".encode()
            value = f"value of {key.decode()}".encode() * 3
            add_uid, get_uid = next(uids), next(uids)
            good.sendall(encode_add(add_uid, key, value, 60_000) + encode_get(get_uid, key))
            added, fetched = recv_messages(good, decoder, 2)
            assert (added.uid, added.operation, added.payload) == (add_uid, Operation.ADD, b"\0")
            assert (fetched.uid, fetched.operation, fetched.payload) == (
                get_uid,
                Operation.GET,
                value,
            )

        examples_run = itertools.count()

        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(STREAMS)
        def check(chunks: list[bytes]) -> None:
            sock = connect(address, timeout=2.0)
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            drain_and_close(sock, 0.02)
            assert proxy_proc.poll() is None, "dc_client exited"
            assert server_proc.poll() is None, "dc_server exited"
            still_correct(next(examples_run))

        try:
            still_correct(-1)
            check()
            still_correct(-2)
        finally:
            good.close()


def test_fuzz_dc_client(tmp_path: Path) -> None:
    fuzz_dc_client(tmp_path, 50)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzz_dc_client_long(tmp_path: Path) -> None:
    fuzz_dc_client(tmp_path, 3000)
