"""parse_add_request: an ADD payload into timeout, id and data, or C's refusal.

Invariants: only ProtocolError (for a payload under 8 bytes); an accepted request
has a timeout, id and data in range, reassembles to the payload, and
``add_refusal`` agrees that it may be stored.
"""

from __future__ import annotations

from tests.fuzz.seeds import encoded_requests, recorded_requests
from tlscache.distcache.protocol import (
    MAX_ID_LEN,
    MAX_PAYLOAD,
    MAX_TIMEOUT_MS,
    Decoder,
    Operation,
    Result,
    add_payload,
    add_refusal,
    parse_add_request,
)
from tlscache.exceptions import ProtocolError


def test_one_input(data: bytes) -> None:
    for payload in (data, bytearray(data), memoryview(data)):
        try:
            add = parse_add_request(payload)
        except ProtocolError:
            assert len(data) < 8
            continue
        assert len(data) >= 8
        assert 0 <= add.timeout_ms <= 0xFFFFFFFF
        if add.refusal is None:
            assert 1 <= len(add.session_id) <= MAX_ID_LEN
            assert add.data and add.timeout_ms <= MAX_TIMEOUT_MS
            assert add_payload(add.session_id, add.data, add.timeout_ms) == data
            if len(data) <= MAX_PAYLOAD:
                assert add_refusal(add.session_id, add.data, add.timeout_ms) is None
        else:
            assert isinstance(add.refusal, Result)
            assert add.refusal is not Result.OK
            if add.session_id or add.data:
                assert add_payload(add.session_id, add.data, add.timeout_ms) == data


def seeds() -> list[bytes]:
    out = []
    for stream in recorded_requests() + encoded_requests():
        messages, _ = Decoder(expect_response=False).feed_until_error(stream)
        out += [m.payload for m in messages if m.operation is Operation.ADD]
    return [*out, b"", b"\x00" * 7, b"\x00" * 8, b"\xff" * 12]
