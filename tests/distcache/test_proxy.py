"""dc_client's asyncio shell in-process: timers, reconnects, the FD: listener."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

from tests.procs import free_port
from tlscache.distcache.address import parse_address
from tlscache.distcache.multiplexer import ProxyLimits
from tlscache.distcache.protocol import Decoder, Message, Operation, encode_have, encode_response
from tlscache.distcache.proxy import ProxyServer
from tlscache.distcache.sockets import listen


class FakeServer(asyncio.Protocol):
    """Answers every request ``0x01``, or never when ``silent``."""

    silent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.decoder = Decoder(expect_response=False)

    def data_received(self, data: bytes) -> None:
        for m in self.decoder.feed(data):
            if not self.silent:
                self.transport.write(encode_response(m.uid, m.operation, b"\x01"))


class Silent(FakeServer):
    silent = True


@asynccontextmanager
async def proxy(tmp_path: Path, upstream_port: int, **options: int) -> AsyncIterator[str]:
    path = str(tmp_path / "p.sock")
    sock = listen(parse_address(f"UNIX:{path}"))
    server = ProxyServer(
        sock, parse_address(f"IP:127.0.0.1:{upstream_port}"), ProxyLimits(**options)
    )
    task = asyncio.create_task(server.serve())
    try:
        yield path
    finally:
        server.stop()
        await asyncio.wait_for(task, 5)
        sock.close()


async def ask(path: str, uid: int) -> Message:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(encode_have(uid, b"x"))
        decoder = Decoder(expect_response=True)
        while True:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, "closed without an answer"
            messages = decoder.feed(data)
            if messages:
                return messages[0]
    finally:
        writer.close()


def test_no_server_then_connected_on_the_retry_deadline(tmp_path: Path) -> None:
    async def scenario() -> None:
        port = free_port()
        async with proxy(tmp_path, port, retry_ms=200) as path:
            assert (await ask(path, 1)).payload == b""  # no server yet: "no server" answer
            loop = asyncio.get_running_loop()
            upstream = await loop.create_server(FakeServer, "127.0.0.1", port)
            started = time.monotonic()
            try:
                # The 200 ms retry timer, not the 5 s default nor never; the bound is loose
                # because a loaded machine adds scheduling delay to every ask.
                while (await ask(path, 2)).payload != b"\x01":
                    took = time.monotonic() - started
                    assert took < 4.0, f"not reconnected after {took:.3f} s (retry 200 ms)"
                    await asyncio.sleep(0.02)
            finally:
                upstream.close()

    asyncio.run(scenario())


def test_request_timeout_from_the_timer(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(Silent, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        try:
            async with proxy(tmp_path, port, request_timeout_ms=150, retry_ms=5000) as path:
                for _ in range(100):  # "no server" answers until the proxy is connected
                    started = time.monotonic()
                    answer = await ask(path, 2)
                    elapsed = time.monotonic() - started
                    if answer.payload:
                        break
                    await asyncio.sleep(0.02)
                assert (answer.uid, answer.operation, answer.payload) == (
                    2,
                    Operation.HAVE,
                    b"\x02",
                )
                # The 150 ms timer answered, not never; never before it.
                assert 0.1 < elapsed < 10.0, f"answered after {elapsed:.3f} s (timeout 150 ms)"
        finally:
            upstream.close()

    asyncio.run(scenario())


def test_fd_listener_serves_its_one_connection_then_stops() -> None:
    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        server = ProxyServer(theirs, parse_address(f"IP:127.0.0.1:{free_port()}"))
        task = asyncio.create_task(server.serve())
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(encode_have(7, b"x"))
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert Decoder(expect_response=True).feed(data)[0].uid == 7
        writer.close()
        await asyncio.wait_for(task, 5)  # its one client gone: serve() returns
        theirs.close()

    asyncio.run(scenario())
