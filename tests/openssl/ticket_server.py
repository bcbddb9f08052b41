"""A small stateless-ticket TLS server process for the ticket tests.

``python -m tests.openssl.ticket_server PORT CERT KEY DC_ADDRESS RING MODE``: listens on
127.0.0.1:PORT, shares ticket keys through the distcache server at DC_ADDRESS, sealed with
the key ring file RING. Each connection gets one line, ``reused=0|1``, then a clean
shutdown. Its clock is the wall clock plus an offset the test moves: on stdin,
``advance SECONDS`` adds to the offset and refreshes the keys; ``stats`` prints the
counters as JSON. Every answer is one line on stdout.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time

from OpenSSL import SSL

from tlscache.keyring import KeyRing
from tlscache.resumption import Resumption, configure_resumption
from tlscache.sealing import Sealer
from tlscache.session_cache import SessionCache
from tlscache.stores.distcache import DistcacheStore
from tlscache.ticketkeys import TicketKeyPolicy, TicketKeys


class OffsetClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def handle(raw: socket.socket, ctx: SSL.Context) -> None:
    """One connection (blocking socket: a timeout would make OpenSSL see EAGAIN)."""
    from OpenSSL._util import lib

    conn = SSL.Connection(ctx, raw)
    conn.set_accept_state()
    try:
        conn.do_handshake()
        reused = lib.SSL_session_reused(conn._ssl)
        conn.sendall(f"reused={reused}\n".encode())
        conn.shutdown()
    except (SSL.Error, OSError):
        pass
    finally:
        raw.close()


def serve(listener: socket.socket, ctx: SSL.Context) -> None:
    while True:
        raw, _ = listener.accept()
        threading.Thread(target=handle, args=(raw, ctx), daemon=True).start()


def main(argv: list[str]) -> None:
    port, cert, key, dc, ring_path, mode = argv
    clock = OffsetClock()
    sealer = Sealer(KeyRing.load(ring_path), clock=clock)
    store = DistcacheStore(dc)
    keys = TicketKeys(
        store, sealer, policy=TicketKeyPolicy(store_timeout_s=2.0, retry_s=3600), clock=clock
    )
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_file(cert)
    ctx.use_privatekey_file(key)
    resumption: Resumption = mode  # type: ignore[assignment]
    cache = SessionCache(store, keys=sealer.keys) if resumption != "stateless" else None
    configure_resumption(ctx, resumption, session_cache=cache, ticket_keys=keys)
    listener = socket.create_server(("127.0.0.1", int(port)))
    threading.Thread(target=serve, args=(listener, ctx), daemon=True).start()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "advance":
            clock.offset += float(rest[0])
            keys.refresh()
        print(json.dumps(keys.stats()._asdict()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
