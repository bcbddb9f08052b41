"""One HTTPS backend of the demo farm: a pyOpenSSL server whose session cache is tlscache.

It serves a small HTML page at ``/`` and the facts of the current connection as JSON at ``/info``
(which backend, TLS version, cipher, whether the handshake resumed a session, the session id
prefix, the cache counters), so that a client can see where it landed and whether it resumed.
``/status`` and ``/status.json`` describe the whole backend; the same JSON is served over plain
HTTP on the admin port, so that the farm's status page can poll it without adding handshakes.

Every connection ends with a clean TLS shutdown (close_notify): OpenSSL throws away the session of
a connection that is freed without one, and the shared cache would lose good sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

from OpenSSL import SSL

if TYPE_CHECKING:
    from tlscache import SessionCache

from . import status as status_page

T = TypeVar("T")

SESSION_ID_CONTEXT = b"tlscache-farm"
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_REQUESTS_PER_CONNECTION = 100
HANDSHAKE_TIMEOUT = 10.0
RECENT = 50
LATENCY_WINDOW = 2000


class ConnectionDone(Exception):
    """The peer went away or was too slow: stop serving this connection."""


@dataclass
class BackendConfig:
    """Everything a backend needs to know; mirrors its command line."""

    name: str
    host: str
    port: int
    admin_port: int
    cert: str
    key: str
    tls: str = "1.3"
    cache: str = "distcache"
    dc_address: str | None = None
    session_timeout: int = 300
    deadline_ms: float = 100.0
    sync_writes: bool = True
    max_connections: int = 128
    idle_timeout: float = 5.0


def jsonable(value: Any) -> Any:
    """Turn cache statistics (dataclass, mapping, named tuple, enum...) into plain JSON data."""
    import dataclasses
    import enum

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value if not isinstance(value.value, int) else value.name.lower())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "_asdict"):
        return jsonable(value._asdict())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset | deque):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "__dict__"):
        return {k: jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
    return str(value)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no data (rather than a misleading zero)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def _session_reused(conn: SSL.Connection) -> bool:
    """pyOpenSSL has no wrapper for SSL_session_reused; the binding does."""
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(conn._ssl))


def _session_id(conn: SSL.Connection) -> bytes | None:
    """The session id (TLS 1.2) or stateful ticket id (TLS 1.3), if tlscache can read it."""
    try:
        from tlscache.openssl.callbacks import session_id
    except ImportError:
        return None
    try:
        return session_id(conn)
    except Exception:
        return None


class SessionCacheSetup:
    """The tlscache SessionCache of this backend (or none, for ``--cache none``)."""

    def __init__(self, config: BackendConfig) -> None:
        self.mode = config.cache
        self.cache: SessionCache | None = None
        self.dc_address = config.dc_address
        self.timeout = config.session_timeout
        self.deadline_ms = config.deadline_ms
        self.sync_writes = config.sync_writes

    def install(self, ctx: SSL.Context) -> None:
        if self.mode == "none":
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
            ctx.set_options(SSL.OP_NO_TICKET)  # TLS 1.3: stateful tickets nobody can look up
            return
        import tlscache

        if self.mode == "distcache":
            if not self.dc_address:
                raise SystemExit("--cache distcache needs --dc-address")
            store: tlscache.SessionStore = tlscache.DistcacheStore(self.dc_address)
        else:
            store = tlscache.MemoryStore()
        self.cache = tlscache.SessionCache(
            store,
            timeout=self.timeout,
            deadline_ms=self.deadline_ms,
            session_id_context=SESSION_ID_CONTEXT,
            async_writes=not self.sync_writes,
        )
        self.cache.install(ctx)

    def close(self) -> None:
        """Finish session writes (queued or still owed a reply) before the process exits."""
        if self.cache is not None:
            self.cache.close(1.0)
            self.cache.store.close()

    def stats(self) -> Any:
        if self.cache is None:
            return None
        try:
            return jsonable(self.cache.stats())
        except Exception as exc:  # the status page must not die with the cache
            return {"error": repr(exc)}


class Backend:
    """A threaded HTTPS server: one thread per connection, at most ``max_connections``."""

    def __init__(self, config: BackendConfig) -> None:
        self.config = config
        self.cache = SessionCacheSetup(config)
        self.ctx = self._make_context()
        self.started = time.time()
        self.stop_event = threading.Event()
        self._slots = threading.BoundedSemaphore(config.max_connections)
        self._lock = threading.Lock()
        self.connections = 0
        self.active = 0
        self.requests = 0
        self.full = 0
        self.resumed = 0
        self.failed = 0
        self.by_version: dict[str, int] = {}
        self.latency_full: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.latency_resumed: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

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

    # -- accepting -----------------------------------------------------------------------------

    def serve(self, listener: socket.socket) -> None:
        """Accept until ``stop_event``; each connection gets a thread once a slot is free."""
        listener.settimeout(0.2)
        while not self.stop_event.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            try:
                sock, peer = listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError:
                self._slots.release()
                if self.stop_event.is_set():
                    break
                time.sleep(0.05)  # EMFILE and friends: back off instead of spinning
                continue
            threading.Thread(target=self._connection_thread, args=(sock, peer), daemon=True).start()

    def _connection_thread(self, sock: socket.socket, peer: Any) -> None:
        with self._lock:
            self.connections += 1
            self.active += 1
        try:
            self._serve_connection(sock, peer)
        finally:
            with self._lock:
                self.active -= 1
            self._slots.release()

    # -- one connection ------------------------------------------------------------------------

    def _io(self, sock: socket.socket, fn: Callable[[], T], deadline: float) -> T:
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

    def _serve_connection(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = SSL.Connection(self.ctx, sock)
        conn.set_accept_state()
        handshaken = False
        try:
            t0 = time.perf_counter()
            try:
                self._io(sock, conn.do_handshake, time.monotonic() + HANDSHAKE_TIMEOUT)
            except (SSL.Error, ConnectionDone, OSError):
                with self._lock:
                    self.failed += 1
                return
            handshaken = True
            self._record_handshake(conn, peer, (time.perf_counter() - t0) * 1000.0)
            self._http_loop(conn, sock)
        finally:
            if handshaken:
                self._shutdown(conn, sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _shutdown(self, conn: SSL.Connection, sock: socket.socket) -> None:
        """Send close_notify; never wait for the peer's. Mark the connection as shut down even if
        sending fails, so that OpenSSL keeps the session in the cache."""
        with contextlib.suppress(SSL.Error, ConnectionDone, OSError):
            self._io(sock, conn.shutdown, time.monotonic() + 1.0)
        conn.set_shutdown(conn.get_shutdown() | SSL.SENT_SHUTDOWN)

    def _record_handshake(self, conn: SSL.Connection, peer: Any, ms: float) -> None:
        resumed = _session_reused(conn)
        version = conn.get_protocol_version_name()
        sid = _session_id(conn)
        entry = {
            "time": time.time(),
            "peer": f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            "resumed": resumed,
            "version": version,
            "session_id": sid.hex()[:16] if sid else None,
            "handshake_ms": round(ms, 3),
        }
        with self._lock:
            if resumed:
                self.resumed += 1
                self.latency_resumed.append(ms)
            else:
                self.full += 1
                self.latency_full.append(ms)
            self.by_version[version] = self.by_version.get(version, 0) + 1
            self.recent.append(entry)

    def _recv_request(
        self, conn: SSL.Connection, sock: socket.socket, buf: bytearray, timeout: float
    ) -> tuple[str, str, dict[str, str], str] | None:
        """Read one request head (and discard its body). None on a clean end of connection."""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            if len(buf) > MAX_HEADER_BYTES:
                raise ConnectionDone("header too large")
            try:
                data = self._io(sock, lambda: conn.recv(16384), deadline)
            except SSL.ZeroReturnError:
                return None
            except ConnectionDone:
                if not buf:
                    return None
                raise
            except SSL.SysCallError:
                return None
            if not data:
                return None
            buf += data
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        del buf[:]
        buf += rest
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            raise ConnectionDone("bad request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        if length < 0 or length > MAX_BODY_BYTES:
            raise ConnectionDone("body too large")
        while len(buf) < length:
            data = self._io(sock, lambda: conn.recv(16384), deadline)
            if not data:
                return None
            buf += data
        del buf[:length]
        return method, target, headers, version

    def _send(self, conn: SSL.Connection, sock: socket.socket, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10.0
        while view:
            chunk = view[:16384]
            sent = self._io(sock, lambda c=chunk: conn.send(c), deadline)  # type: ignore[misc]
            view = view[sent:]

    def _http_loop(self, conn: SSL.Connection, sock: socket.socket) -> None:
        buf = bytearray()
        served = 0
        while served < MAX_REQUESTS_PER_CONNECTION and not self.stop_event.is_set():
            timeout = HANDSHAKE_TIMEOUT if served == 0 else self.config.idle_timeout
            try:
                request = self._recv_request(conn, sock, buf, timeout)
            except (ConnectionDone, SSL.Error, ValueError):
                return
            if request is None:
                return
            method, target, headers, version = request
            served += 1
            with self._lock:
                self.requests += 1
            keep_alive = (
                headers.get("connection", "").lower() != "close"
                if version == "HTTP/1.1"
                else headers.get("connection", "").lower() == "keep-alive"
            )
            keep_alive = keep_alive and served < MAX_REQUESTS_PER_CONNECTION
            code, ctype, body = self._route(method, target, conn, served)
            head = (
                f"HTTP/1.1 {code}\r\n"
                f"Content-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\n"
                f"Cache-Control: no-store\r\n"
                f"X-Backend: {self.config.name}\r\n"
                f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
            ).encode("latin-1")
            try:
                self._send(conn, sock, head + (b"" if method == "HEAD" else body))
            except (ConnectionDone, SSL.Error, OSError):
                return
            if not keep_alive:
                return

    # -- pages ---------------------------------------------------------------------------------

    def _route(
        self, method: str, target: str, conn: SSL.Connection, served: int
    ) -> tuple[str, str, bytes]:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        if path == "/info":
            return "200 OK", "application/json", _json(self.connection_info(conn, served))
        if path == "/status.json":
            return "200 OK", "application/json", _json(self.status())
        if path == "/status":
            html_text = status_page.render_backend(self.status())
            return "200 OK", "text/html; charset=utf-8", html_text.encode()
        if path == "/":
            info = self.connection_info(conn, served)
            return "200 OK", "text/html; charset=utf-8", _index_html(info).encode()
        return "404 Not Found", "text/plain", b"not found\n"

    def connection_info(self, conn: SSL.Connection, served: int) -> dict[str, Any]:
        """What a client wants to know about its own connection."""
        sid = _session_id(conn)
        return {
            "backend": self.config.name,
            "pid": os.getpid(),
            "tls_version": conn.get_protocol_version_name(),
            "cipher": conn.get_cipher_name(),
            "resumed": _session_reused(conn),
            "session_id": sid.hex()[:16] if sid else None,
            "request_on_connection": served,
            "cache_mode": self.config.cache,
            "cache": self.cache.stats(),
        }

    def status(self) -> dict[str, Any]:
        """The whole backend, for its status page and the farm's."""
        with self._lock:
            full_ms = list(self.latency_full)
            res_ms = list(self.latency_resumed)
            out = {
                "name": self.config.name,
                "pid": os.getpid(),
                "listen": f"https://{self.config.host}:{self.config.port}/",
                "admin": f"http://{self.config.host}:{self.config.admin_port}/status.json",
                "tls": self.config.tls,
                "cache_mode": self.config.cache,
                "dc_address": self.config.dc_address,
                "uptime_s": round(time.time() - self.started, 1),
                "connections": self.connections,
                "active": self.active,
                "requests": self.requests,
                "handshakes": {"full": self.full, "resumed": self.resumed, "failed": self.failed},
                "by_version": dict(self.by_version),
                "recent": list(self.recent),
            }
        out["handshake_ms"] = {
            "full": {"p50": percentile(full_ms, 50), "p99": percentile(full_ms, 99)},
            "resumed": {"p50": percentile(res_ms, 50), "p99": percentile(res_ms, 99)},
        }
        out["cache"] = self.cache.stats()
        return out


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def _index_html(info: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(info[k]))}</td></tr>"
        for k in ("backend", "tls_version", "cipher", "resumed", "session_id", "cache_mode")
    )
    verdict = "resumed a session" if info["resumed"] else "did a full handshake"
    name = str(info["backend"])
    return status_page.page(
        f"tlscache farm: {name}",
        f"<p>This connection {verdict} on <b>{html.escape(name)}</b>.</p>"
        f"<table>{rows}</table>"
        '<p><a href="/info">/info</a> (JSON) &middot; <a href="/status">/status</a></p>',
    )


