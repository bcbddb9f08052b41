"""Callbacks live exactly as long as their ``SSL_CTX`` (``tlscache.openssl.ctxlife``).

A connection switched to another context by SNI keeps its first ``SSL_CTX`` (OpenSSL's
session context) after the first Python context is gone, and OpenSSL keeps calling that
``SSL_CTX``'s callbacks. Shown on pyOpenSSL and on the standard library's ``ssl``, with
real handshakes over memory BIOs.
"""

from __future__ import annotations

import contextlib
import gc
import ssl
import weakref

import pytest
from OpenSSL import SSL

from tests.openssl.alertpair import Served
from tests.openssl.test_stdlib import client_context
from tests.tlsutil import Certs, skip_without_resolver
from tlscache.exceptions import ResolverError
from tlscache.openssl import callbacks
from tlscache.openssl.callbacks import keep_with_ssl_ctx

skip_without_resolver()


class Token:
    """Something kept with an SSL_CTX, whose lifetime the test watches."""


def test_kept_objects_outlive_the_context_and_go_with_the_ssl_ctx() -> None:
    initial, other = SSL.Context(SSL.TLS_SERVER_METHOD), SSL.Context(SSL.TLS_SERVER_METHOD)
    before = len(callbacks._registry)
    token = Token()
    kept = weakref.ref(token)
    keep_with_ssl_ctx(initial, token)
    keep_with_ssl_ctx(initial, Token())  # the same SSL_CTX: the same entry
    del token
    assert len(callbacks._registry) == before + 1
    conn = SSL.Connection(initial, None)
    conn.set_context(other)  # the SSL keeps ``initial``'s SSL_CTX as its session context
    context = weakref.ref(initial)
    del initial
    gc.collect()
    assert context() is None, "pyOpenSSL still holds the initial Context"
    assert kept() is not None, "the callbacks went with the Python Context"
    del conn
    gc.collect()
    assert kept() is None, "the callbacks outlived the SSL_CTX"
    assert len(callbacks._registry) == before


def _drive(server: ssl.SSLObject, client: ssl.SSLObject, bios: list[ssl.MemoryBIO]) -> None:
    si, so, ci, co = bios
    for end in (client, server):
        with contextlib.suppress(ssl.SSLWantReadError):
            end.do_handshake()
    si.write(co.read())
    ci.write(so.read())


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_stdlib_sessions_are_stored_after_the_initial_context_is_dropped(
    certs: Certs, version: str
) -> None:
    def server_context() -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certs.chain), str(certs.key))
        return ctx

    switched_to = server_context()
    try:
        served = Served(server_context())
    except ResolverError as e:  # pragma: no cover - only where the stdlib path is refused
        pytest.skip(f"stdlib path unavailable: {e}")
    initial, cache = served.ctx, served.cache
    switched: list[bool] = []

    def on_servername(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        obj.context = switched_to
        switched.append(True)

    initial.sni_callback = on_servername
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = initial.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_context(certs, version).wrap_bio(bios[2], bios[3], server_hostname="localhost")
    context = weakref.ref(initial)
    del initial, served
    for _ in range(2):  # the ClientHello, then the server's first flight: the switch is done
        _drive(server, client, bios)
    assert switched and server.context is switched_to
    gc.collect()
    assert context() is None, "the initial SSLContext is still alive"
    for _ in range(10):
        _drive(server, client, bios)
    server.write(b"ping")  # carries the TLS 1.3 tickets
    bios[2].write(bios[1].read())
    assert client.read(4) == b"ping"
    stats = cache.stats()
    # TLS 1.2: the session, at the end of the handshake; TLS 1.3: the tickets after it.
    assert stats.stores >= 1, stats
