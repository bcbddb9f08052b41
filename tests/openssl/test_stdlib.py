"""The shared session cache on the standard library's ``ssl.SSLContext``.

Servers are real processes (``tests/openssl/stdlib_server.py``: ``asyncio.start_server``
with ``ssl=ctx``, or uvicorn) sharing a real dc_server, with sealing on; clients are
Python's ``ssl`` and ``openssl s_client``. The refusals are shown in-process by faking
what the checks look at: the pointer's offset, the version string, a pointer to another
context whose settings do not follow, an interpreter without the GIL.

Mixed farm: a session made by a pyOpenSSL server (the wheel's OpenSSL) resumes on a stdlib
server (the system's libssl 3.0) and the reverse, through one store: both write the
``SSL_SESSION`` ASN.1 encoding, and each decodes the other's.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import socket
import ssl
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import free_port, running, tool
from tests.tlsutil import Certs, s_client
from tlscache import MemoryStore, SessionCache
from tlscache.distcache.client import Client
from tlscache.exceptions import ResolverError
from tlscache.openssl import stdlib
from tlscache_farm.tlsclient import server_argv

pytestmark = pytest.mark.integration

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"

needs_openssl_cli = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


@pytest.fixture(scope="module")
def dc() -> Iterator[str]:
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address, stderr=subprocess.DEVNULL):
        yield address


@contextlib.contextmanager
def stdlib_server(certs: Certs, store: str, *extra: str) -> Iterator[int]:
    port = free_port()
    argv = [
        *(sys.executable, "-m", "tests.openssl.stdlib_server"),
        *("--cert", str(certs.chain), "--key", str(certs.key), "--port", str(port)),
        *("--store", store, "--keys", str(certs.keys), *extra),
    ]
    with running(argv, ready=f"IP:127.0.0.1:{port}", stderr=subprocess.DEVNULL):
        yield port


@contextlib.contextmanager
def pyopenssl_server(certs: Certs, store: str, *extra: str) -> Iterator[int]:
    port = free_port()
    argv = server_argv(
        certs.chain,
        certs.key,
        port,
        store,
        *("--request", "--sync-writes", "--deadline-ms", "2000", *extra),
        keys=certs.keys,
    )
    with running(argv, ready=f"IP:127.0.0.1:{port}", stderr=subprocess.DEVNULL):
        yield port


# ---------------------------------------------------------------- clients


def parse_line(text: str) -> dict[str, str]:
    for line in text.splitlines():
        if line.startswith("reused="):
            return dict(f.split("=", 1) for f in line.split())
    raise AssertionError(f"no status line from the server in {text!r}")


def client_context(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def https_get(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[str, ssl.SSLSession, bool]:
    """One HTTPS request: (response text, the client's session, whether it resumed)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
    ):
        s.sendall(REQUEST)
        data = b""
        for _ in range(64):
            try:
                chunk = s.recv(4096)
            except (ssl.SSLEOFError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
        sess, reused = s.session, s.session_reused
        assert sess is not None
        with contextlib.suppress(OSError, ssl.SSLError):
            s.unwrap()
    return data.decode(errors="replace"), sess, bool(reused)


def wait_stored(dc: str, fields: dict[str, str], timeout: float = 5.0) -> None:
    """Poll dc_server (HAVE) until it holds every session the server reported as new."""
    ids = [bytes.fromhex(h) for h in fields["new"].split(",") if h]
    assert ids, ("the handshake created no session", fields)
    deadline = time.monotonic() + timeout
    with Client(dc) as client:
        for sid in ids:
            while not client.have(sid):
                assert time.monotonic() < deadline, ("session never reached the store", fields)
                time.sleep(0.005)


# ---------------------------------------------------------------- (a) resumption


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_python_client_resumes_across_stdlib_servers(certs: Certs, dc: str, version: str) -> None:
    ctx = client_context(certs, version)
    with stdlib_server(certs, f"dc:{dc}") as a, stdlib_server(certs, f"dc:{dc}") as b:
        for first, second in ((a, b), (b, a)):
            text, sess, reused = https_get(ctx, first)
            fields = parse_line(text)
            assert (fields["reused"], reused, fields["cache"]) == ("0", False, "installed"), fields
            assert fields["version"] == f"TLSv{version}", fields
            wait_stored(dc, fields)
            text2, _, reused2 = https_get(ctx, second, sess)
            fields2 = parse_line(text2)
            assert (fields2["reused"], reused2) == ("1", True), (fields, fields2)
            assert int(fields2["hits"]) >= 1, fields2
            if version == "1.3":  # stateful tickets: two per full handshake, one per resumption
                assert (len(fields["new"].split(",")), len(fields2["new"].split(","))) == (1 + 1, 1)


@needs_openssl_cli
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_resumes_across_stdlib_servers(
    certs: Certs, dc: str, version: str, tmp_path: Path
) -> None:
    sess = tmp_path / "session.pem"
    with stdlib_server(certs, f"dc:{dc}") as a, stdlib_server(certs, f"dc:{dc}") as b:
        out = s_client(certs, a, version, "-sess_out", str(sess), request=REQUEST)
        assert f"New, TLSv{version}" in out, out
        fields = parse_line(out)
        wait_stored(dc, fields)
        out = s_client(certs, b, version, "-sess_in", str(sess), request=REQUEST)
        assert f"Reused, TLSv{version}" in out, out
        assert parse_line(out)["reused"] == "1", out


def test_uvicorn_app_resumes_across_processes(certs: Certs, dc: str) -> None:
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip("uvicorn is not installed (pip install uvicorn)")
    ctx = client_context(certs, "1.3")
    with (
        stdlib_server(certs, f"dc:{dc}", "--uvicorn") as a,
        stdlib_server(certs, f"dc:{dc}", "--uvicorn") as b,
    ):
        text, sess, reused = https_get(ctx, a)
        assert "hello from uvicorn cache=installed" in text and not reused, text
        # Writes are synchronous: stored before the handshake ended, so before the response.
        text, _, reused = https_get(ctx, b, sess)
        assert "hello from uvicorn cache=installed" in text, text
        assert reused, text


# ---------------------------------------------------------------- (b) refusals


@pytest.fixture
def server_ctx(certs: Certs) -> Iterator[ssl.SSLContext]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.chain), str(certs.key))
    stdlib._reset_cache()
    yield ctx
    stdlib._reset_cache()


