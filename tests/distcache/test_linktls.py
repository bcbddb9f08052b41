"""Mutual TLS on the cache link: real dc_server and dc_client processes, real handshakes.

Certificates come from trustme: one CA for the cache link, a server certificate for
127.0.0.1 (and the name ``cache.test``), a client certificate from that CA, and a client
certificate from another CA that dc_server must refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from tests.procs import free_port, running, tool, wait_proxy_connected
from tests.tlsutil import client_context, handshake_over_memory
from tlscache import SessionCache
from tlscache.cli.dc_test import main as dc_test_main
from tlscache.deadline import Deadline
from tlscache.distcache.address import parse_address
from tlscache.distcache.aioclient import AsyncClient
from tlscache.distcache.client import Client
from tlscache.distcache.linktls import MINIMUM_VERSION, LinkTLS
from tlscache.distcache.protocol import Decoder, Result, encode_have
from tlscache.distcache.sockets import connect
from tlscache.exceptions import (
    ClientError,
    ClientTimeout,
    ConfigurationError,
    ServerUnavailable,
    StoreError,
)
from tlscache.keyring import KeyRing
from tlscache.stores.distcache import DistcacheStore
from tlscache.stores.spec import open_store

SERVER_NAME = "cache.test"


@dataclass(frozen=True)
class Pki:
    """The files of one test run: the link's CA and the certificates of each party."""

    ca: Path
    server: LinkTLS  # dc_server's own settings
    client: LinkTLS  # a member of the cache
    stranger: LinkTLS  # a client whose certificate comes from another CA
    other_ca: Path


def _issue(ca: trustme.CA, directory: Path, name: str, *identities: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(*identities)
    chain, key = directory / f"{name}.pem", directory / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(chain), append=i > 0)
    return chain, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    ca_file, other_file = d / "ca.pem", d / "other-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    other.cert_pem.write_to_path(str(other_file))
    server = _issue(ca, d, "server", "127.0.0.1", SERVER_NAME)
    client = _issue(ca, d, "client", "backend-1.cache.test")
    stranger = _issue(other, d, "stranger", "backend-1.cache.test")
    return Pki(
        ca=ca_file,
        server=LinkTLS(*server, ca_file),
        client=LinkTLS(*client, ca_file),
        stranger=LinkTLS(*stranger, ca_file),
        other_ca=other_file,
    )


def server_switches(tls: LinkTLS) -> list[str]:
    return ["-tls-cert", str(tls.cert), "-tls-key", str(tls.key), "-tls-ca", str(tls.ca)]


def client_switches(tls: LinkTLS) -> list[str]:
    switches = ["-server-tls-cert", str(tls.cert), "-server-tls-key", str(tls.key)]
    switches += ["-server-tls-ca", str(tls.ca)]
    if tls.server_name is not None:
        switches += ["-server-tls-name", tls.server_name]
    return switches


@contextlib.contextmanager
def tls_dc_server(
    pki: Pki, *extra: str, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """dc_server with mutual TLS on a free port; its stderr goes to ``log`` if given."""
    address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_server", "-listen", address, *server_switches(pki.server), *extra)
    with contextlib.ExitStack() as stack:
        stderr = subprocess.PIPE
        if log is not None:
            stderr = stack.enter_context(open(log, "wb")).fileno()
        proc = stack.enter_context(running(argv, ready=address, stderr=stderr))
        yield address, proc


def assert_serving(address: str, pki: Pki, proc: subprocess.Popen[bytes]) -> None:
    """A member can still use the server (after whatever was refused before)."""
    assert proc.poll() is None, f"dc_server exited with {proc.returncode}"
    with Client(address, tls=pki.client, deadline_ms=10_000) as client:
        assert client.add(b"still-serving", b"v" * 100, 60_000) in (
            Result.OK,
            Result.ADD_MATCHING_SESSION,
        )
        assert client.get(b"still-serving") == b"v" * 100


def raw_tls_have(address: str, ctx: ssl.SSLContext) -> bytes:
    """One HAVE over a hand-made TLS connection; the reply payload, or raise OSError."""
    addr = parse_address(address)
    with connect(addr, timeout=10, ssl=ctx, server_hostname="127.0.0.1") as sock:
        sock.sendall(encode_have(9, b"probe"))
        decoder = Decoder(expect_response=True)
        while True:
            chunk = sock.recv(100)
            if not chunk:
                raise ConnectionAbortedError("the server closed the connection")
            if msgs := decoder.feed(chunk):
                return msgs[0].payload


# ---------------------------------------------------------------- settings


def test_missing_and_unusable_files_are_configuration_errors(pki: Pki, tmp_path: Path) -> None:
    missing = LinkTLS(pki.client.cert, pki.client.key, tmp_path / "nope.pem")
    with pytest.raises(ConfigurationError, match=r"cannot read TLS CA file .*nope\.pem"):
        missing.client_context()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match="cannot use TLS CA file"):
        LinkTLS(pki.client.cert, pki.client.key, garbage).server_context()
    # A key that is not the certificate's.
    with pytest.raises(ConfigurationError, match="cannot use TLS certificate"):
        LinkTLS(pki.client.cert, pki.server.key, pki.ca).client_context()
    with pytest.raises(ConfigurationError, match="handshake_timeout"):
        LinkTLS(pki.client.cert, pki.client.key, pki.ca, handshake_timeout=0)


