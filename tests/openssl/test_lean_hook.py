"""The info hook's two forms and the per-connection records, through real handshakes.

Without a chained user callback the Context carries the plain hook (it looks at
HANDSHAKE_START and alerts only); a ``set_info_callback`` switches it to the chaining one.
Either way fatal alerts are reported with every session the connection used or was issued.
"""

from __future__ import annotations

import gc
import ssl
import weakref
from typing import Any

import pytest
import trustme
from OpenSSL import SSL
from OpenSSL._util import ffi

from tests.openssl.test_alerts import Events, Pair
from tests.openssl.test_callbacks import TLS12, TLS13, DictHandler, client_context, server_context
from tlscache.openssl import callbacks
from tlscache.openssl.callbacks import install_callbacks, session_id
from tlscache.openssl.resolver import resolve

try:
    resolve()
except Exception as e:  # pragma: no cover - only on platforms the resolver does not support
    pytest.skip(f"resolver unavailable: {e}", allow_module_level=True)

VERSIONS = [pytest.param(TLS12, id="TLS1.2"), pytest.param(TLS13, id="TLS1.3")]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert("localhost")


def registered(ctx: SSL.Context) -> int:
    """The address of the info callback OpenSSL will call for ``ctx``."""
    current = resolve().get("SSL_CTX_get_info_callback")(ctx._context)
    return int(ffi.cast("uintptr_t", current))


def address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


@pytest.mark.parametrize("version", VERSIONS)
def test_plain_hook_reports_fatal_alerts(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    sctx = server_context(leaf)
    h = DictHandler()
    install_callbacks(sctx, h, session_id_context=b"lean")
    hook = getattr(sctx, callbacks._ATTR).hook
    assert registered(sctx) == address(hook.callback), "the plain hook is not the one registered"
    assert hook.previous is None
    pair = Pair(sctx, client_context(ca, version))
    pair.handshake()
    pair.exchange()
    issued = [sid for sid, _, _ in h.new]
    current = session_id(pair.server)
    record = callbacks._records[pair.server]
    assert record.ids == issued, (record.ids, issued)
    pair.corrupt_client_record()
    assert len(h.alerts) == 1, h.alerts
    assert set(h.alerts[0]) == {*issued, current}, (h.alerts, issued, current)
    assert pair.server not in callbacks._records  # reported once, then forgotten


def test_a_user_callback_switches_to_the_chaining_hook(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    sctx = server_context(leaf)
    h = DictHandler()
    install_callbacks(sctx, h, session_id_context=b"lean")
    hook = getattr(sctx, callbacks._ATTR).hook
    events = Events()
    sctx.set_info_callback(events)
    assert registered(sctx) == address(hook.chained), "the chaining hook is not registered"
    install_callbacks(sctx, h, session_id_context=b"lean")  # again: still chained, once
    assert registered(sctx) == address(hook.chained)
    pair = Pair(sctx, client_context(ca, TLS12))
    pair.handshake()
    pair.exchange()
    assert events.handshakes_done == 1, events.seen
    pair.corrupt_client_record()
    assert events.fatal_alerts(SSL.SSL_CB_WRITE_ALERT) == [20], events.seen
    assert len(h.alerts) == 1, h.alerts


def test_records_live_on_the_connection(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    sctx = server_context(leaf)
    install_callbacks(sctx, DictHandler(), session_id_context=b"lean")
    pair = Pair(sctx, client_context(ca, TLS13))
    pair.handshake()
    pair.exchange()
    record = vars(pair.server)[callbacks._RECORD_ATTR]
    assert record is callbacks._records[pair.server]
    assert len(record.ids) == 2, record.ids  # OpenSSL's two TLS 1.3 tickets
    gone = weakref.ref(pair.server)
    del pair
    gc.collect()
    assert gone() is None
