"""A backend of the farm as an asyncio HTTPS server on the standard library's ``ssl``
(``--backend-kinds ...,stdlib``).

The shared cache goes on the ``ssl.SSLContext`` with ``SessionCache.install`` (see
docs/servers/asyncio-stdlib.md). Every response closes its connection: one request per
connection is all the workload asks, and ``writer.close()`` sends close_notify, which keeps
the session good. The request head is parsed by hand (request line, and the one header the
handshake records read): the pages take no body, and h11 would add a state machine for nothing.

The server listens on plain TCP and starts TLS on each connection itself
(``StreamWriter.start_tls``), so that it can time the handshake and count the ones that fail,
as the threaded backend does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import sys
import time

from .backend_kinds import KindBackend, index_text
from .config import BackendConfig, parse_backend_args
from .handshakes import MADE_BY_HEADER
from .records import Handshake

HEAD_LIMIT = 16384
READ_TIMEOUT = 10.0


def make_context(config: BackendConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(config.cert, config.key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    top = ssl.TLSVersion.TLSv1_3 if config.tls == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = top
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF | ssl.OP_NO_COMPRESSION
    return ctx


def header(head: bytes, name: str) -> str | None:
    """The value of header ``name`` in a request head; None if absent or repeated."""
    wanted = name.lower().encode()
    values = [
        value.strip()
        for key, _, value in (line.partition(b":") for line in head.split(b"\r\n")[1:])
        if key.strip().lower() == wanted
    ]
    return values[0].decode("ascii", "replace") if len(values) == 1 else None


def session_id(sslobj: ssl.SSLObject) -> str | None:
    """The session id (TLS 1.2) or stateful ticket id (TLS 1.3) prefix, as the threaded
    backend shows it."""
    try:
        session = sslobj.session
    except (ValueError, ssl.SSLError):
        return None
    return session.id.hex()[:16] if session is not None and session.id else None


def respond(
    backend: KindBackend, head: bytes, sslobj: ssl.SSLObject, handshake: Handshake | None = None
) -> bytes:
    """The whole HTTP response to the request whose head is ``head``."""
    parts = head.split(b"\r\n", 1)[0].split()
    method = parts[0].decode("ascii", "replace") if parts else ""
    path = parts[1].decode("ascii", "replace").split("?", 1)[0] if len(parts) > 1 else ""
    backend.count_request()
    if handshake is not None:
        backend.first_request(handshake, header(head, MADE_BY_HEADER))
    resumed = bool(sslobj.session_reused)
    status, ctype, body = 200, "text/plain", b""
    page = backend.route(method, path)
    if page is not None:
        status, ctype, body = page.status, page.content_type, page.body
    elif method != "GET":
        status, body = 405, b"only GET\n"
    elif path == "/info":
        cipher = sslobj.cipher()
        version = sslobj.version() or "?"
        ctype = "application/json"
        sid = handshake.session_id if handshake is not None else None
        body = backend.info(version, cipher[0] if cipher else None, resumed, 1, sid)
    elif path == "/":
        body = index_text(backend.config.name, resumed)
    else:
        status, body = 404, b"not found\n"
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(status, "OK")
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nX-Backend: {backend.config.name}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def handshake(
    backend: KindBackend, ctx: ssl.SSLContext, writer: asyncio.StreamWriter
) -> tuple[ssl.SSLObject, Handshake] | None:
    """TLS on an accepted connection, timed and recorded; None if it failed."""
    t0 = time.perf_counter()
    try:
        await writer.start_tls(ctx, ssl_handshake_timeout=READ_TIMEOUT)
    except (TimeoutError, OSError, ssl.SSLError):
        backend.log.fail()
        return None
    ms = (time.perf_counter() - t0) * 1000.0
    sslobj: ssl.SSLObject = writer.get_extra_info("ssl_object")
    peer = writer.get_extra_info("peername")
    entry = backend.log.complete(
        f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
        bool(sslobj.session_reused),
        sslobj.version() or "?",
        session_id(sslobj),
        ms,
    )
    return sslobj, entry


async def serve(config: BackendConfig) -> None:
    backend = KindBackend(config, "stdlib")
    ctx = make_context(config)
    cache = backend.make_cache()
    if cache is None:  # check_args refuses it; ssl has no switch for its internal cache
        raise SystemExit("a stdlib backend needs a session cache (not --cache none)")
    cache.install(ctx)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend.opened()
        try:
            done = await handshake(backend, ctx, writer)
            if done is not None:
                sslobj, entry = done
                with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError):
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
                    writer.write(respond(backend, head, sslobj, entry))
                    await writer.drain()
        except (OSError, ssl.SSLError, asyncio.LimitOverrunError):
            pass
        finally:
            backend.closed()
            writer.close()  # close_notify: the session stays good
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    server = await asyncio.start_server(
        handle, config.host, config.port, backlog=511, limit=HEAD_LIMIT
    )
    admin = backend.start_admin()  # after the TLS port: the farm takes it as "ready"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(backend.banner(), flush=True)
    try:
        async with server:
            await stop.wait()
    finally:
        admin.close()
        backend.setup.close()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_backend_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
