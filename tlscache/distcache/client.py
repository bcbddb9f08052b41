"""Blocking distcache client: the Python counterpart of the C ``DC_CTX`` API.

One :class:`Client` talks to a ``dc_server`` or ``dc_client`` at one address.
It is safe to share between threads: each call checks a connection out of a
small pool (or opens a new one), so no thread ever waits for another's I/O.

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
import itertools
import os
import socket
import threading
import time
from collections import deque
from types import TracebackType
from typing import Final

from tlscache.distcache.address import Address, connect, parse_address
from tlscache.distcache.protocol import (
    MAX_UID,
    Decoder,
    Message,
    Operation,
    Result,
    encode_add,
    encode_get,
    encode_have,
    encode_remove,
    validate_add_request,
)
from tlscache.exceptions import (
    AddressError,
    ClientError,
    ClientTimeout,
    ProtocolError,
    ServerUnavailable,
)

#: GET replies shorter than this are misses, as in the C client (docs/distcache.md).
MIN_SESSION_REPLY: Final = 5

#: Replies to :meth:`Client.add_nowait` one connection may owe; the next
#: ``add_nowait`` on a connection owing this many reads them before sending.
MAX_OWED: Final = 64

_RECV_SIZE: Final = 65536
#: Result bytes of an owed ADD reply that mean "stored" (this session, or one with its id).
_ADD_STORED: Final = frozenset({Result.OK, Result.ADD_MATCHING_SESSION})
_RESULTS: Final = frozenset(int(r) for r in Result)
_uids = itertools.count(1)


def next_uid() -> int:
    """The next request uid from the process-wide counter (1, 2, 3, ... like the C API)."""
    return next(_uids) & MAX_UID


def resolve(address: str | Address) -> Address:
    """Parse ``address`` if needed and make sure it can be connected to."""
    addr = parse_address(address) if isinstance(address, str) else address
    if not addr.connectable:
        raise AddressError(f"{addr} is a listen-only address; give IP:host:port")
    return addr


def check_reply(reply: Message, uid: int, operation: Operation) -> bytes:
    """The payload of ``reply`` after the C client's checks (same uid and operation).

    Raises :class:`ServerUnavailable` for dc_client's empty "no server" reply and
    for its one-byte ``0x02`` "disconnected" result.
    """
    if reply.uid != uid or reply.operation != operation:
        raise ClientError(
            f"reply (uid {reply.uid:#x}, {reply.operation.name}) does not match "
            f"the request (uid {uid:#x}, {operation.name})"
        )
    payload = reply.payload
    if not payload:
        raise ServerUnavailable("the proxy has no connection to the cache server (empty reply)")
    if len(payload) == 1 and payload[0] == Result.DISCONNECTED:
        raise ServerUnavailable("the proxy lost its cache server with the request outstanding")
    return payload


def add_result(payload: bytes) -> Result:
    """An ADD reply: exactly one known result byte."""
    if len(payload) != 1:
        raise ClientError(f"ADD reply of {len(payload)} bytes, expected 1")
    try:
        return Result(payload[0])
    except ValueError:
        raise ClientError(f"unknown ADD result code {payload[0]}") from None


def get_result(payload: bytes) -> bytes | None:
    """A GET reply: the session data, or None for a miss (any reply under 5 bytes)."""
    return payload if len(payload) >= MIN_SESSION_REPLY else None


def yes_no_result(payload: bytes, operation: Operation) -> bool:
    """A REMOVE/HAVE reply: ``0x00`` yes, ``0x01`` no, anything else is an error."""
    if payload == b"\x00":
        return True
    if payload == b"\x01":
        return False
    raise ClientError(f"unexpected {operation.name} reply {payload[:8].hex()} ({len(payload)} B)")


class _Retry(Exception):
    """The reused connection broke before any reply byte: safe to resend once."""


class _Conn:
    """One connected socket, its response decoder and the replies it owes."""

    __slots__ = ("decoder", "owed", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(expect_response=True)
        #: uids of ADDs sent by add_nowait whose replies are not read yet, oldest first.
        self.owed: deque[int] = deque()

    def close(self) -> None:
        self.sock.close()


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ClientTimeout("deadline passed")
    return left


class Client:
    """A blocking, thread-safe distcache client.

    ``deadline_ms`` is the default per-call deadline. With ``persistent=True``
    (the default) up to ``pool_size`` idle connections are kept for reuse;
    ``persistent=False`` opens a new connection per operation, like the C
    library's default mode (and Apache's mod_socache_dc). ``max_owed`` bounds
    the :meth:`add_nowait` replies one pooled connection may owe.
    """

    def __init__(
        self,
        address: str | Address,
        *,
        deadline_ms: float = 1000.0,
        persistent: bool = True,
        pool_size: int = 8,
        max_owed: int = MAX_OWED,
    ) -> None:
        if deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        if pool_size < 0:
            raise ValueError("pool_size must not be negative")
        if max_owed < 1:
            raise ValueError("max_owed must be at least 1")
        self.address = resolve(address)
        self.deadline_ms = deadline_ms
        self.persistent = persistent
        self.pool_size = pool_size if persistent else 0
        self.max_owed = max_owed
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self._nowait_failures = 0

    # ------------------------------------------------------------ public API

    def add(
        self, session_id: bytes, data: bytes, timeout_ms: int, *, deadline_ms: float | None = None
    ) -> Result:
        """Store a session; the server's result (``OK``, ``ADD_MATCHING_SESSION``, ...).

        Arguments the server would refuse raise :class:`ValueError` without any I/O.
        """
        validate_add_request(session_id, data, timeout_ms)
        uid = next_uid()
        frame = encode_add(uid, session_id, data, timeout_ms)
        return add_result(self._call(frame, uid, Operation.ADD, deadline_ms))

    def add_nowait(
        self, session_id: bytes, data: bytes, timeout_ms: int, *, deadline_ms: float | None = None
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
        validate_add_request(session_id, data, timeout_ms)
        if not self.pool_size:
            result = self.add(session_id, data, timeout_ms, deadline_ms=deadline_ms)
            if result not in _ADD_STORED:
                self._count_failures(1)
            return
        if self._closed:
            raise ClientError("client is closed")
        ms = self.deadline_ms if deadline_ms is None else deadline_ms
        deadline = time.monotonic() + ms / 1000.0
        uid = next_uid()
        frame = encode_add(uid, session_id, data, timeout_ms)
        conn, reused = self._checkout(deadline)
        try:
            if reused and not self._settle_arrived(conn, deadline):
                self._discard(conn)  # the peer closed it: send on a fresh one
                conn = self._connect(deadline)
            self._send(conn, frame, deadline)
        except BaseException:
            self._discard(conn)
            raise
        conn.owed.append(uid)
        self._checkin(conn, deadline)

    def get(self, session_id: bytes, *, deadline_ms: float | None = None) -> bytes | None:
        """The session's data, or None if absent (or shorter than 5 bytes, as in C)."""
        uid = next_uid()
        payload = self._call(encode_get(uid, session_id), uid, Operation.GET, deadline_ms)
        return get_result(payload)

    def remove(self, session_id: bytes, *, deadline_ms: float | None = None) -> bool:
        """True if the session was there and is now removed."""
        uid = next_uid()
        payload = self._call(encode_remove(uid, session_id), uid, Operation.REMOVE, deadline_ms)
        return yes_no_result(payload, Operation.REMOVE)

    def have(self, session_id: bytes, *, deadline_ms: float | None = None) -> bool:
        """True if the server holds an unexpired session with this id."""
        uid = next_uid()
        payload = self._call(encode_have(uid, session_id), uid, Operation.HAVE, deadline_ms)
        return yes_no_result(payload, Operation.HAVE)

    @property
    def nowait_failures(self) -> int:
        """:meth:`add_nowait` requests not stored, as far as this process knows.

        Counts replies that reported a failure (a refusal, or dc_client's "no
        server") and replies never read because their connection broke, timed
        out or was discarded. Only grows (also across ``fork()``).
        """
        return self._nowait_failures

    def drain(self, *, deadline_ms: float | None = None) -> bool:
        """Read the replies the idle connections owe (:meth:`add_nowait`).

        True if every one was read (whatever it said; failures are counted in
        :attr:`nowait_failures`); a connection that fails or runs out of time is
        discarded. Connections in use by other threads are not waited for.
        """
        if not self.pool_size or os.getpid() != self._pid:
            return True
        ms = self.deadline_ms if deadline_ms is None else deadline_ms
        deadline = time.monotonic() + ms / 1000.0
        with self._lock:
            owing = [c for c in self._idle if c.owed]
            self._idle = [c for c in self._idle if not c.owed]
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
        pid = os.getpid()
        if pid != self._pid:
            self._after_fork(pid)
        with self._lock:
            idle, self._idle = self._idle, []
        if any(conn.owed for conn in idle):
            deadline = time.monotonic() + self.deadline_ms / 1000.0
            for conn in idle:
                if conn.owed:
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

    def _call(
        self, frame: bytes, uid: int, operation: Operation, deadline_ms: float | None
    ) -> bytes:
        if self._closed:
            raise ClientError("client is closed")
        ms = self.deadline_ms if deadline_ms is None else deadline_ms
        deadline = time.monotonic() + ms / 1000.0
        conn, reused = self._checkout(deadline)
        try:
            reply = self._transact(conn, frame, deadline, reused)
        except _Retry:
            self._discard(conn)
            conn, reused = self._connect(deadline), False
            try:
                reply = self._transact(conn, frame, deadline, reused)
            except BaseException:
                self._discard(conn)
                raise
        except BaseException:
            self._discard(conn)
            raise
        try:
            payload = check_reply(reply, uid, operation)
        except ClientError:
            self._discard(conn)
            raise
        self._checkin(conn)
        return payload

    def _checkout(self, deadline: float) -> tuple[_Conn, bool]:
        if self.pool_size:
            pid = os.getpid()
            if pid != self._pid:
                self._after_fork(pid)
            with self._lock:
                if self._idle:
                    return self._idle.pop(), True
        return self._connect(deadline), False

    def _after_fork(self, pid: int) -> None:
        """In a forked child: forget the parent's sockets (and a lock it may have held)."""
        self._lock = threading.Lock()
        idle, self._idle = self._idle, []
        self._pid = pid
        for conn in idle:
            # Closing our copy of the descriptor leaves the parent's connection intact;
            # the replies it owes are the parent's to read.
            conn.close()

    def _checkin(self, conn: _Conn, deadline: float | None = None) -> None:
        """Back to the pool; or closed, after reading its owed replies (until ``deadline``)."""
        if self.pool_size and os.getpid() == self._pid:
            with self._lock:
                # Checked under the lock: a close() that emptied the pool meanwhile
                # must not see a connection put back after it.
                if not self._closed and len(self._idle) < self.pool_size:
                    self._idle.append(conn)
                    return
            if conn.owed and deadline is not None:
                with contextlib.suppress(ClientError):  # counted as failures by _discard
                    self._read_owed(conn, deadline)
        self._discard(conn)

    def _discard(self, conn: _Conn) -> None:
        """Close ``conn``; the replies it still owes count as failed writes."""
        if conn.owed:
            self._count_failures(len(conn.owed))
            conn.owed.clear()
        conn.close()

    def _count_failures(self, n: int) -> None:
        with self._lock:
            self._nowait_failures += n

    def _connect(self, deadline: float) -> _Conn:
        try:
            sock = connect(self.address, timeout=_remaining(deadline))
        except TimeoutError:
            raise ClientTimeout(f"connect to {self.address} timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.address}: {exc}") from exc
        return _Conn(sock)

    def _settle(self, conn: _Conn, messages: list[Message]) -> list[Message]:
        """Check the owed replies at the head of ``messages``; the messages after them."""
        owed = conn.owed
        n = 0
        for message in messages:
            if not owed:
                break
            uid = owed.popleft()
            n += 1
            if message.uid != uid or message.operation != Operation.ADD:
                self._count_failures(1)
                raise ClientError(
                    f"reply (uid {message.uid:#x}, {message.operation.name}) does not match "
                    f"the owed ADD reply (uid {uid:#x})"
                )
            payload = message.payload
            if len(payload) == 1 and payload[0] in _ADD_STORED:
                continue
            self._count_failures(1)
            if len(payload) > 1 or (payload and payload[0] not in _RESULTS):
                raise ClientError(f"malformed ADD reply {payload[:8].hex()} ({len(payload)} B)")
            # A refusal or "no server": the write is lost, the connection is fine.
        return messages[n:] if n else messages

    def _settle_arrived(self, conn: _Conn, deadline: float) -> bool:
        """Before a send on a reused connection: settle the replies that have arrived,
        without waiting (all owed ones, waiting until ``deadline``, if ``max_owed``
        are owed). False if the connection is closed or out of step: nothing may be
        sent on it. Raises :class:`ClientTimeout` if the owed replies are late."""
        sock = conn.sock
        try:
            sock.settimeout(0.0)
            data = sock.recv(_RECV_SIZE)
        except BlockingIOError:
            data = None
        except OSError:
            return False
        try:
            if data is not None:
                if not data:
                    return False
                rest = self._settle(conn, conn.decoder.feed(data))
                if rest or (not conn.owed and conn.decoder.in_message):
                    return False  # a reply nobody asked for
            if len(conn.owed) >= self.max_owed:
                self._read_owed(conn, deadline)
        except ProtocolError:
            return False
        except ClientTimeout:
            raise
        except ClientError:
            return False
        return True

    def _send(self, conn: _Conn, frame: bytes, deadline: float) -> None:
        """Hand ``frame`` to the kernel; wait (until ``deadline``) only if it will not take it."""
        sock = conn.sock
        try:
            _remaining(deadline)
            sock.settimeout(0.0)
            try:
                sent = sock.send(frame)
            except BlockingIOError:
                sent = 0
            if sent < len(frame):
                sock.settimeout(_remaining(deadline))
                sock.sendall(memoryview(frame)[sent:])
        except TimeoutError:
            raise ClientTimeout(f"cannot send to {self.address} before the deadline") from None
        except OSError as exc:
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc

    def _read_owed(self, conn: _Conn, deadline: float) -> None:
        """Read and check every reply ``conn`` owes, until ``deadline``."""
        sock = conn.sock
        try:
            while conn.owed:
                sock.settimeout(_remaining(deadline))
                data = sock.recv(_RECV_SIZE)
                if not data:
                    raise ClientError(f"{self.address} closed the connection")
                if self._settle(conn, conn.decoder.feed(data)) or (
                    not conn.owed and conn.decoder.in_message
                ):
                    raise ClientError(f"{self.address} sent a reply nobody asked for")
        except TimeoutError:
            raise ClientTimeout(f"owed replies from {self.address} late") from None
        except ProtocolError as exc:
            raise ClientError(f"malformed reply from {self.address}: {exc.reason}") from exc
        except OSError as exc:
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc

    def _transact(self, conn: _Conn, frame: bytes, deadline: float, reused: bool) -> Message:
        """Send one request; read the replies ``conn`` owes, then exactly one reply.

        Raises :class:`_Retry` if the reused connection broke before any byte of
        this request's reply arrived, or if an owed reply does not match.
        """
        sock = conn.sock
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(frame)
            while True:
                sock.settimeout(_remaining(deadline))
                data = sock.recv(_RECV_SIZE)
                if not data:
                    if reused and not _own_reply_started(conn):
                        raise _Retry
                    raise ClientError(f"{self.address} closed the connection")
                messages = conn.decoder.feed(data)
                if conn.owed:
                    try:
                        messages = self._settle(conn, messages)
                    except ClientError as exc:
                        raise _Retry from exc  # out of step: resend on a fresh connection
                if messages:
                    if len(messages) > 1 or conn.decoder.in_message:
                        raise ClientError(f"{self.address} sent more than one reply")
                    return messages[0]
        except TimeoutError:
            raise ClientTimeout(f"no reply from {self.address} before the deadline") from None
        except ProtocolError as exc:
            raise ClientError(f"malformed reply from {self.address}: {exc.reason}") from exc
        except OSError as exc:
            if reused and not _own_reply_started(conn) and time.monotonic() < deadline:
                raise _Retry from exc
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc


def _own_reply_started(conn: _Conn) -> bool:
    """Whether bytes of the reply to the request just sent (after the owed ones) arrived."""
    return not conn.owed and conn.decoder.in_message
