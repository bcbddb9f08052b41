"""The farm's one HTTP/1.1 server, built on h11, for every page the farm serves.

h11 does the protocol (request parsing, bare-LF lines, keep-alive, pipelining, HEAD, errors);
this module does the I/O around it. A connection is anything with the two methods of
:class:`Stream`, so the backends' TLS connections and the plain-HTTP status and control pages
share the same request loop (:func:`serve_connection`), accept loop (:func:`accept_loop`) and
response helpers.

Every plain-HTTP port (:class:`HttpServer`) answers only requests addressed to itself by its
loopback names (``127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT``): a web page that
re-points its own host name at 127.0.0.1 (DNS rebinding) sends its own name in ``Host`` and is
refused with 421, so it can neither read a status page nor drive the control page.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import h11

MAX_HEADER_BYTES = 16 * 1024


class Stream(Protocol):
    """A byte stream under one HTTP connection."""

    def recv(self, deadline: float) -> bytes:
        """Some bytes; b"" at the end of the stream; TimeoutError past ``deadline``
        (time.monotonic); any OSError ends the connection."""
        ...

    def send(self, data: bytes) -> None:
        """All of ``data``, or an OSError."""
        ...


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    body: bytes
    number: int  # 1 for the first request on its connection
    headers: tuple[tuple[str, str], ...] = ()  # names in lower case, in the order received

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case)."""
        wanted = name.lower()
        return [value for key, value in self.headers if key == wanted]

    def header(self, name: str) -> str | None:
        """The value of header ``name``; None if it is absent or repeated (ambiguous)."""
        values = self.header_values(name)
        return values[0] if len(values) == 1 else None

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> list[str]:
        return self.target.partition("?")[2].split("&")


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


def text(status: int, message: str) -> Response:
    return Response(status, message.encode())


def html(page: str) -> Response:
    return Response(200, page.encode(), "text/html; charset=utf-8")


def json(body: bytes, status: int = 200) -> Response:
    return Response(status, body, "application/json")


@dataclass(frozen=True)
class Limits:
    """Bounds on one connection: a slow or greedy client costs a thread for a bounded time."""

    first_timeout: float = 10.0  # for the first request
    idle_timeout: float = 5.0  # for each later one (keep-alive)
    max_requests: int = 100
    max_body_bytes: int = 64 * 1024


class _TooLarge(Exception):
    pass


def _read_request(
    conn: h11.Connection, stream: Stream, deadline: float, limits: Limits, number: int
) -> Request | None:
    """The next request, body included; None when the client closed the connection."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(stream.recv(deadline))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limits.max_body_bytes:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            method, target = head.method.decode("latin-1"), head.target.decode("latin-1")
            # h11 gives header names in lower case already.
            fields = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers)
            return Request(method, target, bytes(body), number, fields)
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


def _send(
    conn: h11.Connection,
    stream: Stream,
    response: Response,
    headers: tuple[tuple[str, str], ...],
    keep_alive: bool,
    with_body: bool = True,
) -> None:
    fields = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        *headers,
        *response.headers,
        ("Connection", "keep-alive" if keep_alive else "close"),  # h11 turns it into close if due
    ]
    reason = HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=fields, reason=reason))
    if with_body and response.body:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    stream.send(data)


def serve_connection(
    stream: Stream,
    handler: Handler,
    limits: Limits = Limits(),
    headers: tuple[tuple[str, str], ...] = (),
) -> int:
    """Answer requests on ``stream`` until the client closes, idles or errs; the number answered.

    ``headers`` are added to every response. The caller closes the stream afterwards.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    served = 0
    try:
        while served < limits.max_requests:
            timeout = limits.first_timeout if served == 0 else limits.idle_timeout
            request = _read_request(conn, stream, time.monotonic() + timeout, limits, served + 1)
            if request is None:
                break
            served += 1
            keep_alive = served < limits.max_requests
            try:
                response = handler(request)
            except Exception as exc:  # a broken page must not take the server down
                response = text(500, f"internal error: {exc!r}\n")
            _send(conn, stream, response, headers, keep_alive, request.method != "HEAD")
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break  # h11 or we decided to close (Connection: close, HTTP/1.0, ...)
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        _refuse(conn, stream, text(exc.error_status_hint, f"bad request: {exc}\n"), headers)
    except _TooLarge:
        _refuse(conn, stream, text(413, "request body too large\n"), headers)
    except OSError:
        pass  # the peer went away, or was too slow
    return served


