"""pyOpenSSL clients for tests and benchmarks: pinned-version contexts, in-memory handshakes, and
the command line of the small TLS server they run against.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from OpenSSL import SSL

#: The protocol versions we test, by the names the tests use.
VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: The small pyOpenSSL TLS server that tests and benchmarks start as a process:
#: ``python -m tlscache_farm.tlsserver --help`` tells its options.
TLS_SERVER_MODULE = "tlscache_farm.tlsserver"


def client_context(version: str) -> SSL.Context:
    """A pyOpenSSL client context that speaks only TLS ``version`` ("1.2" or "1.3")."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(VERSIONS[version])
    ctx.set_max_proto_version(VERSIONS[version])
    return ctx


def pump(server: SSL.Connection, client: SSL.Connection, *, rounds: int = 20) -> bool:
    """Run both ends' handshakes over their memory BIOs for at most ``rounds`` exchanges.

    ``rounds=2`` stops after the server's first flight (its ClientHello callbacks, an SNI
    switch among them, have run). True once both handshakes are done.
    """
    done = [False, False]
    for _ in range(rounds):
        for i, conn in enumerate((client, server)):
            if not done[i]:
                try:
                    conn.do_handshake()
                    done[i] = True
                except SSL.WantReadError:
                    pass
        for src, dst in ((client, server), (server, client)):
            with contextlib.suppress(SSL.WantReadError):
                dst.bio_write(src.bio_read(65536))
        if all(done):
            break
    return all(done)


def handshake_over_memory(
    server_ctx: SSL.Context,
    client_ctx: SSL.Context,
    session: SSL.Session | None = None,
    sni: bytes | None = None,
) -> tuple[bool, SSL.Session]:
    """One connection over memory BIOs, both ends in this process (no sockets, no scheduler).

    Handshake, one byte from the server (it carries any TLS 1.3 ticket to the
    client), clean shutdown (which keeps the session valid). Returns whether the
    server resumed ``session`` and the client's session afterwards.
    """
    from OpenSSL._util import lib

    s = SSL.Connection(server_ctx, None)
    s.set_accept_state()
    c = SSL.Connection(client_ctx, None)
    c.set_connect_state()
    if sni is not None:
        c.set_tlsext_host_name(sni)
    if session is not None:
        c.set_session(session)
    assert pump(s, c), "handshake did not complete"
    s.send(b"x")
    c.bio_write(s.bio_read(65536))
    assert c.recv(1) == b"x"
    reused = bool(lib.SSL_session_reused(s._ssl))
    sess = c.get_session()
    assert sess is not None
    for conn in (c, s):
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
    return reused, sess


def key_ring(path: Path) -> Path:
    """The key ring at ``path``, made (mode 0600) if there is none yet.

    Tests and benchmarks give every server of one run the same file, so that a session one
    sealed opens on the others.
    """
    from tlscache.keyring import KeyRing

    if not path.exists():
        KeyRing.generate().save(path)
    return path


def server_argv(
    cert: Path, key: Path, port: int, store: str, *extra: str, keys: Path | None = None
) -> list[str]:
    """The command line that runs the TLS server with this interpreter (``extra``: more options).

    ``keys``: the run's key ring (made by :func:`key_ring` if missing), passed as ``--keys``.
    """
    sealing = ("--keys", str(key_ring(keys))) if keys is not None else ()
    return [
        *(sys.executable, "-m", TLS_SERVER_MODULE),
        *("--cert", str(cert), "--key", str(key), "--port", str(port), "--store", store),
        *sealing,
        *extra,
    ]
