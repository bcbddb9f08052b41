"""ReplyParser's one-read path for a lone ``VA`` reply agrees with the full parser."""

from __future__ import annotations

import pytest

from tlscache.exceptions import ProtocolError
from tlscache.memcache.protocol import Reply, ReplyKind, ReplyParser


def fragments(data: bytes) -> list[Reply]:
    """Byte by byte: never the one-read path (the first read is not ``VA ``)."""
    parser = ReplyParser()
    out: list[Reply] = []
    for i in range(len(data)):
        out += parser.feed(data[i : i + 1])
    assert parser.buffered == 0
    return out


@pytest.mark.parametrize(
    "data",
    [
        b"VA 5\r\nhello\r\n",
        b"VA 0\r\n\r\n",
        b"VA 007\r\nsession\r\n",
        b"VA 4 c123 t-1\r\n\x00\r\n\x00\r\n",  # flags: the full parser
        b"VA 2\r\nab\r\nEN\r\n",  # two replies in one read
        b"VA 4\r\n\r\n\r\n\r\n",  # CRLF inside the value
    ],
)
def test_one_read_equals_fragments(data: bytes) -> None:
    parser = ReplyParser()
    whole = parser.feed(data)
    assert whole == fragments(data), (whole, data)
    assert parser.buffered == 0


def test_a_lone_value_is_one_reply_with_nothing_left() -> None:
    parser = ReplyParser()
    assert parser.feed(b"VA 3\r\nabc\r\n") == [Reply(ReplyKind.VALUE, b"abc")]
    assert parser.buffered == 0
    assert parser.feed(b"EN\r\n") == [Reply(ReplyKind.MISS)]


def test_a_partial_value_waits_for_the_rest() -> None:
    parser = ReplyParser()
    assert parser.feed(b"VA 6\r\nabc") == []
    assert parser.feed(b"def\r\n") == [Reply(ReplyKind.VALUE, b"abcdef")]


@pytest.mark.parametrize(
    "data",
    [
        b"VA 3\r\nabcX\r",  # the value's CRLF is missing
        b"VA 99999999999999999999999\r\n",  # a size no value has
    ],
)
def test_bad_values_still_fail(data: bytes) -> None:
    parser = ReplyParser(max_value=1 << 20)
    with pytest.raises(ProtocolError):
        parser.feed(data + b"\r\n" * 2)
