"""Async stores: AsyncMemoryStore, and AsyncDistcacheStore against real dc_server processes."""

from __future__ import annotations

import asyncio

import pytest

from tests.procs import free_port, running, tool
from tests.stores.aioutil import fetch_while_stopped, soon
from tlscache import DistcacheStore, MemoryStore
from tlscache.exceptions import StoreTimeout
from tlscache.stores.aio import AsyncDistcacheStore, AsyncMemoryStore

SID = b"i" * 32


def test_memory_store_shares_its_inner_store() -> None:
    inner = MemoryStore()
    store = AsyncMemoryStore(inner)

    async def main() -> list[object]:
        inner.store(SID, b"v", 60, soon())
        seen: list[object] = [await store.fetch(SID, soon())]
        seen.append(await store.take(SID, soon()))
        seen.append(await store.fetch(SID, soon()))
        inner.store(SID, b"w", 60, soon())
        await store.delete(SID, soon())
        seen.append(inner.fetch(SID, soon()))
        return seen

    assert asyncio.run(main()) == [b"v", b"v", None, None]
    assert store.supports_take


@pytest.mark.integration
def test_distcache_fetch_take_delete(dc_server_tcp: str) -> None:
    """Reads what the blocking store wrote; the first fetch learns the server can TAKE."""
    store = AsyncDistcacheStore(dc_server_tcp)
    with DistcacheStore(dc_server_tcp, confirm_writes=True) as writer:
        writer.store(SID, b"value-1", 60, soon())
        writer.store(SID[:-1] + b"j", b"value-2", 60, soon())

        async def main() -> list[object]:
            assert not store.supports_take
            seen: list[object] = [await store.fetch(SID, soon()), store.supports_take]
            seen.append(await store.take(SID, soon()))
            seen.append(await store.fetch(SID, soon()))
            await store.delete(SID[:-1] + b"j", soon())
            seen.append(await store.fetch(SID[:-1] + b"j", soon()))
            seen.append(await store.fetch(b"", soon()))  # never stored: no round trip
            await store.aclose()
            return seen

        assert asyncio.run(main()) == [b"value-1", True, b"value-1", None, None, None]


@pytest.mark.integration
def test_distcache_reconnects_and_follows_a_new_loop(dc_server_tcp: str) -> None:
    """A lost connection is opened again by the next call; a new event loop gets a new
    client (the old one's connection belonged to the old loop)."""
    store = AsyncDistcacheStore(dc_server_tcp)
    with DistcacheStore(dc_server_tcp, confirm_writes=True) as writer:
        writer.store(SID, b"value", 60, soon())
    assert asyncio.run(store.fetch(SID, soon())) == b"value"
    assert asyncio.run(store.fetch(SID, soon())) == b"value"  # another loop

    # Reconnect within one loop: break the connection from the client side.
    async def lost_then_found() -> list[object]:
        seen: list[object] = [await store.fetch(SID, soon())]
        proto = store._client._proto
        assert proto is not None and proto.transport is not None
        proto.transport.abort()
        await asyncio.sleep(0)
        seen.append(await store.fetch(SID, soon()))
        return seen

    assert asyncio.run(lost_then_found()) == [b"value", b"value"]


@pytest.mark.integration
def test_distcache_stalled_server_times_out_without_blocking_the_loop() -> None:
    """A SIGSTOP'd dc_server: the fetch raises StoreTimeout at its deadline while the loop
    keeps running other tasks; nowhere near the 30 s guard."""
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address) as proc:
        store = AsyncDistcacheStore(address)

        async def main() -> tuple[type[BaseException] | None, int, float]:
            await store.fetch(SID, soon())  # connected and probed while healthy
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            tick = asyncio.create_task(ticker())
            try:
                error, took = await fetch_while_stopped(store, proc.pid, SID)
            finally:
                tick.cancel()
            return error, ticks, took

        error, ticks, took = asyncio.run(main())
    assert error is StoreTimeout, (error, ticks, took)
    assert ticks >= 5, (error, ticks, took)  # the loop ran while the fetch waited
    assert took < 15, (error, ticks, took)
