"""Backends of other server kinds in one farm (``--backend-kinds``, :mod:`.kinds`): what they
share with the threaded backend. All kinds use the same store, key ring, certificate and
session id context, so each resumes the sessions the others made.

:class:`KindBackend` is the part the two new kinds share: the session cache built as the
threaded backend builds it (same :data:`~.backend.SESSION_ID_CONTEXT`, passed explicitly),
the handshake records (:class:`~.handshakes.HandshakeLog`, as the threaded backend keeps them),
``/info``, and ``/status.json``, ``/status`` and ``/metrics`` (also on the admin port, which the
farm polls to know the backend is up). Only stateful resumption is offered here: shared ticket
keys are wired into pyOpenSSL contexts only.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING

from . import httpd
from . import status as status_page
from .backend import SESSION_ID_CONTEXT, SessionCacheSetup
from .config import STORE_MODES, BackendConfig, BackendKind
from .handshakes import HandshakeLog
from .metrics import MetricsPage
from .records import BackendStatus, ConnectionInfo, Handshake, encode

if TYPE_CHECKING:
    from tlscache import SessionCache


class KindBackend:
    """Counters, pages and session cache of a twisted or stdlib backend."""

    def __init__(self, config: BackendConfig, kind: BackendKind) -> None:
        self.config = config
        self.kind = kind
        self.setup = SessionCacheSetup(config.cache, config.dc_address, config.keys, config.store)
        self.started = time.time()
        self._lock = threading.Lock()
        self.connections = 0
        self.active = 0
        self.requests = 0
        self.log = HandshakeLog()
        self.metrics = MetricsPage(self.status, lambda: self.setup.cache)

    def make_cache(self) -> SessionCache | None:
        """The SessionCache to install (None with ``--cache none``), with the threaded
        backend's settings and session id context; its store as that backend opens it."""
        import tlscache

        cfg = self.config.cache
        if cfg.mode == "none":
            return None
        store: tlscache.SessionStore
        if cfg.mode == "distcache":
            if not self.config.dc_address or not self.config.keys:
                raise SystemExit("--cache distcache needs --dc-address and --keys")
            store = tlscache.DistcacheStore(self.config.dc_address)
        elif cfg.mode in STORE_MODES:
            store = self.setup._shared_store()
        else:
            store = tlscache.MemoryStore()
        self.setup.cache = tlscache.SessionCache(
            store,
            timeout=cfg.session_timeout,
            deadline_ms=cfg.deadline_ms,
            breaker_reset_s=cfg.breaker_reset_s,
            session_id_context=SESSION_ID_CONTEXT,
            async_writes=cfg.writes == "async",
            keys=self.config.keys,
        )
        return self.setup.cache

    def opened(self) -> None:
        """A TCP connection was accepted (its handshake is still to come)."""
        with self._lock:
            self.connections += 1
            self.active += 1

    def closed(self) -> None:
        with self._lock:
            self.active -= 1

    def count_request(self) -> None:
        """One HTTP request on the TLS port."""
        with self._lock:
            self.requests += 1

    def info(
        self,
        version: str,
        cipher: str | None,
        resumed: bool,
        number: int,
        session_id: str | None = None,
    ) -> bytes:
        """``/info`` as the threaded backend writes it (the workload reads ``backend``)."""
        return encode(
            ConnectionInfo(
                backend=self.config.name,
                pid=os.getpid(),
                tls_version=version,
                cipher=cipher,
                resumed=resumed,
                session_id=session_id,
                request_on_connection=number,
                cache_mode=self.config.cache.mode,
                cache=self.setup.stats()[0],
            )
        )

    def first_request(self, handshake: Handshake, made_by: str | None) -> None:
        """The first request of a connection, with its :data:`~.handshakes.MADE_BY_HEADER`."""
        self.log.made_by(handshake, made_by)

    def status(self) -> BackendStatus:
        cfg = self.config
        with self._lock:
            connections, active, requests = self.connections, self.active, self.requests
        log = self.log.snapshot()
        cache, cache_error = self.setup.stats()
        return BackendStatus(
            name=cfg.name,
            pid=os.getpid(),
            listen=f"https://{cfg.host}:{cfg.port}/",
            admin=f"http://{cfg.host}:{cfg.admin_port}/status.json",
            tls=cfg.tls,
            cache_mode=cfg.cache.mode,
            dc_address=cfg.dc_address,
            uptime_s=round(time.time() - self.started, 1),
            connections=connections,
            active=active,
            requests=requests,
            handshakes=log.counts,
            by_version=log.by_version,
            recent=log.recent,
            handshake_ms=log.latency,
            cache=cache,
            cache_error=cache_error,
            keys=cfg.keys,
            store=cfg.store,
            store_servers=self.setup.store_servers(),
            kind=self.kind,
            resumed_from=log.resumed_from,
        )

    def route(self, method: str, path: str) -> httpd.Response | None:
        """``/status.json``, ``/status`` and ``/metrics`` (None: not a status page)."""
        if method not in ("GET", "HEAD"):
            return None
        if path == "/status.json":
            return httpd.json(encode(self.status()))
        if path == "/status":
            return httpd.html(status_page.render_backend(self.status()))
        if path == "/metrics":
            return self.metrics.response()
        return None

    def admin_route(self, request: httpd.Request) -> httpd.Response:
        return self.route(request.method, request.path) or httpd.text(404, "not found\n")

    def start_admin(self) -> httpd.HttpServer:
        """The plain-HTTP admin port (the farm polls it to see the backend is ready)."""
        return httpd.HttpServer(self.config.host, self.config.admin_port, self.admin_route)

    def banner(self) -> str:
        c = self.config
        return (
            f"{c.name} ({self.kind}): https://{c.host}:{c.port}/ (TLS <= {c.tls}, cache "
            f"{c.cache.mode}), status http://{c.host}:{c.admin_port}/status.json"
        )


def index_text(name: str, resumed: bool) -> bytes:
    """The body of ``/``: which backend answered and how."""
    verdict = "resumed a session" if resumed else "did a full handshake"
    return f"This connection {verdict} on {name}.\n".encode()
