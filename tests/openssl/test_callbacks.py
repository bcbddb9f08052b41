"""Real TLS handshakes through the session callbacks: pyOpenSSL server, Python ``ssl`` client.

Most tests pump records between the two ends through memory BIOs (deterministic, no threads);
one runs over a socket pair with a server thread.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from OpenSSL._util import lib
from packaging.version import Version

from tests.tlsutil import skip_without_resolver
from tlscache.exceptions import ConfigurationError
from tlscache.lograte import RateLimitedLog
from tlscache.openssl import callbacks
from tlscache.openssl.callbacks import (
    default_session_id_context,
    install_callbacks,
    session_id,
)

skip_without_resolver()

# --------------------------------------------------------------------------- helpers


@dataclass
class DictHandler:
    """An in-memory store that records every call."""

    store: dict[bytes, bytes] = field(default_factory=dict)
    new: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    gets: list[bytes] = field(default_factory=list)
    removes: list[bytes] = field(default_factory=list)
    alerts: list[tuple[bytes, ...]] = field(default_factory=list)
    contexts: set[bytes] = field(default_factory=set)

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        self.contexts.add(context)
        self.new.append((session_id, der, timeout_s))
        self.store[session_id] = der

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        self.contexts.add(context)
        self.gets.append(session_id)
        return self.store.get(session_id)

    def on_remove(self, context: bytes, session_id: bytes) -> None:
        self.contexts.add(context)
        self.removes.append(session_id)
        self.store.pop(session_id, None)

    def on_fatal_alert(self, context: bytes, session_ids: Sequence[bytes]) -> None:
        self.contexts.add(context)
        self.alerts.append(tuple(session_ids))


class MissHandler(DictHandler):
    """Stores nothing it is given back: every lookup misses."""

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        self.gets.append(session_id)
        return None


class RaisingHandler:
    calls = 0

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        self.calls += 1
        raise RuntimeError("store down")

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        self.calls += 1
        raise RuntimeError("store down")

    def on_remove(self, context: bytes, session_id: bytes) -> None:
        self.calls += 1
        raise RuntimeError("store down")

    def on_fatal_alert(self, context: bytes, session_ids: Sequence[bytes]) -> None:
        self.calls += 1
        raise RuntimeError("store down")


class GarbageHandler(DictHandler):
    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        self.gets.append(session_id)
        return b"\x30\x03garbage" if session_id in self.store else None


def server_context(leaf: trustme.LeafCert) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate(x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()))
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ctx.use_privatekey(key)
    return ctx


def client_context(ca: trustme.CA, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.minimum_version = version
    ctx.maximum_version = version
    return ctx


@dataclass
class Result:
    server_reused: bool
    client_reused: bool
    session: ssl.SSLSession | None
    server_session_id: bytes | None
    version: str | None


def handshake(
    sctx: SSL.Context, cctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> Result:
    """One connection through memory BIOs: handshake, one record each way, clean shutdown."""
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = cctx.wrap_bio(cin, cout, server_hostname="localhost", session=session)
    server = SSL.Connection(sctx, None)
    server.set_accept_state()

    def flush() -> None:
        data = cout.read()
        if data:
            server.bio_write(data)
        for _ in range(64):
            try:
                chunk = server.bio_read(65536)
            except SSL.WantReadError:
                break
            cin.write(chunk)

    cdone = sdone = False
    for _ in range(50):
        if not cdone:
            try:
                client.do_handshake()
                cdone = True
            except ssl.SSLWantReadError:
                pass
        flush()
        if not sdone:
            try:
                server.do_handshake()
                sdone = True
            except SSL.WantReadError:
                pass
        flush()
        if cdone and sdone:
            break
    assert cdone and sdone, "handshake did not complete"
    # Application data: the client reads past the TLS 1.3 NewSessionTickets.
    server.send(b"ping")
    flush()
    assert client.read(4) == b"ping"
    client.write(b"pong")
    flush()
    assert server.recv(4) == b"pong"
    sid = session_id(server)
    reused = bool(lib.SSL_session_reused(server._ssl))
    server.shutdown()
    flush()
    with contextlib.suppress(ssl.SSLError):
        client.unwrap()
    return Result(reused, client.session_reused, client.session, sid, client.version())


TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3

# --------------------------------------------------------------------------- TLS 1.2


def test_tls12_new_then_resume_via_get(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS12)

    first = handshake(sctx, cctx)
    assert first.version == "TLSv1.2"
    assert not first.server_reused
    assert len(h.new) == 1
    sid, der, timeout = h.new[0]
    assert len(sid) == 32
    assert der[:1] == b"\x30" and 80 < len(der) < 2048
    assert timeout > 0
    assert first.server_session_id == sid

    second = handshake(sctx, cctx, first.session)
    assert second.server_reused and second.client_reused
    assert h.gets[-1] == sid
    assert len(h.new) == 1  # a resumed TLS 1.2 session is not stored again
    assert h.removes == []


def test_tls12_internal_cache_is_off(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = MissHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    assert sctx.get_session_cache_mode() == 0x302
    cctx = client_context(ca, TLS12)
    first = handshake(sctx, cctx)
    second = handshake(sctx, cctx, first.session)
    assert h.gets == [h.new[0][0]]
    assert not second.server_reused and not second.client_reused


def test_wiped_store_means_no_resumption(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS12)
    first = handshake(sctx, cctx)
    h.store.clear()
    assert not handshake(sctx, cctx, first.session).server_reused


def test_session_shared_between_contexts(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    """Two servers (contexts) with one store: a session made on one resumes on the other."""
    h = DictHandler()
    a, b = server_context(leaf), server_context(leaf)
    install_callbacks(a, h, session_id_context=b"farm")
    install_callbacks(b, h, session_id_context=b"farm")
    for version in (TLS12, TLS13):
        cctx = client_context(ca, version)
        first = handshake(a, cctx)
        assert handshake(b, cctx, first.session).server_reused


def test_different_session_id_context_does_not_resume(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    h = DictHandler()
    a, b = server_context(leaf), server_context(leaf)
    install_callbacks(a, h, session_id_context=b"service-a")
    install_callbacks(b, h, session_id_context=b"service-b")
    cctx = client_context(ca, TLS12)
    first = handshake(a, cctx)
    assert not handshake(b, cctx, first.session).server_reused


# --------------------------------------------------------------------------- TLS 1.3


def test_tls13_stateful_tickets(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS13)

    first = handshake(sctx, cctx)
    assert first.version == "TLSv1.3"
    assert len(h.new) == 2  # two tickets by default
    assert all(len(sid) == 32 for sid, _, _ in h.new)
    assert first.session is not None

    second = handshake(sctx, cctx, first.session)
    assert second.server_reused and second.client_reused
    assert h.gets and h.gets[-1] in h.store
    assert len(h.new) == 3  # one new ticket per resumption


def test_tls13_num_tickets(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h, num_tickets=1)
    handshake(sctx, client_context(ca, TLS13))
    assert len(h.new) == 1


def test_tls13_stateless_tickets_bypass_store(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = MissHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h, stateful_tls13_tickets=False, disable_internal_cache=False)
    cctx = client_context(ca, TLS13)
    first = handshake(sctx, cctx)
    assert handshake(sctx, cctx, first.session).server_reused
    assert h.gets == []


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_raising_handler_never_breaks_handshakes(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion, caplog: Any
) -> None:
    h = RaisingHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, version)
    first = handshake(sctx, cctx)
    second = handshake(sctx, cctx, first.session)
    assert not second.server_reused
    assert h.calls >= 2
    # Nothing is left on OpenSSL's error queue to confuse the next call.
    assert lib.ERR_peek_error() == 0


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_garbage_from_store_is_a_miss(
    ca: trustme.CA, leaf: trustme.LeafCert, version: ssl.TLSVersion
) -> None:
    h = GarbageHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, version)
    first = handshake(sctx, cctx)
    second = handshake(sctx, cctx, first.session)
    assert h.gets
    assert not second.server_reused
    assert lib.ERR_peek_error() == 0


def test_session_under_another_id_is_refused(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    """A store answering with some other session's DER must not resume it."""
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS12)
    first = handshake(sctx, cctx)
    other = handshake(sctx, cctx)
    sid1, sid2 = h.new[0][0], h.new[1][0]
    h.store[sid1] = h.store[sid2]
    assert not handshake(sctx, cctx, first.session).server_reused
    assert other.server_session_id == sid2


