"""The capability probe and TAKE without I/O: the encoding, dc_server's answers, and
dc_client's probe state machine (probe first, one request at a time until it is
answered, and for good when the answer is not ours)."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count

import pytest

from tlscache.distcache.multiplexer import (
    BadInput,
    ConnectUpstream,
    LocalClient,
    Multiplexer,
    PipelineMode,
    ProxyLimits,
    ResetUpstream,
)
from tlscache.distcache.protocol import (
    NO_CAPABILITIES,
    PROBE_NONCE_SIZE,
    PROBE_PREFIX,
    SERVER_CAPABILITIES,
    Capabilities,
    Decoder,
    Message,
    Operation,
    Result,
    encode_add,
    encode_get,
    encode_probe,
    encode_remove,
    encode_response,
    encode_result,
    encode_take,
    is_reserved_add,
    parse_probe_reply,
    probe_id,
    probe_nonce,
    probe_reply,
)
from tlscache.distcache.serverconn import CacheService
from tlscache.distcache.table import SessionTable
from tlscache.exceptions import ProtocolError

NONCE = bytes(range(PROBE_NONCE_SIZE))
BIG = bytes(range(256)) * 40  # 10 KiB: a reply C would write over several passes


# ---------------------------------------------------------------- encoding


def test_probe_reply_names_the_nonce_and_the_capabilities() -> None:
    payload = probe_reply(NONCE, SERVER_CAPABILITIES)
    assert payload == b"tlscache/1 " + NONCE.hex().encode() + b" pipeline take"
    assert parse_probe_reply(NONCE, payload) == Capabilities(pipeline=True, take=True)
    assert parse_probe_reply(NONCE, probe_reply(NONCE, Capabilities(True, False))) == (True, False)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01",  # a C server's miss
        b"",  # dc_client without a server
        b"\x02",
        probe_reply(bytes(PROBE_NONCE_SIZE), SERVER_CAPABILITIES),  # planted: another nonce
        b"tlscache/1",
        b"something else entirely, long enough to be a session",
    ],
)
def test_anything_but_our_echo_offers_nothing(payload: bytes) -> None:
    assert parse_probe_reply(NONCE, payload) == NO_CAPABILITIES


def test_probe_ids_and_reserved_adds() -> None:
    pid = probe_id(NONCE)
    assert pid == PROBE_PREFIX + NONCE and len(pid) <= 64
    assert probe_nonce(pid) == NONCE
    assert probe_nonce(pid + b"x") is None and probe_nonce(b"session") is None
    with pytest.raises(ValueError):
        probe_id(b"short")
    add = Decoder().feed(encode_add(1, pid, b"planted answer", 1000))[0]
    assert is_reserved_add(add.payload)
    plain = Decoder().feed(encode_add(1, b"s" * 32, PROBE_PREFIX, 1000))[0]
    assert not is_reserved_add(plain.payload)  # the prefix in the data, not the id


def test_take_goes_through_every_decoder_other_numbers_do_not() -> None:
    msg = Decoder(expect_response=False).feed(encode_take(7, b"sid"))
    assert msg == [Message(False, 7, Operation.TAKE, b"sid")]
    reply = encode_response(7, Operation.TAKE, BIG)  # several frames: the slow path too
    assert Decoder(expect_response=True).feed(reply) == [Message(True, 7, Operation.TAKE, BIG)]
    for op in (4, 0x53, 0x55, 0xFF):
        frame = bytearray(encode_take(7, b"sid"))
        frame[10] = op
        with pytest.raises(ProtocolError):
            Decoder().feed(bytes(frame))


# ---------------------------------------------------------------- dc_server


def answer(service: CacheService, frame: bytes, now: int = 0) -> Message:
    conn = service.connection()
    out = conn.feed(frame, now)
    assert conn.error is None, conn.error
    (msg,) = Decoder(expect_response=True).feed(out)
    return msg


def test_server_answers_probe_take_and_refuses_reserved_ids() -> None:
    table = SessionTable()
    service = CacheService(table)
    probe = answer(service, encode_probe(3, NONCE))
    assert (probe.uid, probe.operation) == (3, Operation.GET)
    assert parse_probe_reply(NONCE, probe.payload) == SERVER_CAPABILITIES

    refused = answer(service, encode_add(4, probe_id(NONCE), b"planted answer", 60_000))
    assert refused.payload == bytes([Result.ADD_ID_RANGE]) and len(table) == 0
    assert answer(service, encode_remove(5, probe_id(NONCE))).payload == b"\x01"
    assert parse_probe_reply(NONCE, answer(service, encode_probe(6, NONCE)).payload).take

    assert answer(service, encode_add(7, b"sid", BIG, 60_000)).payload == b"\x00"
    took = answer(service, encode_take(8, b"sid"))
    assert (took.operation, took.payload) == (Operation.TAKE, BIG)
    again = answer(service, encode_take(9, b"sid"))
    assert again.payload == b"\x01" and len(table) == 0 and table.total_bytes == 0


def test_table_take_is_get_then_gone_and_respects_expiry() -> None:
    table = SessionTable()
    assert table.add(b"a", b"data-a", 100, now_ms=0) == Result.OK
    assert table.add(b"b", b"data-b", 100, now_ms=0) == Result.OK
    assert table.take(b"a", now_ms=50) == b"data-a"
    assert table.take(b"a", now_ms=50) is None and not table.have(b"a", 50)
    assert table.take(b"b", now_ms=101) is None  # expired: no taker gets it
    assert (len(table), table.total_bytes) == (0, 0)


# ---------------------------------------------------------------- dc_client's core


class Core:
    """A multiplexer, an explicit clock, and what it sent where."""

    def __init__(self, pipeline: PipelineMode = "probe", **kw: int) -> None:
        self.now = 10.0
        self.nonces: Iterator[bytes] = (bytes([n]) * PROBE_NONCE_SIZE for n in count(1))
        self.nonce = b""
        self.mux: Multiplexer[str] = Multiplexer(
            ProxyLimits(pipeline=pipeline, **kw), nonce=self._nonce
        )
        self.clients: dict[str, LocalClient[str]] = {}
        self.upstream: list[Message] = []
        self.to_client: dict[str, list[Message]] = {}
        self.events: list[object] = []
        self.up_decoder = Decoder(expect_response=False)

    def _nonce(self) -> bytes:
        self.nonce = next(self.nonces)
        return self.nonce

    def collect(self) -> None:
        out = self.mux.drain()
        self.events += out.events
        self.upstream += self.up_decoder.feed(out.upstream)
        for name, data in out.writes:
            self.to_client.setdefault(name, []).extend(Decoder(expect_response=True).feed(data))

    def connect_upstream(self) -> None:
        self.mux.handle_timer(self.now)
        self.collect()
        assert any(isinstance(e, ConnectUpstream) for e in self.events), self.events
        self.up_decoder = Decoder(expect_response=False)
        self.mux.upstream_connected(self.now)
        self.collect()

    def client(self, name: str) -> None:
        c = self.mux.add_client(name, self.now)
        assert c is not None
        self.clients[name] = c

    def send(self, name: str, *frames: bytes) -> None:
        self.mux.client_data(self.clients[name], b"".join(frames), self.now)
        self.collect()

    def reply(self, *frames: bytes) -> None:
        self.mux.upstream_data(b"".join(frames), self.now)
        self.collect()

    def sent(self) -> list[Message]:
        sent, self.upstream = self.upstream, []
        return sent

    def received(self, name: str) -> list[Message]:
        return self.to_client.pop(name, [])

    def state(self) -> str:
        return (
            f"in_flight={self.mux.in_flight} queued={self.mux.queued} "
            f"caps={self.mux.upstream_capabilities} stats={self.mux.stats} events={self.events}"
        )


def probe_of(msgs: list[Message], nonce: bytes) -> Message:
    """The one message sent: a GET for the probe id of ``nonce``."""
    assert len(msgs) == 1, msgs
    (m,) = msgs
    assert (m.operation, m.payload) == (Operation.GET, probe_id(nonce)), m
    return m


def gets(uid: int, n: int) -> list[bytes]:
    return [encode_get(uid + i, b"sid-%d" % i) for i in range(n)]


def test_the_probe_goes_first_and_alone_then_pipelining() -> None:
    core = Core(max_in_flight=64)
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    core.client("a")
    core.send("a", *gets(1, 5))
    assert core.sent() == [] and core.mux.in_flight == 1, core.state()
    ours = probe_reply(core.nonce, SERVER_CAPABILITIES)
    core.reply(encode_response(probe.uid, Operation.GET, ours))
    assert core.mux.upstream_capabilities == SERVER_CAPABILITIES
    forwarded = core.sent()
    assert [m.payload for m in forwarded] == [b"sid-%d" % i for i in range(5)], core.state()
    assert core.mux.in_flight == 5 and core.received("a") == [], core.state()


def test_a_server_we_did_not_write_gets_one_request_at_a_time_for_good() -> None:
    core = Core(max_in_flight=64)
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    core.client("a")
    core.client("b")
    core.send("a", *gets(1, 4))
    core.send("b", *gets(100, 4))
    core.reply(encode_result(probe.uid, Operation.GET, Result.NOTOK))  # C's miss
    assert core.mux.upstream_capabilities == NO_CAPABILITIES, core.state()
    answered = 0
    while True:
        sent = core.sent()
        if not sent:
            break
        assert len(sent) == 1 and core.mux.in_flight == 1, (sent, core.state())
        core.reply(encode_response(sent[0].uid, Operation.GET, BIG))
        answered += 1
    assert answered == 8, core.state()
    got = {name: [m.uid for m in core.received(name)] for name in ("a", "b")}
    assert got == {"a": [1, 2, 3, 4], "b": [100, 101, 102, 103]}, core.state()


def test_a_planted_reply_with_another_nonce_is_not_trusted() -> None:
    core = Core(max_in_flight=64)
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    planted = probe_reply(bytes(PROBE_NONCE_SIZE), SERVER_CAPABILITIES)
    core.reply(encode_response(probe.uid, Operation.GET, planted))
    assert core.mux.upstream_capabilities == NO_CAPABILITIES, core.state()
    core.client("a")
    core.send("a", *gets(1, 3))
    assert len(core.sent()) == 1, core.state()


def test_every_reconnect_probes_again_with_a_fresh_nonce() -> None:
    core = Core(max_in_flight=64, retry_ms=100)
    core.connect_upstream()
    first_nonce = core.nonce
    probe = probe_of(core.sent(), first_nonce)
    core.reply(
        encode_response(probe.uid, Operation.GET, probe_reply(first_nonce, SERVER_CAPABILITIES))
    )
    assert core.mux.upstream_capabilities == SERVER_CAPABILITIES
    core.mux.upstream_failed(core.now, "dropped")
    assert core.mux.upstream_capabilities is None and core.mux.max_in_flight == 64
    core.now += 1.0
    core.connect_upstream()
    assert core.nonce != first_nonce
    probe = probe_of(core.sent(), core.nonce)
    core.client("a")
    core.send("a", *gets(1, 3))
    assert core.sent() == [] and core.mux.max_in_flight == 1, core.state()
    # The old nonce's answer is a planted one now.
    core.reply(
        encode_response(probe.uid, Operation.GET, probe_reply(first_nonce, SERVER_CAPABILITIES))
    )
    assert core.mux.upstream_capabilities == NO_CAPABILITIES
    assert len(core.sent()) == 1, core.state()


def test_an_unanswered_probe_times_out_from_when_a_client_waits_for_it() -> None:
    core = Core(request_timeout_ms=500)
    core.connect_upstream()
    probe_of(core.sent(), core.nonce)
    core.now += 5.0  # nobody waits: no reason to give up on the connection
    core.mux.handle_timer(core.now)
    core.collect()
    assert not any(isinstance(e, ResetUpstream) for e in core.events), core.state()
    core.client("a")
    core.send("a", encode_get(1, b"sid"))
    core.now += 0.4
    core.mux.handle_timer(core.now)
    core.collect()
    assert not any(isinstance(e, ResetUpstream) for e in core.events), core.state()
    core.now += 0.2
    core.mux.handle_timer(core.now)
    core.collect()
    assert any(isinstance(e, ResetUpstream) for e in core.events), core.state()
    (m,) = core.received("a")
    # Held back only by the probe: for the client, the server left with it outstanding.
    assert (m.uid, m.payload) == (1, b"\x02"), core.state()


def test_local_probe_is_answered_by_the_proxy_with_the_paths_capabilities() -> None:
    core = Core()
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    core.client("a")
    local = bytes([9]) * PROBE_NONCE_SIZE
    core.send("a", encode_get(1, b"sid"), encode_probe(2, local))
    assert core.received("a") == [], core.state()  # the upstream's probe is unanswered
    core.reply(
        encode_response(
            probe.uid, Operation.GET, probe_reply(core.nonce, Capabilities(True, False))
        )
    )
    (fwd,) = core.sent()
    assert fwd.payload == b"sid"  # the local probe is never forwarded
    core.reply(encode_response(fwd.uid, Operation.GET, BIG))
    first, second = core.received("a")
    assert (first.uid, first.payload) == (1, BIG)
    assert second.uid == 2 and parse_probe_reply(local, second.payload) == (True, False)
    core.send("a", encode_probe(3, local))  # now known: answered at once
    (third,) = core.received("a")
    assert parse_probe_reply(local, third.payload) == Capabilities(pipeline=True, take=False)
    assert core.sent() == [] and core.mux.stats.answered_locally == 2, core.state()


def test_local_take_is_forwarded_only_when_the_upstream_has_take() -> None:
    core = Core()
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    core.reply(
        encode_response(probe.uid, Operation.GET, probe_reply(core.nonce, SERVER_CAPABILITIES))
    )
    core.client("a")
    core.send("a", encode_take(5, b"sid"))
    (fwd,) = core.sent()
    assert (fwd.operation, fwd.payload) == (Operation.TAKE, b"sid")
    core.reply(encode_response(fwd.uid, Operation.TAKE, BIG))
    assert [(m.uid, m.operation, m.payload) for m in core.received("a")] == [
        (5, Operation.TAKE, BIG)
    ]


@pytest.mark.parametrize("when", ["known", "while probing"])
def test_local_take_without_upstream_take_closes_the_client_unforwarded(when: str) -> None:
    core = Core()
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    miss = encode_result(probe.uid, Operation.GET, Result.NOTOK)
    core.client("a")
    core.client("b")
    if when == "known":
        core.reply(miss)
    core.send("a", encode_get(1, b"sid"), encode_take(2, b"sid"))
    core.send("b", encode_get(1, b"other"))
    if when == "while probing":
        core.reply(miss)
    closed = [e.client for e in core.events if isinstance(e, BadInput)]
    assert closed == ["a"] and core.mux.stats.refused_takes == 1, core.state()
    sent = core.sent()
    assert all(m.operation is not Operation.TAKE for m in sent), sent
    assert [m.payload for m in sent] == ([b"other"] if when == "while probing" else [b"sid"])


def test_reserved_adds_and_removes_are_answered_here_never_forwarded() -> None:
    core = Core()
    core.connect_upstream()
    probe = probe_of(core.sent(), core.nonce)
    core.reply(
        encode_response(probe.uid, Operation.GET, probe_reply(core.nonce, SERVER_CAPABILITIES))
    )
    core.client("a")
    pid = probe_id(bytes([7]) * PROBE_NONCE_SIZE)
    core.send("a", encode_add(1, pid, b"planted answer", 1000), encode_remove(2, pid))
    assert core.sent() == [], core.state()
    got = [(m.uid, m.payload) for m in core.received("a")]
    assert got == [(1, bytes([Result.ADD_ID_RANGE])), (2, b"\x01")], core.state()


@pytest.mark.parametrize(("mode", "limit"), [("on", 64), ("off", 1)])
def test_operator_modes_send_no_probe_and_offer_no_take(mode: PipelineMode, limit: int) -> None:
    core = Core(pipeline=mode, max_in_flight=64)
    core.connect_upstream()
    core.client("a")
    core.send("a", *gets(1, 5))
    sent = core.sent()
    assert len(sent) == min(5, limit) and core.mux.stats.probes_sent == 0, core.state()
    assert core.mux.upstream_capabilities == Capabilities(pipeline=mode == "on", take=False)
    core.send("a", encode_probe(9, NONCE))
    assert core.sent() == []


def test_the_pipeline_mode_is_checked() -> None:
    with pytest.raises(ValueError):
        ProxyLimits(pipeline="sometimes")  # type: ignore[arg-type]
