"""Fatal alerts reach ``on_fatal_alert`` with the ids of the connection's sessions.

Real handshakes between a pyOpenSSL server and a Python ``ssl`` client, through memory BIOs
(deterministic) and, once, over a socket pair.
"""

from __future__ import annotations

import contextlib
import gc
import socket
import ssl
import threading
from typing import Any

import pytest
import trustme
from OpenSSL import SSL
from OpenSSL._util import lib

from tests.openssl.alertpair import VERSIONS, Events, Pair, connect
from tests.openssl.test_callbacks import (
    TLS12,
    TLS13,
    DictHandler,
    RaisingHandler,
    client_context,
    server_context,
)
from tests.tlsutil import skip_without_resolver
from tlscache.openssl import callbacks
from tlscache.openssl.callbacks import install_callbacks, session_id

skip_without_resolver()


def setup(leaf: trustme.LeafCert, handler: Any = None) -> tuple[SSL.Context, Any, Events]:
    """A server Context with a user info callback, then the cache (``DictHandler`` default)."""
    sctx = server_context(leaf)
    events = Events()
    sctx.set_info_callback(events)
    h = handler if handler is not None else DictHandler()
    install_callbacks(sctx, h, session_id_context=b"alerts")
    return sctx, h, events


# --------------------------------------------------------------------------- fatal alerts


