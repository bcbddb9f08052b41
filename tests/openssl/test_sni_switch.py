"""SNI switches (``Connection.set_context`` in the servername callback) and the session cache.

OpenSSL keeps running the session callbacks of the Context a connection was made from (its
session context) after the switch; pyOpenSSL then drops its reference to that Context.
Real handshakes over memory BIOs, with the initial Context dropped and collected mid-way.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable

import pytest
import trustme
from OpenSSL import SSL

from tests.tlsutil import client_context, handshake_over_memory, pump
from tlscache import MemoryStore, SessionCache
from tlscache.openssl.resolver import resolve

try:
    resolve()
except Exception as e:  # pragma: no cover - only on platforms the resolver does not support
    pytest.skip(f"resolver unavailable: {e}", allow_module_level=True)


@pytest.fixture(scope="module")
def server() -> Callable[[], SSL.Context]:
    cert = trustme.CA().issue_cert("localhost", "other.example")

    def make() -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        cert.configure_cert(ctx)
        return ctx

    return make


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_sessions_are_stored_after_the_initial_context_is_dropped(
    server: Callable[[], SSL.Context], version: str
) -> None:
    store = MemoryStore()
    cache = SessionCache(store)
    initial, switched_to = server(), server()
    cache.install(initial)
    switched: list[bool] = []

    def on_servername(conn: SSL.Connection) -> None:
        conn.set_context(switched_to)
        switched.append(True)

    initial.set_tlsext_servername_callback(on_servername)
    s = SSL.Connection(initial, None)
    s.set_accept_state()
    cctx = client_context(version)
    c = SSL.Connection(cctx, None)
    c.set_connect_state()
    c.set_tlsext_host_name(b"other.example")
    ref = weakref.ref(initial)
    del initial
    assert not pump(s, c, rounds=2)  # the server's first flight: the switch is done
    assert switched and s.get_context() is switched_to
    gc.collect()  # nothing but the connection refers to the initial Context now
    assert pump(s, c)
    s.send(b"x")  # carries the TLS 1.3 tickets
    c.bio_write(s.bio_read(65536))
    assert c.recv(1) == b"x"
    stats = cache.stats()
    assert stats.stores == (1 if version == "1.2" else 2), stats
    assert len(store) == stats.stores, stats

    # The session resumes on another Context the cache is installed on.
    other = server()
    cache.install(other)
    session = c.get_session()
    assert session is not None
    assert handshake_over_memory(other, cctx, session)[0]

    # Once its connections are gone, the initial Context goes too.
    del s, c, session
    gc.collect()
    assert ref() is None


def test_a_cache_on_the_context_switched_to_is_reported_unused(
    server: Callable[[], SSL.Context], caplog: pytest.LogCaptureFixture
) -> None:
    used, unused = SessionCache(MemoryStore()), SessionCache(MemoryStore())
    initial, switched_to = server(), server()
    used.install(initial)
    unused.install(switched_to)
    initial.set_tlsext_servername_callback(lambda conn: conn.set_context(switched_to))
    with caplog.at_level(logging.WARNING, logger="tlscache.openssl.callbacks"):
        for _ in range(3):
            handshake_over_memory(initial, client_context("1.2"), sni=b"other.example")
    warnings = [r for r in caplog.records if "never used" in r.getMessage()]
    assert len(warnings) == 1, caplog.text  # once per Context, not per handshake
    assert used.stats().stores == 3, used.stats()
    assert unused.stats().stores == 0, unused.stats()


def test_the_same_cache_on_both_contexts_is_not_reported(
    server: Callable[[], SSL.Context], caplog: pytest.LogCaptureFixture
) -> None:
    cache = SessionCache(MemoryStore())
    initial, switched_to = server(), server()
    cache.install(initial)
    cache.install(switched_to)
    initial.set_tlsext_servername_callback(lambda conn: conn.set_context(switched_to))
    with caplog.at_level(logging.WARNING, logger="tlscache.openssl.callbacks"):
        handshake_over_memory(initial, client_context("1.2"), sni=b"other.example")
    assert "never used" not in caplog.text
    assert cache.stats().stores == 1, cache.stats()
