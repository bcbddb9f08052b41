"""Non-blocking resumption: the ClientHello callback pauses the handshake for the lookup.

Real TLS: an asyncio server (:mod:`tlscache.aio_server`, pyOpenSSL over memory BIOs) and
Python ``ssl`` clients on loopback; stores are in-process (wrapped to be slow, or to fail)
or a real dc_server with sealed sessions. The loop is shown not to be blocked by a store
call that cannot finish until the loop itself has run: a blocked loop would never release it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
import struct
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from OpenSSL._util import lib

from tests.procs import free_port, running, tool
from tests.tlsutil import client_context, handshake_over_memory, ssl_connect
from tlscache import Deadline, MemoryStore, SessionCache, SessionStore, WrappingStore
from tlscache.aio_server import TLSStream, serve
from tlscache.exceptions import StoreError, StoreTimeout
from tlscache.keyring import KeyRing
from tlscache.openssl.clienthello import (
    NonblockingResumption,
    offers_tls13,
    parse_psk_identities,
)
from tlscache.stores.distcache import DistcacheStore

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: Generous: a loaded machine meets it, so no expected resumption is lost to a timeout.
DEADLINE_MS = 5000.0


# ---------------------------------------------------------------- parser (no I/O)


def psk_body(identities: list[bytes], binder_len: int = 32) -> bytes:
    ids = b"".join(struct.pack(">H", len(i)) + i + b"\0\0\0\0" for i in identities)
    binders = b"".join(bytes([binder_len]) + b"\xab" * binder_len for _ in identities)
    return struct.pack(">H", len(ids)) + ids + struct.pack(">H", len(binders)) + binders


def test_psk_parser_reads_well_formed_bodies() -> None:
    ticket = bytes(range(32))
    assert parse_psk_identities(psk_body([ticket])) == (ticket,)
    assert parse_psk_identities(psk_body([b"x" * 100, ticket])) == (b"x" * 100, ticket)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        b"\x00\x00\x00\x00",
        psk_body([bytes(32)])[:-1],  # truncated binder
        psk_body([bytes(32)]) + b"\x00",  # trailing byte
        psk_body([bytes(32)], binder_len=31),  # binder too short
        b"\xff\xff" + psk_body([bytes(32)])[2:],  # identities longer than the body
        psk_body([bytes(32)] * 17),  # too many identities
        struct.pack(">H", 7) + b"\x00\x00" + b"\0" * 5 + psk_body([bytes(32)])[-35:],  # empty id
    ],
)
def test_psk_parser_refuses_malformed_bodies(body: bytes) -> None:
    assert parse_psk_identities(body) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_psk_parser_never_raises_on_random_input(body: bytes) -> None:
    found = parse_psk_identities(body)
    assert found is None or (0 < len(found) <= 16 and all(found)), (body.hex(), found)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=16),
    st.integers(min_value=0, max_value=400),
    st.integers(min_value=0, max_value=255),
)
def test_psk_parser_mutations(ids: list[bytes], at: int, value: int) -> None:
    """A valid body parses to its ids; one changed byte parses to ids or None, never raises."""
    body = psk_body(ids)
    assert parse_psk_identities(body) == tuple(ids)
    mutated = bytearray(body)
    mutated[at % len(body)] = value
    found = parse_psk_identities(bytes(mutated))
    assert found is None or all(len(i) > 0 for i in found), (body.hex(), found)


def test_supported_versions() -> None:
    assert offers_tls13(b"\x04\x03\x04\x03\x03")
    assert not offers_tls13(b"\x02\x03\x03")
    assert not offers_tls13(b"\x05\x03\x04\x03\x03")  # length does not fit
    assert not offers_tls13(b"")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cert") / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def server_context(pem: Path) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pem))
    ctx.use_privatekey_file(str(pem))
    return ctx


class Clients:
    """Python ``ssl`` client contexts, one per version (a session only works with its own)."""

    def __init__(self, ca: trustme.CA) -> None:
        self.contexts = {}
        for name, version in VERSIONS.items():
            c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ca.configure_trust(c)
            c.minimum_version = c.maximum_version = version
            self.contexts[name] = c

    def connect(
        self, port: int, version: str, session: ssl.SSLSession | None = None
    ) -> tuple[bytes, ssl.SSLSession, bool]:
        """One connection: (the server's line, the session, whether the client saw reuse)."""
        return ssl_connect(self.contexts[version], port, session)


async def report(stream: TLSStream) -> None:
    await stream.send(b"reused=%d waits=%d\n" % (stream.resumed, stream.lookup_waits))


@contextlib.contextmanager
def nonblocking(
    pem: Path, cache: SessionCache
) -> Iterator[tuple[SSL.Context, NonblockingResumption]]:
    ctx = server_context(pem)
    nb = NonblockingResumption(cache)
    nb.install(ctx)
    try:
        yield ctx, nb
    finally:
        nb.close()


def state(cache: SessionCache, nb: NonblockingResumption) -> str:
    return f"cache={cache.stats().as_dict()}\nnonblocking={nb.stats()._asdict()}"


class Gate(WrappingStore):
    """A store whose lookups wait for the test to open the gate (at most 30 s)."""

    def __init__(self, inner: SessionStore) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = True

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if self.closed:
            self.entered.set()
            self.release.wait(30)
        return self.inner.fetch(session_id, deadline)


class Failing(WrappingStore):
    """Lookups find nothing (``miss``), time out at their deadline (``timeout``) or fail
    at once (``error``)."""

    def __init__(self, inner: SessionStore, mode: str) -> None:
        super().__init__(inner)
        self.mode = mode

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        if self.mode == "miss":
            return None
        if self.mode == "timeout":
            threading.Event().wait(max(0.0, deadline.remaining()))
            raise StoreTimeout("lookup timed out")
        raise StoreError("store down")


# ---------------------------------------------------------------- handshakes


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resumes_through_the_nonblocking_path(pem: Path, ca: trustme.CA, version: str) -> None:
    cache = SessionCache(MemoryStore(), deadline_ms=DEADLINE_MS)
    clients = Clients(ca)

    async def main() -> tuple[bytes, bytes, bool]:
        with nonblocking(pem, cache) as (ctx, nb):
            server = await serve(ctx, report, "127.0.0.1", 0, resumption=nb)
            port = server.sockets[0].getsockname()[1]
            try:
                first, sess, _ = await asyncio.to_thread(clients.connect, port, version)
                second, _, reused = await asyncio.to_thread(clients.connect, port, version, sess)
            finally:
                server.close()
            assert first.startswith(b"reused=0") and second.startswith(b"reused=1"), (
                first,
                second,
                state(cache, nb),
            )
            assert reused, state(cache, nb)
            stats = nb.stats()
            # A fast store may answer before the callback looks: then there is no pause.
            assert (stats.started, stats.answered, stats.not_prefetched) == (1, 1, 0), state(
                cache, nb
            )
            assert cache.stats().hits == 1, state(cache, nb)
            return first, second, reused

    asyncio.run(main())


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_loop_runs_while_a_lookup_is_in_flight(pem: Path, ca: trustme.CA, version: str) -> None:
    """The store's lookup only finishes after the loop ran 20 ticker steps: a blocked loop
    would hold the lookup (and the handshake) until the 30 s gate timeout."""
    store = Gate(MemoryStore())
    cache = SessionCache(store, deadline_ms=60_000)
    clients = Clients(ca)
    ticks = 0
    ticks_at_release: list[int] = []

    async def main() -> bytes:
        nonlocal ticks
        with nonblocking(pem, cache) as (ctx, nb):
            server = await serve(ctx, report, "127.0.0.1", 0, resumption=nb)
            port = server.sockets[0].getsockname()[1]
            try:
                store.closed = False
                _, sess, _ = await asyncio.to_thread(clients.connect, port, version)
                store.closed = True
                second = asyncio.create_task(
                    asyncio.to_thread(clients.connect, port, version, sess)
                )
                for _ in range(3000):  # bounded: 30 s
                    if store.entered.is_set():
                        break
                    await asyncio.sleep(0.01)
                assert store.entered.is_set(), state(cache, nb)
                for _ in range(20):
                    ticks += 1
                    await asyncio.sleep(0)
                ticks_at_release.append(ticks)
                store.release.set()
                line, _, reused = await second
            finally:
                server.close()
            assert reused and line == b"reused=1 waits=1\n", (line, state(cache, nb))
            return line

    asyncio.run(main())
    assert ticks_at_release == [20]


@pytest.mark.parametrize("mode", ["miss", "timeout", "error", "breaker"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_no_session_gives_a_full_handshake(
    pem: Path, ca: trustme.CA, version: str, mode: str
) -> None:
    store = Failing(MemoryStore(), "error" if mode == "breaker" else mode)
    threshold = 1 if mode == "breaker" else 5
    cache = SessionCache(store, deadline_ms=100, breaker_threshold=threshold, breaker_reset_s=600)
    clients = Clients(ca)

    async def main() -> None:
        with nonblocking(pem, cache) as (ctx, nb):
            server = await serve(ctx, report, "127.0.0.1", 0, resumption=nb)
            port = server.sockets[0].getsockname()[1]
            try:
                _, sess, _ = await asyncio.to_thread(clients.connect, port, version)
                rounds = 2 if mode == "breaker" else 1
                lines = []
                for _ in range(rounds):
                    line, _, reused = await asyncio.to_thread(clients.connect, port, version, sess)
                    lines.append((line, reused))
            finally:
                server.close()
            assert all(line.startswith(b"reused=0") and not r for line, r in lines), (
                lines,
                state(cache, nb),
            )
            s = cache.stats()
            expected = {
                "miss": (s.misses, 1),
                "timeout": (s.timeouts, 1),
                "error": (s.errors, 1),
                "breaker": ((s.errors, s.skipped), (1, 1)),
            }[mode]
            assert expected[0] == expected[1], state(cache, nb)
            assert s.hits == 0, state(cache, nb)

    asyncio.run(main())


@pytest.mark.integration
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_sealed_sessions_through_a_real_dc_server(pem: Path, ca: trustme.CA, version: str) -> None:
    """Two servers (Contexts, caches) share one dc_server with sealed sessions: a session
    made on the blocking one resumes on the non-blocking one."""
    address = f"IP:127.0.0.1:{free_port()}"
    keys = KeyRing.generate()
    clients = Clients(ca)
    with (
        running(tool("dc_server", "-listen", address), ready=address),
        DistcacheStore(address) as store_a,
        DistcacheStore(address) as store_b,
    ):
        if True:
            blocking = SessionCache(store_a, keys=keys, deadline_ms=DEADLINE_MS)
            ctx_a = server_context(pem)
            blocking.install(ctx_a)
            cache_b = SessionCache(store_b, keys=keys, deadline_ms=DEADLINE_MS)

            async def main() -> None:
                with nonblocking(pem, cache_b) as (ctx_b, nb):
                    a = await serve(ctx_a, report, "127.0.0.1", 0)
                    b = await serve(ctx_b, report, "127.0.0.1", 0, resumption=nb)
                    try:
                        port_a = a.sockets[0].getsockname()[1]
                        port_b = b.sockets[0].getsockname()[1]
                        _, sess, _ = await asyncio.to_thread(clients.connect, port_a, version)
                        line, _, reused = await asyncio.to_thread(
                            clients.connect, port_b, version, sess
                        )
                    finally:
                        a.close()
                        b.close()
                    assert reused and line.startswith(b"reused=1"), (
                        line,
                        blocking.stats().as_dict(),
                        state(cache_b, nb),
                    )
                    assert (nb.stats().answered, cache_b.stats().hits) == (1, 1), state(cache_b, nb)

            asyncio.run(main())


# ---------------------------------------------------------------- hostile ClientHello


def _extensions_at(hello: bytes) -> int:
    """Offset of the extensions block in a TLS record holding one ClientHello."""
    pos = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
    pos += 1 + hello[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(hello[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + hello[pos]  # legacy_compression_methods
    return pos + 2


def _find_extension(hello: bytes, kind: int) -> tuple[int, int]:
    pos = _extensions_at(hello)
    while pos + 4 <= len(hello):
        ext, length = struct.unpack_from(">HH", hello, pos)
        if ext == kind:
            return pos + 4, length
        pos += 4 + length
    raise AssertionError(f"no extension {kind} in the ClientHello")


@pytest.mark.parametrize(
    "corrupt",
    ["identities_overlong", "identity_overlong", "binders_short", "zero_identities"],
)
def test_malformed_psk_extension_is_refused_safely(pem: Path, corrupt: str) -> None:
    """A ClientHello whose pre_shared_key body does not parse: no lookup is started, no
    session is resumed, nothing crashes."""
    cache = SessionCache(MemoryStore(), deadline_ms=DEADLINE_MS)
    with nonblocking(pem, cache) as (ctx, nb):
        client = client_context("1.3")
        _, sess = handshake_over_memory(ctx, client)
        c = SSL.Connection(client, None)
        c.set_connect_state()
        c.set_session(sess)
        with contextlib.suppress(SSL.WantReadError):
            c.do_handshake()
        hello = bytearray(c.bio_read(65536))
        at, length = _find_extension(bytes(hello), 41)
        if corrupt == "identities_overlong":
            hello[at : at + 2] = b"\xff\xff"
        elif corrupt == "identity_overlong":
            hello[at + 2 : at + 4] = b"\xff\xf0"
        elif corrupt == "binders_short":
            ids_len = int.from_bytes(hello[at : at + 2], "big")
            hello[at + 2 + ids_len : at + 4 + ids_len] = b"\x00\x01"
        else:
            hello[at : at + 2] = b"\x00\x00"
        assert len(hello) == at + length  # pre_shared_key is the last extension
        s = SSL.Connection(ctx, None)
        s.set_accept_state()
        s.bio_write(bytes(hello))
        # OpenSSL refuses some of these outright; others it reads as "no usable PSK" and
        # goes on with a full handshake (then it waits for the client: WantReadError).
        with pytest.raises(SSL.Error):
            s.do_handshake()
        assert not lib.SSL_session_reused(s._ssl)
        assert nb.paused_lookup(s) is None
        stats = nb.stats()
        assert (stats.malformed, stats.started, stats.paused) == (1, 0, 0), state(cache, nb)
        assert cache.stats().lookups == 0, state(cache, nb)


def test_lookups_beyond_max_pending_get_a_full_handshake(pem: Path, ca: trustme.CA) -> None:
    """With one lookup held in flight and ``max_pending=1``, the next ClientHello starts no
    lookup (``overloaded``) and gets a full handshake at once; the held one then resumes."""
    store = Gate(MemoryStore())
    cache = SessionCache(store, deadline_ms=60_000)
    clients = Clients(ca)
    ctx = server_context(pem)
    nb = NonblockingResumption(cache, max_pending=1)
    nb.install(ctx)

    async def main() -> None:
        server = await serve(ctx, report, "127.0.0.1", 0, resumption=nb)
        port = server.sockets[0].getsockname()[1]
        try:
            store.closed = False
            _, sess1, _ = await asyncio.to_thread(clients.connect, port, "1.2")
            _, sess2, _ = await asyncio.to_thread(clients.connect, port, "1.2")
            store.closed = True
            held = asyncio.create_task(asyncio.to_thread(clients.connect, port, "1.2", sess1))
            for _ in range(3000):  # bounded: 30 s
                if store.entered.is_set():
                    break
                await asyncio.sleep(0.01)
            assert store.entered.is_set(), state(cache, nb)
            line, _, reused = await asyncio.to_thread(clients.connect, port, "1.2", sess2)
            assert line.startswith(b"reused=0") and not reused, (line, state(cache, nb))
            store.release.set()
            line, _, reused = await held
            assert line.startswith(b"reused=1") and reused, (line, state(cache, nb))
        finally:
            server.close()
            nb.close()
        stats = nb.stats()
        assert (stats.overloaded, stats.started, stats.paused) == (1, 1, 1), state(cache, nb)

    asyncio.run(main())


@pytest.mark.parametrize("version", list(VERSIONS))
def test_context_dropped_before_the_client_hello(pem: Path, version: str) -> None:
    """The ClientHello and get callbacks live as long as OpenSSL's SSL_CTX: a Connection
    whose Python Context is gone still pauses, looks up and resumes (no freed callback)."""
    cache = SessionCache(MemoryStore(), deadline_ms=DEADLINE_MS)
    ctx = server_context(pem)
    nb = NonblockingResumption(cache)
    nb.install(ctx)
    client = client_context(version)
    try:
        _, sess = handshake_over_memory(ctx, client)
        s = SSL.Connection(ctx, None)
        s.set_accept_state()
        ref = weakref.ref(ctx)
        # As after an SNI switch, Python lets go of the first Context while OpenSSL goes on
        # using its SSL_CTX for this connection (the C-level SSL is unchanged here).
        s._context = server_context(pem)
        del ctx
        gc.collect()
        assert ref() is None  # the Context is gone; its SSL_CTX lives on inside ``s``
        c = SSL.Connection(client, None)
        c.set_connect_state()
        c.set_session(sess)
        done = [False, False]
        for _ in range(40):  # bounded exchanges; a paused handshake waits for its lookup
            for i, conn in enumerate((c, s)):
                if done[i]:
                    continue
                try:
                    conn.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error:
                    lookup = nb.paused_lookup(s) if conn is s else None
                    assert lookup is not None, state(cache, nb)
                    lookup.result(timeout=30)  # type: ignore[union-attr]
            for src, dst in ((c, s), (s, c)):
                with contextlib.suppress(SSL.WantReadError):
                    dst.bio_write(src.bio_read(65536))
            if all(done):
                break
        assert all(done), state(cache, nb)
        assert lib.SSL_session_reused(s._ssl), state(cache, nb)
        assert nb.stats().answered == 1, state(cache, nb)
    finally:
        nb.close()
