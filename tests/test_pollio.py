"""PolledSocket: deadline-bounded request/reply I/O on a non-blocking socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tlscache.deadline import Deadline
from tlscache.pollio import PolledSocket


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_round_trip_keeps_the_socket_non_blocking(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    polled = PolledSocket(a)
    polled.sendall(b"ping", Deadline.after(5.0))
    assert b.recv(16) == b"ping"
    b.sendall(b"pong")
    assert polled.recv(16, Deadline.after(5.0)) == b"pong"
    assert a.gettimeout() == 0.0


def test_recv_gives_up_at_the_deadline_of_a_silent_peer(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    polled = PolledSocket(pair[0])
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        polled.recv(16, Deadline.after(0.05))
    waited = time.monotonic() - start
    assert 0.04 <= waited < 5.0, waited  # waited for the deadline, not forever


def test_recv_of_a_passed_deadline_does_not_wait(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    now = [100.0]
    polled = PolledSocket(pair[0])
    pair[1].sendall(b"late")
    with pytest.raises(TimeoutError):
        polled.recv(16, Deadline(99.0, clock=lambda: now[0]))


def test_recv_reports_a_closed_peer_as_empty(pair: tuple[socket.socket, socket.socket]) -> None:
    polled = PolledSocket(pair[0])
    pair[1].close()
    assert polled.recv(16, Deadline.after(5.0)) == b""


def test_a_spurious_wake_up_waits_again_within_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Another reader takes the bytes between the poll and the recv: wait on, then give up."""
    a, b = pair
    polled = PolledSocket(a)
    b.sendall(b"x")
    real_recv = a.recv
    stolen: list[bytes] = []

    class Thief:
        """The socket as seen by PolledSocket: its first recv finds the data gone."""

        def recv(self, size: int) -> bytes:
            if not stolen:
                stolen.append(real_recv(size))
                raise BlockingIOError
            return real_recv(size)

    polled.sock = Thief()  # type: ignore[assignment]
    with pytest.raises(TimeoutError):
        polled.recv(16, Deadline.after(0.05))
    assert stolen == [b"x"]


def test_sendall_to_a_peer_that_does_not_read_ends_at_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, _ = pair
    polled = PolledSocket(a)
    big = bytes(8 << 20)  # far more than the socket buffers hold
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        polled.sendall(big, Deadline.after(0.05))
    waited = time.monotonic() - start
    assert waited < 5.0, waited
    assert a.gettimeout() == 0.0  # back to non-blocking for the next call


def test_sendall_waits_for_a_slow_reader(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    polled = PolledSocket(a)
    size = 4 << 20
    got = bytearray()

    def reader() -> None:
        b.settimeout(10.0)
        while len(got) < size:
            chunk = b.recv(1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        polled.sendall(bytes(size), Deadline.after(10.0))
    finally:
        t.join(15.0)
    assert len(got) == size
