"""Async stores: AsyncMemoryStore, and AsyncDistcacheStore against real dc_server processes."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from tests.procs import free_port, running, tool
from tlscache import Deadline, DistcacheStore, MemoryStore
from tlscache.exceptions import StoreError, StoreTimeout
from tlscache.stores.aio import AsyncDistcacheStore, AsyncMemoryStore

SID = b"i" * 32


def deadline(seconds: float = 5.0) -> Deadline:
    return Deadline.after(seconds)


def test_memory_store_shares_its_inner_store() -> None:
    inner = MemoryStore()
    store = AsyncMemoryStore(inner)

    async def main() -> list[object]:
        inner.store(SID, b"v", 60, deadline())
        seen: list[object] = [await store.fetch(SID, deadline())]
        seen.append(await store.take(SID, deadline()))
        seen.append(await store.fetch(SID, deadline()))
        inner.store(SID, b"w", 60, deadline())
        await store.delete(SID, deadline())
        seen.append(inner.fetch(SID, deadline()))
        return seen

    assert asyncio.run(main()) == [b"v", b"v", None, None]
    assert store.supports_take


@pytest.fixture
def dc_server() -> Iterator[str]:
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address):
        yield address


@pytest.mark.integration
def test_distcache_fetch_take_delete(dc_server: str) -> None:
    """Reads what the blocking store wrote; the first fetch learns the server can TAKE."""
    store = AsyncDistcacheStore(dc_server)
    with DistcacheStore(dc_server, confirm_writes=True) as writer:
        writer.store(SID, b"value-1", 60, deadline())
        writer.store(SID[:-1] + b"j", b"value-2", 60, deadline())

        async def main() -> list[object]:
            assert not store.supports_take
            seen: list[object] = [await store.fetch(SID, deadline()), store.supports_take]
            seen.append(await store.take(SID, deadline()))
            seen.append(await store.fetch(SID, deadline()))
            await store.delete(SID[:-1] + b"j", deadline())
            seen.append(await store.fetch(SID[:-1] + b"j", deadline()))
            seen.append(await store.fetch(b"", deadline()))  # never stored: no round trip
            await store.aclose()
            return seen

        assert asyncio.run(main()) == [b"value-1", True, b"value-1", None, None, None]


@pytest.mark.integration
def test_distcache_reconnects_and_follows_a_new_loop(dc_server: str) -> None:
    """A lost connection is opened again by the next call; a new event loop gets a new
    client (the old one's connection belonged to the old loop)."""
    store = AsyncDistcacheStore(dc_server)
    with DistcacheStore(dc_server, confirm_writes=True) as writer:
        writer.store(SID, b"value", 60, deadline())
    assert asyncio.run(store.fetch(SID, deadline())) == b"value"
    assert asyncio.run(store.fetch(SID, deadline())) == b"value"  # another loop

    # Reconnect within one loop: break the connection from the client side.
    async def lost_then_found() -> list[object]:
        seen: list[object] = [await store.fetch(SID, deadline())]
        proto = store._client._proto
        assert proto is not None and proto.transport is not None
        proto.transport.abort()
        await asyncio.sleep(0)
        seen.append(await store.fetch(SID, deadline()))
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
            await store.fetch(SID, deadline())  # connected and probed while healthy
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.001)
                    ticks += 1

            tick = asyncio.create_task(ticker())
            os.kill(proc.pid, signal.SIGSTOP)
            loop = asyncio.get_running_loop()
            start = loop.time()
            error: type[BaseException] | None = None
            try:
                await asyncio.wait_for(store.fetch(SID, Deadline.after(0.3)), 30)
            except StoreError as exc:
                error = type(exc)
            finally:
                os.kill(proc.pid, signal.SIGCONT)
                tick.cancel()
            return error, ticks, loop.time() - start

        error, ticks, took = asyncio.run(main())
    assert error is StoreTimeout, (error, ticks, took)
    assert ticks >= 5, (error, ticks, took)  # the loop ran while the fetch waited
    assert took < 15, (error, ticks, took)
