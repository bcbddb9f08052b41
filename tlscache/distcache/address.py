"""distcache address strings (libnal syntax) and the sockets they name.

Accepted forms, as in the C tools::

    IP:<host>:<port>   IPv4:<host>:<port>   TCP on that host (listen or connect)
    IP:<port>          IP::<port>           TCP on the wildcard address (listen only)
    UNIX:<path>                             unix-domain stream socket
    FD:<n>                                  an already-open socket descriptor

tlscache also accepts ``IPv6:[<addr>]:<port>`` (and ``IP:[<addr>]:<port>``) for
IPv6; the C tools have no IPv6 at all.

An :data:`Address` is a tagged union of :class:`TcpAddress`, :class:`UnixAddress`
and :class:`FdAddress`: code matches on the type and never checks a field that
only one kind has. Parsing does no I/O; :mod:`tlscache.distcache.sockets` opens
the sockets an address names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

from tlscache.exceptions import AddressError

UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes including the terminator


@dataclass(frozen=True, slots=True)
class TcpAddress:
    """``IP:host:port`` (or ``IPv6:[addr]:port``); ``host`` None is the wildcard."""

    host: str | None
    port: int
    ipv6: bool = False
    text: str = ""

    def __str__(self) -> str:
        if self.text:
            return self.text
        if self.ipv6:
            return f"IPv6:[{self.host}]:{self.port}"
        return f"IP:{self.host}:{self.port}" if self.host else f"IP:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """``UNIX:path``, a unix-domain stream socket."""

    path: str
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"UNIX:{self.path}"


@dataclass(frozen=True, slots=True)
class FdAddress:
    """``FD:n``, a socket descriptor inherited from the parent process."""

    fd: int
    text: str = ""

    def __str__(self) -> str:
        return self.text or f"FD:{self.fd}"


Address: TypeAlias = TcpAddress | UnixAddress | FdAddress


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise AddressError(f"bad port {text!r} in address {whole!r}")
    port = int(text)
    if port > 65535:
        raise AddressError(f"port {port} out of range in address {whole!r}")
    return port


def parse_address(text: str) -> Address:
    """Parse an address string; raise :class:`AddressError` with the reason if malformed."""
    if not 2 <= len(text) <= 255:
        raise AddressError(f"address {text!r} must be 2..255 characters")
    prefix, sep, rest = text.partition(":")
    if not sep:
        raise AddressError(f"address {text!r} has no prefix (IP:, IPv4:, IPv6:, UNIX:, FD:)")
    if prefix == "UNIX":
        if not rest:
            raise AddressError(f"address {text!r} has an empty path")
        if len(rest.encode()) > UNIX_PATH_MAX:
            raise AddressError(f"unix socket path longer than {UNIX_PATH_MAX} bytes: {rest!r}")
        return UnixAddress(rest, text)
    if prefix == "FD":
        parts = rest.split(":")
        if len(parts) != 1 or not parts[0].isdigit():
            raise AddressError(f"address {text!r}: tlscache supports FD:<n> with one socket fd")
        return FdAddress(int(parts[0]), text)
    if prefix in ("IP", "IPv4", "IPv6"):
        if rest.startswith("["):
            host, bracket, tail = rest[1:].partition("]")
            if not bracket or not tail.startswith(":") or not host:
                raise AddressError(f"bad IPv6 address {text!r}; use IPv6:[addr]:port")
            return TcpAddress(host, _port(tail[1:], text), True, text)
        if prefix == "IPv6":
            raise AddressError(f"bad IPv6 address {text!r}; use IPv6:[addr]:port")
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            return TcpAddress(None, _port(rest, text), False, text)
        return TcpAddress(host or None, _port(port_text, text), False, text)
    raise AddressError(f"unknown address prefix {prefix!r} in {text!r}")


def connectable(address: str | Address) -> Address:
    """Parse ``address`` if needed and make sure it names something to connect to.

    The wildcard TCP address is listen-only, as in the C tools.
    """
    addr = parse_address(address) if isinstance(address, str) else address
    if isinstance(addr, TcpAddress) and addr.host is None:
        raise AddressError(f"{addr} is a listen-only address; give IP:host:port")
    return addr
