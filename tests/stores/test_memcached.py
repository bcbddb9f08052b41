"""MemcachedStore against real memcached processes on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Iterator

import pytest
from OpenSSL import SSL

from tests.memcache.servers import MEMCACHED, MemcachedServer, memcached_servers
from tests.procs import free_port
from tests.tlsutil import client_context, handshake_over_memory
from tlscache import SessionCache
from tlscache.deadline import Deadline
from tlscache.exceptions import ConfigurationError, StoreError, StoreTimeout
from tlscache.keyring import KeyRing
from tlscache.memcache.protocol import MAX_RELATIVE_TTL, Reply, ReplyKind, ReplyParser
from tlscache.openssl.callbacks import session_id
from tlscache.stores.base import MAX_ID_LEN, WriteStatus
from tlscache.stores.memcached import APACHE_KEY_PREFIX, MemcachedStore, apache_index

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MEMCACHED is None, reason="memcached is not installed"),
]


class Clock:
    """A clock the test moves (the store's down periods; deadlines use real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Raw:
    """A plain connection to one memcached, to look at what the store left there."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        self.parser = ReplyParser()

    def meta(self, line: bytes, data: bytes | None = None) -> Reply:
        self.sock.sendall(line + b"\r\n" + (b"" if data is None else data + b"\r\n"))
        while True:
            chunk = self.sock.recv(65536)
            assert chunk, "memcached closed the connection"
            replies = self.parser.feed(chunk)
            if replies:
                (reply,) = replies
                return reply

    def get(self, key: bytes) -> bytes | None:
        reply = self.meta(b"mg " + key + b" v")
        return reply.value if reply.kind is ReplyKind.VALUE else None

    def ttl(self, key: bytes) -> int | None:
        return self.meta(b"mg " + key + b" t").ttl

    def set(self, key: bytes, value: bytes, ttl: int = 60) -> None:
        reply = self.meta(b"ms %s %d T%d" % (key, len(value), ttl), value)
        assert reply.kind is ReplyKind.HEADER, reply

    def keys(self) -> list[bytes]:
        """Every key the server holds (``lru_crawler metadump all``)."""
        self.sock.sendall(b"lru_crawler metadump all\r\n")
        buf = b""
        while not buf.endswith(b"END\r\n"):
            chunk = self.sock.recv(65536)
            assert chunk, "memcached closed the connection"
            buf += chunk
        return [
            urllib.parse.unquote_to_bytes(line.split(b" ", 1)[0].removeprefix(b"key="))
            for line in buf.split(b"\r\n")
            if line.startswith(b"key=")
        ]

    def close(self) -> None:
        self.sock.close()


def soon() -> Deadline:
    return Deadline.after(2.0)


def sid(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


@pytest.fixture(scope="module")
def servers() -> Iterator[list[MemcachedServer]]:
    with memcached_servers(3) as group:
        yield group


@pytest.fixture
def store(servers: list[MemcachedServer]) -> Iterator[MemcachedStore]:
    with MemcachedStore([s.address for s in servers], key_prefix=f"t{time.monotonic_ns()}:") as s:
        yield s


# ---------------------------------------------------------------- the contract


def test_round_trips(store: MemcachedStore) -> None:
    value = bytes(range(256)) + b"\r\nEND\r\n"  # any bytes, line ends included
    assert store.fetch(sid(1), soon()) is None
    assert store.store(sid(1), value, 60, soon()) is WriteStatus.CONFIRMED
    assert store.fetch(sid(1), soon()) == value
    assert store.store(sid(1), b"second", 60, soon()) is WriteStatus.CONFIRMED  # replaces
    assert store.fetch(sid(1), soon()) == b"second"
    store.delete(sid(1), soon())
    store.delete(sid(1), soon())  # absent: not an error
    assert store.fetch(sid(1), soon()) is None
    store.store(sid(2), value, 60, soon())
    assert store.take(sid(2), soon()) == value
    assert store.take(sid(2), soon()) is None
    assert store.fetch(sid(2), soon()) is None
    longest = b"\xff" * MAX_ID_LEN
    store.store(longest, b"v", 60, soon())
    assert store.fetch(longest, soon()) == b"v"
    assert store.fetch(b"", soon()) is None
    assert store.fetch(b"x" * (MAX_ID_LEN + 1), soon()) is None
    with pytest.raises(StoreError):
        store.store(b"", b"v", 60, soon())
    with pytest.raises(StoreError):
        store.store(sid(3), b"", 60, soon())
    assert store.store(sid(3), b"v", 0, soon()) is None  # already expired: not written
    assert store.fetch(sid(3), soon()) is None
    assert all(h.up and h.failures == 0 for h in store.servers()), store.servers()


def test_key_is_prefix_and_lowercase_hex(servers: list[MemcachedServer]) -> None:
    with MemcachedStore([s.address for s in servers], key_prefix="k:") as store:
        the_id = bytes.fromhex("ABCDEF0123")
        store.store(the_id, b"v", 60, soon())
        address = store.server_for(the_id)
        (server,) = [s for s in servers if s.address == address]
        raw = Raw(server.port)
        try:
            assert raw.get(b"k:abcdef0123") == b"v"
        finally:
            raw.close()


def test_two_takers_exactly_one_wins(store: MemcachedStore) -> None:
    n, wins, errors = 300, Counter[int](), []
    barrier = threading.Barrier(2)
    for i in range(n):
        store.store(sid(i), b"v%d" % i, 60, soon())

    def taker() -> None:
        for i in range(n):
            try:
                barrier.wait(timeout=10)
                if store.take(sid(i), Deadline.after(5.0)) == b"v%d" % i:
                    wins[i] += 1
            except Exception as exc:  # reported below with the whole state
                errors.append(repr(exc))
                return

    threads = [threading.Thread(target=taker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    state = {"errors": errors[:3], "keys_not_won_once": [i for i in range(n) if wins[i] != 1]}
    assert not errors and all(wins[i] == 1 for i in range(n)), state
    assert sum(s.calls for s in store.stats()) >= 2 * n, store.stats()


def test_keys_spread_over_the_servers(store: MemcachedStore) -> None:
    n = 10_000
    held = Counter(store.server_for(i.to_bytes(32, "big")) for i in range(n))
    ratio = max(held.values()) / min(held.values())
    print(f"rendezvous over 3 servers, {n} keys: {dict(held)}, max/min {ratio:.3f}")
    assert len(held) == 3 and ratio < 1.3, held
    # The store writes where server_for says.
    for i in range(30):
        store.store(sid(i), b"v", 60, soon())
    raws = {s.address: Raw(s.port) for s in store_servers(store)}
    try:
        for i in range(30):
            key = store.key_prefix.encode() + sid(i).hex().encode()
            where = {a: r.get(key) is not None for a, r in raws.items()}
            assert where == {a: a == store.server_for(sid(i)) for a in raws}, where
    finally:
        for r in raws.values():
            r.close()


def test_ketama_placement_spreads_too(servers: list[MemcachedServer]) -> None:
    with MemcachedStore([s.address for s in servers], placement="ketama") as store:
        held = Counter(store.server_for(i.to_bytes(32, "big")) for i in range(3000))
        print(f"ketama over 3 servers, 3000 keys: {dict(held)}")
        assert len(held) == 3 and max(held.values()) / min(held.values()) < 1.6, held
        store.store(sid(1), b"k", 60, soon())
        assert store.take(sid(1), soon()) == b"k"


def test_rendezvous_places_as_pymemcache_hashclient() -> None:
    from pymemcache.client.hash import HashClient  # type: ignore[import-untyped]

    ports = [11211, 11212, 11213]  # nothing is contacted
    hc = HashClient([("127.0.0.1", p) for p in ports])
    with MemcachedStore([f"127.0.0.1:{p}" for p in ports]) as store:
        for i in range(500):
            the_id = (i * 104729).to_bytes(32, "big")
            assert store.server_for(the_id) == hc.hasher.get_node("tlscache:" + the_id.hex()), i


def store_servers(store: MemcachedStore) -> list[MemcachedServer]:
    """The servers of ``store`` as MemcachedServer records (port from the address)."""
    return [MemcachedServer(port=int(h.address.rsplit(":", 1)[1])) for h in store.servers()]


# ---------------------------------------------------------------- dead servers


def test_killed_server_loses_only_its_share_and_comes_back() -> None:
    clock = Clock()
    with memcached_servers(3) as group:
        victim = group[1]
        store = MemcachedStore([s.address for s in group], retry_s=5.0, clock=clock)
        ids = [sid(i) for i in range(300)]
        for i in ids:
            store.store(i, b"v" + i, 60, soon())
        on_victim = {i for i in ids if store.server_for(i) == victim.address}
        assert 50 < len(on_victim) < 150, len(on_victim)
        before = {s.address: s for s in store.stats()}
        victim.kill()

        slowest, results = 0.0, dict[bytes, bytes | str | None]()
        for i in ids:
            deadline = Deadline.after(2.0)
            started = time.monotonic()
            try:
                results[i] = store.fetch(i, deadline)
            except StoreError as exc:  # the one call that found the server gone
                results[i] = type(exc).__name__
            slowest = max(slowest, time.monotonic() - started)
        after = {s.address: s for s in store.stats()}
        state = {
            "before": before,
            "after": after,
            "health": store.servers(),
            "slowest_s": slowest,
            "failed": [r for r in results.values() if isinstance(r, str)],
        }
        others_hit = all(results[i] == b"v" + i for i in ids if i not in on_victim)
        victim_missed = all(not isinstance(results[i], bytes) for i in on_victim)
        assert others_hit and victim_missed, state
        assert slowest < 1.0, state  # well before the 2 s deadline: nobody waited it out
        tried = after[victim.address].calls - before[victim.address].calls
        assert tried <= 1 and after[victim.address].errors == 1, state
        assert after[victim.address].skipped >= len(on_victim) - 1, state
        (health,) = [h for h in store.servers() if h.address == victim.address]
        assert not health.up and health.failures == 1 and health.retry_in_s == 5.0, state
        # Writes to it are skipped (no verdict), other servers' are confirmed.
        victim_id = next(iter(on_victim))
        assert store.store(victim_id, b"w", 60, soon()) is WriteStatus.SENT, state

        victim.start()  # same port, empty
        assert store.fetch(victim_id, soon()) is None  # still within retry_s: not tried
        assert store.stats()[1].calls == after[victim.address].calls, store.stats()
        clock.now += 5.0
        assert store.fetch(victim_id, soon()) is None  # the probe: a real miss
        assert store.stats()[1].calls == after[victim.address].calls + 1, store.stats()
        assert all(h.up for h in store.servers()), store.servers()
        store.store(victim_id, b"back", 60, soon())
        assert store.fetch(victim_id, soon()) == b"back"
        store.close()


def test_server_that_never_answers_costs_one_timeout_per_period() -> None:
    clock = Clock()
    with socket.socket() as silent:  # accepts connections (backlog), never reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with MemcachedStore([address], retry_s=5.0, clock=clock) as store:
            started = time.monotonic()
            with pytest.raises(StoreTimeout):
                store.fetch(sid(1), Deadline.after(0.3))
            first = time.monotonic() - started
            started = time.monotonic()
            for i in range(50):
                assert store.fetch(sid(i), Deadline.after(2.0)) is None
                assert store.take(sid(i), Deadline.after(2.0)) is None
            rest = time.monotonic() - started
            state = {"first_s": first, "rest_s": rest, "stats": store.stats()}
            assert first < 1.9 and rest < 1.9, state  # neither waited for a 2 s deadline
            assert store.stats()[0].calls == 1 and store.stats()[0].skipped == 100, state


def test_refused_connect_marks_down_without_waiting() -> None:
    clock = Clock()
    address = f"127.0.0.1:{free_port()}"  # nobody listens
    with MemcachedStore([address], clock=clock, retry_s=5.0) as store:
        with pytest.raises(StoreError):
            store.fetch(sid(1), soon())
        for _ in range(20):
            assert store.fetch(sid(1), soon()) is None
        (stats,) = store.stats()
        assert stats.calls == 1 and stats.errors == 1 and stats.skipped == 20, stats
        clock.now += 5.0
        with pytest.raises(StoreError):  # one probe per period
            store.fetch(sid(1), soon())
        assert store.stats()[0].calls == 2, store.stats()


# ---------------------------------------------------------------- Apache mod_ssl


def test_apache_placement_and_key(servers: list[MemcachedServer]) -> None:
    addresses = [s.address for s in servers]
    with MemcachedStore(addresses, placement="apache", key_prefix=APACHE_KEY_PREFIX) as store:
        for i in range(200):
            the_id = (i * 7919).to_bytes(32, "big")
            key = b"mod_ssl-sess:" + the_id.hex().encode()
            h = (zlib.crc32(key) >> 16) & 0x7FFF
            assert store.server_for(the_id) == addresses[(h or 1) % 3], i
            assert apache_index(key, 3) == (h or 1) % 3
        the_id = bytes(range(32))
        key = b"mod_ssl-sess:" + the_id.hex().encode()
        store.store(the_id, b"der", 300, soon())
        raw = Raw(servers[apache_index(key, 3)].port)
        try:
            assert raw.get(key) == b"der"
            assert 290 <= (raw.ttl(key) or 0) <= 300
        finally:
            raw.close()


def test_apache_dead_server_moves_to_next_index(servers: list[MemcachedServer]) -> None:
    clock = Clock()
    dead = f"127.0.0.1:{free_port()}"
    addresses = [servers[0].address, dead, servers[2].address]
    with MemcachedStore(addresses, placement="apache", clock=clock) as store:
        ids = [i.to_bytes(32, "big") for i in range(60)]
        on_dead = [i for i in ids if store.server_for(i) == dead]
        assert on_dead
        with pytest.raises(StoreError):
            store.store(on_dead[0], b"v", 60, soon())
        for i in on_dead:
            assert store.server_for(i) == addresses[2], i  # the next index
            store.store(i, b"moved", 60, soon())
            assert store.fetch(i, soon()) == b"moved"


# ---------------------------------------------------------------- TTLs


def test_ttl_over_30_days_is_absolute_and_ttl_1_expires(store: MemcachedStore) -> None:
    long_ttl = MAX_RELATIVE_TTL + 86400
    store.store(sid(1), b"long", long_ttl, soon())
    store.store(sid(2), b"short", 1, soon())
    assert store.fetch(sid(1), soon()) == b"long"
    address = store.server_for(sid(1))
    (server,) = [s for s in store_servers(store) if s.address == address]
    raw = Raw(server.port)
    try:
        left = raw.ttl(store.key_prefix.encode() + sid(1).hex().encode())
    finally:
        raw.close()
    # memcached keeps whole seconds on its own clock: allow it a couple either side.
    assert left is not None and long_ttl - 60 <= left <= long_ttl + 2, left
    limit = time.monotonic() + 8.0  # memcached's clock ticks in whole seconds
    while store.fetch(sid(2), soon()) is not None:
        assert time.monotonic() < limit, "a 1 s ttl did not expire within 8 s"
        time.sleep(0.1)
    assert store.fetch(sid(1), soon()) == b"long"


# ---------------------------------------------------------------- sealing, real handshakes


def _server_context() -> SSL.Context:
    import trustme

    cert = trustme.CA().issue_cert("localhost")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    cert.configure_cert(ctx)
    return ctx


def _master_key(sess: SSL.Session) -> bytes:
    from OpenSSL._util import ffi, lib

    n = lib.SSL_SESSION_get_master_key(sess._session, ffi.NULL, 0)
    buf = ffi.new("unsigned char[]", n)
    lib.SSL_SESSION_get_master_key(sess._session, buf, n)
    return bytes(ffi.buffer(buf, n))


def test_sealed_sessions_in_memcached() -> None:
    with memcached_servers(1) as (server,):
        raw = Raw(server.port)
        store = MemcachedStore([server.address], key_prefix="sealed:")
        cache = SessionCache(store, keys=KeyRing.generate(), async_writes=False)
        ctx = _server_context()
        cache.install(ctx)
        cctx = client_context("1.2")
        try:
            _, sess = handshake_over_memory(ctx, cctx)
            holder = SSL.Connection(cctx, None)
            holder.set_session(sess)
            the_id = session_id(holder)
            secret = _master_key(sess)
            keys = raw.keys()
            values = {k: raw.get(k) for k in keys}
            state = {"keys": keys, "stats": cache.stats()}
            assert the_id and len(secret) == 48 and len(keys) == 1, state
            assert all(v is not None and secret not in v for v in values.values()), state
            assert all(the_id.hex().encode() not in k for k in keys), state  # keyed names
            assert handshake_over_memory(ctx, cctx, sess)[0], state

            (key,) = keys
            good = values[key]
            assert good is not None
            tampered = bytearray(good)
            tampered[-1] ^= 1
            for planted in (bytes(tampered), b"\x30\x81\x83" + bytes(131), b"x"):
                raw.set(key, planted)
                assert not handshake_over_memory(ctx, cctx, sess)[0], cache.stats()
            stats = cache.stats()
            assert stats.sealed_refused >= 3, stats
            raw.set(key, good)
            assert handshake_over_memory(ctx, cctx, sess)[0], cache.stats()
        finally:
            cache.close()
            store.close()
            raw.close()


# ---------------------------------------------------------------- configuration


def test_configuration_errors() -> None:
    for bad in ([], ["127.0.0.1"], ["127.0.0.1:1", "127.0.0.1:1"], ["[::1]11211"]):
        with pytest.raises(ConfigurationError):
            MemcachedStore(bad)
    with pytest.raises(ConfigurationError):
        MemcachedStore("127.0.0.1:1")
    with pytest.raises(ConfigurationError):
        MemcachedStore(["127.0.0.1:1"], key_prefix="has space")
    with pytest.raises(ConfigurationError):
        MemcachedStore(["127.0.0.1:1"], key_prefix="x" * 200)  # no room for 64-byte ids
    with pytest.raises(ConfigurationError):
        MemcachedStore(["127.0.0.1:1"], placement="modulo")  # type: ignore[arg-type]


def test_unix_socket_and_ipv6() -> None:
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    from tlscache_farm.procs import running

    assert MEMCACHED is not None
    d = tempfile.mkdtemp(prefix="tlscache-mc-")
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    if user:  # memcached drops to nobody before it creates its socket
        os.chown(d, pwd.getpwnam("nobody").pw_uid, -1)
    path = os.path.join(d, "mc.sock")
    argv = [MEMCACHED, "-s", path, "-m", "8", *user]
    try:
        with (
            running(argv, ready=f"UNIX:{path}", stdout=subprocess.DEVNULL),
            MemcachedStore([path]) as store,
        ):
            store.store(sid(1), b"u", 60, soon())
            assert store.take(sid(1), soon()) == b"u"
            assert store.server_for(sid(1)) == path
    finally:
        shutil.rmtree(d, ignore_errors=True)
    if not socket.has_ipv6:
        return
    port = free_port()
    argv = [MEMCACHED, "-l", "::1", "-p", str(port), "-U", "0", "-m", "8", *user]
    try:
        with (
            running(argv, ready=f"IP:[::1]:{port}", stdout=subprocess.DEVNULL),
            MemcachedStore([f"[::1]:{port}"]) as store,
        ):
            store.store(sid(1), b"6", 60, soon())
            assert store.fetch(sid(1), soon()) == b"6"
    except Exception as exc:  # a host without ::1
        if "IP:[::1]" in str(exc):
            pytest.skip("no ::1 on this host")
        raise


def test_forked_child_uses_its_own_connections(store: MemcachedStore) -> None:
    import os

    store.store(sid(1), b"parent", 60, soon())
    assert store.fetch(sid(1), soon()) == b"parent"  # pooled connections exist now
    pid = os.fork()
    if pid == 0:  # the child: its own sockets, the same data
        code = 1
        try:
            inherited = sum(len(s.idle) for s in store._servers)  # the parent's sockets
            ok = inherited == 0 and store.fetch(sid(1), soon()) == b"parent"
            store.store(sid(2), b"child", 60, soon())
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.fetch(sid(2), soon()) == b"child"  # the parent's connections still in step
    assert store.fetch(sid(1), soon()) == b"parent"