@pytest.mark.parametrize("version", VERSIONS)
def test_corrupted_record_reports_the_issued_sessions(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    """The server reads a record that fails authentication and sends bad_record_mac."""
    sctx, h, events = setup(leaf)
    pair = connect(sctx, client_context(ca, version))
    current = session_id(pair.server)
    issued = [sid for sid, _, _ in h.new]
    assert len(issued) == (1 if version == TLS12 else 2)
    assert h.alerts == []
    pair.corrupt_client_record()
    assert events.fatal_alerts(lib.SSL_CB_WRITE_ALERT) == [20]  # bad_record_mac
    assert len(h.alerts) == 1
    assert set(h.alerts[0]) == {*issued, current}
    assert set(issued) <= set(h.alerts[0])
    assert h.contexts == {b"alerts"}


@pytest.mark.parametrize("version", VERSIONS)
def test_corrupted_record_after_resumption_reports_the_resumed_session(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    sctx, h, _ = setup(leaf)
    cctx = client_context(ca, version)
    first = connect(sctx, cctx)
    first.close_cleanly()
    issued_first = {sid for sid, _, _ in h.new}

    second = connect(sctx, cctx, first.client.session)
    assert second.client.session_reused
    offered = h.gets[-1]
    assert offered in issued_first
    issued_second = {sid for sid, _, _ in h.new} - issued_first
    second.corrupt_client_record()
    assert len(h.alerts) == 1
    assert offered in h.alerts[0]
    assert issued_second <= set(h.alerts[0])
    # Only this connection's sessions: the other ticket of the first connection is not named.
    assert set(h.alerts[0]) <= {offered, *issued_second, session_id(second.server)}


@pytest.mark.parametrize("version", VERSIONS)
def test_alert_read_from_the_client_reports_the_sessions(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    """The client receives a corrupted record and sends bad_record_mac; the server reads it."""
    sctx, h, events = setup(leaf)
    pair = connect(sctx, client_context(ca, version))
    issued = {sid for sid, _, _ in h.new}
    pair.corrupt_server_record()
    assert events.fatal_alerts(lib.SSL_CB_READ_ALERT) == [20]
    assert len(h.alerts) == 1
    assert issued <= set(h.alerts[0])


@pytest.mark.parametrize("version", VERSIONS)
def test_client_refusing_the_certificate(leaf: trustme.LeafCert, version: ssl.TLSVersion) -> None:
    """The client does not trust the server's CA and sends a fatal alert during the handshake.

    TLS 1.2: the session the server had begun (its id was in the ServerHello) is reported.
    TLS 1.3: no session has an id before the tickets, so there is nothing to report.
    """
    sctx, h, events = setup(leaf)
    pair = Pair(sctx, client_context(trustme.CA(), version))  # trusts another CA
    with pytest.raises(ssl.SSLCertVerificationError):
        pair.handshake()
    pair.to_server()
    with pytest.raises(SSL.Error):
        pair.server.do_handshake()
    assert events.fatal_alerts(lib.SSL_CB_READ_ALERT) in ([48], [42])  # unknown_ca, bad_cert
    if version == TLS12:
        sid = session_id(pair.server)
        assert sid
        assert h.alerts == [(sid,)]
    else:
        assert h.alerts == []
    assert h.new == []


# --------------------------------------------------------------------------- not alerts


@pytest.mark.parametrize("version", VERSIONS)
def test_close_without_close_notify_is_not_an_alert(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    """OpenSSL answers the hang-up with a decode_error alert of its own: not a failure."""
    sctx, h, events = setup(leaf)
    pair = connect(sctx, client_context(ca, version))
    pair.client_hangs_up()
    assert events.handshakes_done >= 1
    assert h.alerts == []


@pytest.mark.parametrize("version", VERSIONS)
def test_clean_close_is_not_an_alert(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    sctx, h, events = setup(leaf)
    pair = connect(sctx, client_context(ca, version))
    pair.close_cleanly()
    assert h.alerts == []
    assert events.fatal_alerts(0) == []


def _serve_once(sctx: SSL.Context, sock: socket.socket, errors: list[BaseException]) -> None:
    try:
        conn = SSL.Connection(sctx, sock)
        conn.set_accept_state()
        conn.do_handshake()
        conn.sendall(b"x")
        with contextlib.suppress(SSL.Error):
            conn.recv(100)  # the client hangs up here
    except BaseException as e:  # reported by the test thread
        errors.append(e)


@pytest.mark.integration
@pytest.mark.parametrize("version", VERSIONS)
def test_socket_closed_without_close_notify_is_not_an_alert(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    sctx, h, _ = setup(leaf)
    s_server, s_client = socket.socketpair()
    s_client.settimeout(30)
    errors: list[BaseException] = []
    t = threading.Thread(target=_serve_once, args=(sctx, s_server, errors), daemon=True)
    t.start()
    try:
        tls = client_context(ca, version).wrap_socket(s_client, server_hostname="localhost")
        assert tls.recv(1) == b"x"
        tls.close()  # no close_notify
    finally:
        t.join(60)
        s_server.close()
    assert not t.is_alive()
    assert not errors
    assert h.new
    assert h.alerts == []


# --------------------------------------------------------------------------- user callbacks


def test_user_callback_set_before_install_still_sees_events(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    sctx, h, events = setup(leaf)  # set_info_callback, then install
    pair = connect(sctx, client_context(ca, TLS12))
    assert events.handshakes_done == 1
    pair.corrupt_client_record()
    assert events.fatal_alerts(lib.SSL_CB_WRITE_ALERT) == [20]
    assert len(h.alerts) == 1


def test_user_callback_set_after_install_is_chained(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    sctx = server_context(leaf)
    h = DictHandler()
    install_callbacks(sctx, h)
    first, later = Events(), Events()
    sctx.set_info_callback(first)
    sctx.set_info_callback(later)  # replaces ``first``, as pyOpenSSL always did
    pair = connect(sctx, client_context(ca, TLS13))
    assert later.handshakes_done == 1
    assert first.seen == []
    pair.corrupt_client_record()
    assert later.fatal_alerts(lib.SSL_CB_WRITE_ALERT) == [20]
    assert len(h.alerts) == 1  # ours was not dropped


def test_reinstalling_does_not_call_twice(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    sctx, _, events = setup(leaf)
    h2 = DictHandler()
    install_callbacks(sctx, h2, session_id_context=b"second")
    pair = connect(sctx, client_context(ca, TLS12))
    pair.corrupt_client_record()
    assert events.handshakes_done == 1
    assert len(h2.alerts) == 1
    assert h2.contexts == {b"second"}


def test_raising_handler_does_not_disturb_the_connection(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    sctx, h, events = setup(leaf, RaisingHandler())
    pair = connect(sctx, client_context(ca, TLS12))
    pair.corrupt_client_record()  # SSL.Error as without the cache, nothing else
    assert events.fatal_alerts(lib.SSL_CB_WRITE_ALERT) == [20]
    assert h.calls >= 2  # on_new, on_fatal_alert
    assert lib.ERR_peek_error() == 0


# --------------------------------------------------------------------------- bookkeeping


def test_connection_records_go_with_the_connection(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    sctx, _, _ = setup(leaf)
    pair = connect(sctx, client_context(ca, TLS13))
    assert pair.server in callbacks._records
    assert len(callbacks._records[pair.server].ids) == 2
    before = len(callbacks._records)
    del pair
    gc.collect()
    assert len(callbacks._records) == before - 1


def test_ids_per_connection_are_bounded(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    sctx, _, _ = setup(leaf)
    pair = Pair(sctx, client_context(ca, TLS13))
    pair.handshake()
    h = DictHandler()
    for i in range(40):
        callbacks._remember(pair.server._ssl, h, b"c", bytes([i]) * 32)
    ids = callbacks._records[pair.server].ids
    assert len(ids) == callbacks._MAX_IDS_PER_CONNECTION
    assert ids[-1] == bytes([39]) * 32
