"""Single-use TLS 1.3 tickets across servers sharing one store, with real handshakes.

Two pyOpenSSL server Contexts, A and B, each with its own ``SessionCache(single_use=True)``
(as two servers of a farm would have) over one shared store: a real dc_server (TAKE),
memcached (``mg``/``md``), redis-server (GETDEL), and the in-process ``MemoryStore``.
A ticket that resumed on one server must be refused by the other, also when both try at
the same moment. A store without take gets GET then DELETE; TLS 1.2 sessions stay reusable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from pprint import pformat

import pytest
from OpenSSL import SSL

from tests.memcache.servers import MEMCACHED, memcached_servers
from tests.redisutil import redis_server
from tests.tlsutil import client_context, handshake_over_memory
from tlscache import Deadline, MemoryStore, SessionCache, SessionStore, WrappingStore
from tlscache.exceptions import ConfigurationError
from tlscache.keyring import KeyRing
from tlscache.stores.base import WriteStatus
from tlscache.stores.distcache import DistcacheStore
from tlscache.stores.near import NearCache

pytestmark = pytest.mark.integration

#: Lookups and writes get this long: a loaded machine meets it, so no resumption the
#: tests expect is lost to a timeout.
DEADLINE_MS = 2000.0

StoreFactory = Callable[[], contextlib.AbstractContextManager[SessionStore]]


@contextlib.contextmanager
def _memory() -> Iterator[SessionStore]:
    yield MemoryStore()


@contextlib.contextmanager
def _dc_server() -> Iterator[SessionStore]:
    from tests.procs import free_port, running, tool

    address = f"IP:127.0.0.1:{free_port()}"
    with (
        running(tool("dc_server", "-listen", address), ready=address),
        DistcacheStore(address) as store,
    ):
        yield store


@contextlib.contextmanager
def _memcached() -> Iterator[SessionStore]:
    if MEMCACHED is None:
        pytest.skip("memcached is not installed")
    from tlscache.stores.memcached import MemcachedStore

    with (
        memcached_servers(1) as (server,),
        MemcachedStore([server.address], connect_timeout_s=2.0) as store,
    ):
        yield store


@contextlib.contextmanager
def _redis() -> Iterator[SessionStore]:
    from tests.redisutil import REDIS_SERVER
    from tlscache.stores.redis import RedisStore

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    with redis_server() as server, RedisStore(server.url, connect_timeout_s=2.0) as store:
        yield store


STORES: dict[str, StoreFactory] = {
    "memory": _memory,
    "dc_server": _dc_server,
    "memcached": _memcached,
    "redis": _redis,
}


@pytest.fixture(scope="module")
def cert() -> object:
    import trustme

    return trustme.CA().issue_cert("localhost")


def _server(cert: object, cache: SessionCache) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert.configure_cert(ctx)  # type: ignore[attr-defined]
    cache.install(ctx)
    return ctx


def _cache(store: SessionStore, keys: KeyRing, **options: object) -> SessionCache:
    return SessionCache(
        store,
        keys=keys,
        single_use=True,
        deadline_ms=DEADLINE_MS,
        **options,  # type: ignore[arg-type]
    )


def _state(**parts: object) -> str:
    return pformat({k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in parts.items()})


@pytest.mark.parametrize("kind", list(STORES))
def test_ticket_resumes_once_across_servers(kind: str, cert: object) -> None:
    keys = KeyRing.generate()
    with STORES[kind]() as store:
        cache_a, cache_b = _cache(store, keys), _cache(store, keys)
        a, b = _server(cert, cache_a), _server(cert, cache_b)
        assert store.supports_take, type(store).__name__
        client = client_context("1.3")
        for first, second in ((a, b), (b, a)):
            _, ticket = handshake_over_memory(first, client)
            resumed, _ = handshake_over_memory(first, client, ticket)
            replayed_elsewhere, _ = handshake_over_memory(second, client, ticket)
            replayed_here, _ = handshake_over_memory(first, client, ticket)
            state = _state(a=cache_a.stats(), b=cache_b.stats())
            assert resumed, state
            assert not replayed_elsewhere, state
            assert not replayed_here, state
        sa, sb = cache_a.stats(), cache_b.stats()
        state = _state(a=sa, b=sb)
        assert (sa.takes, sb.takes) == (1, 1), state
        assert (sa.take_misses, sb.take_misses) == (2, 2), state
        assert sa.take_fallbacks == sb.take_fallbacks == 0, state
        # A resumption issues a new ticket, which resumes once in turn.
        _, ticket = handshake_over_memory(a, client)
        _, renewed = handshake_over_memory(a, client, ticket)
        assert handshake_over_memory(b, client, renewed)[0], _state(b=cache_b.stats())
        assert not handshake_over_memory(a, client, renewed)[0], _state(a=cache_a.stats())


@pytest.mark.parametrize("kind", list(STORES))
def test_concurrent_offers_resume_at_most_once(kind: str, cert: object) -> None:
    tickets_n = 12
    keys = KeyRing.generate()
    with STORES[kind]() as store:
        cache_a, cache_b = _cache(store, keys), _cache(store, keys)
        servers = (_server(cert, cache_a), _server(cert, cache_b))
        client = client_context("1.3")
        tickets = [handshake_over_memory(servers[i % 2], client)[1] for i in range(tickets_n)]
        resumed = [[False, False] for _ in tickets]
        errors: list[BaseException] = []

        def offer(side: int, barrier: threading.Barrier, i: int) -> None:
            try:
                barrier.wait(timeout=30)
                resumed[i][side] = handshake_over_memory(servers[side], client, tickets[i])[0]
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        for i in range(tickets_n):
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=offer, args=(s, barrier, i)) for s in (0, 1)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "a handshake hung"
        sa, sb = cache_a.stats(), cache_b.stats()
        state = _state(resumed=resumed, errors=errors, a=sa, b=sb)
        assert not errors, state
        assert all(sum(pair) <= 1 for pair in resumed), state
        wins = sum(sum(pair) for pair in resumed)
        assert wins == sa.takes + sb.takes, state
        # Each ticket was taken by exactly one side unless a lookup failed outright.
        failed = sa.errors + sb.errors + sa.timeouts + sb.timeouts + sa.skipped + sb.skipped
        assert wins + failed >= tickets_n, state
        assert sa.take_misses + sb.take_misses == 2 * tickets_n - wins - failed, state


class NoTake(WrappingStore):
    """A store like C distcache's: no atomic take, whatever the inner store can do."""

    def __init__(self, inner: SessionStore) -> None:
        super().__init__(inner)
        self.supports_take = False
        self.stored: list[bytes] = []  # keys, in order
        self.deleted: list[bytes] = []

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        self.stored.append(session_id)
        return self.inner.store(session_id, value, ttl_s, deadline)

    def delete(self, session_id: bytes, deadline: Deadline) -> None:
        self.deleted.append(session_id)
        self.inner.delete(session_id, deadline)