def settings(ctx: ssl.SSLContext) -> tuple[object, ...]:
    return (ctx.options, ctx.verify_mode, ctx.minimum_version, ctx.maximum_version, ctx.num_tickets)


def assert_untouched(ctx: ssl.SSLContext, before: tuple[object, ...]) -> None:
    """Nothing installed: no state of ours, and the real checks still find CPython's
    defaults (cache mode 0x2, no callbacks) with the settings as they were."""
    assert not hasattr(ctx, "_tlscache_stdlib_session_cache")
    assert settings(ctx) == before
    stdlib._reset_cache()
    res = stdlib.resolve_stdlib()
    raw = stdlib._locate(ctx, res, [])
    null = stdlib._ffi.NULL
    found = {
        "mode": res["SSL_CTX_ctrl"](raw, 45, 0, null),  # SSL_CTRL_GET_SESS_CACHE_MODE
        "new": res["SSL_CTX_sess_get_new_cb"](raw) == null,
        "get": res["SSL_CTX_sess_get_get_cb"](raw) == null,
        "remove": res["SSL_CTX_sess_get_remove_cb"](raw) == null,
        "info": res["SSL_CTX_get_info_callback"](raw) == null,
    }
    assert found == {"mode": 2, "new": True, "get": True, "remove": True, "info": True}, found


def refuse(ctx: ssl.SSLContext) -> str:
    cache = SessionCache(MemoryStore())
    with pytest.raises(ResolverError) as info:
        cache.install(ctx)
    return info.value.reason


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (8, "does not start with TLS_server_method's SSL_METHOD"),  # ob_type: a heap pointer
        (24, "is no heap pointer"),  # the next field (ALPN protocols): NULL
    ],
)
def test_wrong_offset_is_refused(
    server_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch, offset: int, reason: str
) -> None:
    before = settings(server_ctx)
    monkeypatch.setattr(stdlib, "CTX_POINTER_OFFSET", offset)
    got = refuse(server_ctx)
    assert reason in got, got
    monkeypatch.undo()
    assert_untouched(server_ctx, before)


