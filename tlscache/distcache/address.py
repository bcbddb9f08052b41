"""distcache address strings (libnal syntax) and the sockets they name.

Accepted forms, as in the C tools::

    IP:<host>:<port>   IPv4:<host>:<port>   TCP on that host (listen or connect)
    IP:<port>          IP::<port>           TCP on the wildcard address (listen only)
    UNIX:<path>                             unix-domain stream socket
    FD:<n>                                  an already-open socket descriptor

tlscache also accepts ``IPv6:[<addr>]:<port>`` (and ``IP:[<addr>]:<port>``) for
IPv6; the C tools have no IPv6 at all.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from typing import Literal

from tlscache.exceptions import AddressError

UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminator
LISTEN_BACKLOG = 511


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed distcache address."""

    kind: Literal["tcp", "unix", "fd"]
    host: str | None = None  # None: wildcard (listen only)
    port: int = 0
    path: str = ""
    fd: int = -1
    family: int = socket.AF_INET
    text: str = ""

    @property
    def connectable(self) -> bool:
        """False for wildcard TCP addresses, which the C tools also refuse to connect to."""
        return not (self.kind == "tcp" and self.host is None)

    def __str__(self) -> str:
        return self.text or self.describe()

    def describe(self) -> str:
        if self.kind == "unix":
            return f"UNIX:{self.path}"
        if self.kind == "fd":
            return f"FD:{self.fd}"
        if self.family == socket.AF_INET6:
            return f"IPv6:[{self.host}]:{self.port}"
        return f"IP:{self.host}:{self.port}" if self.host else f"IP:{self.port}"


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
        return Address("unix", path=rest, family=socket.AF_UNIX, text=text)
    if prefix == "FD":
        parts = rest.split(":")
        if len(parts) != 1 or not parts[0].isdigit():
            raise AddressError(f"address {text!r}: tlscache supports FD:<n> with one socket fd")
        return Address("fd", fd=int(parts[0]), family=socket.AF_UNSPEC, text=text)
    if prefix in ("IP", "IPv4", "IPv6"):
        if rest.startswith("["):
            host, bracket, tail = rest[1:].partition("]")
            if not bracket or not tail.startswith(":") or not host:
                raise AddressError(f"bad IPv6 address {text!r}; use IPv6:[addr]:port")
            return Address(
                "tcp", host=host, port=_port(tail[1:], text), family=socket.AF_INET6, text=text
            )
        if prefix == "IPv6":
            raise AddressError(f"bad IPv6 address {text!r}; use IPv6:[addr]:port")
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            return Address("tcp", host=None, port=_port(rest, text), text=text)
        if not host:
            return Address("tcp", host=None, port=_port(port_text, text), text=text)
        return Address("tcp", host=host, port=_port(port_text, text), text=text)
    raise AddressError(f"unknown address prefix {prefix!r} in {text!r}")


def _tune(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _resolve(addr: Address) -> tuple[int, tuple[str, int] | tuple[str, int, int, int]]:
    # No host: the wildcard address. AI_PASSIVE makes getaddrinfo say so (0.0.0.0);
    # without it a missing host means loopback.
    flags = socket.AI_PASSIVE if addr.host is None else 0
    infos = socket.getaddrinfo(addr.host, addr.port, addr.family, socket.SOCK_STREAM, 0, flags)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise AddressError(f"cannot resolve {addr}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr  # type: ignore[return-value]


def connect(addr: Address, timeout: float | None = None) -> socket.socket:
    """A connected blocking socket (TCP_NODELAY on TCP) with ``timeout`` set."""
    if not addr.connectable:
        raise AddressError(f"cannot connect to the wildcard address {addr}")
    if addr.kind == "fd":
        fd = os.dup(addr.fd)
        try:
            sock = socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
    elif addr.kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(addr.path)
        except BaseException:
            sock.close()
            raise
    else:
        family, sockaddr = _resolve(addr)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
    _tune(sock)
    sock.settimeout(timeout)
    return sock


def listen(
    addr: Address,
    backlog: int = LISTEN_BACKLOG,
    owner: str | None = None,
    group: str | None = None,
    perms: int | None = None,
) -> socket.socket:
    """A listening socket for ``addr``.

    TCP listeners set SO_REUSEADDR; unix listeners replace a stale socket file
    (but refuse to delete anything that is not a socket), then apply
    ``owner``/``group``/``perms`` like ``-sockowner``/``-sockgroup``/``-sockperms``.
    """
    if addr.kind == "fd":
        sock = socket.socket(fileno=addr.fd)
        return sock
    if addr.kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(addr.path).st_mode):
                raise AddressError(f"{addr.path} exists and is not a socket; not replacing it")
            os.unlink(addr.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(addr.path)
            bound = True
            if owner is not None or group is not None:
                import grp
                import pwd

                uid = pwd.getpwnam(owner).pw_uid if owner is not None else -1
                gid = grp.getgrnam(group).gr_gid if group is not None else -1
                os.chown(addr.path, uid, gid)
            if perms is not None:
                os.chmod(addr.path, perms)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            if bound:  # do not leave a socket file nobody listens on
                with contextlib.suppress(OSError):
                    os.unlink(addr.path)
            raise
        return sock
    family, sockaddr = _resolve(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
