"""A real twisted.web HTTPS server resumes sessions made by another process.

A real dc_server, a pyOpenSSL server process (``tlscache_farm.tlsserver``) and a Twisted
server process (``tests/twisted_server.py``, ``CertificateOptions`` with the cache installed
by :func:`tlscache.twisted.install`) share sealed sessions. A Python ``ssl`` client makes a
session on the pyOpenSSL server and resumes it on the Twisted one, for TLS 1.2 and 1.3, with
blocking and with non-blocking lookups.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port, running, tool
from tlscache.distcache.client import Client
from tlscache_farm.tlsclient import key_ring, server_argv

pytest.importorskip("twisted")

pytestmark = pytest.mark.integration

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
SERVER = Path(__file__).resolve().parent / "twisted_server.py"


@dataclass(frozen=True)
class Certs:
    chain: Path
    key: Path
    pem: Path  # chain and key in one file
    ca: Path


@dataclass(frozen=True)
class Farm:
    dc_server: str
    pyopenssl_port: int
    twisted_ports: dict[str, int]  # by mode: "blocking", "nonblocking"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    import trustme

    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    c = Certs(d / "chain.pem", d / "key.pem", d / "server.pem", d / "ca.pem")
    cert.private_key_pem.write_to_path(str(c.key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(c.chain), append=i > 0)
    cert.private_key_and_cert_chain_pem.write_to_path(str(c.pem))
    ca.cert_pem.write_to_path(str(c.ca))
    return c


@pytest.fixture(scope="module")
def farm(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    d = tmp_path_factory.mktemp("farm")
    keys = key_ring(d / "keys")
    dc = f"IP:127.0.0.1:{free_port()}"
    py_port = free_port()
    ports = {"blocking": free_port(), "nonblocking": free_port()}

    def twisted(mode: str) -> list[str]:
        argv = [sys.executable, str(SERVER), "--pem", str(certs.pem), "--port"]
        argv += [str(ports[mode]), "--store", dc, "--keys", str(keys)]
        # Non-blocking: lookups take 50 ms, so the handshake surely pauses for them.
        return argv + (["--nonblocking", "--delay-ms", "50"] if mode == "nonblocking" else [])

    py_argv = server_argv(
        *(certs.chain, certs.key, py_port, f"dc:{dc}"),
        *("--deadline-ms", "2000", "--session-id-context", "default"),
        keys=keys,
    )
    with (
        running(tool("dc_server", "-listen", dc), ready=dc, stderr=subprocess.DEVNULL),
        running(py_argv, ready=f"IP:127.0.0.1:{py_port}", stderr=subprocess.DEVNULL),
        running(twisted("blocking"), ready=f"IP:127.0.0.1:{ports['blocking']}"),
        running(twisted("nonblocking"), ready=f"IP:127.0.0.1:{ports['nonblocking']}"),
    ):
        yield Farm(dc, py_port, ports)


def client_context(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def exchange(
    ctx: ssl.SSLContext, port: int, request: bytes, session: ssl.SSLSession | None = None
) -> tuple[str, ssl.SSLSession, bool]:
    """One connection: send ``request``, read to the end; (reply, session, client saw reuse)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
    ):
        if request:
            s.sendall(request)
        data = b""
        for _ in range(256):
            try:
                chunk = s.recv(4096)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not chunk:
                break
            data += chunk
            if not request and data.endswith(b"\n"):
                break
        sess, reused = s.session, s.session_reused
        assert sess is not None
        with contextlib.suppress(OSError, ssl.SSLError):
            s.unwrap()
    return data.decode(errors="replace"), sess, bool(reused)


def wait_stored(dc: str, line: str, timeout: float = 5.0) -> None:
    """Poll dc_server (HAVE) until it holds every key the pyOpenSSL server reported."""
    fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
    keys = [bytes.fromhex(h) for h in fields.get("new", "").split(",") if h]
    assert keys, f"the handshake created no session: {line!r}"
    deadline = time.monotonic() + timeout
    with Client(dc) as client:
        for key in keys:
            while not client.have(key):
                assert time.monotonic() < deadline, f"session never reached the store: {line!r}"
                time.sleep(0.005)


@pytest.mark.parametrize("mode", ["blocking", "nonblocking"])
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_twisted_resumes_a_session_from_another_process(
    farm: Farm, certs: Certs, version: str, mode: str
) -> None:
    ctx = client_context(certs, version)
    line, sess, reused = exchange(ctx, farm.pyopenssl_port, b"")
    assert "reused=0" in line and not reused, line
    wait_stored(farm.dc_server, line)
    get = b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n"
    reply, _, reused2 = exchange(ctx, farm.twisted_ports[mode], get, sess)
    assert reply.startswith("HTTP/1.0 200"), reply
    body = reply.rsplit("\r\n\r\n", 1)[-1]
    fields = dict(f.split("=", 1) for f in body.split())
    assert fields["reused"] == "1" and reused2, reply
    assert int(fields["hits"]) >= 1, reply
    if mode == "nonblocking":  # paused, then answered from the prefetched lookup
        assert int(fields["paused"]) >= 1 and int(fields["answered"]) >= 1, reply


def test_twisted_full_handshake_for_an_unknown_session(farm: Farm, certs: Certs) -> None:
    """A session the shared store never saw (made by a stdlib ``ssl`` server with the same
    certificate): a miss, a full handshake, and the page is still served."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(certs.chain), str(certs.key))
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve_one() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"hello\n")
                with contextlib.suppress(OSError, ssl.SSLError):
                    s.unwrap()

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        ctx = client_context(certs, "1.2")
        _, sess, _ = exchange(ctx, listener.getsockname()[1], b"")
        thread.join(10)
    reply, _, reused = exchange(
        ctx, farm.twisted_ports["nonblocking"], b"GET / HTTP/1.0\r\n\r\n", sess
    )
    assert reply.startswith("HTTP/1.0 200") and "reused=0" in reply and not reused, reply
