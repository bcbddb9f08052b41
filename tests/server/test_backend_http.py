"""A farm backend speaks HTTP/1.1 as clients write it: bare-LF lines, keep-alive, pipelining.

One real backend process (``python -m tlscache_farm.backend``, started from the same command
line the farm uses) and Python's ``ssl`` client over real TLS on loopback.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator

import pytest

from tlscache_farm.certs import CertPaths, ensure_demo_certs
from tlscache_farm.config import BackendConfig, CacheConfig, backend_argv
from tlscache_farm.procs import free_port, running

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return ensure_demo_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def backend(certs: CertPaths) -> Iterator[int]:
    """A backend with its own in-process cache; yields its TLS port."""
    port, admin = free_port(), free_port()
    cfg = BackendConfig(
        "backend-1", port, admin, str(certs.cert), str(certs.key), cache=CacheConfig("memory")
    )
    # Readiness is polled on the status port: a probe of the TLS port would be a failed handshake.
    with running(backend_argv(cfg), ready=f"IP:127.0.0.1:{admin}"):
        yield port


def exchange(certs: CertPaths, port: int, request: bytes) -> bytes:
    """Send ``request`` in one write over a new TLS connection; all the server sent until it
    closed the connection."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(request)
        data = b""
        for _ in range(1000):  # bounded: the server closes after its last answer
            try:
                chunk = tls.recv(65536)
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            data += chunk
        return data


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The status line and the headers (lower-case names) of a response head."""
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def responses(data: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Split a byte stream of HTTP/1.1 responses framed by Content-Length."""
    found = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, data
        status, headers = parse_head(head)
        length = int(headers["content-length"])
        found.append((status, headers, rest[:length]))
        data = rest[length:]
    return found


def test_bare_lf_http10_request_is_answered(certs: CertPaths, backend: int) -> None:
    ((status, headers, body),) = responses(exchange(certs, backend, b"GET / HTTP/1.0\n\n"))
    assert status == "HTTP/1.1 200 OK"
    assert headers["x-backend"] == "backend-1"
    assert headers["connection"] == "close"  # an HTTP/1.0 client gets one answer
    assert b"This connection did a full handshake on <b>backend-1</b>" in body


def read_response(tls: ssl.SSLSocket) -> tuple[str, dict[str, str], bytes]:
    """One whole response from a connection the server keeps open."""
    data = b""
    for _ in range(1000):  # bounded; each recv is bounded by the socket's timeout
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep and len(rest) >= int(parse_head(head)[1]["content-length"]):
            (response,) = responses(data)
            return response
        chunk = tls.recv(65536)
        assert chunk, data
        data += chunk
    raise AssertionError(data)


def test_two_pipelined_requests_in_one_write(certs: CertPaths, backend: int) -> None:
    request = (
        b"GET /info HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    answers = responses(exchange(certs, backend, request))
    assert [status for status, _, _ in answers] == ["HTTP/1.1 200 OK"] * 2
    assert [h["connection"] for _, h, _ in answers] == ["keep-alive", "close"]
    infos = [json.loads(body) for _, _, body in answers]
    assert [i["request_on_connection"] for i in infos] == [1, 2]  # one connection, in order
    assert {i["backend"] for i in infos} == {"backend-1"}


def test_keep_alive_serves_requests_one_after_the_other(certs: CertPaths, backend: int) -> None:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    raw = socket.create_connection(("127.0.0.1", backend), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        for n in (1, 2, 3):
            tls.sendall(b"GET /info HTTP/1.1\r\nHost: localhost\r\n\r\n")
            status, headers, body = read_response(tls)
            assert status == "HTTP/1.1 200 OK" and headers["connection"] == "keep-alive"
            assert json.loads(body)["request_on_connection"] == n


def test_a_malformed_request_gets_400(certs: CertPaths, backend: int) -> None:
    ((status, headers, _),) = responses(exchange(certs, backend, b"NONSENSE\r\n\r\n"))
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["connection"] == "close"


def test_head_has_no_body(certs: CertPaths, backend: int) -> None:
    request = b"HEAD /status.json HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    data = exchange(certs, backend, request)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and rest == b""
