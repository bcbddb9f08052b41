"""Fixtures shared by every test package: real dc_server processes on loopback, certificates."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.procs import free_port, running, tool
from tests.tlsutil import Certs, write_certs


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A CA for in-process tests (trustme); modules that need their own define ``ca``."""
    return trustme.CA()


@pytest.fixture(scope="session")
def leaf(ca: trustme.CA) -> trustme.LeafCert:
    """A ``localhost`` certificate of :func:`ca`."""
    return ca.issue_cert("localhost")


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A server certificate for ``localhost``/``127.0.0.1``, its CA and a shared key ring."""
    return write_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def dc_server_tcp() -> Iterator[str]:
    """A fresh dc_server on a free loopback TCP port; yields its address string."""
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address):
        yield address


@pytest.fixture
def dc_server_unix(tmp_path: Path) -> Iterator[str]:
    """A fresh dc_server on a unix socket in the test's temporary directory."""
    address = f"UNIX:{tmp_path / 'dc_server.sock'}"
    with running(tool("dc_server", "-listen", address), ready=address):
        yield address


@pytest.fixture(params=["tcp", "unix"])
def dc_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """dc_server over TCP and over a unix socket (the test runs once for each)."""
    if request.param == "tcp":
        address = f"IP:127.0.0.1:{free_port()}"
    else:
        address = f"UNIX:{tmp_path / 'dc_server.sock'}"
    with running(tool("dc_server", "-listen", address), ready=address, stderr=subprocess.DEVNULL):
        yield address