def test_store_without_take_gets_then_deletes(
    cert: object, caplog: pytest.LogCaptureFixture
) -> None:
    keys = KeyRing.generate()
    with _dc_server() as inner:
        assert isinstance(inner, DistcacheStore)
        store = NoTake(inner)
        with caplog.at_level(logging.WARNING, logger="tlscache.session_cache"):
            cache_a, cache_b = _cache(store, keys), _cache(store, keys)
            a, b = _server(cert, cache_a), _server(cert, cache_b)
            _server(cert, cache_a)  # a second Context on the same cache: no second warning
        warnings = [r.getMessage() for r in caplog.records if "best-effort" in r.getMessage()]
        assert len(warnings) == 2, warnings  # once per cache
        assert "replay window" in warnings[0], warnings
        client = client_context("1.3")
        _, ticket = handshake_over_memory(a, client)
        issued = list(store.stored)
        held = [inner.contains(k, Deadline.after(2.0)) for k in issued]
        assert held == [True, True], held
        assert handshake_over_memory(a, client, ticket)[0], _state(a=cache_a.stats())
        held = [inner.contains(k, Deadline.after(2.0)) for k in issued]
        state = _state(held=held, deleted=store.deleted == issued[-1:], a=cache_a.stats())
        assert held == [True, False] and store.deleted == issued[-1:], state
        assert not handshake_over_memory(b, client, ticket)[0], _state(b=cache_b.stats())
        sa, sb = cache_a.stats(), cache_b.stats()
        state = _state(a=sa, b=sb)
        assert (sa.takes, sa.take_fallbacks, sa.removes) == (1, 1, 1), state
        assert (sb.takes, sb.take_fallbacks, sb.misses) == (0, 0, 1), state