class _AdminHandler(BaseHTTPRequestHandler):
    """Plain-HTTP status on the admin port: polling it costs no TLS handshake."""

    backend: Backend

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/status.json":
            body, ctype = _json(self.backend.status()), "application/json"
        elif path in ("/", "/status"):
            body = status_page.render_backend(self.backend.status()).encode()
            ctype = "text/html; charset=utf-8"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def start_admin(backend: Backend) -> ThreadingHTTPServer:
    handler = type("AdminHandler", (_AdminHandler,), {"backend": backend})
    server = ThreadingHTTPServer((backend.config.host, backend.config.admin_port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2})
    thread.daemon = True
    thread.start()
    return server


def parse_args(argv: list[str] | None) -> BackendConfig:
    p = argparse.ArgumentParser(
        prog="python -m tlscache_farm.backend", description="One HTTPS backend of the demo farm."
    )
    p.add_argument("--name", default="backend-1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True, help="TLS port")
    p.add_argument("--admin-port", type=int, required=True, help="plain-HTTP status port")
    p.add_argument("--cert", required=True, help="PEM certificate chain")
    p.add_argument("--key", required=True, help="PEM private key")
    p.add_argument("--tls", choices=("1.2", "1.3"), default="1.3", help="highest TLS version")
    p.add_argument("--cache", choices=("distcache", "memory", "none"), default="distcache")
    p.add_argument("--dc-address", help="dc_client address, e.g. UNIX:/run/dcc.sock")
    p.add_argument("--session-timeout", type=int, default=300, help="session lifetime, seconds")
    p.add_argument(
        "--cache-deadline-ms",
        type=float,
        default=100.0,
        help="bound on each cache lookup/write (default 100; the library default is 20)",
    )
    p.add_argument(
        "--cache-writes",
        choices=("async", "sync"),
        default="sync",
        help="sync (default): a new session is stored within the handshake, before the first "
        "response; async: from a writer thread",
    )
    p.add_argument("--max-connections", type=int, default=128)
    p.add_argument("--idle-timeout", type=float, default=5.0, help="keep-alive idle, seconds")
    a = p.parse_args(argv)
    return BackendConfig(
        name=a.name,
        host=a.host,
        port=a.port,
        admin_port=a.admin_port,
        cert=a.cert,
        key=a.key,
        tls=a.tls,
        cache=a.cache,
        dc_address=a.dc_address,
        session_timeout=a.session_timeout,
        deadline_ms=a.cache_deadline_ms,
        sync_writes=a.cache_writes == "sync",
        max_connections=a.max_connections,
        idle_timeout=a.idle_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    backend = Backend(config)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((config.host, config.port))
    listener.listen(511)
    admin = start_admin(backend)

    def on_signal(signum: int, frame: Any) -> None:
        backend.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"{config.name}: https://{config.host}:{config.port}/ (TLS <= {config.tls}, "
        f"cache {config.cache}), status http://{config.host}:{config.admin_port}/status.json",
        flush=True,
    )
    try:
        backend.serve(listener)
    finally:
        listener.close()
        admin.shutdown()
        admin.server_close()
    # Give in-flight connections a moment to finish their clean shutdown.
    deadline = time.monotonic() + 2.0
    while backend.active and time.monotonic() < deadline:
        time.sleep(0.05)
    backend.cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
