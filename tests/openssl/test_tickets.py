"""Shared ticket keys across server processes, through a real dc_server, with real clients.

Two ``tests.openssl.ticket_server`` processes (separate Contexts, one certificate, one key
ring) share ticket keys through a dc_server. Their clocks are the wall clock plus an offset
the test moves over stdin, so rotations happen when the test says, not when time passes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.procs import ROOT, free_port, running, tool, wait_connectable
from tlscache.keyring import KeyRing

pytestmark = pytest.mark.integration

PERIOD = 3600
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass
class Certs:
    chain: Path
    key: Path
    ca: Path
    ring: Path


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[str]

    def command(self, text: str) -> dict[str, Any]:
        """Send one stdin command; the server answers with its counters."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"server exited (rc={self.proc.poll()})"
        stats: dict[str, Any] = json.loads(line)
        return stats

    def stats(self) -> dict[str, Any]:
        return self.command("stats")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    import trustme

    d = tmp_path_factory.mktemp("tickets")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    c = Certs(d / "chain.pem", d / "key.pem", d / "ca.pem", d / "ring.json")
    cert.private_key_pem.write_to_path(str(c.key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(c.chain), append=i > 0)
    ca.cert_pem.write_to_path(str(c.ca))
    KeyRing.generate().save(c.ring)
    return c


@contextlib.contextmanager
def dc_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address) as proc:
        yield address, proc


@contextlib.contextmanager
def ticket_server(certs: Certs, dc: str, mode: str = "stateless") -> Iterator[Server]:
    port = free_port()
    argv = [sys.executable, "-m", "tests.openssl.ticket_server", str(port)]
    argv += [str(certs.chain), str(certs.key), dc, str(certs.ring), mode]
    proc = subprocess.Popen(
        argv,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", f"rc={proc.poll()}"
        wait_connectable(f"IP:127.0.0.1:{port}", proc=proc)
        yield Server(port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def client(certs: Certs, version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


def connect(
    ctx: ssl.SSLContext, server: Server, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession]:
    """One connection: (the server resumed, the client's session afterwards)."""
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
    ):
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
        sess = s.session
        assert sess is not None and data.startswith(b"reused="), data
        with contextlib.suppress(OSError, ssl.SSLError):
            s.unwrap()
        return data.strip() == b"reused=1", sess


def advance(seconds: float, *servers: Server) -> list[dict[str, Any]]:
    return [s.command(f"advance {seconds}") for s in servers]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_ticket_from_a_resumes_on_b_and_rotation(certs: Certs, version: str) -> None:
    ctx = client(certs, version)
    with dc_server() as (dc, _), ticket_server(certs, dc) as a:
        ok, sess = connect(ctx, a)
        assert not ok
        with ticket_server(certs, dc) as b:  # started later: reads a's key
            ok, sess_b = connect(ctx, b, sess)
            assert ok, (a.stats(), b.stats())
            assert b.stats()["decrypted"] == 1, b.stats()
            # One rotation on both: the old ticket is accepted and renewed.
            advance(PERIOD, a, b)
            ok, renewed = connect(ctx, b, sess_b)
            stats = b.stats()
            assert ok and stats["renewed"] == 1 and stats["rotations"] == 1, stats
            ok, _ = connect(ctx, a, renewed)  # the renewed ticket is under the shared new key
            stats = a.stats()
            assert ok and stats["decrypted"] >= 1 and stats["renewed"] == 0, stats
            # Three more: the first key is erased on both: full handshake.
            for _ in range(3):
                advance(PERIOD, a, b)
            ok, _ = connect(ctx, a, sess)
            stats = a.stats()
            assert not ok and stats["rejected"] == 1 and stats["store_failures"] == 0, stats


def test_store_down_keeps_keys_working(certs: Certs) -> None:
    ctx = client(certs, "1.3")
    with dc_server() as (dc, proc), ticket_server(certs, dc) as a, ticket_server(certs, dc) as b:
        _, sess = connect(ctx, a)
        proc.terminate()
        proc.wait(timeout=30)
        stats_a, stats_b = advance(PERIOD, a, b)  # the rotation cannot reach the store
        assert stats_a["store_failures"] == 1 and stats_b["store_failures"] == 1, stats_a
        ok, _ = connect(ctx, b, sess)  # a's ticket, b's kept keys
        stats = b.stats()
        assert ok and stats["local_keys"] == 0 and stats["current_shared"], stats


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_both_mode_tls12_without_tickets_resumes_by_session_id(
    certs: Certs, tmp_path: Path
) -> None:
    """``both``: a TLS 1.2 client that sends no ticket extension resumes by session id."""
    with (
        dc_server() as (dc, _),
        ticket_server(certs, dc, "both") as a,
        ticket_server(certs, dc, "both") as b,
    ):
        sess = tmp_path / "sess.pem"

        def s_client(port: int, *extra: str) -> str:
            argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2"]
            argv += [
                "-no_ticket",
                "-ign_eof",
                "-CAfile",
                str(certs.ca),
                "-servername",
                "localhost",
                *extra,
            ]
            done = subprocess.run(argv, input=b"", capture_output=True, timeout=30, check=False)
            return done.stdout.decode(errors="replace")

        first = s_client(a.port, "-sess_out", str(sess))
        assert "\nNew, TLSv1.2" in first and "reused=0" in first, first[-400:]
        out = ""
        for _ in range(20):  # the TLS 1.2 write lands after the server's Finished
            out = s_client(b.port, "-sess_in", str(sess))
            if "reused=1" in out:
                break
        assert "reused=1" in out and "\nReused, TLSv1.2" in out, (out[-400:], b.stats())
        assert b.stats()["decrypted"] == 0, b.stats()  # no ticket was involved
        ctx = client(certs, "1.3")
        _, t = connect(ctx, a)
        ok, _ = connect(ctx, b, t)
        assert ok and b.stats()["decrypted"] == 1, b.stats()