def test_dc_client_that_cannot_take(
    cert: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Our dc_client told not to pipeline offers no TAKE, as a C dc_server would not:
    the store learns that from the probe at install, and lookups GET then DELETE."""
    from tests.procs import free_port, running, tool

    server = f"IP:127.0.0.1:{free_port()}"
    proxy = f"UNIX:{tmp_path / 'dc_client.sock'}"
    proxy_argv = tool("dc_client", "-listen", proxy, "-server", server, "--pipeline", "off")
    keys = KeyRing.generate()
    with (
        running(tool("dc_server", "-listen", server), ready=server),
        running(proxy_argv, ready=proxy),
        # Writes confirmed: B's lookup must not overtake A's write inside dc_client, which
        # forwards its clients' requests one at a time, round-robin, with --pipeline off.
        DistcacheStore(proxy, confirm_writes=True) as store,
        caplog.at_level(logging.WARNING, logger="tlscache.session_cache"),
    ):
        cache_a, cache_b = _cache(store, keys), _cache(store, keys)
        a, b = _server(cert, cache_a), _server(cert, cache_b)
        warnings = [r.getMessage() for r in caplog.records if "best-effort" in r.getMessage()]
        assert not store.supports_take and len(warnings) == 2, warnings
        client = client_context("1.3")
        _, ticket = handshake_over_memory(a, client)
        first = handshake_over_memory(b, client, ticket)[0]
        again = [handshake_over_memory(s, client, ticket)[0] for s in (a, b)]
        sa, sb = cache_a.stats(), cache_b.stats()
        state = _state(first=first, again=again, a=sa, b=sb)
        assert first and again == [False, False], state
        assert (sb.takes, sb.take_fallbacks, sb.removes) == (1, 1, 1), state
        assert sa.takes + sa.take_fallbacks + sa.take_misses == 0 and sa.misses == 1, state


@pytest.mark.parametrize("kind", list(STORES))
def test_tls12_sessions_stay_reusable(kind: str, cert: object) -> None:
    keys = KeyRing.generate()
    with STORES[kind]() as store:
        cache_a, cache_b = _cache(store, keys), _cache(store, keys)
        a, b = _server(cert, cache_a), _server(cert, cache_b)
        client = client_context("1.2")
        _, session = handshake_over_memory(a, client)
        results = [handshake_over_memory(s, client, session)[0] for s in (a, b, a, b)]
        sa, sb = cache_a.stats(), cache_b.stats()
        state = _state(results=results, a=sa, b=sb)
        assert results == [True] * 4, state
        assert sa.takes == sb.takes == 0, state
        # The callback says the handshake is TLS 1.2: a plain read, nothing taken.
        assert sa.put_back + sb.put_back == 0, state
        assert sa.hits + sb.hits == 4, state


def _tls12_der() -> bytes:
    """The head of OpenSSL's session encoding, as the cache reads it: version 1, TLS 1.2,
    a cipher, [1] time (now) and [2] timeout (300 s)."""
    now = int(time.time()).to_bytes(4, "big")
    body = (
        b"\x02\x01\x01"  # INTEGER 1: the encoding's version
        b"\x02\x02\x03\x03"  # INTEGER 0x0303: TLS 1.2
        b"\x04\x02\x00\x2f"  # the cipher
        b"\xa1\x06\x02\x04" + now + b"\xa2\x04\x02\x02\x01\x2c"
    )
    return b"\x30" + bytes([len(body)]) + body


def test_tls12_session_of_unknown_version_is_put_back() -> None:
    """Without the handshake's version (e.g. a lookup made ahead of the handshake), the
    session's own says TLS 1.2: taken, then stored again at once, still reusable."""
    keys = KeyRing.generate()
    with STORES["memory"]() as store:
        cache = _cache(store, keys)
        der = _tls12_der()
        cache.on_new(b"ctx", b"\x01" * 32, der, 300)
        cache.flush()
        got = [cache.on_get(b"ctx", b"\x01" * 32) for _ in range(3)]
        stats = cache.stats()
        assert got == [der] * 3 and stats.put_back == 3 and stats.takes == 0, stats


def test_near_cache_is_refused() -> None:
    with _dc_server() as inner:
        near = NearCache(inner)
        with pytest.raises(ConfigurationError, match="NearCache"):
            SessionCache(near, keys=KeyRing.generate(), single_use=True)
        with pytest.raises(ConfigurationError, match="NearCache"):
            SessionCache(WrappingStore(near), keys=KeyRing.generate(), single_use=True)
        SessionCache(near, keys=KeyRing.generate())  # without single use it is fine


class HeldWrites(WrappingStore):
    """Stores block until ``release`` is set, so that writes stay queued."""

    def __init__(self, inner: SessionStore) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.stored: list[bytes] = []

    def store(
        self, session_id: bytes, value: bytes, ttl_s: float, deadline: Deadline
    ) -> WriteStatus | None:
        self.release.wait(timeout=30)
        self.stored.append(session_id)
        return self.inner.store(session_id, value, ttl_s, deadline)


def test_queued_ticket_is_taken_once_and_never_written(cert: object) -> None:
    keys = KeyRing.generate()
    inner = MemoryStore()
    store = HeldWrites(inner)
    cache_a = _cache(store, keys, async_writes=True, write_deadline_ms=30_000.0)
    cache_b = _cache(inner, keys)
    a, b = _server(cert, cache_a), _server(cert, cache_b)
    client = client_context("1.3")
    try:
        # Two tickets: the writer holds the first in its store call; the second, the
        # client's, waits in the queue.
        _, ticket = handshake_over_memory(a, client)
        resumed, renewed = handshake_over_memory(a, client, ticket)
        replayed, _ = handshake_over_memory(a, client, ticket)
    finally:
        store.release.set()
    assert cache_a.flush(30.0)
    sa = cache_a.stats()
    state = _state(a=sa, stored=len(store.stored))
    assert resumed and not replayed, state
    assert (sa.takes, sa.pending_hits) == (1, 1), state
    # Five tickets issued (two, one by the resumption, two by the refused replay's full
    # handshake): all written but the one taken while queued.
    assert len(store.stored) == len(set(store.stored)) == 4, state
    assert not handshake_over_memory(b, client, ticket)[0], _state(b=cache_b.stats())
    assert handshake_over_memory(b, client, renewed)[0], _state(b=cache_b.stats())
