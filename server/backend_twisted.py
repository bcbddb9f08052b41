"""A backend of the farm as a twisted.web HTTPS server (``--backend-kinds ...,twisted``).

Its pyOpenSSL Context is made as the threaded backend makes its own (certificate chain, TLS
versions, ``OP_IGNORE_UNEXPECTED_EOF``) and handed to Twisted as the context factory; the
shared cache goes on it through :func:`tlscache.twisted.install` (lookups block the reactor
for one store round trip). Twisted closes TLS with close_notify when the client asks for
``Connection: close``, so the session stays good.

A handshake is timed from the accepted connection to Twisted's ``handshakeCompleted`` (the
channel is an ``IHandshakeListener``), as the threaded backend times it from accept to the
end of ``do_handshake``; a connection that closes before then counts as a failed handshake.
"""

from __future__ import annotations

import sys
import time
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from zope.interface import implementer  # type: ignore[import-untyped]

from tlscache.twisted import install

from .backend import _session_id, _session_reused
from .backend_kinds import KindBackend, index_text
from .config import BackendConfig, parse_backend_args
from .handshakes import MADE_BY_HEADER
from .records import Handshake


class ContextFactory:
    """One pyOpenSSL Context for every connection, as Twisted's listenSSL wants it."""

    def __init__(self, config: BackendConfig) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.use_certificate_chain_file(config.cert)
        ctx.use_privatekey_file(config.key)
        ctx.check_privatekey()
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        top = SSL.TLS1_3_VERSION if config.tls == "1.3" else SSL.TLS1_2_VERSION
        ctx.set_max_proto_version(top)
        ctx.set_options(SSL.OP_IGNORE_UNEXPECTED_EOF | SSL.OP_NO_COMPRESSION)
        self.ctx = ctx

    def getContext(self) -> SSL.Context:  # Twisted's name
        return self.ctx


@implementer(IHandshakeListener)
class TimedChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that records its TLS handshake in the backend's log."""

    site: KindSite  # set by Site.buildProtocol, before the connection is made

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.handshake: Handshake | None = None
        self._t0 = 0.0

    def connectionMade(self) -> None:  # Twisted's name
        self._t0 = time.perf_counter()
        self.site.backend.opened()
        super().connectionMade()  # type: ignore[no-untyped-call]

    def handshakeCompleted(self) -> None:  # Twisted's name (IHandshakeListener)
        transport: Any = self.transport  # Twisted's TLS protocol, typed as a bare ITransport
        conn: SSL.Connection = transport.getHandle()
        peer = transport.getPeer()
        self.handshake = self.site.backend.log.complete(
            f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            _session_reused(conn),
            conn.get_protocol_version_name(),
            _session_id(conn),
            (time.perf_counter() - self._t0) * 1000.0,
        )

    def connectionLost(self, reason: Failure | None = None) -> None:  # Twisted's name
        if self.handshake is None:
            self.site.backend.log.fail()
        self.site.backend.closed()
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class KindSite(server.Site):
    """The site, with its backend for the channels."""

    protocol = TimedChannel  # type: ignore[assignment]  # plain HTTP/1.1: no HTTP/2 negotiation wrapper around the channel

    def __init__(self, backend: KindBackend) -> None:
        super().__init__(Pages(backend))  # type: ignore[no-untyped-call]
        self.backend = backend
        self.noisy = False


class Pages(resource.Resource):
    """``/``, ``/info`` and the status pages on the TLS port."""

    isLeaf = True

    def __init__(self, backend: KindBackend) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.backend = backend
        self.seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def render_GET(self, request: Any) -> bytes:  # Twisted's name
        backend = self.backend
        backend.count_request()
        request.setHeader(b"X-Backend", backend.config.name.encode())
        channel = request.channel
        number = self.seen.get(channel, 0) + 1
        self.seen[channel] = number
        handshake: Handshake | None = getattr(channel, "handshake", None)
        if number == 1 and handshake is not None:
            made_by = request.getHeader(MADE_BY_HEADER.encode())
            claimed = made_by.decode("ascii", "replace") if made_by else None
            backend.first_request(handshake, claimed)
        path = request.path.decode("ascii", "replace")
        page = backend.route("GET", path)
        if page is not None:
            request.setResponseCode(page.status)
            request.setHeader(b"Content-Type", page.content_type.encode())
            return page.body
        conn: SSL.Connection = channel.transport.getHandle()
        resumed = _session_reused(conn)
        version = conn.get_protocol_version_name()
        if path == "/info":
            request.setHeader(b"Content-Type", b"application/json")
            sid = handshake.session_id if handshake is not None else None
            return backend.info(version, conn.get_cipher_name(), resumed, number, sid)
        if path == "/":
            request.setHeader(b"Content-Type", b"text/plain")
            return index_text(backend.config.name, resumed)
        request.setResponseCode(404)
        return b"not found\n"


def _reactor() -> Any:
    """Twisted's global reactor (its module attribute has no useful type)."""
    from twisted.internet import reactor

    return reactor


def main(argv: list[str] | None = None) -> int:
    config = parse_backend_args(argv)
    backend = KindBackend(config, "twisted")
    factory = ContextFactory(config)
    cache = backend.make_cache()
    if cache is None:
        factory.ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        factory.ctx.set_options(SSL.OP_NO_TICKET)
    else:
        install(cache, factory)
    site = KindSite(backend)
    reactor = _reactor()
    reactor.listenSSL(config.port, site, factory, backlog=511, interface=config.host)
    admin = backend.start_admin()  # after the TLS port: the farm takes it as "ready"
    print(backend.banner(), flush=True)
    try:
        reactor.run()
    finally:
        admin.close()
        backend.setup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
