"""The asyncio shell: a connection that fails is logged (rate-limited) and closed; the
others keep being served."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from tlscache.aio_server import TLSStream, serve


@pytest.fixture(scope="module")
def pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aio") / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


async def hello(stream: TLSStream) -> None:
    await stream.send(b"hello\n")


def test_garbage_is_logged_once_and_good_clients_are_still_served(
    ca: trustme.CA, pem: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.use_certificate_chain_file(str(pem))
    ctx.use_privatekey_file(str(pem))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client)

    async def garbage(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n" * 4)  # not TLS
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)  # the server closes
        writer.close()
        return data

    async def good(port: int) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname="localhost"
        )
        line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        return line

    async def main() -> tuple[list[bytes], list[bytes]]:
        server = await serve(ctx, hello, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            bad = await asyncio.gather(*(garbage(port) for _ in range(5)))
            ok = await asyncio.gather(*(good(port) for _ in range(3)))
        finally:
            server.close()
            await server.wait_closed()
        return list(bad), list(ok)

    with caplog.at_level(logging.WARNING, logger="tlscache.aio_server"):
        bad, ok = asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.name == "tlscache.aio_server"]
    state = f"bad={bad!r} ok={ok!r} warnings={warnings!r}"
    assert ok == [b"hello\n"] * 3, state
    assert all(not b.startswith(b"HTTP") for b in bad), state  # nothing but a TLS alert
    # Five failed handshakes within the interval: one warning, with OpenSSL's reason.
    assert len(warnings) == 1, state
    assert warnings[0].startswith("TLS handshake failed: "), state
    assert "GET" not in warnings[0], state  # never the peer's bytes
