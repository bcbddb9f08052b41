"""dc_snoop's ConnectionAnalyser over both directions of a connection.

Each step takes a direction and a chunk of bytes (FuzzedDataProvider). Invariants:
no exception escapes; every record formats as a text line and as JSON; at most one
Malformed record per direction; the byte counts add up.
"""

from __future__ import annotations

import json

import atheris

from tests.fuzz.seeds import (
    encoded_requests,
    encoded_responses,
    recorded_requests,
    recorded_responses,
)
from tlscache.distcache.analyser import (
    C2S,
    S2C,
    ConnectionAnalyser,
    Direction,
    Malformed,
    format_text,
)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    analyser = ConnectionAnalyser(1)
    malformed: dict[Direction, int] = {C2S: 0, S2C: 0}
    sent: dict[Direction, int] = {C2S: 0, S2C: 0}
    now = 1_700_000_000.0
    while fdp.remaining_bytes():
        direction: Direction = C2S if fdp.ConsumeBool() else S2C
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2100))
        sent[direction] += len(chunk)
        now += 0.001
        for rec in analyser.feed(direction, chunk, now):
            assert format_text(rec)
            json.dumps(rec.to_json())
            if isinstance(rec, Malformed):
                malformed[direction] += 1
    assert malformed[C2S] <= 1 and malformed[S2C] <= 1
    closed = analyser.closed(now, "client")
    assert (closed.bytes_c2s, closed.bytes_s2c) == (sent[C2S], sent[S2C])
    assert 0 <= closed.raw_bytes <= sent[C2S] + sent[S2C]
    assert format_text(closed)


def _step(to_server: bool, chunk: bytes) -> bytes:
    """Seed material for one step: a direction flag, then the bytes."""
    return bytes([1 if to_server else 0]) + chunk


def seeds() -> list[bytes]:
    out = []
    pairs = list(zip(recorded_requests(), recorded_responses(), strict=False))
    pairs += list(zip(encoded_requests(), encoded_responses(), strict=False))
    for request, response in pairs:
        out.append(_step(True, request) + _step(False, response))
    return out
