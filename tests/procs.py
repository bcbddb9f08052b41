"""Paths of the test suite; the process helpers live in :mod:`tlscache_farm.procs`."""

from __future__ import annotations

from pathlib import Path

from tlscache_farm.procs import free_port, running, tool, wait_connectable, wait_proxy_connected

__all__ = [
    "ROOT",
    "VECTORS",
    "free_port",
    "running",
    "tool",
    "wait_connectable",
    "wait_proxy_connected",
]

ROOT = Path(__file__).resolve().parent.parent
VECTORS = Path(__file__).resolve().parent / "data" / "distcache-vectors.json"
