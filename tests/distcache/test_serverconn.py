"""The sans-IO server logic: the recorded C conversation, byte for byte, with a fake clock."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.procs import VECTORS
from tlscache.distcache.protocol import (
    Decoder,
    Operation,
    encode_add,
    encode_get,
    encode_have,
    encode_remove,
    parse_get_reply,
)
from tlscache.distcache.serverconn import DECODE_AHEAD, CacheService, ServerConnection
from tlscache.distcache.table import SessionTable

DATA: dict[str, Any] = json.loads(VECTORS.read_text())
ALL_VECTORS: list[dict[str, Any]] = DATA["vectors"]
T0 = 5_000_000


def clock_for(name: str, now: int) -> int:
    # The capture sent get_timeout_zero_expired 10 ms after the 0 ms ADD.
    return now + 10 if name == "get_timeout_zero_expired" else now


def replay(feed_pieces: int = 1) -> list[tuple[str, bytes, bytes]]:
    conn = CacheService(SessionTable()).connection()
    now = T0
    results = []
    for vector in ALL_VECTORS:
        now = clock_for(vector["name"], now)
        request = bytes.fromhex(vector["request_hex"])
        got = b""
        step = max(1, len(request) // feed_pieces)
        for pos in range(0, len(request), step):
            got += conn.feed(request[pos : pos + step], now)
        assert conn.error is None
        results.append((vector["name"], got, bytes.fromhex(vector["response_hex"])))
    return results


def test_replay_all_vectors() -> None:
    results = replay()
    assert len(results) == 34
    for name, got, want in results:
        assert got == want, name


@pytest.mark.parametrize("pieces", [2, 3, 7, 1000])
def test_replay_in_pieces(pieces: int) -> None:
    for name, got, want in replay(pieces):
        assert got == want, name


def conversation() -> tuple[bytes, bytes]:
    """Every request and every response of the vectors that need no clock change."""
    used = [v for v in ALL_VECTORS if v["name"] != "get_timeout_zero_expired"]
    stream = b"".join(bytes.fromhex(v["request_hex"]) for v in used)
    expected = b"".join(bytes.fromhex(v["response_hex"]) for v in used)
    return stream, expected


def test_whole_conversation_in_one_buffer() -> None:
    """All 34 requests pipelined in one read are answered in order (C drops some)."""
    conn = CacheService(SessionTable()).connection()
    stream, expected = conversation()
    assert conn.feed(stream, T0) == expected


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100_000), max_size=30))
def test_arbitrary_chunking(cuts: list[int]) -> None:
    stream, expected = conversation()
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    conn = CacheService(SessionTable()).connection()
    got = b"".join(conn.feed(stream[a:b], T0) for a, b in itertools.pairwise(points))
    assert got == expected
    assert not conn.partial


def test_operation_counter() -> None:
    service = CacheService(SessionTable())
    conn = service.connection()
    conn.feed(encode_have(1, b"a") + encode_get(2, b"b") + encode_remove(3, b"c"), T0)
    assert service.operations == 3


def test_partial_flag() -> None:
    conn = CacheService(SessionTable()).connection()
    frame = encode_have(1, b"abc")
    assert conn.feed(frame[:9], T0) == b""
    assert conn.partial
    assert conn.buffered == 9
    assert len(conn.feed(frame[9:], T0)) == 15
    assert conn.buffered == 0
    big = encode_add(2, b"id", b"x" * 5000, 1000)
    assert conn.feed(big[:2062], T0) == b""
    assert conn.buffered == 2048  # one whole fragment held by the decoder
    assert conn.feed(big[2062:], T0)[-1] == 0
    assert not conn.partial


@pytest.mark.parametrize("size", [0, 5, 7])
def test_short_add_payload_closes_without_reply(size: int) -> None:
    conn = CacheService(SessionTable()).connection()
    frame = (
        bytes.fromhex("0011000000000000010000") + b"\x01" + size.to_bytes(2, "big") + bytes(size)
    )
    assert conn.feed(frame, T0) == b""
    assert conn.error is not None
    assert "shorter" in conn.error.reason
    assert conn.feed(encode_have(2, b"x"), T0) == b""


def test_requests_before_bad_input_are_answered() -> None:
    conn = CacheService(SessionTable()).connection()
    out = conn.feed(encode_have(1, b"a") + encode_have(2, b"b") + b"GET / HTTP/1.0\r\n\r\n", T0)
    responses = Decoder(expect_response=True).feed(out)
    assert [m.uid for m in responses] == [1, 2]
    assert conn.error is not None


def test_bad_input_cases_set_error() -> None:
    for case in DATA["bad_input"]["cases"]:
        text = case["request_hex"]
        if case["connection"] != "eof" or "." in text or case["name"].startswith("truncated"):
            continue
        if case["name"] == "half_close_after_request":
            continue
        conn = CacheService(SessionTable()).connection()
        assert conn.feed(bytes.fromhex(text), T0) == b"", case["name"]
        assert conn.error is not None, case["name"]


def test_multiframe_get_response() -> None:
    conn = CacheService(SessionTable()).connection()
    data = bytes(range(256)) * 100
    assert conn.feed(encode_add(1, b"big", data, 1000), T0)[-1] == 0
    out = conn.feed(encode_get(2, b"big"), T0)
    msgs = Decoder(expect_response=True).feed(out)
    assert len(msgs) == 1
    assert (msgs[0].uid, msgs[0].operation, msgs[0].payload) == (2, Operation.GET, data)


def test_have_miss_answer_bytes() -> None:
    conn = CacheService(SessionTable()).connection()
    assert conn.feed(encode_have(7, b"nope"), T0).hex() == "001100000100000007000301000101"


def test_connection_type() -> None:
    assert isinstance(CacheService(SessionTable()).connection(), ServerConnection)


def held_back(conn: ServerConnection) -> bool:
    return conn.pending


def drain(conn: ServerConnection, first: bytes) -> tuple[bytes, int]:
    """Feed ``first`` then keep calling feed(b"") while input is held back."""
    out = conn.feed(first, T0)
    rounds = 1
    while conn.pending:
        out += conn.feed(b"", T0)
        rounds += 1
        assert rounds < 10_000
    return out, rounds


@pytest.mark.parametrize("lead", ["single-frame", "multi-frame"])
def test_output_budget_holds_back_requests(lead: str) -> None:
    service = CacheService(SessionTable())
    conn = service.connection(output_budget=64 * 1024)
    big = bytes(range(256)) * 80  # 20480 bytes: a 10-frame answer
    assert conn.feed(encode_add(1, b"big", big, 60_000), T0)[-1] == 0
    first = (
        encode_have(2, b"big")
        if lead == "single-frame"
        else encode_add(2, b"other", b"o" * 5000, 60_000)
    )
    stream = first + b"".join(encode_get(uid, b"big") for uid in range(3, 103))
    out, rounds = drain(conn, stream)
    assert rounds > 10  # 100 x 20 KiB answers do not come out in one go
    msgs = Decoder(expect_response=True).feed(out)
    assert [m.uid for m in msgs] == list(range(2, 103))
    assert all(m.payload == big for m in msgs[1:])
    assert service.operations == 102
    assert not conn.busy


def test_input_arriving_while_held_back_keeps_its_order() -> None:
    conn = CacheService(SessionTable()).connection(output_budget=1)
    conn.feed(encode_add(1, b"k", b"v" * 100, 60_000), T0)
    out = conn.feed(encode_get(2, b"k") + encode_get(3, b"k"), T0)
    assert held_back(conn)
    out += conn.feed(encode_have(4, b"k")[:10], T0)
    out += conn.feed(encode_have(4, b"k")[10:], T0)
    while conn.pending:
        out += conn.feed(b"", T0)
    assert [m.uid for m in Decoder(expect_response=True).feed(out)] == [2, 3, 4]


def test_requests_before_bad_input_are_answered_on_the_slow_path() -> None:
    # A multi-frame request goes through the general decoder; the bad frame after
    # it must not swallow its answer.
    conn = CacheService(SessionTable()).connection()
    big = encode_add(1, b"big", b"x" * 5000, 60_000)
    out = conn.feed(big + encode_have(2, b"big") + b"GET / HTTP/1.0\r\n\r\n", T0)
    responses = Decoder(expect_response=True).feed(out)
    assert [(m.uid, m.payload) for m in responses] == [(1, b"\x00"), (2, b"\x00")]
    assert conn.error is not None
    assert conn.feed(encode_have(3, b"big"), T0) == b""


def test_bad_input_waits_for_held_back_answers() -> None:
    conn = CacheService(SessionTable()).connection(output_budget=1)
    assert conn.feed(encode_add(1, b"k", b"v" * 3000, 60_000), T0)[-1] == 0
    out = conn.feed(encode_get(2, b"k")[:10], T0)
    out += conn.feed(encode_get(2, b"k")[10:] + encode_get(3, b"k") + b"\xff" * 20, T0)
    rounds = 0
    while conn.pending:
        assert conn.error is None
        out += conn.feed(b"", T0)
        rounds += 1
        assert rounds < 100
    assert [m.uid for m in Decoder(expect_response=True).feed(out)] == [2, 3]
    assert conn.error is not None
    assert not conn.pending


def test_max_batch_bounds_the_answers_per_call() -> None:
    """Requests with small answers (ADDs) are also answered a batch at a time."""
    conn = CacheService(SessionTable()).connection(max_batch=5)
    stream = b"".join(encode_add(uid, b"k%d" % uid, b"v" * 100, 60_000) for uid in range(1, 13))
    out = conn.feed(stream, T0)
    assert len(Decoder(expect_response=True).feed(out)) == 5
    assert conn.pending
    out += conn.feed(b"", T0)
    out += conn.feed(b"", T0)
    assert [m.uid for m in Decoder(expect_response=True).feed(out)] == list(range(1, 13))
    assert not conn.busy


def test_receive_queues_without_answering() -> None:
    conn = CacheService(SessionTable()).connection()
    conn.receive(encode_have(1, b"a") + encode_have(2, b"b"))
    assert conn.pending
    conn.receive(encode_have(3, b"c"))
    out = conn.feed(b"", T0)
    assert [m.uid for m in Decoder(expect_response=True).feed(out)] == [1, 2, 3]
    conn.receive(b"GET / HTTP/1.0\r\n\r\n")
    assert conn.error is not None


def test_requests_beyond_the_batch_are_held_undecoded() -> None:
    """A peer that pipelines hundreds of requests costs bytes, not a tuple per request."""
    table = SessionTable(64)
    table.add(b"k", b"v" * 100, 60_000, now_ms=0)
    conn = ServerConnection(CacheService(table), output_budget=1024, max_batch=512)
    requests = b"".join(encode_get(uid, b"k") for uid in range(1, 401))
    out = bytearray(conn.feed(requests + b"GET / HTTP/1.0\r\n\r\n", 1))
    held = len(conn._queue)
    assert conn.pending and not conn.partial and conn.error is None, vars(conn)
    assert held <= DECODE_AHEAD, held
    turns = 0
    while conn.pending and turns < 1000:
        out += conn.feed(b"", 1)
        assert len(conn._queue) <= DECODE_AHEAD, len(conn._queue)
        turns += 1
    answers = Decoder(expect_response=True).feed(bytes(out))
    assert [m.uid for m in answers] == list(range(1, 401)), turns
    assert all(parse_get_reply(m.payload) == b"v" * 100 for m in answers)
    # The bad input behind them takes effect only once they are all answered.
    assert conn.error is not None and not conn.pending, vars(conn)
