"""A small pyOpenSSL TLS server for cross-process resumption tests and the handshake bench.

    python -m tlscache_farm.tlsserver --cert chain.pem --key key.pem --port N --store SPEC

``--store``: ``dc:ADDRESS`` (a SessionCache over DistcacheStore), ``memory`` (a
SessionCache over a MemoryStore), ``internal`` (OpenSSL's own cache, no
SessionCache) or ``none`` (no resumption at all).

A SessionCache seals what it stores with the key ring ``--keys PATH``; servers that
share a store must share the ring. ``--insecure-unsealed`` stores sessions as they
are instead, for measuring what sealing costs; a distcache store needs one or the other.

One connection at a time per thread (``--threads``): handshake, then one line to the client::

    reused=1 version=TLSv1.3 new=<hex id>,<hex id> hits=.. misses=.. skipped=.. cpu=<s>

(``new`` lists the keys under which the store receives this handshake's sessions:
their ids, or with ``--keys`` the keyed hashes the store sees instead, so a test can
wait until the store holds them; ``peer`` and ``verify`` are the
client certificate's common name and OpenSSL's verify result; ``seal_<kind>``
count the stored values the cache refused, by kind), then a clean TLS shutdown.
``--log FILE`` appends that line for every connection, failed handshakes included
(``handshake=failed:...``), with how the connection ended (``end=...``).
``--request``: the client speaks first (one line), as in HTTP.
``--client-ca FILE`` asks clients for a certificate from that CA
(``--require-client-cert``: refuses those without one).
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
from typing import TextIO

from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as _lib

from tlscache import CacheStats, DistcacheStore, MemoryStore, SessionCache, SessionStore

from .tlsclient import VERSIONS

#: The session id context of every server started without ``--session-id-context``.
SESSION_ID_CONTEXT = b"tlscache-test"

#: The kinds of sealed values a cache refuses, as the per-connection line names them.
SEAL_FAILURES = ("malformed", "unknown_key", "retired_key", "tampered", "expired")


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

    def on_new(self, context: bytes, session_id: bytes, der: bytes, timeout_s: int) -> None:
        # What the store receives: with a key ring, the keyed hash of the id, not the id.
        sealer = self.sealer
        key = sealer.lookup_key(bytes(context), session_id) if sealer else session_id
        self.new_ids.append(bytes(key))
        super().on_new(context, session_id, der, timeout_s)


def make_context(args: argparse.Namespace) -> tuple[SSL.Context, RecordingCache | None]:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(args.cert)
    ctx.use_privatekey_file(args.key)
    ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF)
    if args.client_ca:
        # Before the cache is installed: the default session id context depends on these.
        ctx.load_verify_locations(args.client_ca)
        ctx.load_client_ca(args.client_ca.encode())
        required = SSL.VERIFY_FAIL_IF_NO_PEER_CERT if args.require_client_cert else 0
        ctx.set_verify(SSL.VERIFY_PEER | required)
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
            if not args.keys and not args.insecure_unsealed:
                raise SystemExit("--store dc:ADDRESS needs --keys PATH (or --insecure-unsealed)")
            store = DistcacheStore(args.store[3:])
        else:
            raise SystemExit(f"unknown --store {args.store!r}")
        cache = RecordingCache(
            store,
            timeout=300,
            deadline_ms=args.deadline_ms,
            breaker_reset_s=args.breaker_reset_s,
            async_writes=args.writes == "async",  # default: SessionCache's (synchronous)
            session_id_context=(
                None
                if args.session_id_context == "default"
                else bytes.fromhex(args.session_id_context)
            ),
            keys=args.keys,
            insecure_unsealed_storage=args.insecure_unsealed,
        )
        cache.install(ctx)
    return ctx, cache


def peer_fields(conn: SSL.Connection) -> dict[str, str]:
    """The client's certificate (its common name, ``-`` without one) and OpenSSL's verdict."""
    cert = conn.get_peer_certificate(as_cryptography=True)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if cert else []
    peer = str(names[0].value).replace(" ", "_") if names else "-"
    return {"peer": peer, "verify": str(int(_lib.SSL_get_verify_result(conn._ssl)))}


def seal_fields(stats: CacheStats) -> dict[str, str]:
    """The cache's counts of refused sealed values, one ``seal_<kind>`` per kind, and of
    sessions deleted after a fatal alert."""
    counts = stats.as_dict()
    fields = {f"seal_{kind}": str(counts[f"sealed_{kind}"]) for kind in SEAL_FAILURES}
    fields["alerts_invalidated"] = str(stats.alerts_invalidated)
    return fields


def serve_one(
    sock: socket.socket,
    ctx: SSL.Context,
    cache: RecordingCache | None,
    report_stats: bool,
    log: TextIO | None = None,
    request: bool = False,
) -> None:
    # Kernel timeouts keep the socket blocking for pyOpenSSL but bound every read and write.
    tv = struct.pack("ll", 5, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    conn = SSL.Connection(ctx, sock)
    conn.set_accept_state()
    if cache is not None:
        cache.new_ids.clear()

    def status(handshake: str) -> dict[str, str]:
        fields = {
            "reused": str(int(_lib.SSL_session_reused(conn._ssl))),
            "version": conn.get_protocol_version_name(),
            "new": ",".join(i.hex() for i in cache.new_ids) if cache is not None else "",
            **peer_fields(conn),
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
                **seal_fields(s),
            )
        if handshake != "ok":
            fields["handshake"] = handshake
        return fields

    def record(fields: dict[str, str]) -> None:
        if log is not None:
            with _log_lock:
                print(" ".join(f"{k}={v}" for k, v in fields.items()), file=log, flush=True)

    try:
        conn.do_handshake()
    except (SSL.Error, OSError) as exc:
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        record(status("failed:" + type(exc).__name__))
        return
    fields = status("ok")
    fields["cpu"] = f"{time.process_time():.6f}"
    line = " ".join(f"{k}={v}" for k, v in fields.items()) + "\n"
    end = "clean"
    try:
        if request:  # the client speaks first: one line, read before answering
            received = b""
            for _ in range(16):
                received += conn.recv(4096)
                if received.endswith(b"\n"):
                    break
        conn.sendall(line.encode())
        conn.shutdown()  # close_notify: the session stays valid
        for _ in range(16):  # wait (bounded) for the client's close_notify
            try:
                conn.recv(4096)
            except SSL.ZeroReturnError:
                break
    except (SSL.Error, OSError) as exc:
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
        end = "error:" + type(exc).__name__
    record({**fields, **status("ok"), "end": end})  # the counters once the connection ended


_log_lock = threading.Lock()


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
    sealing = p.add_mutually_exclusive_group()
    sealing.add_argument("--keys", metavar="PATH", help="key ring that seals stored sessions")
    sealing.add_argument(
        "--insecure-unsealed",
        action="store_true",
        help="store sessions unsealed (benchmarks of the sealing's cost only)",
    )
    p.add_argument("--no-stats", action="store_true", help="leave the counters out of the line")
    p.add_argument("--threads", type=int, default=1, help="connections served at once")
    p.add_argument("--client-ca", metavar="FILE", help="ask for client certificates from this CA")
    p.add_argument(
        "--require-client-cert",
        action="store_true",
        help="with --client-ca: refuse clients without a valid certificate",
    )
    p.add_argument(
        "--session-id-context",
        metavar="HEX",
        default=SESSION_ID_CONTEXT.hex(),
        help="the session id context, or 'default' for the cache's own (derived) one",
    )
    p.add_argument(
        "--request",
        action="store_true",
        help="read one line from the client after the handshake, before answering",
    )
    p.add_argument(
        "--log", metavar="FILE", help="append every connection's line (failed ones too) to FILE"
    )
    args = p.parse_args(argv)

    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        # Only a flag: an exception raised here could land inside an OpenSSL callback
        # or a lock of the cache and be lost there. The workers are threads; the main
        # thread only waits for this.
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ctx, cache = make_context(args)
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
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
                serve_one(sock, ctx, cache, not args.no_stats, log, args.request)
            finally:
                sock.close()

    for _ in range(max(1, args.threads)):
        threading.Thread(target=worker, daemon=True).start()
    try:
        while not stopping.wait(0.2):
            pass
    finally:
        listener.close()
        if cache is not None:
            cache.close()
            print(json.dumps(cache.stats().as_dict()), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
