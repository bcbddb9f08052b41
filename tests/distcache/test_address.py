"""Address strings: the libnal syntax, parsed without any I/O."""

from __future__ import annotations

import pytest

from tlscache.distcache.address import (
    FdAddress,
    TcpAddress,
    UnixAddress,
    connectable,
    parse_address,
)
from tlscache.exceptions import AddressError


@pytest.mark.parametrize(
    ("text", "host", "port", "ipv6"),
    [
        ("IP:127.0.0.1:9000", "127.0.0.1", 9000, False),
        ("IPv4:localhost:1", "localhost", 1, False),
        ("IP:9000", None, 9000, False),
        ("IP::9000", None, 9000, False),
        ("IPv6:[::1]:9000", "::1", 9000, True),
    ],
)
def test_parse_tcp(text: str, host: str | None, port: int, ipv6: bool) -> None:
    addr = parse_address(text)
    assert isinstance(addr, TcpAddress)
    assert (addr.host, addr.port, addr.ipv6, str(addr)) == (host, port, ipv6, text)
    if host is None:  # the wildcard is listen-only, as in C
        with pytest.raises(AddressError):
            connectable(addr)
    else:
        assert connectable(text) == addr


def test_parse_unix_and_fd() -> None:
    assert parse_address("UNIX:/tmp/scache") == UnixAddress("/tmp/scache", "UNIX:/tmp/scache")
    assert parse_address("FD:3") == FdAddress(3, "FD:3")
    assert str(UnixAddress("/x")) == "UNIX:/x" and str(FdAddress(4)) == "FD:4"
    assert str(TcpAddress(None, 80)) == "IP:80"


@pytest.mark.parametrize(
    "text", ["", "I", "9000", "IP:", "IP:host:", "IP:host:65536", "IP:host:80x", "TCP:1:2", "FD:a"]
)
def test_parse_errors(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)