def _refuse(
    conn: h11.Connection, stream: Stream, response: Response, headers: tuple[tuple[str, str], ...]
) -> None:
    """Answer a request that cannot be served (if a response can still be sent), then close."""
    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        with contextlib.suppress(OSError, h11.LocalProtocolError):
            _send(conn, stream, response, headers, keep_alive=False)


# -- plain sockets -------------------------------------------------------------------------------


class SocketStream:
    """A blocking socket as a :class:`Stream`."""

    def __init__(self, sock: socket.socket, send_timeout: float = 10.0) -> None:
        self.sock = sock
        self.send_timeout = send_timeout

    def recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("idle")
        self.sock.settimeout(remaining)
        return self.sock.recv(65536)

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.send_timeout)
        self.sock.sendall(data)


def accept_loop(
    listener: socket.socket,
    stop: threading.Event,
    slots: threading.BoundedSemaphore,
    on_socket: Callable[[socket.socket, object], None],
) -> None:
    """Accept until ``stop``; each connection gets a thread once one of ``slots`` is free.

    ``on_socket(sock, peer)`` runs in that thread; the slot is released after it returns.
    """
    listener.settimeout(0.2)

    def run(sock: socket.socket, peer: object) -> None:
        try:
            on_socket(sock, peer)
        finally:
            slots.release()

    while not stop.is_set():
        if not slots.acquire(timeout=0.2):
            continue
        try:
            sock, peer = listener.accept()
        except TimeoutError:
            slots.release()
            continue
        except OSError:
            slots.release()
            if stop.is_set():
                break
            time.sleep(0.05)  # EMFILE and friends: back off instead of spinning
            continue
        threading.Thread(target=run, args=(sock, peer), daemon=True).start()


def loopback_hosts(port: int) -> frozenset[str]:
    """The ``Host`` values by which a loopback server on ``port`` is addressed (lower case)."""
    names = ("127.0.0.1", "localhost", "[::1]")
    hosts = {f"{name}:{port}" for name in names}
    if port == 80:  # browsers leave the default port out
        hosts.update(names)
    return frozenset(hosts)


def host_guard(handler: Handler, allowed: frozenset[str]) -> Handler:
    """``handler`` behind a check of the ``Host`` header: a request addressed to any other name,
    or without exactly one ``Host``, is refused with 421 before ``handler`` sees it."""
    expected = ", ".join(sorted(allowed))

    def guarded(request: Request) -> Response:
        host = request.header("host")
        if host is None or host.strip().lower() not in allowed:
            return text(421, f"this server answers only to Host: {expected}\n")
        return handler(request)

    return guarded


class HttpServer:
    """Plain HTTP on one TCP port, served from a background thread, one thread a connection.

    Only requests whose ``Host`` is one of this port's loopback names are passed to ``handler``
    (see the module doc).
    """

    def __init__(self, host: str, port: int, handler: Handler, max_connections: int = 32) -> None:
        self.listener = socket.create_server((host, port))  # OSError: the port is taken
        self.port = int(self.listener.getsockname()[1])
        self.handler = host_guard(handler, loopback_hosts(self.port))
        self._stop = threading.Event()
        slots = threading.BoundedSemaphore(max_connections)
        args = (self.listener, self._stop, slots, self._serve)
        self._thread = threading.Thread(target=accept_loop, args=args, daemon=True)
        self._thread.start()

    def _serve(self, sock: socket.socket, peer: object) -> None:
        with sock:
            serve_connection(SocketStream(sock), self.handler)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.listener.close()
