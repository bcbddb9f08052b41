"""A backend of the farm as a twisted.web HTTPS server (``--backend-kinds ...,twisted``).

Its pyOpenSSL Context is made as the threaded backend makes its own (certificate chain, TLS
versions, ``OP_IGNORE_UNEXPECTED_EOF``) and handed to Twisted as the context factory; the
shared cache goes on it through :func:`tlscache.twisted.install` (lookups block the reactor
for one store round trip). Twisted closes TLS with close_notify when the client asks for
``Connection: close``, so the session stays good.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.web import resource, server

from tlscache.twisted import install

from .backend import _session_reused
from .backend_kinds import KindBackend, index_text
from .config import BackendConfig, parse_backend_args


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


class Pages(resource.Resource):
    """``/``, ``/info`` and ``/status.json`` on the TLS port."""

    isLeaf = True

    def __init__(self, backend: KindBackend) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.backend = backend
        self.seen: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    def render_GET(self, request: Any) -> bytes:  # Twisted's name
        request.setHeader(b"X-Backend", self.backend.config.name.encode())
        path = request.path.decode("ascii", "replace")
        page = self.backend.route("GET", path)
        if page is not None:
            request.setHeader(b"Content-Type", page.content_type.encode())
            return page.body
        conn: SSL.Connection = request.channel.transport.getHandle()
        resumed = _session_reused(conn)
        version = conn.get_protocol_version_name()
        number = self.seen.get(request.channel, 0) + 1
        self.seen[request.channel] = number
        if number == 1:
            self.backend.record(resumed, version)
        if path == "/info":
            request.setHeader(b"Content-Type", b"application/json")
            return self.backend.info(version, conn.get_cipher_name(), resumed, number)
        if path == "/":
            request.setHeader(b"Content-Type", b"text/plain")
            return index_text(self.backend.config.name, resumed)
        request.setResponseCode(404)
        return b"not found\n"


def _reactor() -> Any:
    """Twisted's global reactor (its module attribute has no useful type)."""
    from twisted.internet import reactor

    return reactor


def main(argv: list[str] | None = None) -> int:
    config = parse_backend_args(argv)
    backend = KindBackend(config)
    factory = ContextFactory(config)
    cache = backend.make_cache()
    if cache is None:
        factory.ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        factory.ctx.set_options(SSL.OP_NO_TICKET)
    else:
        install(cache, factory)
    site = server.Site(Pages(backend))  # type: ignore[no-untyped-call]
    site.noisy = False
    reactor = _reactor()
    reactor.listenSSL(config.port, site, factory, backlog=511, interface=config.host)
    admin = backend.start_admin()  # after the TLS port: the farm takes it as "ready"
    print(backend.banner("twisted"), flush=True)
    try:
        reactor.run()
    finally:
        admin.close()
        backend.setup.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
