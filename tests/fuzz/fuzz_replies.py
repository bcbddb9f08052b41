"""The reply parsers: parse_add_reply, parse_get_reply, parse_flag_reply.

Byte 0 picks the parser; the rest is the reply payload. Invariants: only
ProtocolError; an ADD reply is one known result; a GET reply is the payload itself
or None (under 5 bytes); a REMOVE/HAVE reply is 0x00 (True) or 0x01 (False).
"""

from __future__ import annotations

from tests.fuzz.seeds import encoded_responses, recorded_responses
from tlscache.distcache.protocol import (
    MIN_SESSION_REPLY,
    Decoder,
    Operation,
    Result,
    is_unavailable_reply,
    parse_add_reply,
    parse_flag_reply,
    parse_get_reply,
)
from tlscache.exceptions import ProtocolError


def test_one_input(data: bytes) -> None:
    if not data:
        return
    op = Operation(data[0] % 4)
    payload = data[1:]
    assert is_unavailable_reply(payload) is (payload in (b"", b"\x02"))
    if op is Operation.ADD:
        try:
            result = parse_add_reply(payload)
        except ProtocolError:
            assert len(payload) != 1 or payload[0] not in set(Result)
        else:
            assert isinstance(result, Result) and bytes([result]) == payload
    elif op is Operation.GET:
        got = parse_get_reply(payload)
        if len(payload) < MIN_SESSION_REPLY:
            assert got is None
        else:
            assert got == payload
    else:
        try:
            flag = parse_flag_reply(payload, op)
        except ProtocolError:
            assert payload not in (b"\x00", b"\x01")
        else:
            assert flag is (payload == b"\x00")


def seeds() -> list[bytes]:
    out = []
    for stream in recorded_responses() + encoded_responses():
        messages, _ = Decoder(expect_response=True).feed_until_error(stream)
        out += [bytes([m.operation]) + m.payload for m in messages]
    return out
