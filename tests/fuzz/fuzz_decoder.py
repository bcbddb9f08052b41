"""The protocol Decoder: requests, responses or both, fed in random chunkings.

Input: byte 0 picks the direction (``% 3``: requests, responses, both) and byte 1
seeds the chunking; the rest is the stream. Invariants: only ProtocolError escapes;
after one the decoder is not fed again; chunked decoding gives the same messages and
the same verdict as decoding the stream in one piece; re-encoding the messages with
``encode_message`` and decoding them again gives the same messages.
"""

from __future__ import annotations

import random

from tests.fuzz.seeds import (
    encoded_requests,
    encoded_responses,
    recorded_requests,
    recorded_responses,
)
from tlscache.distcache.protocol import Decoder, Message, encode_message
from tlscache.exceptions import ProtocolError

_DIRECTIONS: tuple[bool | None, ...] = (False, True, None)


def chunks(stream: bytes, seed: int) -> list[bytes]:
    """``stream`` cut into pieces of 1..64 bytes (seed 0: one piece)."""
    if seed == 0:
        return [stream]
    rng = random.Random(seed)
    out = []
    pos = 0
    while pos < len(stream):
        size = rng.randint(1, 64)
        out.append(stream[pos : pos + size])
        pos += size
    return out


def decode_chunked(
    expect: bool | None, pieces: list[bytes]
) -> tuple[list[Message], ProtocolError | None]:
    decoder = Decoder(expect)
    messages: list[Message] = []
    for piece in pieces:
        got, error = decoder.feed_until_error(piece)
        messages += got
        if error is not None:
            return messages, error  # the decoder is unusable now: stop
    return messages, None


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    expect = _DIRECTIONS[data[0] % 3]
    stream = data[2:]
    whole, whole_error = decode_chunked(expect, [stream])
    pieces, pieces_error = decode_chunked(expect, chunks(stream, data[1]))
    assert pieces == whole, "chunked decoding differs from one-piece decoding"
    assert (pieces_error is None) == (whole_error is None), (whole_error, pieces_error)

    # feed() raises what feed_until_error() returns, and nothing else.
    try:
        fed = Decoder(expect).feed(stream)
    except ProtocolError:
        assert whole_error is not None
    else:
        assert whole_error is None and fed == whole

    for m in whole:
        assert isinstance(m.payload, bytes) and 0 <= m.uid <= 0xFFFFFFFF
        assert expect is None or m.is_response is expect
    again = b"".join(encode_message(*m) for m in whole)
    redecoded, error = decode_chunked(expect, [again])
    assert error is None, error
    assert redecoded == whole, "re-encoded messages decode differently"


def seeds() -> list[bytes]:
    out = []
    for i, stream in enumerate(recorded_requests() + encoded_requests()):
        out.append(bytes([0, i % 7]) + stream)
        out.append(bytes([2, 0]) + stream)
    for i, stream in enumerate(recorded_responses() + encoded_responses()):
        out.append(bytes([1, i % 5]) + stream)
    out.append(bytes([0, 3]) + b"".join(encoded_requests()))
    out.append(bytes([1, 9]) + b"".join(encoded_responses()))
    return out
