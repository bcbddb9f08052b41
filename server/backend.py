"""One HTTPS backend of the demo farm: a pyOpenSSL server whose session cache is tlscache.

It serves a small HTML page at ``/`` and the facts of the current connection as JSON at ``/info``
(which backend, TLS version, cipher, whether the handshake resumed a session, the session id
prefix, the cache counters), so that a client can see where it landed and whether it resumed.
``/status`` and ``/status.json`` describe the whole backend; the same JSON is served over plain
HTTP on the admin port, so that the farm's status page can poll it without adding handshakes.
``/metrics`` is the same backend in the Prometheus text format, for a scraper (:mod:`.metrics`).

Every connection ends with a clean TLS shutdown (close_notify): OpenSSL throws away the session of
a connection that is freed without one, and the shared cache would lose good sessions.
"""

from __future__ import annotations

import contextlib
import functools
import html
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, TypeVar

from OpenSSL import SSL

from . import httpd
from . import status as status_page
from .cacheservers import KeyShares
from .config import STORE_MODES, BackendConfig, CacheConfig, parse_backend_args
from .handshakes import MADE_BY_HEADER, HandshakeLog
from .metrics import MetricsPage
from .records import (
    BackendStatus,
    ConnectionInfo,
    Handshake,
    StoreServer,
    TicketStatus,
    encode,
)

if TYPE_CHECKING:
    from tlscache import CacheStats, SessionCache, SessionStore
    from tlscache.ticketkeys import TicketKeys

T = TypeVar("T")

SESSION_ID_CONTEXT = b"tlscache-farm"
HANDSHAKE_TIMEOUT = 10.0


class ConnectionDone(ConnectionError):
    """The peer went away or was too slow, or the server is stopping: stop this connection."""


def _session_reused(conn: SSL.Connection) -> bool:
    """pyOpenSSL has no wrapper for SSL_session_reused; the binding does."""
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(conn._ssl))


def _session_id(conn: SSL.Connection) -> str | None:
    """The session id (TLS 1.2) or stateful ticket id (TLS 1.3) prefix, if tlscache can read it."""
    try:
        from tlscache.openssl.callbacks import session_id
    except ImportError:
        return None
    try:
        sid = session_id(conn)
    except Exception:
        return None
    return sid.hex()[:16] if sid else None


