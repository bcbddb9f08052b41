"""Blocking distcache client: the Python counterpart of the C ``DC_CTX`` API.

One :class:`Client` talks to a ``dc_server`` or ``dc_client`` at one address.
It is safe to share between threads: each call checks a connection out of a
small pool (or opens a new one), so no thread ever waits for another's I/O.
Each connection's protocol state (uids, owed replies, reply checks) is a
:class:`~tlscache.distcache.clientconn.ClientConnection`; this module only
moves its bytes and manages the pool.

Differences from the C library, all deliberate:

* every call has a deadline covering connect, send and receive, and raises
  :class:`~tlscache.exceptions.ClientTimeout` past it (C blocks forever);
* persistent connections are opened lazily and replaced transparently: a
  request that fails on a reused connection before any reply byte arrived is
  re-sent once, with the same uid, on a fresh connection (C's
  ``PERSISTENT_RETRY | PERSISTENT_LATE``), but never once the deadline passed;
* after ``fork()`` the child never touches the parent's sockets (C's
  ``PERSISTENT_PIDCHECK``, except that the child then keeps its own pool);
* failures raise exceptions instead of returning 0;
* :meth:`Client.add_nowait` sends an ADD without waiting for its reply: the
  connection goes back to the pool owing that reply, and whoever uses the
  connection next reads and checks it first (pipelining, which the protocol
  allows: replies come back in request order on a connection).

Like the C library, a GET reply shorter than 5 bytes is a miss: the protocol
cannot tell a 1-byte session from a result code, and TLS sessions are always
well over 100 bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from types import TracebackType
from typing import Final, TypeVar

from tlscache.deadline import Deadline
from tlscache.distcache.address import Address, connectable
from tlscache.distcache.clientconn import (
    STORED_RESULTS,
    ClientConnection,
    Request,
    add_request,
    get_request,
    have_request,
    probe_request,
    remove_request,
    take_request,
)
from tlscache.distcache.linktls import LinkTLS
from tlscache.distcache.protocol import Capabilities, Result, new_probe_nonce
from tlscache.distcache.sockets import connect
from tlscache.exceptions import ClientError, ClientTimeout, TakeUnsupported
from tlscache.pollio import PolledSocket

__all__ = ["MAX_OWED", "Client"]

#: Replies to :meth:`Client.add_nowait` one connection may owe; the next
#: ``add_nowait`` on a connection owing this many reads them before sending.
MAX_OWED: Final = 64

_RECV_SIZE: Final = 65536

T = TypeVar("T")

#: Forks this process descends through. A client compares it with the value it
#: last saw, which costs nothing per call, where ``os.getpid()`` is a system call.
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class _Retry(Exception):
    """The reused connection failed before any byte of the reply: safe to resend once."""


class _Conn:
    """One connected socket and the protocol state of its connection.

    A plain socket is kept non-blocking and waited on with ``poll``
    (:class:`~tlscache.pollio.PolledSocket`): a round trip is three system calls
    instead of six. A TLS socket (``polled`` None) keeps socket timeouts: ``poll``
    cannot see the bytes OpenSSL has already decrypted.
    """

    __slots__ = ("polled", "proto", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.proto = ClientConnection(peer)
        self.polled = None if isinstance(sock, ssl.SSLSocket) else PolledSocket(sock)

    def recv(self, deadline: Deadline) -> bytes:
        """One ``recv``, waiting for data until ``deadline``; TimeoutError past it."""
        if self.polled is not None:
            return self.polled.recv(_RECV_SIZE, deadline)
        self.sock.settimeout(deadline.socket_timeout())
        return self.sock.recv(_RECV_SIZE)

    def sendall(self, data: bytes, deadline: Deadline) -> None:
        """Hand ``data`` to the kernel, waiting (until ``deadline``) only if it will not take it."""
        if self.polled is not None:
            self.polled.sendall(data, deadline)
        else:
            self.sock.settimeout(deadline.socket_timeout())
            self.sock.sendall(data)


class Client:
    """A blocking, thread-safe distcache client.

    ``deadline_ms`` is the default per-call deadline; a call given a
    :class:`~tlscache.deadline.Deadline` spends from that one instead. With
    ``persistent=True`` (the default) up to ``pool_size`` idle connections are
    kept for reuse; ``persistent=False`` opens a new connection per operation,
    like the C library's default mode (and Apache's mod_socache_dc).
    ``max_owed`` bounds the :meth:`add_nowait` replies one pooled connection may owe.
    ``tls`` speaks mutual TLS to a dc_server at an ``IP:`` address (see
    :mod:`tlscache.distcache.linktls`); each connect's handshake spends from the
    call's deadline.
    """

    def __init__(
        self,
        address: str | Address,
        *,
        deadline_ms: float = 1000.0,
        persistent: bool = True,
        pool_size: int = 8,
        max_owed: int = MAX_OWED,
        tls: LinkTLS | None = None,
    ) -> None:
        if deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        if pool_size < 0:
            raise ValueError("pool_size must not be negative")
        if max_owed < 1:
            raise ValueError("max_owed must be at least 1")
        self.address = connectable(address)
        self.tls = tls
        self._server_hostname = tls.server_hostname(self.address) if tls is not None else None
        self._ssl = tls.client_context() if tls is not None else None
        self.deadline_ms = deadline_ms
        self.persistent = persistent
        self.pool_size = pool_size if persistent else 0
        self.max_owed = max_owed
        self._peer = str(self.address)
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._forks = _forks
        self._closed = False
        self._nowait_failures = 0
        self._nowait_confirmed = 0
        # What the server offers beyond C, once probed (see capabilities()).
        self._capabilities: Capabilities | None = None

    # ------------------------------------------------------------ public API

    def add(
        self, session_id: bytes, data: bytes, timeout_ms: int, *, deadline: Deadline | None = None
    ) -> Result:
        """Store a session; the server's result (``OK``, ``ADD_MATCHING_SESSION``, ...).

        Arguments the server would refuse raise :class:`ValueError` without any I/O.
        """
        return self._call(add_request(session_id, data, timeout_ms), deadline)

    def add_nowait(
        self, session_id: bytes, data: bytes, timeout_ms: int, *, deadline: Deadline | None = None
    ) -> None:
        """Send an ADD and return without waiting for its reply.

        The request is in the kernel's hands when this returns, so the server
        reads it before any later request on the same connection (requests on
        other connections carry no ordering guarantee). The connection goes back
        to the pool owing the reply; the next call that uses it (or
        :meth:`drain`, :meth:`close`) reads and checks it first, within that
        call's own deadline. ``OK`` and ``ADD_MATCHING_SESSION`` count as stored;
        any other result, "no server", or a reply never read because its
        connection broke counts in :attr:`nowait_failures`. A reply that does not
        match its request discards the connection.

        Raises like :meth:`add` when the request cannot be sent (no connection,
        deadline passed); never waits for the server otherwise, except to read
        replies when a connection already owes ``max_owed`` of them, or when the
        pool is full and the connection must be closed. Without a pool
        (``persistent=False`` or ``pool_size=0``) this is :meth:`add`.
        """
        request = add_request(session_id, data, timeout_ms)
        if not self.pool_size:
            if self._call(request, deadline) not in STORED_RESULTS:
                self._count_failures(1)
            return
        deadline = self._deadline(deadline)
        conn, reused = self._checkout(deadline)
        try:
            if reused and not self._settle_arrived(conn, deadline):
                self._discard(conn)  # the peer closed it: send on a fresh one
                conn = self._connect(deadline)
            self._send(conn, conn.proto.send_nowait(request), deadline)
        except BaseException:
            self._discard(conn)
            raise
        conn.proto.owe(request)
        self._checkin(conn, deadline)

    def get(self, session_id: bytes, *, deadline: Deadline | None = None) -> bytes | None:
        """The session's data, or None if absent (or shorter than 5 bytes, as in C)."""
        return self._call(get_request(session_id), deadline)

    def remove(self, session_id: bytes, *, deadline: Deadline | None = None) -> bool:
        """True if the session was there and is now removed."""
        return self._call(remove_request(session_id), deadline)

    def have(self, session_id: bytes, *, deadline: Deadline | None = None) -> bool:
        """True if the server holds an unexpired session with this id."""
        return self._call(have_request(session_id), deadline)

    def capabilities(self, *, deadline: Deadline | None = None) -> Capabilities:
        """What the server (or the path through a dc_client) offers beyond C distcache.

        Probed on first use with a fresh nonce and kept; a C server (or anything
        that does not echo the nonce) offers nothing. A failed probe raises and is
        tried again next time.
        """
        caps = self._capabilities
        if caps is None:
            caps = self._capabilities = self._call(probe_request(new_probe_nonce()), deadline)
        return caps

    def take(self, session_id: bytes, *, deadline: Deadline | None = None) -> bytes | None:
        """The session's data, deleted in the same step: of two takers, one gets it.

        Raises :class:`~tlscache.exceptions.TakeUnsupported` if the server did not
        offer TAKE (probing it first if need be): a C server would close the
        connection for it.
        """
        deadline = self._deadline(deadline)
        if not self.capabilities(deadline=deadline).take:
            raise TakeUnsupported(f"{self.address} does not offer TAKE")
        try:
            return self._call(take_request(session_id), deadline)
        except ClientError as exc:
            if not isinstance(exc, ClientTimeout):
                # The path may have changed (a dc_client reconnected elsewhere): probe again.
                self._capabilities = None
            raise

    @property
    def nowait_failures(self) -> int:
        """:meth:`add_nowait` requests not stored, as far as this process knows.

        Counts replies that reported a failure (a refusal, or dc_client's "no
        server") and replies never read because their connection broke, timed
        out or was discarded. Only grows (also across ``fork()``).
        """
        return self._nowait_failures

    @property
    def nowait_confirmed(self) -> int:
        """:meth:`add_nowait` requests whose reply said stored, once read. Only grows.

        With :attr:`nowait_failures` it tells a caller whether the server answered
        anything since it last looked: a sent request alone proves nothing (a stopped
        server's socket buffers still take it).
        """
        return self._nowait_confirmed

    def drain(self, *, deadline: Deadline | None = None) -> bool:
        """Read the replies the idle connections owe (:meth:`add_nowait`).

        True if every one was read (whatever it said; failures are counted in
        :attr:`nowait_failures`); a connection that fails or runs out of time is
        discarded. Connections in use by other threads are not waited for.
        """
        if not self.pool_size or _forks != self._forks:
            return True
        if deadline is None:
            deadline = Deadline.after_ms(self.deadline_ms)
        with self._lock:
            owing = [c for c in self._idle if c.proto.owed]
            self._idle = [c for c in self._idle if not c.proto.owed]
        done = True
        for conn in owing:
            try:
                self._read_owed(conn, deadline)
            except ClientError:
                self._discard(conn)
                done = False
            else:
                self._checkin(conn)
        return done

    def close(self) -> None:
        """Close the idle connections; ones in use are closed when their call ends.

        Replies still owed (:meth:`add_nowait`) are read first, within one default
        deadline in all, so the server has seen every request before the
        connection goes away.
        """
        self._closed = True
        if _forks != self._forks:
            self._after_fork()
        with self._lock:
            idle, self._idle = self._idle, []
        if any(conn.proto.owed for conn in idle):
            deadline = Deadline.after_ms(self.deadline_ms)
            for conn in idle:
                if conn.proto.owed:
                    with contextlib.suppress(ClientError):  # counted when discarded below
                        self._read_owed(conn, deadline)
        for conn in idle:
            self._discard(conn)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "persistent" if self.persistent else "per-op"
        return f"<Client {self.address} {mode}>"

    # ------------------------------------------------------------ internals

    def _deadline(self, deadline: Deadline | None) -> Deadline:
        """The deadline of a call about to start (the default one for None)."""
        if self._closed:
            raise ClientError("client is closed")
        return Deadline.after_ms(self.deadline_ms) if deadline is None else deadline

    def _call(self, request: Request[T], deadline: Deadline | None) -> T:
        deadline = self._deadline(deadline)
        conn, reused = self._checkout(deadline)
        try:
            try:
                self._transact(conn, request, deadline, reused)
            except _Retry:
                self._discard(conn)
                conn = self._connect(deadline)
                self._transact(conn, request, deadline, False)
        except BaseException:
            self._discard(conn)
            raise
        if request.error is not None:
            self._discard(conn)  # never reuse a connection whose last answer was wrong
            raise request.error
        self._checkin(conn)
        return request.value

    def _checkout(self, deadline: Deadline) -> tuple[_Conn, bool]:
        if self.pool_size:
            if _forks != self._forks:
                self._after_fork()
            with self._lock:
                if self._idle:
                    return self._idle.pop(), True
        return self._connect(deadline), False

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's sockets (and a lock it may have held)."""
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        self._forks = _forks
        for conn in idle:
            # Closing our copy of the descriptor leaves the parent's connection intact;
            # the replies it owes are the parent's to read.
            conn.sock.close()

    def _checkin(self, conn: _Conn, deadline: Deadline | None = None) -> None:
        """Back to the pool; or closed, after reading its owed replies (until ``deadline``)."""
        if self.pool_size and _forks == self._forks:
            with self._lock:
                # Checked under the lock: a close() that emptied the pool meanwhile
                # must not see a connection put back after it.
                if not self._closed and len(self._idle) < self.pool_size:
                    self._idle.append(conn)
                    return
            if conn.proto.owed and deadline is not None:
                with contextlib.suppress(ClientError):  # counted as failures by _discard
                    self._read_owed(conn, deadline)
        self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        """Close ``conn``; the replies it still owes count as failed writes."""
        if conn.proto.write_confirmations:
            self._take_settled(conn.proto)
        failures = conn.proto.abandon()
        if failures:
            self._count_failures(failures)
        conn.sock.close()

    def _count_failures(self, n: int) -> None:
        with self._lock:
            self._nowait_failures += n

    def _take_settled(self, proto: ClientConnection) -> None:
        """Count the owed replies ``proto`` has settled since it was last asked."""
        with self._lock:
            self._nowait_failures += proto.take_write_failures()
            self._nowait_confirmed += proto.take_write_confirmations()

    def _connect(self, deadline: Deadline) -> _Conn:
        try:
            if deadline.expired:
                raise TimeoutError
            sock = connect(
                self.address,
                deadline.socket_timeout(),
                ssl=self._ssl,
                server_hostname=self._server_hostname,
            )
        except TimeoutError:
            raise ClientTimeout(f"connect to {self.address} timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.address}: {exc}") from exc
        return _Conn(sock, self._peer)

    def _settle_arrived(self, conn: _Conn, deadline: Deadline) -> bool:
        """Before a send on a reused connection: settle the replies that have arrived,
        without waiting (all owed ones, waiting until ``deadline``, if ``max_owed``
        are owed). False if the connection is closed or out of step: nothing may be
        sent on it. Raises :class:`ClientTimeout` if the owed replies are late."""
        sock = conn.sock
        proto = conn.proto
        try:
            if conn.polled is None:
                sock.settimeout(0.0)
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            data = None  # TLS: nothing decrypted yet (bytes in ssl's buffer are returned)
        except OSError:
            return False
        try:
            if data is not None:
                if not data:
                    return False
                proto.receive_data(data)
                if proto.write_failures or proto.write_confirmations:
                    self._take_settled(proto)
            if proto.owed >= self.max_owed:
                self._read_owed(conn, deadline)
        except ClientTimeout:
            raise
        except ClientError:
            return False
        return True

    def _send(self, conn: _Conn, data: bytes, deadline: Deadline) -> None:
        """Hand ``data`` to the kernel; wait (until ``deadline``) only if it will not take it."""
        sock = conn.sock
        try:
            if deadline.expired:
                raise TimeoutError
            if conn.polled is not None:
                conn.sendall(data, deadline)
                return
            sock.settimeout(0.0)
            try:
                sent = sock.send(data)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0  # TLS: sendall below retries with the same bytes, as OpenSSL requires
            if sent < len(data):
                sock.settimeout(deadline.socket_timeout())
                sock.sendall(memoryview(data)[sent:])
        except TimeoutError:
            raise ClientTimeout(f"cannot send to {self.address} before the deadline") from None
        except OSError as exc:
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc

    def _read_owed(self, conn: _Conn, deadline: Deadline) -> None:
        """Read and check every reply ``conn`` owes, until ``deadline``."""
        proto = conn.proto
        try:
            while proto.owed:
                if deadline.expired:
                    raise TimeoutError
                data = conn.recv(deadline)
                if not data:
                    raise ClientError(f"{self.address} closed the connection")
                proto.receive_data(data)
                if proto.write_failures or proto.write_confirmations:
                    self._take_settled(proto)
        except TimeoutError:
            raise ClientTimeout(f"owed replies from {self.address} late") from None
        except OSError as exc:
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc

    def _transact(self, conn: _Conn, request: Request[T], deadline: Deadline, reused: bool) -> None:
        """Send ``request``; read the replies ``conn`` owes, then the request's own.

        Raises :class:`_Retry` if the reused connection broke before any byte of
        the request's reply arrived, or if it turned out of step while owed
        replies were still being read.
        """
        proto = conn.proto
        data = proto.send(request)
        try:
            conn.sendall(data, deadline)
            while not request.done:
                chunk = conn.recv(deadline)
                if not chunk:
                    if reused and not proto.reply_started:
                        raise _Retry
                    raise ClientError(f"{self.address} closed the connection")
                try:
                    proto.receive_data(chunk)
                except ClientError as exc:
                    if proto.owed:
                        raise _Retry from exc  # out of step: resend on a fresh connection
                    raise
                if proto.write_failures or proto.write_confirmations:
                    self._take_settled(proto)
        except TimeoutError:
            raise ClientTimeout(f"no reply from {self.address} before the deadline") from None
        except OSError as exc:
            if reused and not proto.reply_started and not deadline.expired:
                raise _Retry from exc
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc
