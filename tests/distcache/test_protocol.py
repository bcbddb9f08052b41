"""The sans-IO codec against the recorded C vectors, the header checks and random input."""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.procs import VECTORS
from tlscache.distcache.protocol import (
    HEADER,
    MAX_FRAME_DATA,
    MAX_PAYLOAD,
    PROTO_LEVEL,
    Decoder,
    Message,
    Operation,
    Result,
    add_payload,
    encode_add,
    encode_message,
    encode_request,
    encode_response,
    encode_result,
    parse_add_request,
)
from tlscache.exceptions import ProtocolError

DATA: dict[str, Any] = json.loads(VECTORS.read_text())
ALL_VECTORS: list[dict[str, Any]] = DATA["vectors"]


def frames(raw: bytes) -> list[tuple[int, int, int, int, int, int, int, bytes]]:
    """Split a byte string into (header fields..., data) tuples."""
    out = []
    pos = 0
    while pos < len(raw):
        fields = HEADER.unpack_from(raw, pos)
        dlen = fields[6]
        out.append((*fields, raw[pos + 14 : pos + 14 + dlen]))
        pos += 14 + dlen
    assert pos == len(raw)
    return out


def with_our_level(raw: bytes) -> bytes:
    """``raw`` with every frame's proto_level replaced by ours."""
    out = bytearray(raw)
    pos = 0
    while pos < len(out):
        out[pos : pos + 4] = PROTO_LEVEL.to_bytes(4, "big")
        pos += 14 + int.from_bytes(out[pos + 12 : pos + 14], "big")
    return bytes(out)


def decode_all(raw: bytes, expect_response: bool | None) -> list[Message]:
    decoder = Decoder(expect_response=expect_response)
    messages = decoder.feed(raw)
    assert not decoder.in_message
    return messages


@pytest.mark.parametrize("vector", ALL_VECTORS, ids=[v["name"] for v in ALL_VECTORS])
def test_vector_round_trip(vector: dict[str, Any]) -> None:
    """Decoding then re-encoding every recorded frame sequence gives the same bytes."""
    request = bytes.fromhex(vector["request_hex"])
    response = bytes.fromhex(vector["response_hex"])
    requests = decode_all(request, expect_response=False)
    responses = decode_all(response, expect_response=True)
    assert len(requests) == len(responses) >= 1
    assert len(frames(request)) == vector["request_frames"]
    assert len(frames(response)) == vector["response_frames"]
    encoded_requests = b"".join(encode_request(r.uid, r.operation, r.payload) for r in requests)
    # patch_level_differs carries another patch level; we always send our own.
    assert encoded_requests == with_our_level(request)
    encoded_responses = b"".join(encode_response(r.uid, r.operation, r.payload) for r in responses)
    assert encoded_responses == response
    for req, resp in zip(requests, responses, strict=True):
        assert resp.is_response
        assert (resp.uid, resp.operation) == (req.uid, req.operation)


def test_fragmentation_5023() -> None:
    payload = add_payload(b"session-id-0001", bytes(range(256)) * 19 + b"\x07" * 136, 300000)
    assert len(payload) == 5023
    raw = encode_request(9, Operation.ADD, payload)
    parts = frames(raw)
    assert [p[6] for p in parts] == [2048, 2048, 927]
    assert [p[5] for p in parts] == [0, 0, 1]
    assert {p[2] for p in parts} == {9}
    assert decode_all(raw, False) == [Message(False, 9, Operation.ADD, payload)]


def test_fragmentation_32768() -> None:
    payload = bytes(i % 251 for i in range(MAX_PAYLOAD))
    raw = encode_response(3, Operation.GET, payload)
    parts = frames(raw)
    assert len(parts) == 16
    assert all(p[6] == MAX_FRAME_DATA for p in parts)
    assert [p[5] for p in parts] == [0] * 15 + [1]
    assert decode_all(raw, True)[0].payload == payload
    with pytest.raises(ValueError):
        encode_message(True, 3, Operation.GET, payload + b"x")


def test_empty_payload_is_one_empty_frame() -> None:
    raw = encode_request(1, Operation.HAVE, b"")
    assert raw == HEADER.pack(PROTO_LEVEL, 0, 1, 0, 3, 1, 0)
    assert decode_all(raw, False)[0].payload == b""


def test_encode_result_and_parse_add() -> None:
    assert encode_result(1, Operation.ADD, Result.OK).hex() == "001100000100000001000001000100"
    req = parse_add_request(add_payload(b"abc", b"data", 1234))
    assert (req.timeout_ms, req.session_id, req.data, req.refusal) == (1234, b"abc", b"data", None)
    with pytest.raises(ProtocolError):
        parse_add_request(b"\x00" * 7)


@pytest.mark.parametrize("size", [0, 5, 7])
def test_add_payload_too_short_is_protocol_error(size: int) -> None:
    with pytest.raises(ProtocolError):
        parse_add_request(bytes(size))


def hdr(
    level: int = PROTO_LEVEL,
    resp: int = 0,
    uid: int = 1,
    op_class: int = 0,
    op: int = 3,
    complete: int = 1,
    dlen: int = 3,
) -> bytes:
    return struct.pack(">IBIBBBH", level, resp, uid, op_class, op, complete, dlen)