class SessionCacheSetup:
    """The tlscache SessionCache of this backend (or none, for ``--cache none``).

    Sessions are sealed with the key ring ``keys`` before they reach the store: dc_server is
    shared by every host, so what it holds must be useless to anyone who can read or write it.
    The cache re-reads the ring when it changes, so a rotation needs no restart.
    With memcached or Redis the store comes from the store string ``store``, and counts the
    sessions it places on each server (:class:`~.cacheservers.KeyShares`).
    """

    def __init__(
        self,
        config: CacheConfig,
        dc_address: str | None,
        keys: str | None,
        store: str | None = None,
        apache: tuple[str, str] | None = None,
    ) -> None:
        self.config = config
        self.dc_address = dc_address
        self.keys = keys
        self.store = store
        self.apache = apache  # (ServerName, SSLSessionCache): store as Apache mod_ssl does
        self.cache: SessionCache | None = None
        self.shares: KeyShares | None = None
        self.ticket_keys: TicketKeys | None = None  # --resumption stateless or both
        self.cache_store: SessionStore | None = None  # the store, when no SessionCache owns it

    def install(self, ctx: SSL.Context) -> None:
        if self.config.mode == "none":
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_options(SSL.OP_NO_TICKET)  # TLS 1.3: stateful tickets nobody can look up
            return
        if self.apache is not None:
            self._install_apache(ctx, *self.apache)
            return
        import tlscache

        if self.config.mode == "distcache":
            if not self.dc_address:
                raise SystemExit("--cache distcache needs --dc-address")
            if not self.keys:
                raise SystemExit(
                    "--cache distcache needs --keys PATH (create one: tlscache-keys generate PATH)"
                )
            store: tlscache.SessionStore = tlscache.DistcacheStore(self.dc_address)
        elif self.config.mode in STORE_MODES:
            store = self._shared_store()
        else:
            store = tlscache.MemoryStore()
        mode = self.config.resumption
        if mode != "stateless":
            self.cache = tlscache.SessionCache(
                store,
                timeout=self.config.session_timeout,
                deadline_ms=self.config.deadline_ms,
                breaker_reset_s=self.config.breaker_reset_s,
                session_id_context=SESSION_ID_CONTEXT,
                async_writes=self.config.writes == "async",
                keys=self.keys,
            )
        if mode != "stateful":
            self.ticket_keys = self._ticket_keys(store)
        from tlscache.resumption import configure_resumption

        configure_resumption(ctx, mode, session_cache=self.cache, ticket_keys=self.ticket_keys)
        if self.cache is None:
            self.cache_store = store  # closed by close(): no SessionCache owns it

    def _ticket_keys(self, store: SessionStore) -> TicketKeys:
        """Ticket keys shared through the cache's store, sealed with the run's key ring (a
        ring of this process only without one: the store is then this backend's own)."""
        from tlscache.keyring import KeyRing, KeyRingFile
        from tlscache.sealing import Sealer
        from tlscache.ticketkeys import TicketKeyPolicy, TicketKeys

        sealer = Sealer(KeyRingFile(self.keys) if self.keys else KeyRing.generate())
        policy = TicketKeyPolicy(period_s=self.config.ticket_period_s, group=SESSION_ID_CONTEXT)
        return TicketKeys(store, sealer, policy=policy)

    def _shared_store(self) -> KeyShares:
        """The memcached or Redis store of ``--store``, sealed like distcache's."""
        from tlscache.exceptions import ConfigurationError
        from tlscache.stores.spec import open_store

        mode = self.config.mode
        if not self.store or not self.keys:
            raise SystemExit(f"--cache {mode} needs --store SPEC and --keys PATH")
        try:
            self.shares = KeyShares(open_store(self.store))
        except ConfigurationError as exc:
            raise SystemExit(f"--store: {exc}") from None
        return self.shares

    def _install_apache(self, ctx: SSL.Context, server_name: str, session_cache: str) -> None:
        """Sessions shared with Apache httpd: unsealed, under mod_ssl's keys, placement, TTL
        and session id context (:mod:`tlscache.apache`, docs/apache.md)."""
        from tlscache.apache import ApacheCompat
        from tlscache.exceptions import ConfigurationError

        try:
            compat = ApacheCompat.from_directives(
                server_name, session_cache, self.config.session_timeout
            )
            self.shares = KeyShares(compat.open_store())
        except ConfigurationError as exc:
            raise SystemExit(f"--apache-session-cache: {exc}") from None
        apache = compat.session_cache_for(
            self.shares,
            deadline_ms=self.config.deadline_ms,
            breaker_reset_s=self.config.breaker_reset_s,
            async_writes=self.config.writes == "async",
        )
        apache.install(ctx)
        self.cache = apache.cache

    def store_servers(self) -> list[StoreServer]:
        """Each server of the store: health and the sessions stored on it (empty without)."""
        return self.shares.shares() if self.shares is not None else []

    def close(self) -> None:
        """Finish session writes (queued or still owed a reply) before the process exits."""
        if self.ticket_keys is not None:
            self.ticket_keys.close()
        if self.cache is not None:
            self.cache.close(1.0)
            self.cache.store.close()
        elif self.cache_store is not None:
            self.cache_store.close()

    def stats(self) -> tuple[CacheStats | None, str | None]:
        """The cache's counters, or why there are none (the status page must not die with it)."""
        if self.cache is None:
            return None, None
        try:
            return self.cache.stats(), None
        except Exception as exc:
            return None, repr(exc)

    def ticket_status(self) -> TicketStatus | None:
        """The ticket keys' counters and state (None without shared ticket keys)."""
        if self.ticket_keys is None:
            return None
        t = self.ticket_keys.stats()
        return TicketStatus(*t, period_s=self.ticket_keys.policy.period_s)


class _TlsStream:
    """One TLS connection on a non-blocking socket, as an HTTP byte stream."""

    def __init__(self, backend: Backend, conn: SSL.Connection, sock: socket.socket) -> None:
        self.backend, self.conn, self.sock = backend, conn, sock

    def recv(self, deadline: float) -> bytes:
        try:
            return self.backend.io(self.sock, lambda: self.conn.recv(16384), deadline)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return b""  # close_notify, or a plain hang-up (OP_IGNORE_UNEXPECTED_EOF)
        except SSL.Error as exc:
            raise ConnectionDone(str(exc)) from None

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10.0
        try:
            while view:
                send = functools.partial(self.conn.send, view[:16384])
                view = view[self.backend.io(self.sock, send, deadline) :]
        except SSL.Error as exc:
            raise ConnectionDone(str(exc)) from None


