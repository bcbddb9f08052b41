"""SNI switches (``Connection.set_context`` in the servername callback), the session cache
and the ticket keys.

OpenSSL keeps running the session and ticket-key callbacks of the Context a connection was
made from (its session context) after the switch; pyOpenSSL then drops its reference to that
Context. Real handshakes over memory BIOs, with the initial Context dropped and collected
mid-way.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Callable
from typing import NamedTuple

import pytest
import trustme
from OpenSSL import SSL

from tests.tlsutil import client_context, handshake_over_memory, pump, skip_without_resolver
from tlscache import MemoryStore, SessionCache
from tlscache.keyring import KeyRing
from tlscache.openssl import callbacks
from tlscache.openssl.tickets import install_ticket_callback
from tlscache.sealing import Sealer
from tlscache.ticketkeys import TicketKeyPolicy, TicketKeys

skip_without_resolver()


@pytest.fixture(scope="module")
def server() -> Callable[[], SSL.Context]:
    cert = trustme.CA().issue_cert("localhost", "other.example")

    def make() -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        cert.configure_cert(ctx)
        return ctx

    return make


class Switched(NamedTuple):
    server: SSL.Connection
    client: SSL.Connection
    client_ctx: SSL.Context


def switch_then_drop(
    make_initial: Callable[[], SSL.Context], switched_to: SSL.Context, version: str
) -> Switched:
    """A handshake switched by SNI from a Context made by ``make_initial`` (referenced by
    nothing else) to ``switched_to``; the initial Context is dropped and collected right
    after the switch, before the handshake ends and its tickets are sent."""
    initial = make_initial()
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
    gc.collect()  # nothing but the connection's SSL refers to the initial SSL_CTX now
    assert ref() is None, "the initial Context is still alive"
    assert pump(s, c)
    s.send(b"x")  # carries the TLS 1.3 tickets
    c.bio_write(s.bio_read(65536))
    assert c.recv(1) == b"x"
    return Switched(s, c, cctx)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_sessions_are_stored_after_the_initial_context_is_dropped(
    server: Callable[[], SSL.Context], version: str
) -> None:
    store = MemoryStore()
    cache = SessionCache(store)
    before = len(callbacks._registry)

    def cached() -> SSL.Context:
        ctx = server()
        cache.install(ctx)
        return ctx

    s, c, cctx = switch_then_drop(cached, server(), version)
    stats = cache.stats()
    assert stats.stores == (1 if version == "1.2" else 2), stats
    assert len(store) == stats.stores, stats

    # The session resumes on another Context the cache is installed on.
    session = c.get_session()
    assert session is not None
    assert handshake_over_memory(cached(), cctx, session)[0]

    # Once its connections are gone, the initial SSL_CTX goes too, and its callbacks.
    del s, c, session
    gc.collect()
    assert len(callbacks._registry) == before, "callbacks kept after their SSL_CTX was freed"


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


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_tickets_use_the_shared_keys_after_the_initial_context_is_dropped(
    server: Callable[[], SSL.Context], version: str
) -> None:
    """The ticket-key callback lives with the SSL_CTX: a ticket issued after the initial
    Context is gone is still sealed under the farm's keys, so it resumes elsewhere."""
    keys = TicketKeys(MemoryStore(), Sealer(KeyRing.generate()), policy=TicketKeyPolicy())
    keys.refresh()

    def ticketing() -> SSL.Context:
        ctx = server()
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        install_ticket_callback(ctx, keys)
        return ctx

    _, c, cctx = switch_then_drop(ticketing, server(), version)
    assert keys.stats().issued >= 1, keys.stats()

    session = c.get_session()
    assert session is not None
    resumed, _ = handshake_over_memory(ticketing(), cctx, session)
    assert resumed, keys.stats()
