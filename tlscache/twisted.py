"""The shared session cache on a Twisted TLS server.

Twisted builds its pyOpenSSL ``Context`` in ``CertificateOptions.getContext()`` (once, then
cached) and makes every server connection from it. Left alone, that Context cannot share
sessions: ``CertificateOptions`` sets a random session id context per options object (a
session from another server, or another options object, never resumes) and turns the
session cache off unless ``enableSessions=True``. :func:`install` takes that Context (and any
SNI Contexts) and installs a :class:`~tlscache.SessionCache` on it, which sets one session id
context, the cache mode and the callbacks, whatever ``enableSessions`` said.

Lookups block the reactor for one store round trip, as in any server, unless
``resumption`` (a :class:`~tlscache.openssl.clienthello.NonblockingResumption`) is given:
then the handshake pauses while the lookup runs on a worker thread. Twisted treats the
``SSL.Error([])`` of a paused handshake as end of file, so a server using it must be served
by :func:`tls_factory`, whose protocol (:class:`ResumingTLSProtocol`) waits for the lookup
and drives the handshake on, on the reactor thread.

Only the Context a connection is made from runs session callbacks: with SNI switching,
install the cache on the first Context (and the others too, so that direct use works).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, IProtocolFactory
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure

from tlscache.exceptions import ConfigurationError
from tlscache.openssl.clienthello import NonblockingResumption

__all__ = ["ResumingTLSProtocol", "install", "tls_factory"]


class _Installs(Protocol):
    def install(self, ctx: SSL.Context) -> bytes: ...


def _context_of(options: Any) -> SSL.Context:
    if isinstance(options, SSL.Context):
        return options
    get_context = getattr(options, "getContext", None)
    if get_context is None:
        raise ConfigurationError("pass an OpenSSL Context or an object with getContext()")
    ctx = get_context()
    if not isinstance(ctx, SSL.Context):
        raise ConfigurationError("getContext() did not return an OpenSSL Context")
    return ctx


def install(
    cache: _Installs,
    options: Any,
    *,
    resumption: NonblockingResumption | None = None,
    sni_contexts: Iterable[SSL.Context] = (),
) -> bytes:
    """Install ``cache`` on the Context of ``options`` (``CertificateOptions``, any context
    factory with ``getContext()``, or a Context) and on each of ``sni_contexts``.

    With ``resumption`` (made over ``cache``), lookups do not block the reactor; the server
    must then use :func:`tls_factory`. Call before the server accepts connections. Returns
    the session id context set on the main Context.
    """
    installer: _Installs = cache if resumption is None else resumption
    if resumption is not None and resumption.cache is not cache:
        raise ConfigurationError("resumption was made for another cache")
    context = installer.install(_context_of(options))
    for ctx in sni_contexts:
        installer.install(ctx)
    return context


class ResumingTLSProtocol(BufferingTLSTransport):
    """Twisted's TLS protocol, taught to wait for a session lookup instead of closing."""

    _waiting_for_lookup = False

    def _checkHandshakeStatus(self) -> None:
        if self._aborted or self._waiting_for_lookup:
            return
        try:
            self._tlsConnection.do_handshake()
        except SSL.WantReadError:
            self._flushSendBIO()  # type: ignore[no-untyped-call]
        except SSL.Error:
            resumption: NonblockingResumption | None = getattr(self.factory, "resumption", None)
            lookup = None if resumption is None else resumption.paused_lookup(self._tlsConnection)
            if lookup is None:
                self._tlsShutdownFinished(Failure())  # type: ignore[no-untyped-call]
                return
            self._waiting_for_lookup = True
            from twisted.internet import reactor

            lookup.add_done_callback(lambda _f: reactor.callFromThread(self._lookupDone))
        else:
            self._handshakeDone = True
            if IHandshakeListener.providedBy(self.wrappedProtocol):
                self.wrappedProtocol.handshakeCompleted()

    def _lookupDone(self) -> None:
        """The lookup finished: go on with the handshake, then with what arrived meanwhile."""
        self._waiting_for_lookup = False
        if self._aborted or self._lostTLSConnection:
            return
        self._checkHandshakeStatus()
        if self._handshakeDone:
            if self._appSendBuffer:
                self._unbufferPendingWrites()  # type: ignore[no-untyped-call]
            self._flushReceiveBIO()  # type: ignore[no-untyped-call]


def tls_factory(
    options: Any,
    wrapped: IProtocolFactory,
    *,
    resumption: NonblockingResumption | None = None,
) -> TLSMemoryBIOFactory:
    """A server TLS factory for ``reactor.listenTCP`` (what ``listenSSL`` builds), whose
    connections wait for non-blocking lookups of ``resumption``."""
    factory = TLSMemoryBIOFactory(options, False, wrapped)
    factory.protocol = ResumingTLSProtocol
    factory.resumption = resumption  # type: ignore[attr-defined]
    return factory
