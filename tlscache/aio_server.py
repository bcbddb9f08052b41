"""A small asyncio TLS server shell: pyOpenSSL over memory BIOs, on asyncio streams.

asyncio's own TLS uses the stdlib ``ssl`` module, which has no session callbacks; a
pyOpenSSL ``Connection`` with memory BIOs can be driven by any event loop instead. This
shell is deliberately small (one connection per task, no renegotiation, no half-close): it
is what the non-blocking resumption path needs to be used and measured. With a
:class:`~tlscache.openssl.clienthello.NonblockingResumption` installed on the Context, a
handshake paused for a session lookup awaits the lookup instead of blocking the loop: a
task on this loop (lookups on the loop) or a worker thread's future (lookups on threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from OpenSSL import SSL

from tlscache.exceptions import describe_error
from tlscache.lograte import RateLimitedLog
from tlscache.openssl.clienthello import NonblockingResumption

__all__ = ["TLSStream", "serve"]

#: Failed handshakes and connections: one warning per kind per 10 s (a peer can cause them).
_log_failure = RateLimitedLog(logger=logging.getLogger(__name__))

_CHUNK = 65536


def _reason(exc: BaseException) -> str:
    """OpenSSL's reasons for an ``SSL.Error`` (library texts, nothing the peer sent), else
    the exception's type and place."""
    errors = exc.args[0] if isinstance(exc, SSL.Error) and exc.args else None
    if isinstance(errors, list) and errors and all(isinstance(e, tuple) for e in errors):
        return "; ".join(str(e[-1]) for e in errors)
    return describe_error(exc)


class TLSStream:
    """One server-side TLS connection over an asyncio stream pair."""

    def __init__(
        self,
        ctx: SSL.Context,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        resumption: NonblockingResumption | None = None,
    ) -> None:
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_accept_state()
        self.reader = reader
        self.writer = writer
        self.resumption = resumption
        #: Times the handshake waited for a session lookup.
        self.lookup_waits = 0

    async def _flush(self) -> None:
        while True:
            try:
                data = self.conn.bio_read(_CHUNK)
            except SSL.WantReadError:
                break
            self.writer.write(data)
        await self.writer.drain()

    async def _feed(self) -> None:
        data = await self.reader.read(_CHUNK)
        if not data:
            raise ConnectionResetError("peer closed the connection")
        self.conn.bio_write(data)

    async def handshake(self) -> None:
        """Complete the handshake; a lookup the handshake waits for is awaited, not blocked on."""
        while True:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:
                await self._flush()
                await self._feed()
                continue
            except SSL.Error:
                lookup = None
                if self.resumption is not None:
                    lookup = self.resumption.paused_lookup(self.conn)
                if lookup is None:
                    raise
                self.lookup_waits += 1
                if isinstance(lookup, asyncio.Future):
                    # A task of this loop. Waited for, not awaited: its answer is read by
                    # the get callback, and a cancelled handshake leaves it to end by its
                    # own deadline.
                    await asyncio.wait((lookup,))
                else:
                    await asyncio.wrap_future(lookup)
                continue
            await self._flush()
            return

    @property
    def resumed(self) -> bool:
        """Whether the handshake resumed a session."""
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(self.conn._ssl))

    async def recv(self, n: int = _CHUNK) -> bytes:
        """Up to ``n`` bytes of application data; b"" at close_notify."""
        while True:
            try:
                return self.conn.recv(n)
            except SSL.WantReadError:
                await self._flush()
                await self._feed()
            except SSL.ZeroReturnError:
                return b""

    async def send(self, data: bytes) -> None:
        self.conn.sendall(data)
        await self._flush()

    async def close(self) -> None:
        """Clean TLS shutdown (close_notify keeps the session resumable), then the socket."""
        with contextlib.suppress(SSL.Error):
            self.conn.shutdown()
        with contextlib.suppress(OSError):
            await self._flush()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def serve(
    ctx: SSL.Context,
    handle: Callable[[TLSStream], Awaitable[None]],
    host: str,
    port: int,
    *,
    resumption: NonblockingResumption | None = None,
) -> asyncio.Server:
    """Listen on ``host:port``; each connection's handshake is done, then ``handle`` runs.

    A failed handshake or handler closes that connection only.
    """

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stream = TLSStream(ctx, reader, writer, resumption)
        try:
            await stream.handshake()
        except (SSL.Error, OSError) as exc:
            _log_failure("handshake", f"TLS handshake failed: {_reason(exc)}")
            await stream.close()
            return
        try:
            await handle(stream)
        except (SSL.Error, OSError) as exc:
            _log_failure("connection", f"TLS connection failed: {_reason(exc)}")
        finally:
            await stream.close()

    return await asyncio.start_server(on_connect, host, port)