def test_bad_arguments(leaf: trustme.LeafCert) -> None:
    sctx = server_context(leaf)
    with pytest.raises(ConfigurationError):
        install_callbacks(sctx, DictHandler(), session_id_context=b"x" * 33)
    with pytest.raises(ConfigurationError):
        install_callbacks(sctx, DictHandler(), session_id_context=b"")
    with pytest.raises(ConfigurationError):
        install_callbacks(sctx, DictHandler(), num_tickets=-1)
    with pytest.raises(ConfigurationError):
        install_callbacks(sctx, object())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- lifetime


def test_callbacks_survive_gc(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    install_callbacks(sctx, h)  # replacing keeps both sets alive
    cctx12, cctx13 = client_context(ca, TLS12), client_context(ca, TLS13)
    session12 = handshake(sctx, cctx12).session
    session13 = handshake(sctx, cctx13).session
    gc.collect()
    for _ in range(20):
        assert handshake(sctx, cctx12, session12).server_reused
        assert handshake(sctx, cctx13, session13).server_reused
        gc.collect()


def test_context_is_collected_and_callbacks_unregistered(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    """The callbacks live as long as the SSL_CTX: dropped when OpenSSL frees it.

    (A handler must not refer to its Context: the callbacks hold the handler until the
    SSL_CTX is freed, which that reference would prevent.)
    """
    h = DictHandler()
    sctx = server_context(leaf)
    before = len(callbacks._registry)
    install_callbacks(sctx, h)
    assert len(callbacks._registry) == before + 1
    handshake(sctx, client_context(ca, TLS12))
    ref, href = weakref.ref(sctx), weakref.ref(h)
    del sctx, h
    gc.collect()
    assert ref() is None
    assert len(callbacks._registry) == before, callbacks._registry
    assert href() is None, "the handler outlived the SSL_CTX"


def test_unclean_close_calls_remove(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    """Documented OpenSSL behaviour the cache layer must cope with."""
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context(ca, TLS12).wrap_bio(cin, cout, server_hostname="localhost")
    server = SSL.Connection(sctx, None)
    server.set_accept_state()
    for _ in range(20):
        for step in (client.do_handshake, server.do_handshake):
            with contextlib.suppress(ssl.SSLWantReadError, SSL.WantReadError):
                step()
            if data := cout.read():
                server.bio_write(data)
            with contextlib.suppress(SSL.WantReadError):
                cin.write(server.bio_read(65536))
    assert len(h.new) == 1
    del server, step  # the bound method would keep the Connection alive
    gc.collect()
    assert h.removes == [h.new[0][0]]


# --------------------------------------------------------------------------- sockets


def serve(sctx: SSL.Context, sock: socket.socket, count: int) -> None:
    """Accept ``count`` TLS connections on a connected socket pair end, one after another."""
    for _ in range(count):
        conn = SSL.Connection(sctx, sock)
        conn.set_accept_state()
        conn.do_handshake()
        conn.sendall(b"x")
        conn.recv(1)
        conn.shutdown()
        sock.recv(1)  # the client's "done" byte, outside TLS


@pytest.mark.integration
def test_socketpair_resumption(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS13)
    count = 30
    s_server, s_client = socket.socketpair()
    s_client.settimeout(10)  # the server end stays blocking: pyOpenSSL wants that
    errors: list[BaseException] = []

    def run() -> None:
        try:
            serve(sctx, s_server, count)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    session = None
    reused = 0
    try:
        for _ in range(count):
            cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = cctx.wrap_bio(cin, cout, server_hostname="localhost", session=session)
            _drive(tls, cin, cout, s_client)
            reused += tls.session_reused
            session = tls.session
            s_client.sendall(b"d")
    finally:
        t.join(10)
        s_server.close()
        s_client.close()
    assert not errors
    assert reused == count - 1


def _drive(tls: ssl.SSLObject, cin: ssl.MemoryBIO, cout: ssl.MemoryBIO, s: socket.socket) -> None:
    """Client side over a socket through memory BIOs (stops exactly at close_notify)."""

    def io(op: Any) -> Any:
        for _ in range(100):
            try:
                result = op()
            except ssl.SSLWantReadError:
                if data := cout.read():
                    s.sendall(data)
                cin.write(s.recv(65536))
                continue
            if data := cout.read():
                s.sendall(data)
            return result
        raise AssertionError("no progress")

    io(tls.do_handshake)
    assert io(lambda: tls.read(1)) == b"x"
    io(lambda: tls.write(b"y"))
    with contextlib.suppress(ssl.SSLZeroReturnError):
        io(tls.read)


# --------------------------------------------------------------------------- switches


def test_disabled_resolver_raises_cleanly() -> None:
    code = (
        "from OpenSSL import SSL\n"
        "from tlscache.exceptions import ResolverError\n"
        "from tlscache.openssl.callbacks import install_callbacks\n"
        "class H:\n"
        "    def on_new(self, c, s, d, t): pass\n"
        "    def on_get(self, c, s, v=None): return None\n"
        "    def on_remove(self, c, s): pass\n"
        "    def on_fatal_alert(self, c, s): pass\n"
        "try:\n"
        "    install_callbacks(SSL.Context(SSL.TLS_SERVER_METHOD), H())\n"
        "except ResolverError as e:\n"
        "    print('refused:', e.reason)\n"
        "    raise SystemExit(3)\n"
    )
    env = {**os.environ, "TLSCACHE_DISABLE_RESOLVER": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert "disabled by TLSCACHE_DISABLE_RESOLVER" in proc.stdout


def test_install_on_a_used_context_is_refused(leaf: trustme.LeafCert) -> None:
    sctx = server_context(leaf)
    conn = SSL.Connection(sctx, None)
    with pytest.raises(ConfigurationError, match="before"):
        install_callbacks(sctx, DictHandler())
    del conn


def test_install_works_after_set_cipher_list(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    """pyOpenSSL 25.1's set_cipher_list makes a throwaway Connection: that is not use."""
    sctx = server_context(leaf)
    sctx.set_cipher_list(b"ECDHE+AESGCM")
    h = DictHandler()
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS12)
    first = handshake(sctx, cctx)
    assert handshake(sctx, cctx, first.session).server_reused


def test_install_returns_the_context_it_set(leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    assert install_callbacks(server_context(leaf), h, session_id_context=b"svc") == b"svc"
    sctx = server_context(leaf)
    context = install_callbacks(sctx, h)
    assert context == default_session_id_context(sctx) and len(context) == 32


def test_handler_calls_carry_the_context(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h, session_id_context=b"svc-a")
    cctx = client_context(ca, TLS12)
    handshake(sctx, cctx, handshake(sctx, cctx).session)
    assert h.new and h.gets
    assert h.contexts == {b"svc-a"}


def test_session_id_without_session(leaf: trustme.LeafCert) -> None:
    assert session_id(SSL.Connection(server_context(leaf), None)) is None


def test_default_session_id_context_is_shared_and_follows_verify_mode(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    h = DictHandler()
    a, b, strict = server_context(leaf), server_context(leaf), server_context(leaf)
    strict.set_verify(SSL.VERIFY_PEER, None)
    with_client_cas(strict, ca)
    for ctx in (a, b, strict):
        install_callbacks(ctx, h)
    cctx = client_context(ca, TLS12)
    first = handshake(a, cctx)
    assert handshake(b, cctx, first.session).server_reused
    # Made without a client-certificate request: not resumable where one is requested.
    assert not handshake(strict, cctx, first.session).server_reused


def with_client_cas(ctx: SSL.Context, *cas: trustme.CA) -> SSL.Context:
    for authority in cas:
        ctx.add_client_ca(x509.load_pem_x509_certificate(authority.cert_pem.bytes()))
    return ctx


def test_default_session_id_context_follows_the_client_cas(leaf: trustme.LeafCert) -> None:
    one, two = trustme.CA(), trustme.CA()
    plain = default_session_id_context(server_context(leaf))
    a = default_session_id_context(with_client_cas(server_context(leaf), one))
    b = default_session_id_context(with_client_cas(server_context(leaf), two))
    both = default_session_id_context(with_client_cas(server_context(leaf), one, two))
    both_reversed = default_session_id_context(with_client_cas(server_context(leaf), two, one))
    assert len({plain, a, b, both}) == 4
    assert both == both_reversed  # the names' order does not matter
    assert a == default_session_id_context(with_client_cas(server_context(leaf), one))


def test_default_session_id_context_follows_the_certificate(ca: trustme.CA) -> None:
    leaf_a, leaf_b = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    assert default_session_id_context(server_context(leaf_a)) != default_session_id_context(
        server_context(leaf_b)
    )


def test_default_session_id_context_refuses_unnamed_client_cas(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    """Verifying clients against a trust store alone could share sessions across services."""
    ctx = server_context(leaf)
    ctx.set_verify(SSL.VERIFY_PEER, None)
    with pytest.raises(ConfigurationError, match="names no client CAs"):
        install_callbacks(ctx, DictHandler())
    assert install_callbacks(ctx, DictHandler(), session_id_context=b"svc") == b"svc"
    named = with_client_cas(server_context(leaf), ca)
    named.set_verify(SSL.VERIFY_PEER, None)
    assert len(install_callbacks(named, DictHandler())) == 32


def test_default_session_id_context_needs_a_certificate() -> None:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    with pytest.raises(ConfigurationError, match="load the certificate"):
        install_callbacks(ctx, DictHandler())
    assert install_callbacks(ctx, DictHandler(), session_id_context=b"explicit") == b"explicit"


_DEFAULT_CONTEXT_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from OpenSSL import SSL
from cryptography import x509
from tlscache.openssl.callbacks import default_session_id_context

ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
ctx.use_certificate_chain_file(sys.argv[2])
ctx.use_privatekey_file(sys.argv[3])
with open(sys.argv[4], "rb") as f:
    ctx.add_client_ca(x509.load_pem_x509_certificate(f.read()))
ctx.set_verify(SSL.VERIFY_PEER, None)
print(default_session_id_context(ctx).hex())
"""


@pytest.mark.integration
def test_default_session_id_context_is_stable_across_processes(
    leaf: trustme.LeafCert, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    chain, key, cas = tmp_path / "chain.pem", tmp_path / "key.pem", tmp_path / "cas.pem"
    chain.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    cas.write_bytes(client_ca.cert_pem.bytes())
    root = str(Path(__file__).resolve().parents[2])
    outputs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _DEFAULT_CONTEXT_SCRIPT, root, chain, key, cas],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outputs.append(proc.stdout.strip())
    here = with_client_cas(server_context(leaf), client_ca)
    here.set_verify(SSL.VERIFY_PEER, None)
    assert outputs == [default_session_id_context(here).hex()] * 2


def test_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RateLimitedLog(interval=60.0, logger=logging.getLogger("tlscache.openssl.callbacks"))
    with caplog.at_level(logging.WARNING, logger="tlscache.openssl.callbacks"):
        for _ in range(5):
            limiter("get", "store down")
        limiter("new", "store down")
    assert [r.getMessage() for r in caplog.records] == ["store down", "store down"]
    limiter._next["get"] = 0.0
    with caplog.at_level(logging.WARNING, logger="tlscache.openssl.callbacks"):
        limiter("get", "store down")
    assert caplog.records[-1].getMessage() == "store down (4 similar suppressed)"


@pytest.mark.integration
def test_concurrent_handshakes_share_one_context(ca: trustme.CA, leaf: trustme.LeafCert) -> None:
    """cffi drops the GIL around OpenSSL calls: callbacks run on many threads at once."""
    h = DictHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    lock = threading.Lock()
    reused: list[bool] = []
    errors: list[BaseException] = []

    def worker(version: ssl.TLSVersion) -> None:
        try:
            cctx = client_context(ca, version)
            session = handshake(sctx, cctx).session
            for _ in range(15):
                r = handshake(sctx, cctx, session)
                with lock:
                    reused.append(r.server_reused)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(v,)) for v in (TLS12, TLS13) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(reused) == 90 and all(reused)


_SNI_SCRIPT = """
import gc, ssl, sys, weakref
sys.path.insert(0, sys.argv[1])
from OpenSSL import SSL
from tests.openssl.test_callbacks import DictHandler, client_context, server_context, TLS12
from tlscache.openssl import callbacks
from tlscache.openssl.callbacks import install_callbacks
import trustme

ca = trustme.CA(); leaf = ca.issue_cert("localhost")
h = DictHandler()
a, b = server_context(leaf), server_context(leaf)
a.set_tlsext_servername_callback(lambda conn: conn.set_context(b))
install_callbacks(a, h)
conn = SSL.Connection(a, None)
conn.set_accept_state()
cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
client = client_context(ca, TLS12).wrap_bio(cin, cout, server_hostname="localhost")


def pump():
    for step in (client.do_handshake, conn.do_handshake):
        try:
            step()
        except (ssl.SSLWantReadError, SSL.WantReadError):
            pass
        if data := cout.read():
            conn.bio_write(data)
        try:
            cin.write(conn.bio_read(65536))
        except SSL.WantReadError:
            pass


pump()  # ClientHello -> servername callback -> the Connection now uses b
assert conn.get_context() is b
ref = weakref.ref(a)
registered = len(callbacks._registry)
del a  # pyOpenSSL's Connection no longer refers to it; its SSL uses it as session context
gc.collect()
assert ref() is None, "the Context outlives its last reference"
assert len(callbacks._registry) == registered, "the SSL_CTX's callbacks went with the Context"
for _ in range(20):
    pump()
del conn  # freed without shutdown: OpenSSL calls remove on the session context
gc.collect()
assert len(callbacks._registry) == registered - 1, "callbacks kept after the SSL_CTX was freed"
new, removes = len(h.new), len(h.removes)

# A Connection with its own info callback: nothing of ours depends on info callbacks.
a = server_context(leaf)
a.set_tlsext_servername_callback(lambda conn: conn.set_context(b))
install_callbacks(a, h)
conn = SSL.Connection(a, None)
conn.set_info_callback(lambda conn, where, ret: None)
conn.set_accept_state()
cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
client = client_context(ca, TLS12).wrap_bio(cin, cout, server_hostname="localhost")
pump()
assert conn.get_context() is b
ref = weakref.ref(a)
del a
gc.collect()
assert ref() is None, "Context still alive"
for _ in range(20):
    pump()
del conn
gc.collect()
print("ok", new, removes, len(h.new) - new, len(h.removes) - removes)
"""


@pytest.mark.integration
def test_context_dies_before_its_ssl_ctx() -> None:
    """SNI switching: the initial Context dies at once, while its SSL_CTX, whose callbacks
    OpenSSL keeps calling, lives as long as its Connection (sessions stored, remove seen);
    the callbacks go when the SSL_CTX is freed. Also with a per-Connection info callback."""
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.run(
        [sys.executable, "-c", _SNI_SCRIPT, root],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "1", "1", "1", "1"], proc.stdout


class ExitingHandler:
    """Raises what ``except Exception`` does not catch: cffi's ``onerror`` must."""

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        raise SystemExit(1)

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        raise GeneratorExit

    def on_remove(self, context: bytes, session_id: bytes) -> None:
        raise SystemExit(1)

    def on_fatal_alert(self, context: bytes, session_ids: Sequence[bytes]) -> None:
        raise SystemExit(1)


def test_base_exceptions_do_not_escape(
    ca: trustme.CA, leaf: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    sctx = server_context(leaf)
    install_callbacks(sctx, ExitingHandler())
    cctx = client_context(ca, TLS12)
    first = handshake(sctx, cctx)
    assert not handshake(sctx, cctx, first.session).server_reused
    assert lib.ERR_peek_error() == 0


class InterruptedHandler(DictHandler):
    """Stands for a signal handler that raises KeyboardInterrupt inside a callback."""

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        super().on_new(context, session_id, der, timeout_s)
        raise KeyboardInterrupt


def test_keyboard_interrupt_in_a_callback_is_delivered_again(
    ca: trustme.CA, leaf: trustme.LeafCert
) -> None:
    """Ctrl-C (or a stop signal's handler) is not lost because it hit a callback."""
    h = InterruptedHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    # Test runners (pytest-xdist workers) may replace Python's own SIGINT handler; the
    # redelivery is for processes that keep it, so this test keeps it too.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                handshake(sctx, client_context(ca, TLS12))
            except KeyboardInterrupt:
                raise
            for _ in range(3000):  # it arrives within milliseconds; the bound is generous
                time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(h.new) == 1


class QuotingHandler(DictHandler):
    """A handler whose errors quote the session's DER."""

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        super().on_new(context, session_id, der, timeout_s)
        raise ValueError(f"cannot keep {der.hex()}")

    def on_get(self, context: bytes, session_id: bytes, tls13: bool | None = None) -> bytes | None:
        der = self.store[session_id]
        raise ValueError(f"refusing {der.hex()}")


def test_callback_errors_never_log_session_bytes(
    ca: trustme.CA, leaf: trustme.LeafCert, caplog: pytest.LogCaptureFixture
) -> None:
    from tlscache.openssl import callbacks

    callbacks._warn._next.clear()  # the log is rate-limited per kind across tests
    h = QuotingHandler()
    sctx = server_context(leaf)
    install_callbacks(sctx, h)
    cctx = client_context(ca, TLS12)
    with caplog.at_level(logging.DEBUG, logger="tlscache"):
        first = handshake(sctx, cctx)
        assert not handshake(sctx, cctx, first.session).server_reused
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert "on_new failed: ValueError at test_callbacks.py:" in text
    assert "on_get failed: ValueError at test_callbacks.py:" in text
    assert not any(r.exc_info for r in caplog.records)
    for _, der, _ in h.new:
        assert der.hex() not in text and der.hex()[:32] not in text


def test_the_openssl_layer_imports_nothing_above_it() -> None:
    """tlscache.openssl knows its handler only by protocol: never the stores or the cache."""
    import ast

    import tlscache.openssl

    above = ("tlscache.stores", "tlscache.session_cache")
    package = Path(tlscache.openssl.__file__).parent
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = "tlscache.openssl" if node.level == 1 else "tlscache"
                module = node.module or ""
                modules = [module if node.level == 0 else f"{base}.{module}".rstrip(".")]
            else:
                continue
            for module in modules:
                assert not module.startswith(above), f"{path.name} imports {module}"


# --------------------------------------------------------------------------- version floors

ROOT = Path(__file__).resolve().parents[2]


def declared_floors() -> dict[str, str]:
    """``name -> version`` for every ``name>=version`` in the project's dependencies."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    floors = {}
    for dep in deps:
        name, sep, version = dep.partition(">=")
        if sep:
            floors[name.strip()] = version.strip()
    return floors


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_callbacks_pass_with_the_declared_floor_versions(tmp_path: Path) -> None:
    """The floors in pyproject.toml are what is tested: this file, with exactly those."""
    floors = declared_floors()
    assert {"pyOpenSSL", "cryptography"} <= floors.keys()
    venv = tmp_path / "floor-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pins = [f"{name}=={version}" for name, version in floors.items()]
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", *pins, "trustme", "pytest", "pytest-timeout"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if install.returncode != 0:
        pytest.skip(f"pip cannot install {pins}: {install.stderr.strip()[-500:]}")
    probe = "import OpenSSL, cryptography; print(OpenSSL.__version__, cryptography.__version__)"
    installed = subprocess.run(
        [python, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    wanted = [floors["pyOpenSSL"], floors["cryptography"]]
    assert [Version(v) for v in installed] == [Version(v) for v in wanted]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--noconftest",
            "tests/openssl/test_callbacks.py",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
