"""Cross-process session resumption through a real dc_server, with real TLS clients.

Two pyOpenSSL server processes (``tlscache_farm.tlsserver``) with separate
Contexts and the same certificate share one dc_server: A through a dc_client
proxy (asynchronous writes), B directly (synchronous writes). A session made on
one must resume on the other, for TLS 1.2 (session ids) and TLS 1.3 (stateful
tickets), with Python's ``ssl`` module and with ``openssl s_client``.

TLS 1.2 race: ``new_cb`` runs after the server's Finished, so a client that
reconnects at once to another server may get there before the store write and
make a full handshake. The tests wait for the write: each server reports the
ids it stored, and the test polls dc_server with HAVE before reconnecting.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port, running, tool, wait_proxy_connected
from tlscache.distcache.client import Client
from tlscache_farm.tlsclient import server_argv

pytestmark = pytest.mark.integration

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Certs:
    chain: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Server:
    port: int
    proc: subprocess.Popen[bytes]


@dataclass(frozen=True)
class Farm:
    dc_server: str
    a: Server  # via dc_client, asynchronous writes
    b: Server  # direct to dc_server, synchronous writes


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    import trustme

    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    c = Certs(d / "chain.pem", d / "key.pem", d / "ca.pem")
    cert.private_key_pem.write_to_path(str(c.key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(c.chain), append=i > 0)
    ca.cert_pem.write_to_path(str(c.ca))
    return c


@contextlib.contextmanager
def tls_server(certs: Certs, store: str, *extra: str) -> Iterator[Server]:
    port = free_port()
    # A lookup deadline (2 s) that a loaded machine meets, so that a resumption the tests
    # expect is not lost to a timeout; ``extra`` may set its own (the last one counts).
    extra = ("--deadline-ms", "2000", *extra)
    argv = server_argv(certs.chain, certs.key, port, store, *extra, keys=certs.key.parent / "keys")
    with running(argv, ready=f"IP:127.0.0.1:{port}", stderr=subprocess.DEVNULL) as proc:
        yield Server(port, proc)


@pytest.fixture(scope="module")
def farm(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    d = tmp_path_factory.mktemp("farm")
    dc = f"IP:127.0.0.1:{free_port()}"
    proxy = f"UNIX:{d / 'dc_client.sock'}"
    dc_argv = tool("dc_server", "-listen", dc)
    proxy_argv = tool("dc_client", "-listen", proxy, "-server", dc, "-retry", "100")
    with (
        running(dc_argv, ready=dc, stderr=subprocess.DEVNULL),
        running(proxy_argv, ready=proxy, stderr=subprocess.DEVNULL),
    ):
        wait_proxy_connected(proxy)
        with (
            tls_server(certs, f"dc:{proxy}", "--async-writes") as a,
            tls_server(certs, f"dc:{dc}", "--sync-writes") as b,
        ):
            yield Farm(dc, a, b)


# ---------------------------------------------------------------- clients


def parse_line(text: str) -> dict[str, str]:
    """The server's status line (``reused=1 version=... new=...``) as a dict."""
    for line in text.splitlines():
        if line.startswith("reused="):
            return dict(f.split("=", 1) for f in line.split())
    raise AssertionError(f"no status line from the server in {text!r}")


