"""One switch for how a server's clients resume: by session id, by ticket, or both.

``stateful``
    Today's behaviour: :meth:`SessionCache.install` (session ids, and TLS 1.3 tickets that
    are ids looked up in the store, ``OP_NO_TICKET``). Every resumption costs a store lookup.
``stateless``
    Tickets only, under the farm's shared ticket keys (:class:`TicketKeys`): no server-side
    session cache, no session callbacks, no lookup. Clients that cannot do tickets (rare)
    always do full handshakes.
``both``
    The session cache as in ``stateful``, then ``OP_NO_TICKET`` cleared and the ticket key
    callback installed: clients that send the ticket extension (every TLS 1.3 client, most
    TLS 1.2 ones, Go's TLS 1.2 client in particular) get stateless tickets; a TLS 1.2
    client without ticket support still resumes by session id through the cache. OpenSSL
    gives a TLS 1.2 session that carries a ticket no id, so the cache stores nothing for it.

Early data (0-RTT) stays off in every mode: OpenSSL's default ``max_early_data`` is 0 and
nothing here changes it (see ``docs/tickets.md`` for what it would need).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

from OpenSSL import SSL

from tlscache.exceptions import ConfigurationError
from tlscache.openssl.resolver import resolve
from tlscache.openssl.tickets import TicketKeySource, install_ticket_callback

if TYPE_CHECKING:
    from tlscache.session_cache import SessionCache

__all__ = ["MODES", "Resumption", "configure_resumption"]

Resumption = Literal["stateful", "stateless", "both"]
MODES: tuple[Resumption, ...] = get_args(Resumption)

_SESS_CACHE_OFF = 0x0000


def _clear_no_ticket(ctx: SSL.Context) -> None:
    """Clear ``OP_NO_TICKET`` (pyOpenSSL has no ``clear_options``)."""
    from OpenSSL._util import lib

    if lib.SSL_CTX_get_options(ctx._context) & SSL.OP_NO_TICKET:
        resolve().get("SSL_CTX_clear_options")(ctx._context, SSL.OP_NO_TICKET)


def configure_resumption(
    ctx: SSL.Context,
    mode: Resumption,
    *,
    session_cache: SessionCache | None = None,
    ticket_keys: TicketKeySource | None = None,
) -> bytes | None:
    """Set ``ctx`` up to resume clients the ``mode`` way; call once, before any Connection.

    ``stateful`` needs ``session_cache``; ``stateless`` needs ``ticket_keys``; ``both``
    needs the two. Returns the session id context set by the session cache (None in
    ``stateless``). A :class:`~tlscache.ticketkeys.TicketKeys` given is started (its
    refresh thread) if it has not been. Raises ``ConfigurationError`` for a missing part
    or an unknown mode, ``ResolverError`` if OpenSSL's functions cannot be verified.
    """
    if mode not in MODES:
        raise ConfigurationError(f"resumption must be one of {', '.join(MODES)}, not {mode!r}")
    if mode in ("stateful", "both") and session_cache is None:
        raise ConfigurationError(f"resumption {mode!r} needs a session_cache")
    if mode in ("stateless", "both") and ticket_keys is None:
        raise ConfigurationError(f"resumption {mode!r} needs ticket_keys")

    context: bytes | None = None
    if session_cache is not None and mode != "stateless":
        context = session_cache.install(ctx)
    if mode == "stateful":
        return context
    assert ticket_keys is not None
    from OpenSSL._util import lib

    if mode == "stateless":
        lib.SSL_CTX_set_session_cache_mode(ctx._context, _SESS_CACHE_OFF)
    _clear_no_ticket(ctx)
    start = getattr(ticket_keys, "start", None)
    if callable(start):
        start()
    install_ticket_callback(ctx, ticket_keys)
    return context
