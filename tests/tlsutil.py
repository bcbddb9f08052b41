"""TLS helpers for tests: certificate files, in-memory pumping, ``openssl s_client``.

The pyOpenSSL client helpers live in :mod:`tlscache_farm.tlsclient`, shared with bench/, and
are re-exported here.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tlscache_farm.tlsclient import (
    VERSIONS,
    client_context,
    handshake_over_memory,
    key_ring,
    pump,
)

__all__ = [
    "VERSIONS",
    "Certs",
    "client_context",
    "handshake_over_memory",
    "pump",
    "s_client",
    "ssl_connect",
    "write_certs",
]


@dataclass(frozen=True)
class Certs:
    """A server's certificate files, signed by a throwaway CA, and a key ring to seal with."""

    chain: Path  #: the leaf (``localhost``, ``127.0.0.1``) and its chain, PEM
    key: Path  #: the leaf's private key, PEM
    ca: Path  #: the CA certificate clients verify against
    keys: Path  #: a key ring every server of the run shares


def write_certs(directory: Path) -> Certs:
    """A fresh CA and a leaf for ``localhost`` and ``127.0.0.1``, written into ``directory``."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    c = Certs(
        directory / "chain.pem", directory / "key.pem", directory / "ca.pem", directory / "keys"
    )
    cert.private_key_pem.write_to_path(str(c.key))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(c.chain), append=i > 0)
    ca.cert_pem.write_to_path(str(c.ca))
    key_ring(c.keys)
    return c


def s_client(
    certs: Certs, port: int, version: str, *args: str, request: bytes, timeout: float = 30
) -> str:
    """``openssl s_client`` to ``127.0.0.1:port`` as ``localhost``, TLS ``version`` only,
    sending ``request``; its standard output (``args``: e.g. ``-sess_out FILE``)."""
    argv = [
        *(shutil.which("openssl") or "openssl", "s_client"),
        *("-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-CAfile", str(certs.ca)),
        *(f"-tls{version.replace('.', '_')}", "-ign_eof", *args),
    ]
    done = subprocess.run(argv, input=request, capture_output=True, timeout=timeout, check=False)
    return done.stdout.decode(errors="replace")


def ssl_connect(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None = None
) -> tuple[bytes, ssl.SSLSession, bool]:
    """One Python ``ssl`` connection to ``localhost`` at ``127.0.0.1:port``: (the server's
    first line, the session, whether the client saw reuse); clean shutdown."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
    ):
        line = s.recv(200)
        sess, reused = s.session, s.session_reused
        assert sess is not None
        with contextlib.suppress(OSError, ssl.SSLError):
            s.unwrap()
    return line, sess, bool(reused)


def skip_without_resolver() -> None:
    """Skip the calling test module where the resolver does not support the platform."""
    from tlscache.openssl.resolver import resolve

    try:
        resolve()
    except Exception as e:  # pragma: no cover - only on platforms the resolver does not support
        pytest.skip(f"resolver unavailable: {e}", allow_module_level=True)
