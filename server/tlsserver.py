"""A small pyOpenSSL TLS server for cross-process resumption tests and the handshake bench.

    python -m tlscache_farm.tlsserver --cert chain.pem --key key.pem --port N --store SPEC

``--store``: ``dc:ADDRESS`` (a SessionCache over DistcacheStore), ``memory`` (a
SessionCache over a MemoryStore), ``internal`` (OpenSSL's own cache, no
SessionCache) or ``none`` (no resumption at all).

One connection at a time per thread (``--threads``): handshake, then one line to the client::

    reused=1 version=TLSv1.3 new=<hex id>,<hex id> hits=.. misses=.. skipped=.. cpu=<s>

(``new`` lists the ids given to the new-session callback during this handshake,
so a test can wait until the store holds them), then a clean TLS shutdown.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import threading
import time
from types import FrameType

from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tlscache import DistcacheStore, MemoryStore, SessionCache, SessionStore

from .tlsclient import VERSIONS


class RecordingCache(SessionCache):
    """A SessionCache that remembers the ids of the sessions created by the current handshake."""

    def __init__(self, store: SessionStore, **kwargs: object) -> None:
        super().__init__(store, **kwargs)  # type: ignore[arg-type]
        self._local = threading.local()

    @property
    def new_ids(self) -> list[bytes]:
        """The ids created on this thread's current connection (one connection per thread)."""
        ids: list[bytes] | None = getattr(self._local, "ids", None)
        if ids is None:
            ids = self._local.ids = []
        return ids

    def on_new(self, session_id: bytes, der: bytes, timeout_s: int) -> None:
        self.new_ids.append(bytes(session_id))
        super().on_new(session_id, der, timeout_s)


def make_context(args: argparse.Namespace) -> tuple[SSL.Context, RecordingCache | None]:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(args.cert)
    ctx.use_privatekey_file(args.key)
    ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    if args.tls != "any":
        ctx.set_min_proto_version(VERSIONS[args.tls])
        ctx.set_max_proto_version(VERSIONS[args.tls])
    cache: RecordingCache | None = None
    if args.store == "internal":
        ctx.set_session_id(b"tlscache-test")
        ctx.set_options(SSL.OP_NO_TICKET)  # stateful TLS 1.3 tickets, as with the shared cache
        ctx.set_timeout(300)
    elif args.store == "none":
        ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(SSL.OP_NO_TICKET)
    else:
        store: SessionStore
        if args.store == "memory":
            store = MemoryStore()
        elif args.store.startswith("dc:"):
            store = DistcacheStore(args.store[3:])
        else:
            raise SystemExit(f"unknown --store {args.store!r}")
        cache = RecordingCache(
            store,
            timeout=300,
            deadline_ms=args.deadline_ms,
            breaker_reset_s=args.breaker_reset_s,
            async_writes=args.writes == "async",  # default: SessionCache's (synchronous)
            session_id_context=b"tlscache-test",
        )
        cache.install(ctx)
    return ctx, cache


def serve_one(
    sock: socket.socket, ctx: SSL.Context, cache: RecordingCache | None, report_stats: bool
) -> None:
    # Kernel timeouts keep the socket blocking for pyOpenSSL but bound every read and write.
    tv = struct.pack("ll", 5, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    conn = SSL.Connection(ctx, sock)
    conn.set_accept_state()
    if cache is not None:
        cache.new_ids.clear()
    try:
        conn.do_handshake()
    except (SSL.Error, OSError):
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        return
    reused = _lib.SSL_session_reused(conn._ssl)
    fields = {
        "reused": str(int(reused)),
        "version": conn.get_protocol_version_name(),
        "new": ",".join(i.hex() for i in cache.new_ids) if cache is not None else "",
    }
    if cache is not None and report_stats:
        s = cache.stats()
        fields.update(
            hits=str(s.hits),
            pending_hits=str(s.pending_hits),
            misses=str(s.misses),
            skipped=str(s.skipped),
            errors=str(s.errors + s.timeouts),
            breaker=s.breaker_state,
        )
    fields["cpu"] = f"{time.process_time():.6f}"
    line = " ".join(f"{k}={v}" for k, v in fields.items()) + "\n"
    try:
        conn.sendall(line.encode())
        conn.shutdown()  # close_notify: the session stays valid
        for _ in range(16):  # wait (bounded) for the client's close_notify
            try:
                conn.recv(4096)
            except SSL.ZeroReturnError:
                break
    except (SSL.Error, OSError):
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", default="none")
    p.add_argument("--tls", choices=["1.2", "1.3", "any"], default="any")
    writes = p.add_mutually_exclusive_group()
    writes.add_argument("--sync-writes", dest="writes", action="store_const", const="sync")
    writes.add_argument("--async-writes", dest="writes", action="store_const", const="async")
    p.add_argument("--deadline-ms", type=float, default=20.0)
    p.add_argument("--breaker-reset-s", type=float, default=5.0)
    p.add_argument("--no-stats", action="store_true", help="leave the counters out of the line")
    p.add_argument("--threads", type=int, default=1, help="connections served at once")
    args = p.parse_args(argv)

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ctx, cache = make_context(args)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(128)

    def worker() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # listener closed: shutting down
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                serve_one(sock, ctx, cache, not args.no_stats)
            finally:
                sock.close()

    for _ in range(max(0, args.threads - 1)):
        threading.Thread(target=worker, daemon=True).start()
    try:
        worker()
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()
        if cache is not None:
            cache.close()
            print(json.dumps(cache.stats().as_dict()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
