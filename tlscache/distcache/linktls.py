"""Mutual TLS on the distcache link (dc_client or any client -> dc_server over TCP).

The distcache protocol has no authentication: whoever reaches a dc_server can read and
write every entry. :class:`LinkTLS` names the three files a link end needs (its own
certificate and key, and the CA that issued its peers' certificates) and builds the
stdlib :class:`ssl.SSLContext` for each side. Both sides present a certificate and both
verify the other's chain against that one CA and nothing else (no system trust store):
a peer without a certificate from it is refused during the handshake.

Choices, all deliberate:

* TLS 1.3 only. Both ends are tlscache, so no older peer needs 1.2. TLS 1.3 has only
  AEAD suites with forward secrecy, no renegotiation, one round trip less, and it
  encrypts the client's certificate, so an observer of the link does not learn which
  identity a client holds.
* The server checks the client's chain, not its name: any certificate issued by ``ca``
  is a member of the cache. Use a CA dedicated to the cache link.
* The client checks the server's name: ``server_name`` when given, otherwise the host of
  the ``IP:`` address it connects to. An IP address matches only an IP subjectAltName
  (``IP:127.0.0.1:9000`` needs a certificate for ``127.0.0.1``); a DNS name matches a DNS
  subjectAltName.
* No TLS session tickets on the link: connections are persistent, and a ticket the client
  never uses is a message and a few hundred bytes per connection for nothing.
* TCP (``IP:``) addresses only: a ``UNIX:`` socket is already limited to its host by
  file permissions, and an ``FD:`` socket's kind is unknown; asking for TLS on either is a
  configuration mistake and raises :class:`~tlscache.exceptions.ConfigurationError`.

Contexts are built by :meth:`LinkTLS.server_context` and :meth:`LinkTLS.client_context`
each time they are called (reading the files again); callers build one per client,
proxy or server and keep it.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tlscache.distcache.address import Address, TcpAddress
from tlscache.exceptions import ConfigurationError

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "MINIMUM_VERSION", "LinkTLS"]

#: The lowest protocol version either side accepts.
MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_3
#: Seconds a server waits for a client to finish its handshake before closing the
#: connection (a client that never finishes must not keep a socket forever).
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0


@dataclass(frozen=True)
class LinkTLS:
    """One end's TLS settings for the cache link: its certificate chain and key (PEM),
    and the CA (PEM) whose certificates it accepts from peers.

    ``server_name`` is the name a client expects in the server's certificate (None: the
    host of the address it connects to). ``handshake_timeout`` bounds the handshake a
    server waits for, and a proxy's handshake with its server.
    """

    cert: Path
    key: Path
    ca: Path
    server_name: str | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT

    def __post_init__(self) -> None:
        # Accept plain strings too (from command lines and configuration files).
        for field in ("cert", "key", "ca"):
            value = getattr(self, field)
            if not isinstance(value, Path):
                object.__setattr__(self, field, Path(os.fspath(value)))
        if not self.handshake_timeout > 0:
            raise ConfigurationError("handshake_timeout must be positive")
        if self.server_name is not None and not self.server_name:
            raise ConfigurationError("server_name must not be empty")

    # ------------------------------------------------------------ contexts

    def server_context(self) -> ssl.SSLContext:
        """A dc_server's context: TLS 1.3, presents ``cert``, requires a client
        certificate that chains to ``ca``."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0
        self._configure(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """A client's context: TLS 1.3, presents ``cert``, requires a server certificate
        that chains to ``ca`` and names the server (see :meth:`server_hostname`)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        self._configure(ctx)
        return ctx

    def server_hostname(self, address: Address) -> str:
        """The name the server's certificate must carry when connecting to ``address``."""
        tcp = self.check_address(address)
        if self.server_name is not None:
            return self.server_name
        if tcp.host is None:
            raise ConfigurationError(f"{address} has no host to check the certificate against")
        return tcp.host

    @staticmethod
    def check_address(address: Address) -> TcpAddress:
        """``address`` if it is a TCP address; :class:`ConfigurationError` otherwise."""
        if not isinstance(address, TcpAddress):
            raise ConfigurationError(f"TLS on the cache link needs an IP: address, not {address}")
        return address

    @staticmethod
    def check_socket(sock: socket.socket) -> None:
        """:class:`ConfigurationError` unless ``sock`` is a TCP socket (IPv4 or IPv6)."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigurationError(
                f"TLS on the cache link needs a TCP socket, not {sock.family.name}"
            )

    # ------------------------------------------------------------ internals

    def _configure(self, ctx: ssl.SSLContext) -> None:
        ctx.minimum_version = MINIMUM_VERSION
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            _readable(what, path)
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise ConfigurationError(
                f"cannot use TLS certificate {self.cert} with key {self.key}: {exc.reason}"
            ) from None
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except ssl.SSLError as exc:
            raise ConfigurationError(f"cannot use TLS CA file {self.ca}: {exc.reason}") from None


def _readable(what: str, path: Path) -> None:
    """A clear error for a missing or unreadable file (ssl's own says only "No such file")."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(f"cannot read TLS {what} file {path}: {reason}") from None
