"""Event loop selection for the distcache servers: uvloop when asked for or available."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Literal

LoopKind = Literal["auto", "asyncio", "uvloop"]
LOOP_KINDS: tuple[LoopKind, ...] = ("auto", "asyncio", "uvloop")


def loop_factory(kind: LoopKind = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """An event loop factory: uvloop for ``uvloop`` and, when installed, for ``auto``.

    Raises :class:`ImportError` for ``uvloop`` when it is not installed.
    """
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


__all__ = ["LOOP_KINDS", "LoopKind", "loop_factory"]
