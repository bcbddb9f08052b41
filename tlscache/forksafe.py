"""Objects that repair themselves in a forked child.

A pre-forking server (gunicorn, a multiprocessing pool) forks while other
threads may hold a lock of ours; the child would then wait on it forever. Each
object with such state registers here once and gets its
``_after_fork_in_child`` called in every child, through one ``os.register_at_fork``
hook for the whole library.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol

__all__ = ["ForkAware", "repair_after_fork"]


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


_objects: weakref.WeakSet[ForkAware] = weakref.WeakSet()


def repair_after_fork(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every child forked while it lives."""
    _objects.add(obj)


def _after_fork() -> None:
    for obj in list(_objects):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
