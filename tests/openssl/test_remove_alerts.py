"""Fatal alerts through OpenSSL's remove callback, and callbacks that live with the SSL_CTX.

No info callback is registered: real handshakes (pyOpenSSL server, Python ``ssl`` client,
memory BIOs) show that a fatal alert, sent or received, still deletes every session the
connection used or was issued, that an unclean close deletes nothing, and that the
callbacks stay registered exactly as long as OpenSSL keeps the ``SSL_CTX``.
"""

from __future__ import annotations

import gc
import ssl
import weakref
from collections.abc import Iterator

import pytest
import trustme
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from tests.openssl.alertpair import (
    VERSIONS,
    Events,
    Pair,
    Served,
    connect,
)
from tests.openssl.test_callbacks import TLS12, TLS13, DictHandler, client_context, server_context
from tests.tlsutil import skip_without_resolver
from tlscache.openssl import callbacks
from tlscache.openssl.callbacks import install_callbacks, session_id
from tlscache.openssl.resolver import resolve

skip_without_resolver()


@pytest.fixture
def collected() -> Iterator[None]:
    """Collect before and after, so that connections of other tests do not count."""
    gc.collect()
    yield
    gc.collect()


def info_callback_of(ctx: SSL.Context) -> int:
    return int(ffi.cast("uintptr_t", resolve().get("SSL_CTX_get_info_callback")(ctx._context)))


