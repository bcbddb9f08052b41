"""Opening the sockets an :data:`~tlscache.distcache.address.Address` names.

The one place that turns an address into a connected or listening socket, for
blocking code (:func:`connect`, :func:`listen`) and for asyncio shells
(:func:`open_connection`, :func:`serve`). Every role gets the same treatment:
TCP_NODELAY on TCP connections, SO_REUSEADDR and IPV6_V6ONLY on TCP listeners,
stale socket files replaced (never anything else), ``FD:`` sockets duplicated
so that closing ours leaves the inherited descriptor alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import time
from collections.abc import Callable
from ssl import SSLContext, SSLSocket
from typing import Final, TypeVar

from tlscache.distcache.address import Address, FdAddress, TcpAddress, UnixAddress
from tlscache.exceptions import AddressError

#: The backlog of listeners: the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG: Final = 4096

P = TypeVar("P", bound=asyncio.BaseProtocol)
SockAddr = tuple[str, int] | tuple[str, int, int, int]


def _tcp_sockaddr(addr: TcpAddress) -> tuple[int, SockAddr]:
    # No host: the wildcard address. AI_PASSIVE makes getaddrinfo say so (0.0.0.0);
    # without it a missing host means loopback.
    family = socket.AF_INET6 if addr.ipv6 else socket.AF_INET
    flags = socket.AI_PASSIVE if addr.host is None else 0
    infos = socket.getaddrinfo(addr.host, addr.port, family, socket.SOCK_STREAM, 0, flags)
    if not infos:  # pragma: no cover - getaddrinfo raises instead
        raise AddressError(f"cannot resolve {addr}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr  # type: ignore[return-value]


def _nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _connected_socket(addr: Address, timeout: float | None) -> socket.socket:
    if isinstance(addr, FdAddress):
        fd = os.dup(addr.fd)
        try:
            return socket.socket(fileno=fd)
        except BaseException:
            os.close(fd)
            raise
    if isinstance(addr, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: str | SockAddr = addr.path
    else:
        if addr.host is None:
            raise AddressError(f"cannot connect to the wildcard address {addr}")
        family, target = _tcp_sockaddr(addr)
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(
    addr: Address,
    timeout: float | None = None,
    *,
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
) -> socket.socket:
    """A connected blocking socket (TCP_NODELAY on TCP) with ``timeout`` set.

    With ``ssl``, the TLS handshake (checking ``server_hostname``) is done before this
    returns and spends what the connect left of ``timeout``: the whole call, not each
    step, is bounded by it.
    """
    started = time.monotonic()
    sock = _connected_socket(addr, timeout)
    _nodelay(sock)
    sock.settimeout(timeout)
    if ssl is None:
        return sock
    return _handshake(sock, ssl, server_hostname, timeout, started)


def _handshake(
    sock: socket.socket,
    ctx: SSLContext,
    server_hostname: str | None,
    timeout: float | None,
    started: float,
) -> SSLSocket:
    try:
        if timeout is not None:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                raise TimeoutError("no time left for the TLS handshake")
            sock.settimeout(left)  # ssl's do_handshake spends it across the whole handshake
        tls = ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    tls.settimeout(timeout)
    return tls


async def open_connection(
    addr: Address,
    factory: Callable[[], P],
    *,
    ssl: SSLContext | None = None,
    server_hostname: str | None = None,
    ssl_handshake_timeout: float | None = None,
) -> tuple[asyncio.Transport, P]:
    """Connect an asyncio protocol to ``addr`` (asyncio sets TCP_NODELAY itself).

    With ``ssl``, the protocol sees the connection once the TLS handshake (checking
    ``server_hostname``, within ``ssl_handshake_timeout`` seconds) is done.
    """
    loop = asyncio.get_running_loop()
    name, limit = server_hostname, ssl_handshake_timeout
    if isinstance(addr, UnixAddress):
        transport, proto = await loop.create_unix_connection(
            factory, addr.path, ssl=ssl, server_hostname=name, ssl_handshake_timeout=limit
        )
    elif isinstance(addr, FdAddress):
        sock = _connected_socket(addr, None)
        sock.setblocking(False)
        transport, proto = await loop.create_connection(
            factory, sock=sock, ssl=ssl, server_hostname=name, ssl_handshake_timeout=limit
        )
    else:
        if addr.host is None:
            raise AddressError(f"cannot connect to the wildcard address {addr}")
        family = socket.AF_INET6 if addr.ipv6 else socket.AF_INET
        transport, proto = await loop.create_connection(
            factory,
            addr.host,
            addr.port,
            family=family,
            ssl=ssl,
            server_hostname=name,
            ssl_handshake_timeout=limit,
        )
    return transport, proto


def listen(
    addr: Address,
    backlog: int = LISTEN_BACKLOG,
    owner: str | None = None,
    group: str | None = None,
    perms: int | None = None,
) -> socket.socket:
    """A listening socket for ``addr`` (for ``FD:n``, the inherited socket itself).

    TCP listeners set SO_REUSEADDR; unix listeners replace a stale socket file
    (but refuse to delete anything that is not a socket), then apply
    ``owner``/``group``/``perms`` like ``-sockowner``/``-sockgroup``/``-sockperms``.
    """
    if isinstance(addr, FdAddress):
        return socket.socket(fileno=addr.fd)
    if isinstance(addr, UnixAddress):
        return _listen_unix(addr.path, backlog, owner, group, perms)
    family, sockaddr = _tcp_sockaddr(addr)
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


def _listen_unix(
    path: str, backlog: int, owner: str | None, group: str | None, perms: int | None
) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AddressError(f"{path} exists and is not a socket; not replacing it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound = False
    try:
        sock.bind(path)
        bound = True
        if owner is not None or group is not None:
            import grp
            import pwd

            uid = pwd.getpwnam(owner).pw_uid if owner is not None else -1
            gid = grp.getgrnam(group).gr_gid if group is not None else -1
            os.chown(path, uid, gid)
        if perms is not None:
            os.chmod(path, perms)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        if bound:  # do not leave a socket file nobody listens on
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    return sock


def is_listening(sock: socket.socket) -> bool:
    """False for an inherited connected socket (``FD:n`` handed one client, as in C)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return True


async def serve(
    sock: socket.socket,
    factory: Callable[[], asyncio.BaseProtocol],
    backlog: int = LISTEN_BACKLOG,
    *,
    ssl: SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
) -> asyncio.AbstractServer | None:
    """Serve ``factory`` on ``sock``: every connection of a listener, or the one
    connection of an inherited connected socket (then None is returned).

    Keeps the listener's backlog (asyncio's own default of 100 would replace it).
    With ``ssl``, a connection reaches ``factory`` once its TLS handshake is done; one
    whose handshake takes longer than ``ssl_handshake_timeout`` seconds is closed.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    limit = ssl_handshake_timeout
    if not is_listening(sock):
        await loop.connect_accepted_socket(factory, sock, ssl=ssl, ssl_handshake_timeout=limit)
        return None
    if sock.family == socket.AF_UNIX:
        return await loop.create_unix_server(
            factory, sock=sock, backlog=backlog, ssl=ssl, ssl_handshake_timeout=limit
        )
    return await loop.create_server(
        factory, sock=sock, backlog=backlog, ssl=ssl, ssl_handshake_timeout=limit
    )
