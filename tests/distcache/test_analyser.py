"""dc_snoop's sans-IO analyser on recorded vectors and hand-made traffic."""

from __future__ import annotations

import json

from tests.procs import VECTORS
from tlscache.distcache.analyser import (
    C2S,
    S2C,
    ConnectionAnalyser,
    Malformed,
    MessageRecord,
    Record,
    format_text,
    hexdump,
)
from tlscache.distcache.protocol import (
    ADD_PREFIX,
    Decoder,
    Operation,
    add_payload,
    encode_add,
    encode_get,
    encode_have,
    encode_message,
    encode_response,
)

ALL = json.loads(VECTORS.read_text())


def only_message(records: list[Record]) -> MessageRecord:
    [rec] = records
    assert isinstance(rec, MessageRecord)
    return rec


def test_analyser_decodes_every_vector() -> None:
    a = ConnectionAnalyser(1)
    lines = []
    requests = responses = 0
    for v in ALL["vectors"]:
        req = bytes.fromhex(v["request_hex"])
        resp = bytes.fromhex(v["response_hex"]) if v["response_hex"] else b""
        # Byte-at-a-time for one direction: the analyser must not care how bytes arrive.
        for rec in a.feed(C2S, req, 0.0):
            requests += 1
            lines.append(format_text(rec))
        for i in range(len(resp)):
            for rec in a.feed(S2C, resp[i : i + 1], 0.0):
                responses += 1
                lines.append(format_text(rec))
    assert requests == sum(
        len(Decoder().feed(bytes.fromhex(v["request_hex"]))) for v in ALL["vectors"]
    )
    assert responses == a.messages[S2C] and responses > 30
    assert not any("MALFORMED" in line for line in lines)
    assert any("result=ADD_MATCHING_SESSION(0x65)" in line for line in lines)


def test_analyser_fields() -> None:
    a = ConnectionAnalyser(3)
    add = only_message(a.feed(C2S, encode_add(7, b"\x01\x02", b"data", 5000), 0.0))
    assert add.op is Operation.ADD and add.session_id == "0102" and add.timeout_ms == 5000
    assert add.data_len == 4 and add.payload.endswith(b"data")
    get = only_message(a.feed(C2S, encode_get(8, b"\xaa"), 0.0))
    assert get.session_id == "aa" and get.uid == 8
    r1, r2 = a.feed(S2C, encode_response(7, 0, b"\x00") + encode_response(8, 1, b"x" * 3000), 0.0)
    assert isinstance(r1, MessageRecord) and isinstance(r2, MessageRecord)
    assert r1.to_json()["result"] == "OK" and r1.session_id == "0102"
    assert r2.data_len == 3000 and r2.to_json()["frames"] == 2 and r2.session_id == "aa"
    empty = only_message(a.feed(S2C, encode_response(9, 3, b""), 0.0))
    assert empty.to_json()["result"] == "EMPTY"
    assert "payload=1" in format_text(r1)
    assert hexdump(b"AB\x00") == "    0000  41 42 00" + " " * 39 + "  |AB.|"


def test_analyser_reports_malformed_once_then_counts_raw() -> None:
    a = ConnectionAnalyser(1)
    recs = a.feed(C2S, encode_have(1, b"x") + b"GET / HTTP/1.0\r\n\r\n", 0.0)
    assert [type(r) for r in recs] == [MessageRecord, Malformed]
    assert a.feed(C2S, encode_have(2, b"y"), 0.0) == []
    assert a.raw_bytes[C2S] == 18 + len(encode_have(2, b"y"))
    # The other direction still decodes.
    assert len(a.feed(S2C, encode_response(1, 3, b"\x01"), 0.0)) == 1


def test_malformed_inside_a_message_keeps_the_messages_before_it() -> None:
    a = ConnectionAnalyser(1)
    big = encode_message(False, 5, Operation.GET, b"i" * 3000)  # two frames
    first = a.feed(C2S, encode_have(1, b"x") + big[:2062], 0.0)
    assert [r.uid for r in first if isinstance(r, MessageRecord)] == [1]
    recs = a.feed(C2S, b"\xff" * 20, 0.0)
    assert [type(r) for r in recs] == [Malformed]
    assert a.raw_bytes[C2S] == 2062 + 20  # the unfinished message and the garbage


def test_json_and_text_of_each_add_shape() -> None:
    a = ConnectionAnalyser(1)
    ok = only_message(a.feed(C2S, encode_add(1, b"id", b"data", 10), 1.5))
    assert ok.to_json() == {
        "time": 1.5,
        "conn": 1,
        "dir": C2S,
        "uid": 1,
        "op": "ADD",
        "payload_len": 14,
        "frames": 1,
        "wire_len": 28,
        "timeout_ms": 10,
        "id": "6964",
        "data_len": 4,
    }
    # Refused by the server, but every field is still shown.
    too_long = only_message(a.feed(C2S, encode_add(2, b"i" * 65, b"d", 10), 0.0))
    assert too_long.session_id == "69" * 65 and too_long.data_len == 1
    bad_timeout = encode_message(False, 3, Operation.ADD, add_payload(b"id", b"d", 10**9))
    assert only_message(a.feed(C2S, bad_timeout, 0.0)).session_id == "6964"
    past = ADD_PREFIX.pack(10, 50) + b"short"
    rec = only_message(a.feed(C2S, encode_message(False, 4, Operation.ADD, past), 0.0))
    assert rec.session_id is None and rec.note == "id_len runs past the payload"
    assert format_text(rec).endswith("[id_len runs past the payload]")
    short = only_message(a.feed(C2S, encode_message(False, 5, Operation.ADD, b"\x00"), 0.0))
    assert short.to_json()["note"] == "ADD payload shorter than 8 bytes"


def test_connection_records() -> None:
    a = ConnectionAnalyser(4)
    a.feed(C2S, encode_have(1, b"x"), 0.0)
    a.feed(S2C, encode_response(1, 3, b"\x01") + b"junk" * 5, 0.0)
    assert format_text(a.opened(0.0, "local", "IP:127.0.0.1:1")).endswith(
        "#4 open local -> IP:127.0.0.1:1"
    )
    closed = a.closed(0.0, "client")
    assert closed.to_json()["messages_c2s"] == 1 and closed.raw_bytes == 20
    assert format_text(closed).endswith(
        "close (client): 1 requests / 1 answers, 15 / 35 bytes, 20 bytes relayed undecoded"
    )
    failed = a.connect_failed(0.0, "IP:127.0.0.1:1", "Connection refused")
    assert failed.to_json()["event"] == "connect-failed"
