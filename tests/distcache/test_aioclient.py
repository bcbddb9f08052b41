"""AsyncClient: pipelining, deadlines and connection loss."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Coroutine
from typing import Any

import pytest

from tests.distcache.fakepeer import fake_peer, reply, silent_peer
from tests.procs import free_port, running, tool
from tlscache.deadline import Deadline
from tlscache.distcache.aioclient import AsyncClient
from tlscache.distcache.protocol import MAX_PAYLOAD, Message, Result
from tlscache.exceptions import ClientError, ClientTimeout, ServerUnavailable

SID = b"async-session-01"


@pytest.mark.integration
def test_every_operation(dc_server: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(dc_server) as client:
            assert await client.get(SID) is None
            assert await client.have(SID) is False
            assert await client.remove(SID) is False
            assert await client.add(SID, b"D" * 1500, 60_000) is Result.OK
            assert await client.add(SID, b"E" * 10, 60_000) is Result.ADD_MATCHING_SESSION
            assert await client.have(SID) is True
            assert await client.get(SID) == b"D" * 1500
            assert await client.remove(SID) is True
            assert await client.have(SID) is False
            big = os.urandom(MAX_PAYLOAD - 8 - len(SID))
            assert await client.add(SID, big, 60_000) is Result.OK
            assert await client.get(SID) == big

    asyncio.run(scenario())


@pytest.mark.integration
def test_thousand_requests_in_flight(dc_server_tcp: str) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(dc_server_tcp, deadline_ms=10_000)
        ids = [f"pipelined-{i:04d}".encode() for i in range(500)]  # fits the default cache
        # 1000 requests issued back to back: each GET follows its ADD on the connection,
        # so it must see the session (one connection's requests are handled in order).
        calls: list[Coroutine[Any, Any, object]] = []
        for s in ids:
            calls += [client.add(s, s * 20, 60_000), client.get(s)]
        pending = [asyncio.ensure_future(c) for c in calls]
        await asyncio.sleep(0)
        assert client.in_flight == 1000
        results = await asyncio.gather(*pending)
        for s, added, got in zip(ids, results[::2], results[1::2], strict=True):
            assert added is Result.OK
            assert got == s * 20
        checks: list[Coroutine[Any, Any, bool]] = []
        for s in ids:
            checks += [client.remove(s), client.have(s)]
        assert await asyncio.gather(*checks) == [True, False] * 500
        assert client.in_flight == 0
        await client.close()

    asyncio.run(scenario())


def test_deadline_against_a_server_that_never_answers() -> None:
    async def scenario(address: str) -> None:
        async with AsyncClient(address, deadline_ms=150) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await asyncio.gather(
                client.get(SID),
                client.have(SID, deadline=Deadline.after_ms(50)),
                return_exceptions=True,
            )
            took = loop.time() - started
            assert all(isinstance(r, ClientTimeout) for r in results), results
            # The peer never answers: "not never" is the upper bound, loose for a loaded machine.
            assert 0.1 < took < 20.0, f"took {took:.3f} s for deadlines of 150 and 50 ms"

    with silent_peer() as address:
        asyncio.run(scenario(address))


def test_connect_refused_is_a_client_error() -> None:
    async def scenario() -> None:
        with pytest.raises(ClientError):
            await AsyncClient.connect(f"IP:127.0.0.1:{free_port()}")

    asyncio.run(scenario())


def test_connection_loss_fails_every_pending_call() -> None:
    seen: list[Message] = []

    def handler(m: Message) -> bytes | None:
        seen.append(m)
        return None if len(seen) == 3 else reply(m, b"\x00")  # hang up once

    async def scenario(address: str) -> None:
        async with AsyncClient(address, deadline_ms=5000) as client:
            results = await asyncio.gather(
                *(client.have(SID) for _ in range(20)), return_exceptions=True
            )
            assert results[:2] == [True, True]
            assert all(isinstance(r, ClientError) for r in results[2:])
            assert client.in_flight == 0
            # The next call opens a new connection.
            assert await client.have(SID) is True

    with fake_peer(handler) as address:
        asyncio.run(scenario(address))


@pytest.mark.parametrize("payload", [b"", b"\x02"], ids=["empty", "disconnected"])
def test_proxy_without_server_is_server_unavailable(payload: bytes) -> None:
    async def scenario(address: str) -> None:
        async with AsyncClient(address) as client:
            for call in (client.get(SID), client.have(SID), client.add(SID, b"x" * 9, 10)):
                with pytest.raises(ServerUnavailable):
                    await call

    with fake_peer(lambda m: reply(m, payload)) as address:
        asyncio.run(scenario(address))


def test_reply_to_unknown_uid_drops_the_connection() -> None:
    def handler(m: Message) -> bytes:
        return reply(Message(True, m.uid ^ 0x5555, m.operation, b""), b"\x00")

    async def scenario(address: str) -> None:
        async with AsyncClient(address) as client:
            with pytest.raises(ClientError):
                await client.have(SID)

    with fake_peer(handler) as address:
        asyncio.run(scenario(address))


@pytest.mark.integration
def test_reconnects_after_server_restart() -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_server", "-listen", address)

    async def use(client: AsyncClient, expect_have: bool) -> None:
        assert await client.have(SID) is expect_have
        await client.add(SID, b"D" * 100, 60_000)

    async def scenario() -> None:
        client = AsyncClient(address, deadline_ms=3000)
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            await use(client, False)
        await asyncio.sleep(0.05)  # let the loop notice the loss
        with pytest.raises(ClientError):
            await client.have(SID)
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            await use(client, False)
            assert await client.have(SID) is True
        await client.close()
        with pytest.raises(ClientError):
            await client.have(SID)

    asyncio.run(scenario())


def test_late_reply_after_a_timeout_is_discarded() -> None:
    seen: list[int] = []

    def handler(m: Message) -> bytes:
        seen.append(m.uid)
        if len(seen) == 1:
            time.sleep(0.3)  # the first reply comes after its caller gave up
        return reply(m, b"\x00")

    async def scenario(address: str) -> None:
        async with AsyncClient(address) as client:
            with pytest.raises(ClientTimeout):
                await client.have(SID, deadline=Deadline.after_ms(100))
            assert client.in_flight == 1  # still expected on the wire
            assert await client.have(SID, deadline=Deadline.after_ms(2000)) is True
            assert client.in_flight == 0

    with fake_peer(handler) as address:
        asyncio.run(scenario(address))


def test_silent_server_is_dropped_instead_of_piling_up_timed_out_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tlscache.distcache import aioclient

    monkeypatch.setattr(aioclient, "_GIVE_UP_S", 0.2)

    async def scenario(address: str) -> None:
        async with AsyncClient(address, deadline_ms=50) as client:
            errors: list[str] = []
            for _ in range(20):
                with pytest.raises(ClientError) as info:  # ClientTimeout is a ClientError
                    await client.have(SID)
                errors.append(str(info.value))
            # Timed-out calls wait for their late replies only so long: then the
            # connection is dropped (and the next call opens a new one).
            assert any("stopped answering" in e for e in errors), errors
            for _ in range(200):  # 0.2 s to give up; up to 10 s on a loaded machine
                if client.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert client.in_flight == 0, (client.in_flight, errors)

    with silent_peer() as address:
        asyncio.run(scenario(address))


def record_connects(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[Any]:
    """Make AsyncClient's connects take ``delay`` seconds; returns the connections made."""
    import tlscache.distcache.aioclient as aioclient

    opened: list[aioclient._Protocol] = []
    real_open = aioclient._open

    async def open_and_record(address: Any) -> aioclient._Protocol:
        await asyncio.sleep(delay)
        proto = await real_open(address)
        opened.append(proto)
        return proto

    monkeypatch.setattr(aioclient, "_open", open_and_record)
    return opened


def test_slow_connect_is_reused_not_leaked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connect that finishes after its caller timed out serves the next call."""
    opened = record_connects(monkeypatch, delay=0.2)

    async def scenario(address: str) -> None:
        client = AsyncClient(address)
        with pytest.raises(ClientTimeout):
            await client.have(SID, deadline=Deadline.after_ms(50))
        await asyncio.sleep(0.4)  # the first connect completes meanwhile
        assert await client.have(SID) is False
        assert len(opened) == 1
        await client.close()
        assert opened[0].lost

    with fake_peer(lambda m: reply(m, b"\x01")) as address:
        asyncio.run(scenario(address))


def test_close_during_connect_leaves_no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = record_connects(monkeypatch)

    async def scenario(address: str) -> None:
        client = AsyncClient(address)
        call = asyncio.ensure_future(client.have(SID))
        for _ in range(100_000):
            if opened:
                break
            await asyncio.sleep(0)
        await client.close()  # the connect is done, the caller not yet resumed
        with pytest.raises(ClientError):
            await call
        assert opened[0].lost

    with fake_peer(lambda m: reply(m, b"\x01")) as address:
        asyncio.run(scenario(address))
