"""Opening the sockets an address names."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tlscache.distcache.address import TcpAddress, parse_address
from tlscache.distcache.sockets import _tcp_sockaddr, connect, is_listening, listen


def test_wildcard_means_every_interface() -> None:
    # "IP:<port>" is 0.0.0.0 as in C, not loopback (what getaddrinfo(None, ...) gives
    # without AI_PASSIVE). Resolved only: tests never listen beyond loopback.
    wildcard = parse_address("IP:9000")
    assert isinstance(wildcard, TcpAddress)
    _, sockaddr = _tcp_sockaddr(wildcard)
    assert sockaddr[:2] == ("0.0.0.0", 9000)
    loopback = parse_address("IP:127.0.0.1:9000")
    assert isinstance(loopback, TcpAddress)
    _, sockaddr = _tcp_sockaddr(loopback)
    assert sockaddr[:2] == ("127.0.0.1", 9000)


def test_failed_unix_listen_leaves_no_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with pytest.raises(KeyError):
        listen(parse_address(f"UNIX:{path}"), owner="no-such-user-tlscache-test")
    assert not path.exists()


def test_fd_connect_to_a_non_socket_closes_its_duplicate(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with open(tmp_path / "f", "w") as f:
        for _ in range(5):
            with pytest.raises(OSError):
                connect(parse_address(f"FD:{f.fileno()}"))
        assert len(os.listdir("/proc/self/fd")) == before + 1


def test_unix_listen_and_connect(tmp_path: Path) -> None:
    addr = parse_address(f"UNIX:{tmp_path / 's'}")
    with listen(addr) as srv, connect(addr, timeout=1.0) as cli:
        assert is_listening(srv) and not is_listening(cli)
        peer, _ = srv.accept()
        with peer:
            cli.sendall(b"x")
            assert peer.recv(1) == b"x"
        assert cli.family == socket.AF_UNIX