BAD_HEADERS = {
    "version_0x0010": hdr(level=0x00100000) + b"abc",
    "version_0x0012": hdr(level=0x00120000) + b"abc",
    "http_garbage": b"GET / HTTP/1.0\r\n\r\n",
    "five_garbage_bytes": b"ABCDE",
    "twenty_zero_bytes": bytes(20),
    "is_response_1": hdr(resp=1) + b"abc",
    "is_response_2": hdr(resp=2) + b"abc",
    "op_class_1": hdr(op_class=1) + b"abc",
    "operation_4": hdr(op=4) + b"abc",
    "operation_ff": hdr(op=0xFF) + b"abc",
    "complete_2": hdr(complete=2) + b"abc",
    "data_len_2049": hdr(dlen=2049) + bytes(2049),
    "data_len_ffff_header_only": hdr(dlen=0xFFFF),
    "short_fragment": hdr(complete=0, dlen=3) + b"abc",
    "uid_mismatch": hdr(uid=7, op=0, complete=0, dlen=2048)
    + bytes(2048)
    + hdr(uid=8, op=0, dlen=1)
    + b"x",
    "op_mismatch": hdr(uid=7, op=0, complete=0, dlen=2048)
    + bytes(2048)
    + hdr(uid=7, op=1, dlen=1)
    + b"x",
    "over_32768": b"".join(hdr(op=0, complete=0, dlen=2048) + bytes(2048) for _ in range(16))
    + hdr(op=0, dlen=1)
    + b"x",
}


@pytest.mark.parametrize("raw", BAD_HEADERS.values(), ids=list(BAD_HEADERS))
def test_bad_input_raises_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        Decoder(expect_response=False).feed(raw)


def is_hex(case: dict[str, Any]) -> bool:
    """False for the recorded cases whose bytes were abbreviated ("...")."""
    text: str = case["request_hex"]
    return bool(text) and all(ch in "0123456789abcdef" for ch in text)


@pytest.mark.parametrize(
    "case",
    [c for c in DATA["bad_input"]["cases"] if c["connection"] == "eof" and is_hex(c)],
    ids=lambda c: c["name"],
)
def test_recorded_bad_input(case: dict[str, Any]) -> None:
    """Every case the C server answered by closing is an error or an incomplete frame here."""
    raw = bytes.fromhex(case["request_hex"])
    decoder = Decoder(expect_response=False)
    try:
        messages = decoder.feed(raw)
    except ProtocolError:
        return
    # Truncated frames, short ADD payloads and half-closes are judged above the codec.
    assert case["name"] in {
        "truncated_header",
        "truncated_data",
        "add_payload_too_short",
        "add_payload_empty",
        "half_close_after_request",
    }
    assert decoder.in_message or messages


def test_fewer_than_four_bytes_wait() -> None:
    decoder = Decoder(expect_response=False)
    assert decoder.feed(b"ABC") == []
    assert decoder.in_message


def test_direction_checks() -> None:
    request = encode_request(1, Operation.HAVE, b"x")
    response = encode_response(1, Operation.HAVE, b"\x00")
    with pytest.raises(ProtocolError):
        Decoder(expect_response=True).feed(request)
    with pytest.raises(ProtocolError):
        Decoder(expect_response=False).feed(response)
    assert len(Decoder(expect_response=None).feed(request + response)) == 2


def stream_of_vectors() -> bytes:
    return b"".join(bytes.fromhex(v["request_hex"]) for v in ALL_VECTORS)


STREAM = stream_of_vectors()
EXPECTED = decode_all(STREAM, expect_response=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=40))
def test_arbitrary_chunking_gives_identical_messages(cuts: list[int]) -> None:
    points = sorted({0, len(STREAM), *cuts})
    decoder = Decoder(expect_response=False)
    got: list[Message] = []
    for start, end in itertools.pairwise(points):
        got += decoder.feed(STREAM[start:end])
    assert got == EXPECTED
    assert not decoder.in_message


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=300))
def test_small_chunk_sizes(sizes: list[int]) -> None:
    """Feeding in tiny pieces (even 1 byte) never changes the result."""
    decoder = Decoder(expect_response=False)
    got: list[Message] = []
    pos = 0
    i = 0
    while pos < len(STREAM):
        size = sizes[i % len(sizes)] * (1 + (i % 7) * 40)
        got += decoder.feed(STREAM[pos : pos + size])
        pos += size
        i += 1
    assert got == EXPECTED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([False, True, None]))
def test_random_bytes_only_raise_protocol_error(raw: bytes, direction: bool | None) -> None:
    decoder = Decoder(expect_response=direction)
    with contextlib.suppress(ProtocolError):
        decoder.feed(raw)


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    vector = draw(st.sampled_from(ALL_VECTORS))
    raw = bytearray.fromhex(vector["request_hex"])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        pos = draw(st.integers(min_value=0, max_value=min(len(raw) - 1, 40)))
        raw[pos] = draw(st.integers(min_value=0, max_value=255))
    if draw(st.booleans()):
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    return bytes(raw)


@settings(max_examples=300, deadline=None)
@given(mutated_stream(), st.integers(min_value=1, max_value=4096))
def test_mutated_frames_only_raise_protocol_error(raw: bytes, chunk: int) -> None:
    decoder = Decoder(expect_response=False)
    try:
        for pos in range(0, len(raw), chunk):
            for msg in decoder.feed(raw[pos : pos + chunk]):
                assert len(msg.payload) <= MAX_PAYLOAD
                assert msg.operation in tuple(Operation)
    except ProtocolError:
        pass


def test_add_encoding_matches_vector() -> None:
    vector = next(v for v in ALL_VECTORS if v["name"] == "add_ok")
    msg = decode_all(bytes.fromhex(vector["request_hex"]), False)[0]
    req = parse_add_request(msg.payload)
    assert req.refusal is None
    assert (
        encode_add(msg.uid, req.session_id, req.data, req.timeout_ms).hex() == vector["request_hex"]
    )
