"""A twisted.web HTTPS server with the shared session cache, run as a process by the tests.

    python tests/twisted_server.py --pem server.pem --port N --store ADDRESS --keys RING
        [--nonblocking] [--delay-ms MS]

Every response is one line: ``reused=<0|1> paused=<handshakes paused for a lookup>
answered=<prefetched lookups> hits=<cache hits>``. ``--delay-ms`` makes every lookup take
that long (so that a non-blocking handshake surely pauses).
"""

from __future__ import annotations

import argparse
import sys
import time

from OpenSSL import SSL
from OpenSSL._util import lib
from twisted.internet import reactor, ssl
from twisted.web import resource, server

from tlscache import Deadline, SessionCache, SessionStore, WrappingStore
from tlscache.openssl.clienthello import NonblockingResumption
from tlscache.stores.distcache import DistcacheStore
from tlscache.twisted import install, tls_factory


class Report(resource.Resource):
    isLeaf = True

    def __init__(self, cache: SessionCache, nb: NonblockingResumption | None) -> None:
        super().__init__()
        self.cache, self.nb = cache, nb

    def render_GET(self, request: server.Request) -> bytes:
        conn: SSL.Connection = request.channel.transport.getHandle()
        reused = lib.SSL_session_reused(conn._ssl)
        stats = self.nb.stats() if self.nb is not None else None
        paused, answered = (stats.paused, stats.answered) if stats is not None else (0, 0)
        hits = self.cache.stats().hits
        return b"reused=%d paused=%d answered=%d hits=%d\n" % (reused, paused, answered, hits)


class Delayed(WrappingStore):
    def __init__(self, inner: SessionStore, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s

    def fetch(self, session_id: bytes, deadline: Deadline) -> bytes | None:
        time.sleep(self.delay_s)
        return self.inner.fetch(session_id, deadline)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pem", required=True, help="certificate chain and key")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--store", required=True, help="distcache address")
    p.add_argument("--keys", required=True)
    p.add_argument("--nonblocking", action="store_true")
    p.add_argument("--delay-ms", type=float, default=0.0)
    args = p.parse_args()
    with open(args.pem, "rb") as f:
        options = ssl.PrivateCertificate.loadPEM(f.read()).options()
    store: SessionStore = DistcacheStore(args.store)
    if args.delay_ms:
        store = Delayed(store, args.delay_ms / 1000.0)
    cache = SessionCache(store, keys=args.keys, deadline_ms=2000 + args.delay_ms)
    nb = NonblockingResumption(cache) if args.nonblocking else None
    install(cache, options, resumption=nb)
    site = server.Site(Report(cache, nb))
    if nb is None:
        reactor.listenSSL(args.port, site, options, interface="127.0.0.1")
    else:
        reactor.listenTCP(
            args.port, tls_factory(options, site, resumption=nb), interface="127.0.0.1"
        )
    print("listening", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
