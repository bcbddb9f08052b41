"""RedisStore and RedisClusterStore against real redis-server processes on loopback."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from pprint import pformat

import pytest
import redis
from OpenSSL import SSL
from redis.crc import key_slot

from tests.redisutil import REDIS_SERVER, RedisCluster, RedisServer, redis_cluster, redis_server
from tests.tlsutil import client_context, handshake_over_memory
from tlscache import SessionCache
from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, StoreError, StoreTimeout
from tlscache.keyring import KeyRing
from tlscache.openssl.callbacks import session_id
from tlscache.stores.base import ServerHealth, WriteStatus
from tlscache.stores.redis import APACHE_KEY_PREFIX, RedisClusterStore, RedisStore

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed"),
]

StoreMaker = Callable[..., RedisStore | RedisClusterStore]


class Clock:
    """A clock the test moves (for the stores' down periods; deadlines use real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def soon() -> Deadline:
    return Deadline.after(2.0)


def sid(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with redis_cluster() as c:
        yield c


@pytest.fixture(params=["standalone", "cluster"])
def make_store(request: pytest.FixtureRequest) -> Iterator[StoreMaker]:
    made: list[RedisStore | RedisClusterStore] = []

    def make(**kw: object) -> RedisStore | RedisClusterStore:
        s: RedisStore | RedisClusterStore
        if request.param == "standalone":
            s = RedisStore(request.getfixturevalue("server").url, **kw)  # type: ignore[arg-type]
        else:
            s = RedisClusterStore(request.getfixturevalue("cluster").nodes, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def raw_clients(store: RedisStore | RedisClusterStore) -> list[redis.Redis]:
    """Plain redis-py clients on every server of ``store``, to look at what it wrote."""
    out = []
    for health in store.servers():
        host, _, port = health.address.rpartition(":")
        out.append(redis.Redis(host=host, port=int(port), socket_timeout=5))
    return out


def test_store_fetch_delete_take(make_store: StoreMaker) -> None:
    store = make_store(key_prefix="t1:")
    assert store.supports_take and not store.in_process
    a, b = sid(1), sid(2)
    assert store.fetch(a, soon()) is None
    assert store.store(a, b"value-a", 300, soon()) is WriteStatus.CONFIRMED
    store.store(b, b"value-b", 300, soon())
    assert store.fetch(a, soon()) == b"value-a"
    store.store(a, b"value-a2", 300, soon())  # replaces
    assert store.fetch(a, soon()) == b"value-a2"
    store.delete(a, soon())
    store.delete(a, soon())  # deleting an absent id is not an error
    assert store.fetch(a, soon()) is None
    assert store.take(b, soon()) == b"value-b"
    assert store.take(b, soon()) is None
    assert store.fetch(b, soon()) is None
    # Ids a store can never have stored: misses, and refused on store.
    assert store.fetch(b"", soon()) is None and store.take(b"x" * 65, soon()) is None
    with pytest.raises(StoreError):
        store.store(b"", b"v", 300, soon())
    health = store.servers()
    assert health and all(h.up and h.failures == 0 for h in health), health
    assert store.server_for(a) in {h.address for h in health}


def test_keys_values_and_expiry_match_apache(make_store: StoreMaker) -> None:
    """mod_socache_redis's key (prefix + lowercase hex id), the raw value, a PX expiry."""
    store = make_store(key_prefix=APACHE_KEY_PREFIX)
    session_id = bytes(range(0xE0, 0x100))
    store.store(session_id, b"\x30\x82der", 299.5, soon())
    key = b"mod_ssl-sess:" + session_id.hex().encode()
    assert len(key) == 77
    owner = store.server_for(session_id)
    assert owner is not None
    (client,) = (
        c for c in raw_clients(store) if owner.endswith(f":{c.get_connection_kwargs()['port']}")
    )
    assert client.get(key) == b"\x30\x82der"
    assert 290_000 < client.pttl(key) <= 299_500, client.pttl(key)
    store.store(session_id, b"v", 0, soon())  # never a zero or negative expiry: gone at once
    store.store(sid(3), b"v", -5, soon())
    # PX 1: gone a millisecond after the write (waited for, bounded: the machine may be busy).
    deadline = time.monotonic() + 5.0
    for gone in (session_id, sid(3)):
        while store.fetch(gone, soon()) is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.fetch(gone, soon()) is None


def test_two_takers_exactly_one_wins(make_store: StoreMaker) -> None:
    store = make_store(key_prefix="take:", pool_size=4)
    ids = [sid(1000 + i) for i in range(300)]
    for i, k in enumerate(ids):
        store.store(k, b"v%d" % i, 60, soon())
    wins: list[list[bytes]] = [[], []]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def taker(n: int) -> None:
        try:
            start.wait(timeout=10)
            for k in ids:
                if store.take(k, Deadline.after(5.0)) is not None:
                    wins[n].append(k)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=taker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    won = Counter(wins[0] + wins[1])
    state = {
        "errors": errors,
        "wins_per_thread": [len(w) for w in wins],
        "ids_won_twice": [k.hex() for k, n in won.items() if n > 1],
        "ids_won_never": [k.hex() for k in ids if k not in won],
    }
    assert not errors and all(n == 1 for n in won.values()) and len(won) == len(ids), pformat(state)


def test_cluster_spreads_keys_over_its_masters(cluster: RedisCluster) -> None:
    n = 10_000
    with RedisClusterStore(cluster.nodes, key_prefix="spread:") as store:
        placed: Counter[str | None] = Counter()
        for i in range(n):
            store.store(sid(i), b"v", 60, soon())
            placed[store.server_for(sid(i))] += 1
        held = {}
        for node in cluster.masters:
            client = redis.Redis(port=node.port, socket_timeout=5)
            held[node.address] = sum(1 for _ in client.scan_iter(match="spread:*", count=1000))
            client.close()
        ratio = max(held.values()) / min(held.values())
        print(f"keys per master over {n}: {held}, max/min {ratio:.3f}")
        assert held == dict(placed) and sum(held.values()) == n, (held, placed)
        assert ratio < 1.1, held
        assert {h.address for h in store.servers()} == set(held)


def test_stopped_server_costs_one_timeout_per_down_period() -> None:
    clock = Clock()
    with redis_server() as srv, RedisStore(srv.url, retry_s=5.0, clock=clock) as store:
        store.store(sid(1), b"v", 60, soon())  # a warm connection
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            before = store.network_attempts
            t0 = time.monotonic()
            with pytest.raises(StoreTimeout):
                store.fetch(sid(1), Deadline.after(0.3))
            outcomes = []
            for i in range(20):  # generous deadlines: none of them may be waited out
                try:
                    got = store.fetch(sid(i), Deadline.after(2.0))
                    outcomes.append("answered" if got is not None else "skipped: miss")
                except StoreTimeout:
                    outcomes.append("timeout")
                except StoreError:
                    outcomes.append("fast error")
            elapsed = time.monotonic() - t0
            health = store.servers()
            state = pformat(
                {
                    "attempts": store.network_attempts - before,
                    "outcomes": Counter(outcomes),
                    "elapsed_s": elapsed,
                    "health": health,
                }
            )
            assert store.network_attempts - before == 1, state
            assert outcomes == ["skipped: miss"] * 20, state
            assert elapsed < 2.0, state  # 21 calls, not one 2 s timeout among them
            assert health == (ServerHealth(srv.address, False, 1, 5.0),), state
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert store.fetch(sid(1), soon()) is None  # still inside the down period: skipped
        assert store.store(sid(1), b"w", 60, soon()) is WriteStatus.SENT  # not written
        assert store.network_attempts - before == 1
        clock.now += 5.0
        assert store.fetch(sid(1), soon()) == b"v"
        assert store.network_attempts - before == 2
        assert store.servers() == (ServerHealth(srv.address, True, 0, None),)


def test_refused_connection_is_a_store_error_and_a_down_period() -> None:
    clock = Clock()
    with redis_server() as srv:
        url = srv.url
    with RedisStore(url, retry_s=5.0, clock=clock) as store:  # nobody listens there now
        with pytest.raises(StoreError) as info:
            store.store(sid(1), b"v", 60, soon())
        assert not isinstance(info.value, StoreTimeout)
        assert store.fetch(sid(1), soon()) is None  # down: a miss without the network
        assert store.network_attempts == 1
        (health,) = store.servers()
        assert not health.up and health.failures == 1, health


def test_killed_master_loses_only_its_own_keys() -> None:
    with redis_cluster() as cluster, RedisClusterStore(cluster.nodes, key_prefix="k:") as store:
        ids = [sid(i) for i in range(300)]
        owner = {}
        for k in ids:
            store.store(k, b"v" + k, 60, soon())
            owner[k] = store.server_for(k)
        victim = cluster.masters[1]
        victim.proc.kill()
        victim.proc.wait(timeout=10)
        results: Counter[tuple[bool, str]] = Counter()
        for k in ids:
            on_victim = owner[k] == victim.address
            try:
                got = store.fetch(k, Deadline.after(1.0))
                results[(on_victim, "hit" if got == b"v" + k else "miss")] += 1
            except StoreError as exc:
                results[(on_victim, type(exc).__name__)] += 1
        lost = sum(1 for k in ids if owner[k] == victim.address)
        health = {h.address: h for h in store.servers()}
        state = pformat({"results": results, "lost": lost, "health": health})
        assert 50 < lost < 150, state
        assert results[(False, "hit")] == len(ids) - lost, state
        # The first call to meet the dead master fails; the rest are misses without a wait.
        assert results[(True, "StoreError")] == 1, state
        assert results[(True, "miss")] == lost - 1, state
        assert not health[victim.address].up, state
        assert all(h.up for a, h in health.items() if a != victim.address), state


def test_version_without_getdel_is_refused_clearly(server: RedisServer) -> None:
    with RedisStore(server.url) as store:
        (only,) = store._all_servers()
        only.version = (6, 0, 9)  # as an old server would report it
        with pytest.raises(StoreError, match=r"6\.0\.9.*GETDEL.*6\.2"):
            store.take(sid(1), soon())
        assert store.servers()[0].up  # not the server's health


def test_configuration_errors() -> None:
    for kwargs in ({"pool_size": 0}, {"retry_s": 0}, {"connect_timeout_s": -1}):
        with pytest.raises(ConfigurationError):
            RedisStore("redis://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RedisStore("http://127.0.0.1:1")
    with pytest.raises(ConfigurationError):
        RedisClusterStore([])


def test_unix_socket_url(tmp_path: Path) -> None:
    d = tmp_path
    path = d / "redis.sock"
    with (
        redis_server(d, "--unixsocket", str(path), "--unixsocketperm", "700"),
        RedisStore(f"unix://{path}") as store,
    ):
        store.store(sid(1), b"v", 60, soon())
        assert store.take(sid(1), soon()) == b"v"
        assert store.server_for(sid(1)) == f"unix:{path}"


# ---------------------------------------------------------------- sealing, with real handshakes


def _server_context() -> SSL.Context:
    import trustme

    cert = trustme.CA().issue_cert("localhost")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert.configure_cert(ctx)
    return ctx


def _master_key(sess: SSL.Session) -> bytes:
    from OpenSSL._util import ffi, lib

    raw = sess._session
    n = lib.SSL_SESSION_get_master_key(raw, ffi.NULL, 0)
    buf = ffi.new("unsigned char[]", n)
    lib.SSL_SESSION_get_master_key(raw, buf, n)
    return bytes(ffi.buffer(buf, n))


def test_sealed_sessions_in_redis(server: RedisServer) -> None:
    raw = redis.Redis(port=server.port, socket_timeout=5)
    prefix = "sealed:"
    store = RedisStore(server.url, key_prefix=prefix)
    cache = SessionCache(store, keys=KeyRing.generate(), async_writes=False)
    ctx = _server_context()
    cache.install(ctx)
    cctx = client_context("1.2")
    try:
        _, sess = handshake_over_memory(ctx, cctx)
        holder = SSL.Connection(cctx, None)
        holder.set_session(sess)
        the_id = session_id(holder)
        assert the_id, "the client session has no id"
        secret, session_id_hex = _master_key(sess), the_id.hex().encode()
        keys = list(raw.scan_iter(match=prefix + "*"))
        values = {k: raw.get(k) for k in keys}
        state = {"keys": keys, "stats": cache.stats().as_dict()}
        assert len(secret) == 48 and keys, state
        assert all(v is not None and secret not in v for v in values.values()), state
        assert all(session_id_hex not in k for k in keys), state  # keyed lookup names
        assert handshake_over_memory(ctx, cctx, sess)[0], state

        (key,) = keys
        good = values[key]
        assert isinstance(good, bytes)
        tampered = bytearray(good)
        tampered[-1] ^= 1
        planted = [bytes(tampered), b"\x30\x81\x83" + bytes(131), b"x"]
        for value in planted:
            raw.set(key, value, px=60_000)
            assert not handshake_over_memory(ctx, cctx, sess)[0], cache.stats()
        raw.delete(key)
        raw.hset(key, "f", "v")  # not even a string: an error reply, still only a miss
        assert not handshake_over_memory(ctx, cctx, sess)[0]
        stats = cache.stats()
        assert stats.sealed_refused >= 3 and stats.errors >= 1, stats
        raw.delete(key)
        raw.set(key, good, px=60_000)
        assert handshake_over_memory(ctx, cctx, sess)[0], cache.stats()
    finally:
        cache.close()
        store.close()
        raw.close()


def test_moved_reply_is_followed_and_the_map_read_again(cluster: RedisCluster) -> None:
    """A stale slot map (as after a resharding) costs one redirection, then is re-read."""
    clock = Clock()
    with RedisClusterStore(cluster.nodes, key_prefix="moved:", clock=clock) as store:
        k = sid(7)
        store.store(k, b"v", 60, soon())
        owner = store.server_for(k)
        slots = store._slots
        assert slots is not None and owner is not None
        wrong = next(s for s in slots if s is not None and s.address != owner)
        slot = key_slot(store.key(k))
        slots[slot] = wrong  # the map now sends this key to a master that does not own it
        before = store.network_attempts
        assert store.fetch(k, soon()) == b"v"  # MOVED, then the owner
        assert store.network_attempts - before == 2
        assert store.server_for(k) == owner
        clock.now += store.retry_s
        store.fetch(sid(8), soon())  # the map is read again, once
        assert store.server_for(k) == owner and store._slots is not slots


def test_a_forked_child_uses_its_own_connections(server: RedisServer) -> None:
    with RedisStore(server.url, key_prefix="fork:") as store:
        store.store(sid(1), b"parent", 60, soon())  # the parent holds a connection now
        pid = os.fork()
        if pid == 0:  # the child: its own connection; the parent's socket is left alone
            code = 1
            try:
                store.store(sid(2), b"child", 60, soon())
                code = 0 if store.fetch(sid(1), soon()) == b"parent" else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.fetch(sid(2), soon()) == b"child"  # the parent's connection still works
        assert store.network_attempts == 2 and store.servers()[0].failures == 0
