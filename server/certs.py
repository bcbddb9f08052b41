"""The demo certificate authority and server certificate, made with trustme on first use.

The files live in ``certs/`` (git-ignored: no private key is ever committed). Users with their own
certificate pass ``--cert``/``--key`` and never touch these.
"""

from __future__ import annotations

import datetime
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

CA_FILE = "ca.pem"
CERT_FILE = "server.pem"
KEY_FILE = "server-key.pem"
IDENTITIES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class CertPaths:
    """Where the server's chain, its key and the CA that clients must trust are."""

    cert: Path
    key: Path
    ca: Path | None


def default_certs_dir() -> Path:
    """``certs/`` next to ``server/`` in a checkout; otherwise ``./certs``."""
    repo_certs = Path(__file__).resolve().parent.parent / "certs"
    if repo_certs.is_dir() and os.access(repo_certs, os.W_OK):
        return repo_certs
    return Path.cwd() / "certs"


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomic write, so that a concurrent reader never sees half a PEM file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def ensure_demo_certs(directory: Path | None = None) -> CertPaths:
    """Return the demo files, creating a CA and a server certificate if they are missing.

    A lock file serialises creation: farms started in parallel must not end up with a CA from one
    run and a server certificate from another.
    """
    directory = directory or default_certs_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(directory / CERT_FILE, directory / KEY_FILE, directory / CA_FILE)
    lock = os.open(directory, os.O_RDONLY)  # flock on the directory: no stray lock file
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not all(p is not None and p.exists() for p in (paths.cert, paths.key, paths.ca)):
            _create(paths)
    finally:
        os.close(lock)
    return paths


def _create(paths: CertPaths) -> None:
    import trustme

    ca = trustme.CA(organization_name="tlscache demo CA")
    now = datetime.datetime.now(datetime.UTC)
    leaf = ca.issue_cert(
        *IDENTITIES,
        common_name="localhost",
        organization_name="tlscache demo farm",
        not_before=now - datetime.timedelta(hours=1),
        not_after=now + datetime.timedelta(days=365),
    )
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    assert paths.ca is not None
    _write(paths.key, leaf.private_key_pem.bytes(), 0o600)
    _write(paths.cert, chain, 0o644)
    _write(paths.ca, ca.cert_pem.bytes(), 0o644)
