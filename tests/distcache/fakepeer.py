"""Tiny scripted distcache peers on loopback for client tests.

Each answers requests through a function of the decoded request, so a test can
make a "server" that lies, stalls, or speaks like dc_client without a server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

from tlscache.distcache.protocol import Decoder, Message, encode_response
from tlscache.exceptions import ProtocolError

#: Given a request, the bytes to send back (None: close the connection).
Handler = Callable[[Message], bytes | None]


def reply(msg: Message, payload: bytes) -> bytes:
    """A well-formed response to ``msg`` carrying ``payload``."""
    return encode_response(msg.uid, msg.operation, payload)


def _serve_conn(conn: socket.socket, handler: Handler) -> None:
    decoder = Decoder(expect_response=False)
    with conn:
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                messages = decoder.feed(data)
            except ProtocolError:
                return
            for msg in messages:
                out = handler(msg)
                if out is None:
                    return
                try:
                    conn.sendall(out)
                except OSError:
                    return


@contextlib.contextmanager
def fake_peer(handler: Handler) -> Iterator[str]:
    """Serve ``handler`` on a loopback TCP port for the block; yields the address."""
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.1)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10.0)
            t = threading.Thread(target=_serve_conn, args=(conn, handler), daemon=True)
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield f"IP:127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        stop.set()
        acceptor.join(5)
        lsock.close()


@contextlib.contextmanager
def silent_peer() -> Iterator[str]:
    """A listening socket that never accepts: connects succeed, nothing is ever answered."""
    lsock = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield f"IP:127.0.0.1:{lsock.getsockname()[1]}"
    finally:
        lsock.close()
