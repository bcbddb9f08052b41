"""Connections that end in a fatal alert, for the alert tests.

A server and a Python ``ssl`` client joined by memory BIOs, so that every record is handed
over by the test and the alert comes at a known point: :class:`Pair` (a pyOpenSSL server) and
:class:`StdlibPair` (an ``ssl`` server). :class:`Events` records what a user's info callback
sees; :class:`Served` is a server Context with a SessionCache on a MemoryStore. Hand-written:
the pumping is a few lines per end, and the tests need to corrupt single records between them.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Generic, TypeVar

import pytest
from OpenSSL import SSL
from OpenSSL._util import lib

from tests.openssl.test_callbacks import TLS12, TLS13
from tlscache import MemoryStore, SessionCache

VERSIONS = [pytest.param(TLS12, id="TLS1.2"), pytest.param(TLS13, id="TLS1.3")]
FATAL = 2  #: the alert level of a fatal alert


def flipped(record: bytes) -> bytes:
    """``record`` with its last byte changed, so that it fails authentication."""
    return record[:-1] + bytes([record[-1] ^ 0x01])


class Pair:
    """A pyOpenSSL server and a Python ``ssl`` client joined by memory BIOs."""

    def __init__(
        self, sctx: SSL.Context, cctx: ssl.SSLContext, session: ssl.SSLSession | None = None
    ) -> None:
        self.cin, self.cout = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.client = cctx.wrap_bio(
            self.cin, self.cout, server_hostname="localhost", session=session
        )
        self.server = SSL.Connection(sctx, None)
        self.server.set_accept_state()

    def to_server(self) -> None:
        if data := self.cout.read():
            self.server.bio_write(data)

    def from_server(self) -> bytes:
        out = b""
        with contextlib.suppress(SSL.WantReadError):
            while chunk := self.server.bio_read(65536):
                out += chunk
        return out

    def to_client(self) -> None:
        self.cin.write(self.from_server())

    def handshake(self) -> None:
        cdone = sdone = False
        for _ in range(50):
            if not cdone:
                try:
                    self.client.do_handshake()
                    cdone = True
                except ssl.SSLWantReadError:
                    pass
            self.to_server()
            if not sdone:
                try:
                    self.server.do_handshake()
                    sdone = True
                except SSL.WantReadError:
                    pass
            self.to_client()
            if cdone and sdone:
                return
        raise AssertionError("handshake did not complete")

    def exchange(self) -> None:
        """One record each way (the client reads past the TLS 1.3 tickets)."""
        self.server.send(b"ping")
        self.to_client()
        assert self.client.read(4) == b"ping"
        self.client.write(b"pong")
        self.to_server()
        assert self.server.recv(4) == b"pong"

    def corrupt_client_record(self) -> None:
        """The client's next record reaches the server with one byte changed."""
        self.client.write(b"tampered")
        self.server.bio_write(flipped(self.cout.read()))
        with pytest.raises(SSL.Error):
            self.server.recv(100)

    def corrupt_server_record(self) -> None:
        """The server's next record reaches the client with one byte changed: the client
        sends bad_record_mac, and the server reads it."""
        self.server.send(b"data")
        self.cin.write(flipped(self.from_server()))
        with pytest.raises(ssl.SSLError):
            self.client.read(4)
        self.to_server()
        with pytest.raises(SSL.Error):
            self.server.recv(100)

    def client_hangs_up(self) -> None:
        """No close_notify: OpenSSL answers the hang-up with a decode_error alert itself."""
        self.server.bio_shutdown()
        with pytest.raises(SSL.Error):
            self.server.recv(100)

    def close_cleanly(self) -> None:
        self.server.shutdown()
        self.to_client()
        with contextlib.suppress(ssl.SSLError):
            self.client.unwrap()


def connect(sctx: SSL.Context, cctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Pair:
    """A :class:`Pair` past its handshake and one record each way."""
    pair = Pair(sctx, cctx, session)
    pair.handshake()
    pair.exchange()
    return pair


class StdlibPair:
    """An ``ssl`` server and an ``ssl`` client joined by memory BIOs."""

    def __init__(self, server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        self.si, self.so, self.ci, self.co = (ssl.MemoryBIO() for _ in range(4))
        self.server = server.wrap_bio(self.si, self.so, server_side=True)
        self.client = client.wrap_bio(self.ci, self.co, server_hostname="localhost")

    def pump(self) -> None:
        self.si.write(self.co.read())
        self.ci.write(self.so.read())

    def handshake(self) -> None:
        for _ in range(10):
            for end in (self.client, self.server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    end.do_handshake()
            self.pump()
        self.server.write(b"ping")  # carries the TLS 1.3 tickets
        self.pump()
        assert self.client.read(4) == b"ping"

    def corrupt_client_record(self) -> None:
        """The client's next record reaches the server with one byte changed."""
        self.client.write(b"tampered")
        self.si.write(flipped(self.co.read()))
        with pytest.raises(ssl.SSLError):
            self.server.read(100)

    def client_hangs_up(self) -> None:
        """The client goes without close_notify."""
        self.si.write_eof()
        with pytest.raises(ssl.SSLError):
            self.server.read(100)


class Events:
    """A user's info callback: records (where, ret) of every event."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []
        self.connections: set[int] = set()

    def __call__(self, conn: SSL.Connection, where: int, ret: int) -> None:
        assert isinstance(conn, SSL.Connection)
        self.connections.add(id(conn))
        self.seen.append((where, ret))

    def fatal_alerts(self, where: int) -> list[int]:
        """Descriptions of the fatal alerts seen, read (``SSL_CB_READ_ALERT``) or written."""
        return [r & 0xFF for w, r in self.seen if w & where == where and r >> 8 == FATAL]

    @property
    def handshakes_done(self) -> int:
        return sum(1 for w, _ in self.seen if w & lib.SSL_CB_HANDSHAKE_DONE)


Ctx = TypeVar("Ctx", SSL.Context, ssl.SSLContext)


class Served(Generic[Ctx]):
    """A server Context, pyOpenSSL's or the standard library's, with a SessionCache on a
    MemoryStore (``cache.install`` raises ``ResolverError`` where the path is refused)."""

    def __init__(self, ctx: Ctx) -> None:
        self.store = MemoryStore()
        self.cache = SessionCache(self.store)
        self.ctx: Ctx = ctx
        self.cache.install(ctx)

    def state(self) -> str:
        return f"stored={len(self.store)} {self.cache.stats()}"