def test_contexts_require_tls13_and_a_peer_certificate(pki: Pki) -> None:
    server, client = pki.server.server_context(), pki.client.client_context()
    state = {
        "server": (server.minimum_version, server.verify_mode, server.num_tickets),
        "client": (client.minimum_version, client.verify_mode, client.check_hostname),
    }
    assert state == {
        "server": (MINIMUM_VERSION, ssl.CERT_REQUIRED, 0),
        "client": (MINIMUM_VERSION, ssl.CERT_REQUIRED, True),
    }
    assert ssl.TLSVersion.TLSv1_3 == MINIMUM_VERSION


def test_only_tcp_addresses_take_tls(pki: Pki, tmp_path: Path) -> None:
    tls = pki.client
    for text in (f"UNIX:{tmp_path / 's'}", "FD:3"):
        with pytest.raises(ConfigurationError, match="needs an IP: address"):
            Client(text, tls=tls)
        with pytest.raises(ConfigurationError, match="needs an IP: address"):
            AsyncClient(text, tls=tls)
        with pytest.raises(ConfigurationError, match="needs an IP: address"):
            DistcacheStore(text, tls=tls)
    with socket.socket(socket.AF_UNIX) as unix, pytest.raises(ConfigurationError):
        tls.check_socket(unix)
    # The name checked: the address's host, unless server_name says otherwise.
    addr = parse_address("IP:127.0.0.1:9000")
    assert tls.server_hostname(addr) == "127.0.0.1"
    named = LinkTLS(tls.cert, tls.key, tls.ca, server_name=SERVER_NAME)
    assert named.server_hostname(addr) == SERVER_NAME
    with pytest.raises(ConfigurationError, match="not to the store"):
        DistcacheStore("IP:127.0.0.1:9000", client=Client("IP:127.0.0.1:9000"), tls=tls)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-tls-cert", "c.pem"], "missing -tls-key, -tls-ca"),
        (["-tls-cert", "/nonexistent/c.pem", "-tls-key", "k", "-tls-ca", "ca"], "cannot read"),
        (["--tls-handshake-timeout", "0"], "out of range"),
    ],
)
def test_dc_server_tls_switches(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlscache.cli.dc_server import main

    with pytest.raises(SystemExit) as info:
        main(["-listen", "IP:127.0.0.1:1", *argv])
    assert info.value.code == 1
    assert message in capsys.readouterr().err


def test_dc_server_refuses_tls_on_a_unix_listener(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlscache.cli.dc_server import main

    with pytest.raises(SystemExit) as info:
        main(["-listen", f"UNIX:{tmp_path / 's.sock'}", *server_switches(pki.server)])
    assert info.value.code == 1
    assert "needs an IP: address" in capsys.readouterr().err
    assert not (tmp_path / "s.sock").exists()


def test_dc_client_tls_switches(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tlscache.cli.dc_client import main

    listen = f"UNIX:{tmp_path / 'p.sock'}"
    for extra, message in (
        (["-server-tls-key", str(pki.client.key)], "missing -server-tls-cert, -server-tls-ca"),
        (["-server-tls-name", "x"], "-server-tls-name needs"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["-listen", listen, "-server", "IP:127.0.0.1:1", *extra])
        assert info.value.code == 1
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["-listen", listen, "-server", f"UNIX:{tmp_path / 'x'}", *client_switches(pki.client)])
    assert "needs an IP: address" in capsys.readouterr().err


# ---------------------------------------------------------------- refusals


@pytest.mark.integration
def test_dc_server_refuses_peers_without_the_right_certificate(pki: Pki, tmp_path: Path) -> None:
    log = tmp_path / "dc_server.log"
    with tls_dc_server(pki, log=log) as (address, proc):
        assert_serving(address, pki, proc)

        # Plain TCP: the distcache request is not a ClientHello.
        with pytest.raises(ClientError), Client(address, deadline_ms=10_000) as plain:
            plain.have(b"probe")
        assert_serving(address, pki, proc)

        # TLS, trusting the right CA, but no certificate of its own.
        anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anonymous.load_verify_locations(cafile=pki.ca)
        with pytest.raises(OSError):
            raw_tls_have(address, anonymous)
        assert_serving(address, pki, proc)

        # A certificate from another CA.
        with pytest.raises(ClientError), Client(address, tls=pki.stranger) as stranger:
            stranger.have(b"probe")
        assert_serving(address, pki, proc)

        # The client refuses too: a server whose certificate it cannot verify
        # (it trusts only the other CA), or that does not carry the expected name.
        distrusting = LinkTLS(pki.client.cert, pki.client.key, pki.other_ca)
        with pytest.raises(ClientError), Client(address, tls=distrusting) as client:
            client.have(b"probe")
        misnamed = LinkTLS(pki.client.cert, pki.client.key, pki.ca, server_name="other.test")
        with pytest.raises(ClientError), Client(address, tls=misnamed) as client:
            client.have(b"probe")
        # ... and accepts the name the certificate does carry.
        named = LinkTLS(pki.client.cert, pki.client.key, pki.ca, server_name=SERVER_NAME)
        with Client(address, tls=named) as client:
            assert client.have(b"still-serving")
        assert_serving(address, pki, proc)
    text = log.read_text()
    assert "with mutual TLS" in text and "Traceback" not in text, text


@pytest.mark.integration
def test_stalled_handshake_is_closed_and_others_are_served(pki: Pki) -> None:
    """Connections that never finish their handshake are closed after
    --tls-handshake-timeout; meanwhile, and after, members are served. They take no
    connection slot: with room for one connection, five stalled ones leave it free."""
    switches = ("--tls-handshake-timeout", "1", "--max-connections", "1")
    with tls_dc_server(pki, *switches) as (address, proc):
        host, port = "127.0.0.1", parse_address(address).port  # type: ignore[union-attr]
        stalled = [socket.create_connection((host, port), timeout=30) for _ in range(5)]
        try:
            stalled[0].sendall(b"\x16\x03\x01")  # the start of a record, never finished
            started = time.monotonic()
            assert_serving(address, pki, proc)
            ends = []
            for sock in stalled:
                try:
                    ends.append(sock.recv(100))
                except ConnectionResetError:
                    ends.append(b"<reset>")
            waited = time.monotonic() - started
        finally:
            for sock in stalled:
                sock.close()
        # Closed by the server (EOF or reset), well before our own 30 s guard.
        assert all(end in (b"", b"<reset>") for end in ends), ends
        assert waited < 25, f"stalled handshakes held for {waited:.1f} s"
        assert_serving(address, pki, proc)


@pytest.mark.integration
def test_blocking_connect_handshake_spends_the_callers_deadline(pki: Pki) -> None:
    """A peer that accepts TCP and never answers the ClientHello: the call fails at its
    deadline instead of waiting for the server's handshake timeout or forever."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"IP:127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ClientTimeout), Client(address, tls=pki.client) as client:
            client.have(b"x", deadline=Deadline.after_ms(300))
        assert time.monotonic() - started < 10

        async def async_call() -> None:
            async with AsyncClient(address, deadline_ms=300, tls=pki.client) as aclient:
                await aclient.have(b"x")

        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            asyncio.run(async_call())
        assert time.monotonic() - started < 10


# ---------------------------------------------------------------- carrying sessions


@pytest.mark.integration
def test_dc_client_carries_requests_over_tls(pki: Pki, tmp_path: Path) -> None:
    """local unix socket -> dc_client -> TLS -> dc_server, and a dc_client with the
    wrong certificate never gets through (it answers "no server")."""
    with tls_dc_server(pki) as (server, proc):
        good = f"UNIX:{tmp_path / 'good.sock'}"
        argv = tool("dc_client", "-listen", good, "-server", server, "-retry", "100")
        with running([*argv, *client_switches(pki.client)], ready=good):
            wait_proxy_connected(good, timeout=20)
            with Client(good, deadline_ms=10_000) as local:
                assert local.add(b"via-proxy", b"s" * 300, 60_000) == Result.OK
                assert local.get(b"via-proxy") == b"s" * 300
                many = [bytes([i]) * 32 for i in range(1, 51)]
                for sid in many:
                    local.add_nowait(sid, sid * 4, 60_000)
                found = [local.get(sid) for sid in many]
                assert found == [sid * 4 for sid in many]
                assert local.nowait_failures == 0
            # The entries are in dc_server itself, read over a direct TLS connection.
            with Client(server, tls=pki.client) as direct:
                assert direct.get(b"via-proxy") == b"s" * 300

        bad = f"UNIX:{tmp_path / 'bad.sock'}"
        argv = tool("dc_client", "-listen", bad, "-server", server, "-retry", "100")
        with (
            running([*argv, *client_switches(pki.stranger)], ready=bad),
            Client(bad, deadline_ms=10_000) as local,
        ):
            time.sleep(0.5)  # several connect attempts, all refused
            with pytest.raises(ServerUnavailable):
                local.get(b"via-proxy")
        assert_serving(server, pki, proc)


@pytest.mark.integration
def test_dc_test_over_tls(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with tls_dc_server(pki) as (server, _):
        # A seed each: every run starts from a cache without its sessions.
        for seed, mode in enumerate(([], ["-persistent"], ["-pipeline", "8"])):
            argv = ["-connect", server, "-sessions", "8", "-ops", "300", "-seed", str(seed), *mode]
            assert dc_test_main([*argv, *client_switches(pki.client)]) == 0, mode
            assert "all tests complete" in capsys.readouterr().err


@pytest.mark.integration
def test_store_talks_tls_to_dc_server(pki: Pki) -> None:
    with tls_dc_server(pki) as (server, _):
        with DistcacheStore(server, tls=pki.client) as store:
            deadline = Deadline.after_ms(10_000)
            for i in range(100):  # pipelined writes: replies read later, from ssl's buffer
                store.store(b"sid-%d" % i, b"value-%d" % i, 60, deadline)
            got = [store.fetch(b"sid-%d" % i, deadline) for i in range(100)]
            assert got == [b"value-%d" % i for i in range(100)]
            assert store.write_failures == 0
        with (
            DistcacheStore(server, tls=pki.stranger) as refused,
            pytest.raises(Exception, match="distcache get failed"),
        ):
            refused.fetch(b"sid-1", Deadline.after_ms(10_000))


def test_store_string_carries_the_link_tls_options(pki: Pki) -> None:
    with tls_dc_server(pki) as (server, _):
        c = pki.client
        spec = f"distcache:{server}?tls_cert={c.cert}&tls_key={c.key}&tls_ca={c.ca}"
        with open_store(spec) as store:
            deadline = Deadline.after_ms(10_000)
            store.store(b"sid", b"value", 60, deadline)
            assert store.fetch(b"sid", deadline) == b"value"
        s = pki.stranger
        stranger = f"distcache:{server}?tls_cert={s.cert}&tls_key={s.key}&tls_ca={s.ca}"
        with open_store(stranger) as refused, pytest.raises(StoreError):
            refused.fetch(b"sid", Deadline.after_ms(10_000))


@pytest.mark.integration
@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_resumption_through_the_tls_link(pki: Pki, version: str) -> None:
    """Two pyOpenSSL servers, each with its own SessionCache and its own TLS connection
    to one dc_server: a session made on A resumes on B."""
    cert = trustme.CA().issue_cert("www.example")
    ring = KeyRing.generate()

    def web_server() -> tuple[SSL.Context, SessionCache]:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        cert.configure_cert(ctx)
        store = DistcacheStore(server, tls=pki.client, confirm_writes=True)
        cache = SessionCache(store, keys=ring, deadline_ms=10_000, breaker_threshold=100)
        cache.install(ctx)
        return ctx, cache

    with tls_dc_server(pki) as (server, _):
        (a, cache_a), (b, cache_b) = web_server(), web_server()
        try:
            browser = client_context(version)
            reused, session = handshake_over_memory(a, browser)
            assert not reused
            reused, _ = handshake_over_memory(b, browser, session)
            stats = {"a": cache_a.stats(), "b": cache_b.stats()}
            assert reused, stats
        finally:
            cache_a.close()
            cache_b.close()
            cache_a.store.close()
            cache_b.store.close()
