"""An asyncio HTTPS server on the standard library's ``ssl``, with the shared session cache.

    python -m tests.openssl.stdlib_server --cert chain.pem --key key.pem --port N \\
        --store dc:ADDRESS --keys RING [--uvicorn]

Plain mode (``asyncio.start_server(ssl=ctx)``): each request is answered with one line in
the body, as ``tlscache_farm.tlsserver`` writes it::

    reused=1 version=TLSv1.3 new=<store key>,<store key> hits=.. misses=..

(``new``: the store keys of the sessions this handshake created, so that a test can wait
until the store holds them.) ``--uvicorn``: the same cache on the ``ssl.SSLContext`` uvicorn
builds from its configuration, serving a tiny ASGI app; ``--refuse-offset N`` makes the
install look for the pointer at ``id(ctx) + N``, to show that the server still serves
(without a shared cache) when the cache refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from typing import Any

from tlscache import DistcacheStore, MemoryStore, SessionStore
from tlscache.exceptions import ResolverError
from tlscache_farm.tlsserver import SESSION_ID_CONTEXT, RecordingCache


def make_cache(args: argparse.Namespace) -> RecordingCache:
    store: SessionStore = (
        MemoryStore() if args.store == "memory" else DistcacheStore(args.store.removeprefix("dc:"))
    )
    sid_ctx = (
        None if args.session_id_context == "default" else bytes.fromhex(args.session_id_context)
    )
    return RecordingCache(
        store, timeout=300, deadline_ms=2000, keys=args.keys, session_id_context=sid_ctx
    )


def install(cache: RecordingCache, ctx: ssl.SSLContext, offset: int | None) -> str:
    """Install the cache; on refusal the server runs on without it, as an operator's would."""
    if offset is not None:
        from tlscache.openssl import stdlib

        stdlib.CTX_POINTER_OFFSET = offset
        stdlib._reset_cache()
    try:
        cache.install(ctx)
    except ResolverError as e:
        print(f"session cache refused: {e.reason}", file=sys.stderr, flush=True)
        return "refused"
    return "installed"


def line(cache: RecordingCache, sslobj: Any, state: str) -> str:
    ids = ",".join(i.hex() for i in cache.new_ids)
    cache.new_ids.clear()
    s = cache.stats()
    return (
        f"reused={int(sslobj.session_reused)} version={sslobj.version()} new={ids} "
        f"hits={s.hits} misses={s.misses} cache={state}\n"
    )


async def serve_plain(args: argparse.Namespace) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    cache = make_cache(args)
    state = install(cache, ctx, args.refuse_offset)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            body = line(cache, writer.get_extra_info("ssl_object"), state).encode()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.IncompleteReadError):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        finally:
            writer.close()  # close_notify: the session stays good
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port, ssl=ctx)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()
    cache.close()


def serve_uvicorn(args: argparse.Namespace) -> None:
    import uvicorn

    cache = make_cache(args)
    state = "unset"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = f"hello from uvicorn cache={state}\n".encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=args.port,
        ssl_certfile=args.cert,
        ssl_keyfile=args.key,
        log_level="warning",
        lifespan="off",
    )
    config.load()  # builds config.ssl, the ssl.SSLContext every connection uses
    assert isinstance(config.ssl, ssl.SSLContext)
    state = install(cache, config.ssl, args.refuse_offset)
    uvicorn.Server(config).run()
    cache.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", default="memory", help="memory or dc:ADDRESS")
    p.add_argument("--keys", metavar="PATH", help="key ring that seals stored sessions")
    p.add_argument("--session-id-context", default=SESSION_ID_CONTEXT.hex())
    p.add_argument("--uvicorn", action="store_true")
    p.add_argument("--refuse-offset", type=int, default=None)
    args = p.parse_args(argv)
    if args.uvicorn:
        serve_uvicorn(args)
    else:
        asyncio.run(serve_plain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