def test_no_info_callback_is_registered(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    served = Served(server_context(leaf))
    assert info_callback_of(served.ctx) == 0
    events = Events()
    served.ctx.set_info_callback(events)  # pyOpenSSL's own, nothing chained
    assert info_callback_of(served.ctx) == int(ffi.cast("uintptr_t", served.ctx._info_callback))
    pair = connect(served.ctx, client_context(ca, TLS12))
    pair.corrupt_client_record()
    assert events.handshakes_done == 1, events.seen
    assert events.fatal_alerts(lib.SSL_CB_WRITE_ALERT) == [20], events.seen
    stats = served.cache.stats()
    assert (len(served.store), stats.alerts_invalidated) == (0, 1), served.state()


@pytest.mark.parametrize("version", VERSIONS)
def test_unclean_close_deletes_nothing(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion, collected: None
) -> None:
    """No close_notify, then the SSL is freed: OpenSSL calls remove, which is not an alert."""
    served = Served(server_context(leaf))
    pair = connect(served.ctx, client_context(ca, version))
    stored = len(served.store)
    assert stored == (1 if version == TLS12 else 2), served.state()
    pair.client_hangs_up()  # OpenSSL sends decode_error itself
    del pair
    gc.collect()
    stats = served.cache.stats()
    assert len(served.store) == stored, served.state()
    assert stats.alerts_invalidated == 0, served.state()
    assert stats.removes_ignored >= 1, served.state()


@pytest.mark.parametrize("version", VERSIONS)
def test_alert_sent_deletes_the_sessions(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    """A resumed connection, then a record that fails authentication: bad_record_mac sent.

    TLS 1.3: the resumed ticket and the new ticket of that connection (OpenSSL issues one
    on resumption) are deleted, the first connection's other ticket stays.
    """
    served = Served(server_context(leaf))
    cctx = client_context(ca, version)
    first = connect(served.ctx, cctx)
    first.close_cleanly()
    issued_first = len(served.store)
    second = connect(served.ctx, cctx, first.client.session)
    assert second.client.session_reused, served.state()
    before = len(served.store)
    assert before == (1 if version == TLS12 else 3), served.state()
    second.corrupt_client_record()
    stats = served.cache.stats()
    expected = 1 + before - issued_first  # the resumed session and those issued since
    assert stats.alerts_invalidated == expected, served.state()
    assert len(served.store) == before - expected, served.state()


@pytest.mark.parametrize("version", VERSIONS)
def test_alert_received_deletes_the_sessions(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    """The client gets a corrupted record and sends bad_record_mac; the server reads it."""
    served = Served(server_context(leaf))
    pair = connect(served.ctx, client_context(ca, version))
    assert len(served.store) == (1 if version == TLS12 else 2), served.state()
    pair.corrupt_server_record()
    stats = served.cache.stats()
    assert len(served.store) == 0, served.state()  # TLS 1.3: both tickets
    assert stats.alerts_invalidated == (1 if version == TLS12 else 2), served.state()


def test_client_certificate_failing_verification_reports_the_session(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    """The server refuses the client's certificate and sends a fatal alert mid-handshake."""
    sctx = server_context(leaf)
    other = trustme.CA()
    sctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    sctx.get_cert_store().add_cert(  # trusts ``ca`` only; the client's cert is from ``other``
        __import__("OpenSSL.crypto").crypto.X509.from_cryptography(
            __import__("cryptography.x509").x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        )
    )
    h = DictHandler()
    install_callbacks(sctx, h, session_id_context=b"client-cert")
    cctx = client_context(ca, TLS12)
    other.issue_cert("client").configure_cert(cctx)
    pair = Pair(sctx, cctx)
    with pytest.raises((SSL.Error, ssl.SSLError)):
        pair.handshake()
    sid = session_id(pair.server)
    assert sid, "no session was begun"
    assert h.alerts == [(sid,)], (h.alerts, h.removes, h.new)
    assert h.new == [], h.new


def test_context_freed_while_a_connection_uses_it(
    ca: trustme.CA, leaf: trustme.LeafCert, collected: None
) -> None:
    """The Python Context goes at once; its SSL_CTX, and the callbacks, with the Connection."""
    h = DictHandler()
    sctx = server_context(leaf)
    before = len(callbacks._registry)
    install_callbacks(sctx, h, session_id_context=b"lifetime")
    assert len(callbacks._registry) == before + 1
    switched_to = server_context(leaf)
    sctx.set_tlsext_servername_callback(lambda conn: conn.set_context(switched_to))
    pair = Pair(sctx, client_context(ca, TLS13))
    pair.handshake()  # the switch makes pyOpenSSL drop its reference to ``sctx``
    assert len(h.new) == 2, h.new
    ref = weakref.ref(sctx)
    del sctx
    gc.collect()
    assert ref() is None
    assert len(callbacks._registry) == before + 1, "the callbacks went with the Context"
    pair.exchange()
    pair.corrupt_client_record()  # handled by the callbacks of the freed Context
    assert len(h.alerts) == 1 and set(h.alerts[0]) == {s for s, _, _ in h.new}, h.alerts
    del pair
    gc.collect()
    assert len(callbacks._registry) == before, "the callbacks outlived the SSL_CTX"


def test_sni_switch_then_the_first_context_dropped(
    ca: trustme.CA, leaf: trustme.LeafCert, collected: None
) -> None:
    served = Served(server_context(leaf))
    switched_to = server_context(leaf)
    served.ctx.set_tlsext_servername_callback(lambda conn: conn.set_context(switched_to))
    before = len(callbacks._registry)
    pair = Pair(served.ctx, client_context(ca, TLS12))
    pair.handshake()
    assert pair.server.get_context() is switched_to
    ref = weakref.ref(served.ctx)
    del served.ctx
    gc.collect()
    assert ref() is None
    pair.exchange()
    assert served.cache.stats().stores == 1, served.state()
    pair.corrupt_client_record()
    assert len(served.store) == 0, served.state()
    del pair
    gc.collect()
    assert len(callbacks._registry) == before - 1, served.state()


def test_record_index_follows_the_connection(
    ca: trustme.CA, leaf: trustme.LeafCert, collected: None
) -> None:
    """The sid -> record index is weak: it empties with the connections."""
    sctx = server_context(leaf)
    install_callbacks(sctx, DictHandler(), session_id_context=b"index")
    pair = connect(sctx, client_context(ca, TLS13))
    record = callbacks._records[pair.server]
    assert len(record.ids) == 2, record.ids
    assert all(callbacks._by_sid.get(sid) is record for sid in record.ids)
    ids = list(record.ids)
    del pair, record
    gc.collect()
    assert not any(sid in callbacks._by_sid for sid in ids)


def test_record_index_is_bounded_per_connection(
    ca: trustme.CA, leaf: trustme.LeafCert, collected: None
) -> None:
    sctx = server_context(leaf)
    h = DictHandler()
    install_callbacks(sctx, h, session_id_context=b"index")
    pair = Pair(sctx, client_context(ca, TLS13))
    pair.handshake()
    record = callbacks._records[pair.server]
    ids = [bytes([i]) * 32 for i in range(40)]
    for sid in ids:
        callbacks._remember(pair.server._ssl, h, b"index", sid)
    indexed = [sid for sid in ids if callbacks._by_sid.get(sid) is record]
    assert indexed == record.ids == ids[-callbacks._MAX_IDS_PER_CONNECTION :], indexed
