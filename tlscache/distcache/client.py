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
* failures raise exceptions instead of returning 0.

Like the C library, a GET reply shorter than 5 bytes is a miss: the protocol
cannot tell a 1-byte session from a result code, and TLS sessions are always
well over 100 bytes.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
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

#: GET replies shorter than this are misses (protocol.md §7.4, as in the C client).
MIN_SESSION_REPLY: Final = 5

_RECV_SIZE: Final = 65536
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
    """One connected socket and its response decoder."""

    __slots__ = ("decoder", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(expect_response=True)

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
    library's default mode (and Apache's mod_socache_dc).
    """

    def __init__(
        self,
        address: str | Address,
        *,
        deadline_ms: float = 1000.0,
        persistent: bool = True,
        pool_size: int = 8,
    ) -> None:
        if deadline_ms <= 0:
            raise ValueError("deadline_ms must be positive")
        if pool_size < 0:
            raise ValueError("pool_size must not be negative")
        self.address = resolve(address)
        self.deadline_ms = deadline_ms
        self.persistent = persistent
        self.pool_size = pool_size if persistent else 0
        self._idle: list[_Conn] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

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

    def close(self) -> None:
        """Close the idle connections; ones in use are closed when their call ends."""
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

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
            conn.close()
            conn, reused = self._connect(deadline), False
            try:
                reply = self._transact(conn, frame, deadline, reused)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        try:
            payload = check_reply(reply, uid, operation)
        except ClientError:
            conn.close()
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
            # Closing our copy of the descriptor leaves the parent's connection intact.
            conn.close()

    def _checkin(self, conn: _Conn) -> None:
        if self.pool_size and os.getpid() == self._pid:
            with self._lock:
                # Checked under the lock: a close() that emptied the pool meanwhile
                # must not see a connection put back after it.
                if not self._closed and len(self._idle) < self.pool_size:
                    self._idle.append(conn)
                    return
        conn.close()

    def _connect(self, deadline: float) -> _Conn:
        try:
            sock = connect(self.address, timeout=_remaining(deadline))
        except TimeoutError:
            raise ClientTimeout(f"connect to {self.address} timed out") from None
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.address}: {exc}") from exc
        return _Conn(sock)

    def _transact(self, conn: _Conn, frame: bytes, deadline: float, reused: bool) -> Message:
        """Send one request and read exactly one reply; raise :class:`_Retry` if worth it."""
        sock = conn.sock
        got_bytes = False
        try:
            sock.settimeout(_remaining(deadline))
            sock.sendall(frame)
            while True:
                sock.settimeout(_remaining(deadline))
                data = sock.recv(_RECV_SIZE)
                if not data:
                    if reused and not got_bytes:
                        raise _Retry
                    raise ClientError(f"{self.address} closed the connection")
                got_bytes = True
                messages = conn.decoder.feed(data)
                if messages:
                    if len(messages) > 1 or conn.decoder.in_message:
                        raise ClientError(f"{self.address} sent more than one reply")
                    return messages[0]
        except TimeoutError:
            raise ClientTimeout(f"no reply from {self.address} before the deadline") from None
        except ProtocolError as exc:
            raise ClientError(f"malformed reply from {self.address}: {exc.reason}") from exc
        except OSError as exc:
            if reused and not got_bytes and time.monotonic() < deadline:
                raise _Retry from exc
            raise ClientError(f"I/O error talking to {self.address}: {exc}") from exc
