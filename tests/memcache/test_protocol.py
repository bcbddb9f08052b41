"""The meta-protocol codec: requests, every reply kind, fragments, bad replies, keys, TTLs."""

from __future__ import annotations

import pytest

from tlscache.exceptions import ProtocolError
from tlscache.memcache.protocol import (
    MAX_KEY_LEN,
    MAX_LINE_LEN,
    MAX_RELATIVE_TTL,
    Reply,
    ReplyKind,
    ReplyParser,
    ServerAddress,
    check_key,
    delete_request,
    expiry,
    get_request,
    noop_request,
    parse_server,
    set_request,
)


def test_requests() -> None:
    assert get_request(b"k") == b"mg k v\r\n"
    assert get_request(b"k", cas=True) == b"mg k v c\r\n"
    assert set_request(b"k", b"a b\r\n", 300) == b"ms k 5 T300\r\na b\r\n\r\n"
    assert delete_request(b"k") == b"md k\r\n"
    assert delete_request(b"k", cas=42) == b"md k C42\r\n"
    assert noop_request() == b"mn\r\n"


@pytest.mark.parametrize("expires", [0, -1])
def test_set_never_sends_a_non_positive_expiry(expires: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        set_request(b"k", b"v", expires)


@pytest.mark.parametrize(
    "key",
    [b"", b"x" * (MAX_KEY_LEN + 1), b"a b", b"a\tb", b"a\r\nmg x", b"a\x00b", b"a\x7fb"],
    ids=["empty", "too-long", "space", "tab", "crlf", "nul", "del"],
)
def test_bad_keys_are_refused_before_any_bytes(key: bytes) -> None:
    with pytest.raises(ValueError, match="key"):
        check_key(key)
    for encode in (get_request, delete_request):
        with pytest.raises(ValueError):
            encode(key)
    with pytest.raises(ValueError):
        set_request(key, b"v", 1)


def test_longest_key_is_accepted() -> None:
    key = b"k" * MAX_KEY_LEN
    assert check_key(key) == key
    assert get_request(key).startswith(b"mg " + key + b" ")


def test_expiry() -> None:
    now = 1_800_000_000.0
    assert expiry(0.001, now) == 1  # never 0: that is "never expires"
    assert expiry(299.2, now) == 300  # rounded up
    assert expiry(MAX_RELATIVE_TTL, now) == MAX_RELATIVE_TTL
    assert expiry(MAX_RELATIVE_TTL + 1, now) == int(now) + MAX_RELATIVE_TTL + 1  # absolute
    assert expiry(10**12, now) == 2**31 - 1  # the largest time memcached parses
    for ttl in (0, -5):
        with pytest.raises(ValueError):
            expiry(ttl, now)


EVERY_KIND = [
    (b"VA 3 c99 t-1\r\nabc\r\n", Reply(ReplyKind.VALUE, b"abc", cas=99, ttl=-1)),
    (b"VA 0\r\n\r\n", Reply(ReplyKind.VALUE, b"")),
    (b"VA 4 Oxy\r\n\r\n\r\n\r\n", Reply(ReplyKind.VALUE, b"\r\n\r\n", opaque=b"xy")),
    (b"HD\r\n", Reply(ReplyKind.HEADER)),
    (b"HD c7 t12 k6b f0\r\n", Reply(ReplyKind.HEADER, cas=7, ttl=12)),
    (b"EN\r\n", Reply(ReplyKind.MISS)),
    (b"NF\r\n", Reply(ReplyKind.NOT_FOUND)),
    (b"NS\r\n", Reply(ReplyKind.NOT_STORED)),
    (b"EX\r\n", Reply(ReplyKind.EXISTS)),
    (b"MN\r\n", Reply(ReplyKind.NOOP)),
    (b"ERROR\r\n", Reply(ReplyKind.ERROR)),
    (b"CLIENT_ERROR bad data chunk\r\n", Reply(ReplyKind.CLIENT_ERROR)),
    (b"SERVER_ERROR out of memory storing object\r\n", Reply(ReplyKind.SERVER_ERROR)),
]


@pytest.mark.parametrize(("wire", "reply"), EVERY_KIND, ids=[w[:2].decode() for w, _ in EVERY_KIND])
def test_every_reply_kind(wire: bytes, reply: Reply) -> None:
    parser = ReplyParser()
    assert parser.feed(wire) == [reply]
    assert parser.buffered == 0
    assert reply.is_error == (reply.kind.value.endswith("ERROR"))


def test_fragments_of_every_size_give_the_same_replies() -> None:
    stream = b"".join(w for w, _ in EVERY_KIND)
    expected = [r for _, r in EVERY_KIND]
    for size in (1, 2, 3, 5, 7, 64):
        parser = ReplyParser()
        got: list[Reply] = []
        for i in range(0, len(stream), size):
            got.extend(parser.feed(stream[i : i + size]))
        assert got == expected, f"fragment size {size}"
        assert parser.buffered == 0


def test_value_split_between_data_and_crlf() -> None:
    parser = ReplyParser()
    assert parser.feed(b"VA 2\r\nab") == []
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\nEN\r\n") == [Reply(ReplyKind.VALUE, b"ab"), Reply(ReplyKind.MISS)]


@pytest.mark.parametrize(
    "wire",
    [
        b"XX\r\n",
        b"VALUE k 0 3\r\nabc\r\nEND\r\n",  # the text protocol's answer
        b"VA\r\n",
        b"VA x\r\n",
        b"VA -1\r\n",
        b"VA 3\r\nabcd\r\n",  # data longer than announced
        b"HD c\r\n",
        b"HD cx\r\n",
        b"HD  c1\r\n",
        b"HD 1\r\n",
        b"MN c1\r\n",
        b"HD t\r\n",
    ],
)
def test_malformed_replies_raise_a_clear_error(wire: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        ReplyParser().feed(wire)
    assert "memcached" in info.value.reason
    # The reason names the fault, never the server's bytes (beyond a bare reply code).
    if len(wire.strip()) > 4:
        assert wire.strip().decode("latin-1") not in info.value.reason


def test_too_long_line_and_value_are_refused() -> None:
    with pytest.raises(ProtocolError, match="too long"):
        ReplyParser().feed(b"H" * (MAX_LINE_LEN + 1))
    with pytest.raises(ProtocolError, match="too long"):
        ReplyParser().feed(b"HD " + b"k" * MAX_LINE_LEN + b"\r\n")
    with pytest.raises(ProtocolError, match="larger"):
        ReplyParser(max_value=10).feed(b"VA 11\r\n")


def test_server_addresses() -> None:
    assert parse_server("127.0.0.1:11211") == ServerAddress(
        "127.0.0.1:11211", "127.0.0.1", 11211, None
    )
    assert parse_server("[::1]:11311") == ServerAddress("[::1]:11311", "::1", 11311, None)
    assert parse_server("cache.example:1") == ServerAddress(
        "cache.example:1", "cache.example", 1, None
    )
    assert parse_server("/run/mc.sock").path == "/run/mc.sock"
    for bad in ("127.0.0.1", "::1:11211", "[::1]11211", "h:0", "h:70000", ":1", "h:x"):
        with pytest.raises(ValueError):
            parse_server(bad)
