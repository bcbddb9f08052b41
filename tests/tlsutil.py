"""pyOpenSSL helpers for tests: they live in :mod:`tlscache_farm.tlsclient`, shared with bench/."""

from __future__ import annotations

from tlscache_farm.tlsclient import VERSIONS, client_context, handshake_over_memory

__all__ = ["VERSIONS", "client_context", "handshake_over_memory"]