class Backend:
    """A threaded HTTPS server: one thread per connection, at most ``max_connections``."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        apache = None
        if config.apache_server_name and config.apache_session_cache:
            apache = (config.apache_server_name, config.apache_session_cache)
        self.cache = SessionCacheSetup(
            config.cache, config.dc_address, config.keys, config.store, apache
        )
        self.ctx = self._make_context()
        self.started = time.time()
        self.stop_event = threading.Event()
        self.limits = httpd.Limits(
            first_timeout=HANDSHAKE_TIMEOUT, idle_timeout=config.idle_timeout
        )
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._lock = threading.Lock()
        self.connections = 0
        self.active = 0
        self.requests = 0
        self.log = HandshakeLog()
        self.metrics = MetricsPage(self.status, lambda: self.cache.cache)

    def _make_context(self) -> SSL.Context:
        cfg = self.config
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(cfg.cert)
        ctx.use_privatekey_file(cfg.key)
        ctx.check_privatekey()
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_3_VERSION if cfg.tls == "1.3" else SSL.TLS1_2_VERSION)
        # Clients that hang up without close_notify must not cost us the session.
        ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF | SSL.OP_NO_COMPRESSION)
        self.cache.install(ctx)
        return ctx

    def serve(self, listener: socket.socket) -> None:
        """Accept until ``stop_event``."""
        httpd.accept_loop(listener, self.stop_event, self._slots, self._connection)

    def _connection(self, sock: socket.socket, peer: object) -> None:
        with self._lock:
            self.connections += 1
            self.active += 1
        try:
            self._serve_connection(sock, peer)
        finally:
            with self._lock:
                self.active -= 1

    # -- one connection ------------------------------------------------------------------------

    def io(self, sock: socket.socket, fn: Callable[[], T], deadline: float) -> T:
        """Run a pyOpenSSL call on a non-blocking socket, waiting as OpenSSL asks."""
        while True:
            try:
                return fn()
            except SSL.WantReadError:
                want_read = True
            except SSL.WantWriteError:
                want_read = False
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.stop_event.is_set():
                raise ConnectionDone("timeout")
            # Wake at least twice a second so that a stopping server is not held up.
            if want_read:
                select.select([sock], [], [], min(remaining, 0.5))
            else:
                select.select([], [sock], [], min(remaining, 0.5))

    def _serve_connection(self, sock: socket.socket, peer: object) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SSL.Connection(self.ctx, sock)
        conn.set_accept_state()
        try:
            t0 = time.perf_counter()
            try:
                self.io(sock, conn.do_handshake, time.monotonic() + HANDSHAKE_TIMEOUT)
            except (SSL.Error, OSError):
                self.log.fail()
                return
            entry = self._record_handshake(conn, peer, (time.perf_counter() - t0) * 1000.0)
            try:
                httpd.serve_connection(
                    _TlsStream(self, conn, sock),
                    lambda request: self.route(request, conn, entry),
                    self.limits,
                    headers=(("X-Backend", self.config.name),),
                )
            finally:
                self._shutdown(conn, sock)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _shutdown(self, conn: SSL.Connection, sock: socket.socket) -> None:
        """Send close_notify; never wait for the peer's. Mark the connection as shut down even if
        sending fails, so that OpenSSL keeps the session in the cache."""
        with contextlib.suppress(SSL.Error, OSError):
            self.io(sock, conn.shutdown, time.monotonic() + 1.0)
        conn.set_shutdown(conn.get_shutdown() | SSL.SENT_SHUTDOWN)

    def _record_handshake(self, conn: SSL.Connection, peer: object, ms: float) -> Handshake:
        return self.log.complete(
            f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            _session_reused(conn),
            conn.get_protocol_version_name(),
            _session_id(conn),
            ms,
        )

    # -- pages ---------------------------------------------------------------------------------

    def route(
        self, request: httpd.Request, conn: SSL.Connection, handshake: Handshake | None = None
    ) -> httpd.Response:
        """The TLS port: the connection's own pages, then the status pages."""
        with self._lock:
            self.requests += 1
        if handshake is not None and request.number == 1:
            self.log.made_by(handshake, request.header(MADE_BY_HEADER))
        if request.method in ("GET", "HEAD"):
            if request.path == "/info":
                return httpd.json(encode(self.connection_info(conn, request.number)))
            if request.path == "/":
                return httpd.html(_index_html(self.connection_info(conn, request.number)))
        return self.status_route(request, index=False)

    def status_route(self, request: httpd.Request, index: bool = True) -> httpd.Response:
        """``/status.json`` and ``/status`` (and ``/`` on the admin port)."""
        if request.method not in ("GET", "HEAD"):
            return httpd.text(405, "only GET and HEAD\n")
        if request.path == "/status.json":
            return httpd.json(encode(self.status()))
        if request.path == "/metrics":
            return self.metrics.response()
        if request.path == "/status" or (index and request.path == "/"):
            return httpd.html(status_page.render_backend(self.status()))
        return httpd.text(404, "not found\n")

    def connection_info(self, conn: SSL.Connection, number: int) -> ConnectionInfo:
        """What a client wants to know about its own connection."""
        return ConnectionInfo(
            backend=self.config.name,
            pid=os.getpid(),
            tls_version=conn.get_protocol_version_name(),
            cipher=conn.get_cipher_name(),
            resumed=_session_reused(conn),
            session_id=_session_id(conn),
            request_on_connection=number,
            cache_mode=self.config.cache.mode,
            cache=self.cache.stats()[0],
        )

    def status(self) -> BackendStatus:
        """The whole backend, for its status page and the farm's."""
        cfg = self.config
        with self._lock:
            counters = (self.connections, self.active, self.requests)
        log = self.log.snapshot()
        cache, cache_error = self.cache.stats()
        return BackendStatus(
            name=cfg.name,
            pid=os.getpid(),
            listen=f"https://{cfg.host}:{cfg.port}/",
            admin=f"http://{cfg.host}:{cfg.admin_port}/status.json",
            tls=cfg.tls,
            cache_mode=cfg.cache.mode,
            dc_address=cfg.dc_address,
            keys=cfg.keys,
            uptime_s=round(time.time() - self.started, 1),
            connections=counters[0],
            active=counters[1],
            requests=counters[2],
            handshakes=log.counts,
            by_version=log.by_version,
            recent=log.recent,
            handshake_ms=log.latency,
            cache=cache,
            cache_error=cache_error,
            store=cfg.store,
            store_servers=self.cache.store_servers(),
            resumption=cfg.cache.resumption,
            tickets=self.cache.ticket_status(),
            kind="threaded",
            resumed_from=log.resumed_from,
        )


