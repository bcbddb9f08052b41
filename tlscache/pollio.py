"""Blocking request/reply I/O on a non-blocking socket, bounded by a deadline.

A lookup on the handshake path is one small request and one small reply. With Python's
socket timeouts that costs six system calls: an ``ioctl`` for each ``settimeout`` (CPython
sets the descriptor's blocking mode on every call) and a ``poll`` before the ``send`` as
well as before the ``recv``. A :class:`PolledSocket` keeps the descriptor non-blocking for
its whole life and waits with its own ``poll`` object, so a round trip is one ``send``,
one ``poll`` bounded by the deadline and one ``recv``.

Hand-written because the standard library has no deadline-bounded receive that skips
the per-call ``ioctl``; it is the few lines the distcache client and the memcached
connection share. Plain sockets only: ``poll`` cannot see the bytes an ``ssl.SSLSocket``
has already decrypted, so TLS connections keep socket timeouts.
"""

from __future__ import annotations

import math
import select
import socket

from tlscache.deadline import Deadline

__all__ = ["PolledSocket"]


class PolledSocket:
    """A connected plain stream socket, made non-blocking, and the ``poll`` that waits on it."""

    __slots__ = ("_poller", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(0.0)
        self.sock = sock
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def recv(self, size: int, deadline: Deadline) -> bytes:
        """One ``recv`` of up to ``size`` bytes, waiting for data until ``deadline``.

        Raises :class:`TimeoutError` once the deadline has passed with nothing to read;
        ``b""`` means the peer closed (a hang-up or an error wakes the ``poll`` too, and
        the ``recv`` then reports it).
        """
        sock = self.sock
        poll = self._poller.poll
        while True:
            left = deadline.expires - deadline.clock()
            # poll() counts whole milliseconds: round up, as CPython's socket timeouts do.
            if left <= 0.0 or not poll(math.ceil(left * 1000.0)):
                raise TimeoutError
            try:
                return sock.recv(size)
            except BlockingIOError:
                continue  # a spurious wake-up: wait again, within the same deadline

    def sendall(self, data: bytes, deadline: Deadline) -> None:
        """Hand ``data`` to the kernel; wait (until ``deadline``) only if it will not take it all.

        Raises :class:`TimeoutError` if the rest could not be sent before the deadline.
        """
        sock = self.sock
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            sock.settimeout(deadline.socket_timeout())
            try:
                sock.sendall(memoryview(data)[sent:])
            finally:
                sock.settimeout(0.0)