def client_context(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def py_connect(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[dict[str, str], ssl.SSLSession, bool]:
    """One connection with Python's ssl module: (server's line, session, client saw reuse)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
    ):
        data = b""
        for _ in range(64):
            chunk = s.recv(4096)
            data += chunk
            if not chunk or data.endswith(b"\n"):
                break
        fields = parse_line(data.decode())
        sess, reused = s.session, s.session_reused
        assert sess is not None
        with contextlib.suppress(OSError, ssl.SSLError):
            s.unwrap()
    return fields, sess, bool(reused)


def wait_stored(dc: str, fields: dict[str, str], timeout: float = 3.0) -> None:
    """Poll dc_server (HAVE) until it holds every session the server reported as new."""
    ids = [bytes.fromhex(h) for h in fields["new"].split(",") if h]
    assert ids, "the handshake created no session"
    deadline = time.monotonic() + timeout
    with Client(dc) as client:
        for sid in ids:
            while not client.have(sid):
                assert time.monotonic() < deadline, "session never reached the store"
                time.sleep(0.005)


def s_client(certs: Certs, port: int, version: str, *args: str) -> str:
    argv = [
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        "-CAfile",
        str(certs.ca),
        f"-tls{version.replace('.', '_')}",
        "-ign_eof",
        *args,
    ]
    out = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False
    )
    return out.stdout.decode(errors="replace")


needs_openssl_cli = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_python_client_resumes_across_processes(farm: Farm, certs: Certs, version: str) -> None:
    ctx = client_context(certs, version)
    for first, second in ((farm.a, farm.b), (farm.b, farm.a)):
        fields, sess, reused = py_connect(ctx, first.port)
        assert fields["reused"] == "0" and not reused
        assert fields["version"] == f"TLSv{version}"
        wait_stored(farm.dc_server, fields)
        fields2, _, reused2 = py_connect(ctx, second.port, sess)
        assert fields2["reused"] == "1", fields2
        assert reused2
        if version == "1.3":
            assert len(fields["new"].split(",")) == 2  # two stateful tickets by default
            assert len(fields2["new"].split(",")) == 1  # a resumption issues one more


@needs_openssl_cli
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_sess_out_then_sess_in(
    farm: Farm, certs: Certs, version: str, tmp_path: Path
) -> None:
    sess = tmp_path / "session.pem"
    out = s_client(certs, farm.a.port, version, "-sess_out", str(sess))
    assert f"New, TLSv{version}" in out, out
    fields = parse_line(out)
    assert fields["reused"] == "0"
    wait_stored(farm.dc_server, fields)
    out = s_client(certs, farm.b.port, version, "-sess_in", str(sess))
    assert f"Reused, TLSv{version}" in out, out
    assert parse_line(out)["reused"] == "1"


class RoundRobin:
    """A TCP forwarder that sends each new connection to the next backend in turn.

    Connections are handled one at a time: the next one is forwarded only once
    the previous backend connection has closed, i.e. once that server finished
    its handshake (and, with synchronous writes, its store write).
    """

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent_to: list[int] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.listener.settimeout(0.2)
        n = 0
        while not self._stop:
            try:
                front, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            port = self.ports[n % len(self.ports)]
            n += 1
            self.sent_to.append(port)
            with front, socket.create_connection(("127.0.0.1", port), timeout=5) as back:
                front.settimeout(5)
                pump = threading.Thread(target=self._copy, args=(back, front), daemon=True)
                pump.start()
                self._copy(front, back)
                pump.join(5)

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            for _ in range(10_000):
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self._thread.join(2)


@needs_openssl_cli
def test_openssl_reconnect_through_round_robin(farm: Farm, certs: Certs) -> None:
    # The full handshake lands on B (synchronous writes): its session is in the store
    # before B closes the connection, so every reconnect, on A or B, can resume.
    rr = RoundRobin([farm.b.port, farm.a.port])
    try:
        out = s_client(certs, rr.port, "1.2", "-reconnect")
    finally:
        rr.close()
    assert out.count("New, TLSv1.2") == 1, out
    assert out.count("Reused, TLSv1.2") == 5, out
    assert farm.a.port in rr.sent_to and farm.b.port in rr.sent_to


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_wiped_store_means_no_resumption(certs: Certs, version: str) -> None:
    """With the internal cache off, even the origin server cannot resume once the store is gone."""
    dc = f"IP:127.0.0.1:{free_port()}"
    dc_argv = tool("dc_server", "-listen", dc)
    ctx = client_context(certs, version)
    with (
        running(dc_argv, ready=dc, stderr=subprocess.DEVNULL) as first,
        tls_server(certs, f"dc:{dc}", "--sync-writes") as a,
    ):
        fields, sess, _ = py_connect(ctx, a.port)
        wait_stored(dc, fields)
        assert py_connect(ctx, a.port, sess)[0]["reused"] == "1"
        first.terminate()
        first.wait(5)
        with running(dc_argv, ready=dc, stderr=subprocess.DEVNULL):
            fields, _, reused = py_connect(ctx, a.port, sess)
            assert fields["reused"] == "0" and not reused
            # The store works again: a new session resumes.
            fields, sess, _ = py_connect(ctx, a.port)
            wait_stored(dc, fields)
            assert py_connect(ctx, a.port, sess)[0]["reused"] == "1"


def test_cache_down_means_quick_full_handshakes(certs: Certs, tmp_path: Path) -> None:
    """No dc_server at all, or a dc_client without its server: handshakes still complete."""
    proxy = f"UNIX:{tmp_path / 'lonely.sock'}"
    nowhere = f"IP:127.0.0.1:{free_port()}"
    proxy_argv = tool("dc_client", "-listen", proxy, "-server", nowhere, "-retry", "60000")
    with (
        running(proxy_argv, ready=proxy, stderr=subprocess.DEVNULL),
        # A 10 s lookup deadline: a lookup that waited for it would show (the client's
        # socket times out after 5 s); failing at once keeps each handshake well under.
        tls_server(certs, f"dc:{nowhere}", "--sync-writes", "--deadline-ms", "10000") as direct,
        tls_server(certs, f"dc:{proxy}", "--deadline-ms", "10000") as proxied,
    ):
        for server in (direct, proxied):
            pending_hits = 0
            for version in ("1.2", "1.3"):
                ctx = client_context(certs, version)
                sess = None
                for _ in range(6):
                    start = time.monotonic()
                    fields, sess, reused = py_connect(ctx, server.port, sess)
                    took = time.monotonic() - start
                    assert took < 4.0, (f"handshake took {took:.3f} s", fields)
                    # The only resumption possible is from a write still queued in the
                    # same process (a client back within the write's round trip).
                    hit = int(fields["pending_hits"]) - pending_hits
                    pending_hits += hit
                    assert fields["reused"] == str(hit) and reused == bool(hit)
            assert int(fields["hits"]) == pending_hits
            if server is direct:
                # Synchronous writes: every failure is counted before the next handshake.
                assert fields["breaker"] == "open", fields


def test_servers_shut_down_cleanly(certs: Certs) -> None:
    """SIGTERM: the server stops accepting, flushes its writer and exits with status 0."""
    with tls_server(certs, "memory") as srv:
        py_connect(client_context(certs, "1.3"), srv.port)
        srv.proc.terminate()
        # The handler only sets a flag the main thread waits for: nothing can swallow it.
        assert srv.proc.wait(30) == 0
