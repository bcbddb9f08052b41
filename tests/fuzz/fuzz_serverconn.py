"""One dc_server connection (ServerConnection.feed) over random bytes and output budgets.

Input: byte 0 seeds the chunking, byte 1 the output budget, byte 2 bit 0 asks for
end of input; the rest is what the peer sends. Invariants: no exception escapes;
only bytes come out; all of them decode as whole responses; ``error`` is set
exactly when the stream holds a bad frame or an ADD under 8 bytes (or ends inside
a message, with end of input).
"""

from __future__ import annotations

from tests.fuzz.fuzz_decoder import chunks
from tests.fuzz.seeds import encoded_requests, recorded_requests
from tlscache.distcache.protocol import Decoder, Operation
from tlscache.distcache.serverconn import CacheService
from tlscache.distcache.table import SessionTable

_BUDGETS = (1, 15, 100, 4096, 256 * 1024)


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    stream = data[3:]
    budget = _BUDGETS[data[1] % len(_BUDGETS)]
    conn = CacheService(SessionTable(64)).connection(output_budget=budget)
    responses = Decoder(expect_response=True)
    now = 1_000_000
    out: list[bytes] = []

    def take(got: object) -> None:
        assert type(got) is bytes, type(got)
        out.append(got)
        responses.feed(got)  # raises on a malformed response
        assert not responses.in_message, "feed returned part of a response"

    for piece in chunks(stream, data[0]):
        now += 7
        take(conn.feed(piece, now))
        for _ in range(10_000):  # the shell calls feed(b"") until the budget lets go
            if not conn.pending or conn.error is not None:
                break
            take(conn.feed(b"", now))
        if conn.error is not None:
            break
    if data[2] & 1 and conn.error is None:
        conn.end_of_input()
        while conn.pending and conn.error is None:
            take(conn.feed(b"", now))
    assert not conn.pending or conn.error is not None

    requests, error = Decoder(expect_response=False).feed_until_error(stream)
    short_add = next(
        (i for i, m in enumerate(requests) if m.operation is Operation.ADD and len(m.payload) < 8),
        None,
    )
    answered = len(requests) if short_add is None else short_add
    bad = error is not None or short_add is not None
    if data[2] & 1 and not bad:
        bad = _ends_inside(stream)
    assert (conn.error is not None) == bad, (conn.error, error, short_add)
    total = b"".join(out)
    got = Decoder(expect_response=True).feed(total)
    assert len(got) == answered, (len(got), answered)
    assert [m.uid for m in got] == [m.uid for m in requests[:answered]]


def _ends_inside(stream: bytes) -> bool:
    decoder = Decoder(expect_response=False)
    decoder.feed(stream)
    return decoder.in_message


def seeds() -> list[bytes]:
    out = []
    for i, stream in enumerate(recorded_requests() + encoded_requests()):
        out.append(bytes([i % 4, i % 5, i % 2]) + stream)
    out.append(bytes([0, 0, 0]) + b"".join(encoded_requests()))
    out.append(bytes([5, 1, 1]) + b"".join(encoded_requests()))
    return out
