"""TLS helpers for tests: certificate files, in-memory pumping, ``openssl s_client``.

The pyOpenSSL client helpers live in :mod:`tlscache_farm.tlsclient`, shared with bench/, and
are re-exported here.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