def test_other_version_string_is_refused(
    server_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = settings(server_ctx)
    monkeypatch.setattr(ssl, "OPENSSL_VERSION", "OpenSSL 9.9.9 1 Jan 2099")
    got = refuse(server_ctx)
    assert "but ssl.OPENSSL_VERSION is 'OpenSSL 9.9.9 1 Jan 2099'" in got, got
    # A refusal is remembered: the library is the same for every context.
    assert refuse(server_ctx) == got
    monkeypatch.undo()
    assert_untouched(server_ctx, before)


def test_pointer_to_another_context_is_refused(
    server_ctx: ssl.SSLContext, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst wrong guess: a real SSL_CTX, of the right kind, but not this context's.
    Every check of the memory passes; the read-backs do not."""
    decoy = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    decoy.load_cert_chain(str(certs.chain), str(certs.key))
    decoy_address = stdlib.ssl_ctx_address(decoy)
    before, decoy_before = settings(server_ctx), settings(decoy)
    monkeypatch.setattr(stdlib, "ssl_ctx_address", lambda ctx: decoy_address)
    got = refuse(server_ctx)
    assert got.startswith("OpenSSL does not see what Python set on this context: options"), got
    assert "num_tickets: Python 7, OpenSSL 2" in got, got
    monkeypatch.undo()
    assert_untouched(server_ctx, before)
    assert_untouched(decoy, decoy_before)


class LyingContext(ssl.SSLContext):
    """Its ``num_tickets`` setter does nothing: Python and OpenSSL disagree."""

    @property
    def num_tickets(self) -> int:
        return int(super().num_tickets)

    @num_tickets.setter
    def num_tickets(self, value: int) -> None:
        pass


def test_read_back_disagreement_is_refused(certs: Certs) -> None:
    ctx = LyingContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.chain), str(certs.key))
    before = settings(ctx)
    got = refuse(ctx)
    assert got == (
        "OpenSSL does not see what Python set on this context: "
        "num_tickets: Python 7, OpenSSL 2; num_tickets: Python 3, OpenSSL 2"
    ), got
    assert_untouched(ctx, before)


def test_client_context_is_refused(certs: Certs) -> None:
    ctx = ssl.create_default_context()
    got = refuse(ctx)
    assert "is not a server context" in got, got


def test_free_threaded_build_is_refused(
    server_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = settings(server_ctx)
    real = sysconfig.get_config_var
    monkeypatch.setattr(
        sysconfig,
        "get_config_var",
        lambda name: 1 if name == "Py_GIL_DISABLED" else real(name),
    )
    got = refuse(server_ctx)
    assert got.startswith("free-threaded CPython"), got
    monkeypatch.undo()
    assert_untouched(server_ctx, before)


def test_server_runs_on_without_the_cache_when_refused(certs: Certs, dc: str) -> None:
    ctx = client_context(certs, "1.3")
    with stdlib_server(certs, f"dc:{dc}", "--refuse-offset", "24") as port:
        text, sess, _ = https_get(ctx, port)
        fields = parse_line(text)
        assert (fields["cache"], fields["new"]) == ("refused", ""), fields
        # CPython's own settings: stateless tickets, resumed on this server only.
        text, _, reused = https_get(ctx, port, sess)
        assert reused and parse_line(text)["hits"] == "0", text


def test_verified_context_reports_its_checks(server_ctx: ssl.SSLContext) -> None:
    cache = SessionCache(MemoryStore())
    cache.install(server_ctx)
    assert server_ctx.options & ssl.OP_NO_TICKET
    # Installing again replaces the handler; the checks now find our callbacks.
    checks = stdlib.verify_context(server_ctx).checks
    assert checks[-1] == "the callbacks installed earlier are still in place", checks
    assert any(c.startswith("OpenSSL_version(0) == ssl.OPENSSL_VERSION") for c in checks), checks
    assert cache.install(server_ctx) == cache.install(server_ctx)


# ---------------------------------------------------------------- (c) mixed farm


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_pyopenssl_and_stdlib_servers_resume_each_other(
    certs: Certs, dc: str, version: str
) -> None:
    """One store, two OpenSSL builds: the wheel's (pyOpenSSL) and the system's (ssl).

    Both derive the same default session id context from the same certificate."""
    ctx = client_context(certs, version)
    with (
        pyopenssl_server(certs, f"dc:{dc}", "--session-id-context", "default") as wheel,
        stdlib_server(certs, f"dc:{dc}", "--session-id-context", "default") as system,
    ):
        for first, second in ((wheel, system), (system, wheel)):
            text, sess, _ = https_get(ctx, first)
            fields = parse_line(text)
            assert fields["reused"] == "0", fields
            wait_stored(dc, fields)
            text2, _, reused = https_get(ctx, second, sess)
            fields2 = parse_line(text2)
            assert (fields2["reused"], reused) == ("1", True), (first, fields, fields2)


class Recorder(SessionCache):
    """Keeps the DER of every session it is given (in-process, unsealed)."""

    def __init__(self) -> None:
        super().__init__(MemoryStore())
        self.ders: list[bytes] = []

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        self.ders.append(bytes(der))
        super().on_new(context, session_id, der, timeout_s)


def _pump_stdlib(server: ssl.SSLContext, client: ssl.SSLContext) -> None:
    si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    s = server.wrap_bio(si, so, server_side=True)
    c = client.wrap_bio(ci, co, server_hostname="localhost")
    for _ in range(10):
        for end in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        si.write(co.read())
        ci.write(so.read())


def _pump_pyopenssl(server: object, client: ssl.SSLContext) -> None:
    from OpenSSL import SSL

    assert isinstance(server, SSL.Context)
    conn = SSL.Connection(server, None)
    conn.set_accept_state()
    ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(ci, co, server_hostname="localhost")
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            c.do_handshake()
        if data := co.read():
            conn.bio_write(data)
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            ci.write(conn.bio_read(65536))


def _round_trip(der: bytes, d2i: object, i2d: object, free: object, ffi: object) -> bytes:
    """d2i then i2d in one OpenSSL build: the encoding it makes of another build's session."""
    f: Any = ffi
    buf = f.from_buffer("unsigned char[]", der)
    sess = d2i(f.NULL, f.new("unsigned char **", buf), len(der))  # type: ignore[operator]
    assert sess != f.NULL, "the session does not decode"
    try:
        n = i2d(sess, f.NULL)  # type: ignore[operator]
        out = f.new("unsigned char[]", n)
        i2d(sess, f.new("unsigned char **", out))  # type: ignore[operator]
        return bytes(f.buffer(out, n))
    finally:
        free(sess)  # type: ignore[operator]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_encodings_agree_between_builds(certs: Certs, version: str) -> None:
    """Each build decodes the other's DER and encodes it again byte for byte."""
    from OpenSSL import SSL
    from OpenSSL._util import ffi as wheel_ffi
    from OpenSSL._util import lib as wheel_lib

    from tlscache.openssl.resolver import resolve

    system_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    system_ctx.load_cert_chain(str(certs.chain), str(certs.key))
    wheel_ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    wheel_ctx.use_certificate_chain_file(str(certs.chain))
    wheel_ctx.use_privatekey_file(str(certs.key))
    system, wheel = Recorder(), Recorder()
    # The same default session id context, from the same certificate, in both builds.
    assert system.install(system_ctx) == wheel.install(wheel_ctx)
    client = client_context(certs, version)
    _pump_stdlib(system_ctx, client)
    _pump_pyopenssl(wheel_ctx, client)
    assert system.ders and wheel.ders, (len(system.ders), len(wheel.ders))
    res, wres = stdlib.resolve_stdlib(), resolve()
    in_system = _round_trip(
        wheel.ders[0],
        res["d2i_SSL_SESSION"],
        res["i2d_SSL_SESSION"],
        res["SSL_SESSION_free"],
        stdlib._ffi,
    )
    in_wheel = _round_trip(
        system.ders[0],
        wres.get("d2i_SSL_SESSION"),
        wres.get("i2d_SSL_SESSION"),
        wheel_lib.SSL_SESSION_free,
        wheel_ffi,
    )
    assert (in_system == wheel.ders[0], in_wheel == system.ders[0]) == (True, True), (
        len(wheel.ders[0]),
        len(in_system),
        len(system.ders[0]),
        len(in_wheel),
    )
