"""One blocking connection to a memcached server: the I/O shell of the meta codec.

It sends encoded requests and reads replies with :class:`~tlscache.memcache.protocol.ReplyParser`,
spending from the caller's :class:`~tlscache.deadline.Deadline` at every step (connect,
send, each receive), so no call waits past it. The socket stays non-blocking and is waited
on with ``poll`` (:class:`~tlscache.pollio.PolledSocket`: three system calls a round trip,
not six). Not thread-safe: the store hands each
connection to one thread at a time. Any failure leaves the connection unusable (it may be
out of step with the server) and the caller closes it.
"""

from __future__ import annotations

import socket
from typing import Final

from tlscache.deadline import Deadline
from tlscache.exceptions import ProtocolError, StoreError, StoreTimeout
from tlscache.pollio import PolledSocket

from .protocol import Reply, ReplyParser, ServerAddress

__all__ = ["MemcacheConnection", "ReplyLost", "connect"]

_RECV_SIZE: Final = 65536


class ReplyLost(StoreError):
    """The connection closed before any byte of the reply: a reused connection the server
    dropped while idle, on which the request may be sent again once, on a fresh one."""


def connect(address: ServerAddress, deadline: Deadline, connect_timeout_s: float) -> socket.socket:
    """A connected socket, within ``connect_timeout_s`` and the deadline, whichever ends first."""
    if deadline.expired:
        raise StoreTimeout("memcached deadline passed before connecting")
    timeout = min(connect_timeout_s, deadline.socket_timeout())
    try:
        if address.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
        else:
            assert address.host is not None and address.port is not None
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError as exc:
        raise StoreTimeout("memcached connect timed out") from exc
    except OSError as exc:
        raise StoreError(f"memcached connect failed: {type(exc).__name__}") from exc
    return sock


class MemcacheConnection:
    """A socket and its reply parser."""

    __slots__ = ("parser", "polled", "sock", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.polled = PolledSocket(sock)
        self.parser = ReplyParser()
        self.used = False  #: True once a request got its replies (a reused connection)

    @classmethod
    def open(
        cls, address: ServerAddress, deadline: Deadline, connect_timeout_s: float
    ) -> MemcacheConnection:
        return cls(connect(address, deadline, connect_timeout_s))

    def request(self, payload: bytes, replies: int, deadline: Deadline) -> list[Reply]:
        """Send ``payload`` and read ``replies`` replies, all before ``deadline``.

        Raises :class:`StoreTimeout` past the deadline, :class:`ReplyLost` when the peer
        closed before any reply byte, :class:`StoreError` for anything else (reset, bad
        reply); the connection is then unusable.
        """
        got: list[Reply] = []
        received = False
        polled = self.polled
        try:
            polled.sendall(payload, deadline)
            while len(got) < replies:
                data = polled.recv(_RECV_SIZE, deadline)
                if not data:
                    if not received:
                        raise ReplyLost("memcached closed the connection")
                    raise StoreError("memcached closed the connection mid-reply")
                received = True
                got.extend(self.parser.feed(data))
        except TimeoutError as exc:
            raise StoreTimeout("memcached reply not complete by the deadline") from exc
        except ProtocolError as exc:
            raise StoreError(f"bad memcached reply: {exc.reason}") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            if not received:
                raise ReplyLost(f"memcached connection lost: {type(exc).__name__}") from exc
            raise StoreError(f"memcached connection lost: {type(exc).__name__}") from exc
        except OSError as exc:
            raise StoreError(f"memcached I/O failed: {type(exc).__name__}") from exc
        if len(got) > replies or self.parser.buffered:
            raise StoreError("memcached sent more than was asked")
        self.used = True
        return got

    def close(self) -> None:
        self.sock.close()
