"""Helpers for the async store tests: deadlines, and a fetch from a stopped server."""

from __future__ import annotations

import asyncio
import os
import signal

from tlscache import Deadline
from tlscache.exceptions import StoreError
from tlscache.stores.aio import AsyncSessionStore


def soon() -> Deadline:
    """A deadline far enough off that a healthy loopback server always meets it."""
    return Deadline.after(5.0)


async def fetch_while_stopped(
    store: AsyncSessionStore, pid: int, session_id: bytes
) -> tuple[type[BaseException] | None, float]:
    """Fetch with a 0.3 s deadline while the server ``pid`` is SIGSTOP'd (a 30 s guard
    around it): the StoreError type raised, or None, and the seconds the fetch took."""
    os.kill(pid, signal.SIGSTOP)
    loop = asyncio.get_running_loop()
    start = loop.time()
    error: type[BaseException] | None = None
    try:
        await asyncio.wait_for(store.fetch(session_id, Deadline.after(0.3)), 30)
    except StoreError as exc:
        error = type(exc)
    finally:
        os.kill(pid, signal.SIGCONT)
    return error, loop.time() - start