def _index_html(info: ConnectionInfo) -> str:
    shown = {
        "backend": info.backend,
        "tls_version": info.tls_version,
        "cipher": info.cipher,
        "resumed": info.resumed,
        "session_id": info.session_id,
        "cache_mode": info.cache_mode,
    }
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in shown.items()
    )
    verdict = "resumed a session" if info.resumed else "did a full handshake"
    return status_page.page(
        f"tlscache farm: {info.backend}",
        f"<p>This connection {verdict} on <b>{html.escape(info.backend)}</b>.</p>"
        f"<table>{rows}</table>"
        '<p><a href="/info">/info</a> (JSON) &middot; <a href="/status">/status</a></p>',
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_backend_args(argv)
    backend = Backend(config)
    listener = socket.create_server((config.host, config.port), backlog=511)
    admin = httpd.HttpServer(config.host, config.admin_port, backend.status_route)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        backend.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"{config.name}: https://{config.host}:{config.port}/ (TLS <= {config.tls}, "
        f"cache {config.cache.mode}, resumption {config.cache.resumption}), status http://{config.host}:{config.admin_port}/status.json",
        flush=True,
    )
    try:
        backend.serve(listener)
    finally:
        listener.close()
        admin.close()
    # Give in-flight connections a moment to finish their clean shutdown.
    deadline = time.monotonic() + 2.0
    while backend.active and time.monotonic() < deadline:
        time.sleep(0.05)
    backend.cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
