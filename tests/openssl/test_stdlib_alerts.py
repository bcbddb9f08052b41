"""Fatal alerts on the standard library path (the system's libssl), through the remove callback.

An ``ssl.SSLContext`` server with a SessionCache and a Python ``ssl`` client, joined by
memory BIOs: a record that fails authentication deletes the session, a hang-up without
close_notify does not, and no info callback is registered.
"""

from __future__ import annotations

import gc
import ssl

import pytest

from tests.openssl.alertpair import Served, StdlibPair
from tests.openssl.test_stdlib import client_context
from tests.tlsutil import Certs
from tlscache.exceptions import ResolverError
from tlscache.openssl import stdlib

VERSIONS = ["1.2", "1.3"]


@pytest.fixture
def served(certs: Certs) -> Served[ssl.SSLContext]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.chain), str(certs.key))
    try:
        return Served(ctx)
    except ResolverError as e:  # pragma: no cover - only where the stdlib path is refused
        pytest.skip(f"stdlib path unavailable: {e}")


def handshaken(
    served: Served[ssl.SSLContext], certs: Certs, version: str
) -> tuple[StdlibPair, int]:
    """A pair past its handshake (tickets delivered), and how many sessions were stored."""
    pair = StdlibPair(served.ctx, client_context(certs, version))
    pair.handshake()
    stored = len(served.store)
    assert stored >= 1, served.state()
    return pair, stored


def test_no_info_callback_is_registered(served: Served[ssl.SSLContext]) -> None:
    ctx = served.ctx
    verified = stdlib.verify_context(ctx)
    res = stdlib.resolve_stdlib()
    assert int(stdlib._ffi.cast("uintptr_t", res["SSL_CTX_get_info_callback"](verified.raw))) == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_corrupted_record_deletes_the_session(
    certs: Certs, served: Served[ssl.SSLContext], version: str
) -> None:
    store, cache = served.store, served.cache
    pair, stored = handshaken(served, certs, version)
    pair.corrupt_client_record()
    stats = cache.stats()
    # TLS 1.2: the one session. TLS 1.3: the connection's current session (the last ticket);
    # the stdlib path keeps no per-connection record of the others.
    assert stats.alerts_invalidated == 1, stats
    assert len(store) == stored - 1, (len(store), stats)


@pytest.mark.parametrize("version", VERSIONS)
def test_hang_up_deletes_nothing(
    certs: Certs, served: Served[ssl.SSLContext], version: str
) -> None:
    store, cache = served.store, served.cache
    pair, stored = handshaken(served, certs, version)
    pair.client_hangs_up()  # without close_notify
    del pair
    gc.collect()
    stats = cache.stats()
    assert stats.alerts_invalidated == 0, stats
    assert len(store) == stored, (len(store), stats)
