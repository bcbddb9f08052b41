"""Fatal alerts on the standard library path (the system's libssl), through the remove callback.

An ``ssl.SSLContext`` server with a SessionCache and a Python ``ssl`` client, joined by
memory BIOs: a record that fails authentication deletes the session, a hang-up without
close_notify does not, and no info callback is registered.
"""

from __future__ import annotations

import contextlib
import gc
import ssl
from collections.abc import Iterator

import pytest

from tests.openssl.test_stdlib import client_context
from tests.tlsutil import Certs
from tlscache import MemoryStore, SessionCache
from tlscache.exceptions import ResolverError
from tlscache.openssl import stdlib

VERSIONS = ["1.2", "1.3"]


class StdlibPair:
    def __init__(self, server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        self.si, self.so, self.ci, self.co = (ssl.MemoryBIO() for _ in range(4))
        self.server = server.wrap_bio(self.si, self.so, server_side=True)
        self.client = client.wrap_bio(self.ci, self.co, server_hostname="localhost")

    def pump(self) -> None:
        self.si.write(self.co.read())
        self.ci.write(self.so.read())

    def handshake(self) -> None:
        for _ in range(10):
            for end in (self.client, self.server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
            self.pump()
        self.server.write(b"ping")  # carries the TLS 1.3 tickets
        self.pump()
        assert self.client.read(4) == b"ping"


@pytest.fixture
def served(certs: Certs) -> Iterator[tuple[ssl.SSLContext, MemoryStore, SessionCache]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.chain), str(certs.key))
    store = MemoryStore()
    cache = SessionCache(store)
    try:
        cache.install(ctx)
    except ResolverError as e:  # pragma: no cover - only where the stdlib path is refused
        pytest.skip(f"stdlib path unavailable: {e}")
    yield ctx, store, cache


def test_no_info_callback_is_registered(
    served: tuple[ssl.SSLContext, MemoryStore, SessionCache],
) -> None:
    ctx, _, _ = served
    verified = stdlib.verify_context(ctx)
    res = stdlib.resolve_stdlib()
    assert int(stdlib._ffi.cast("uintptr_t", res["SSL_CTX_get_info_callback"](verified.raw))) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_corrupted_record_deletes_the_session(
    certs: Certs, served: tuple[ssl.SSLContext, MemoryStore, SessionCache], version: str
) -> None:
    ctx, store, cache = served
    pair = StdlibPair(ctx, client_context(certs, version))
    pair.handshake()
    stored = len(store)
    assert stored >= 1, cache.stats()
    pair.client.write(b"tampered")
    record = bytearray(pair.co.read())
    record[-1] ^= 0x01
    pair.si.write(bytes(record))
    with pytest.raises(ssl.SSLError):
        pair.server.read(100)
    stats = cache.stats()
    # TLS 1.2: the one session. TLS 1.3: the connection's current session (the last ticket);
    # the stdlib path keeps no per-connection record of the others.
    assert stats.alerts_invalidated == 1, stats
    assert len(store) == stored - 1, (len(store), stats)


@pytest.mark.parametrize("version", VERSIONS)
def test_hang_up_deletes_nothing(
    certs: Certs, served: tuple[ssl.SSLContext, MemoryStore, SessionCache], version: str
) -> None:
    ctx, store, cache = served
    pair = StdlibPair(ctx, client_context(certs, version))
    pair.handshake()
    stored = len(store)
    pair.si.write_eof()  # the client hangs up without close_notify
    with pytest.raises(ssl.SSLError):
        pair.server.read(100)
    del pair
    gc.collect()
    stats = cache.stats()
    assert stats.alerts_invalidated == 0, stats
    assert len(store) == stored, (len(store), stats)
