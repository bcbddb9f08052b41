"""Unit tests of dc_client's sans-IO multiplexer core (no sockets, explicit clock)."""

from __future__ import annotations

import json
import random

import pytest

from tests.procs import VECTORS
from tlscache.distcache.multiplexer import (
    LOG_BURST,
    LOG_INTERVAL,
    BadInput,
    ClientEvicted,
    ClientIdle,
    ClientRejected,
    ConnectUpstream,
    Eviction,
    LocalClient,
    Multiplexer,
    Output,
    ProxyLimits,
    ResetUpstream,
    Suppressed,
    Upstream,
    UpstreamLost,
    UpstreamRestored,
)
from tlscache.distcache.protocol import (
    Decoder,
    Message,
    Operation,
    Result,
    encode_add,
    encode_empty_response,
    encode_get,
    encode_have,
    encode_message,
    encode_response,
    encode_result,
    parse_add_request,
)
from tlscache.exceptions import ProtocolError

DC_CLIENT = json.loads(VECTORS.read_text())["dc_client"]


class Harness:
    """A core with an upstream that is up, and helpers to read what it emits."""

    def __init__(self, **kw: int) -> None:
        self.now = 100.0
        # Pipelining on from the start: the probe that decides it has tests of its own.
        self.core: Multiplexer[str] = Multiplexer(ProxyLimits(pipeline="on", **kw))
        self.clients: dict[str, LocalClient[str]] = {}
        self.upstream = bytearray()
        self.to_client: dict[str, bytearray] = {}
        self.closed: list[str] = []
        self.connects = 0
        self.resets = 0

    def start(self) -> None:
        self.core.handle_timer(self.now)
        assert self.connect_due()
        self.core.upstream_connected(self.now)
        self.collect()

    def collect(self) -> Output[str]:
        out = self.core.drain()
        for event in out.events:
            if isinstance(event, ConnectUpstream):
                self.connects += 1
            elif isinstance(event, ResetUpstream):
                self.resets += 1
            elif isinstance(event, BadInput | ClientIdle | ClientEvicted):
                self.closed.append(event.client)
        self.upstream += out.upstream
        for name, data in out.writes:
            self.to_client.setdefault(name, bytearray()).extend(data)
        return out

    def connect_due(self) -> bool:
        """True if the core asked for a connection attempt since the last look."""
        return any(isinstance(e, ConnectUpstream) for e in self.collect().events)

    def tick(self) -> None:
        self.core.handle_timer(self.now)
        self.collect()

    def connect(self, name: str) -> LocalClient[str]:
        client = self.core.add_client(name, self.now)
        assert client is not None
        self.clients[name] = client
        return client

    def send(self, name: str, data: bytes) -> None:
        self.core.client_data(self.clients[name], data, self.now)
        self.collect()

    def reply(self, data: bytes) -> None:
        self.core.upstream_data(data, self.now)
        self.collect()

    def take_upstream(self) -> list[Message]:
        msgs = Decoder(expect_response=False).feed(bytes(self.upstream))
        self.upstream.clear()
        return msgs

    def take(self, name: str) -> list[Message]:
        data = bytes(self.to_client.pop(name, b""))
        return Decoder(expect_response=True).feed(data)

    def answer_all(self, payload: bytes | None = b"\x00") -> int:
        """Answer every forwarded request in order (``payload`` None: echo the request's)."""
        msgs = self.take_upstream()
        self.reply(
            b"".join(
                encode_response(m.uid, m.operation, m.payload if payload is None else payload)
                for m in msgs
            )
        )
        return len(msgs)


def test_uid_rewrite_matches_the_c_proxy_byte_for_byte() -> None:
    vec = DC_CLIENT["uid_rewrite"]
    frames = vec["server_side_frames"]
    to_server = [bytes.fromhex(f["hex"]) for f in frames if f["dir"] == "dc_client->server"]
    from_server = [bytes.fromhex(f["hex"]) for f in frames if f["dir"] == "server->dc_client"]
    h = Harness()
    h.start()
    h.connect("A")
    h.connect("B")
    sent = 0
    for step in vec["client_side"]:
        who = step["step"][0]
        request = bytes.fromhex(step["client_request_hex"])
        h.send(who, request)
        n = len(Decoder().feed(request))
        # Everything the client sent is already upstream (pipelined, not one at a time).
        assert bytes(h.upstream) == b"".join(to_server[sent : sent + n])
        h.upstream.clear()
        assert who not in h.to_client
        h.reply(b"".join(from_server[sent : sent + n]))
        sent += n
        assert bytes(h.to_client.pop(who)) == bytes.fromhex(step["client_response_hex"])
        assert not h.to_client
    assert sent == len(to_server)


def test_server_down_reply_matches_the_c_proxy() -> None:
    for case in (
        DC_CLIENT["uid_rewrite"]["server_down_response"],
        DC_CLIENT["bad_local_input"]["no_server_ever_add"],
    ):
        h = Harness()
        h.connect("A")
        h.send("A", bytes.fromhex(case["request_hex"]))
        assert bytes(h.to_client["A"]) == bytes.fromhex(case["response_hex"])
        assert not h.upstream


def test_empty_reply_while_connecting_and_after_failure() -> None:
    h = Harness(retry_ms=300)
    h.connect("A")
    h.core.handle_timer(h.now)
    assert h.connect_due()
    assert h.core.state is Upstream.CONNECTING
    h.send("A", encode_have(7, b"x"))
    assert [(m.uid, m.payload) for m in h.take("A")] == [(7, b"")]
    h.core.upstream_failed(h.now, "refused")
    h.core.handle_timer(h.now + 0.299)
    assert not h.connect_due()
    h.send("A", encode_get(8, b"x"))
    assert bytes(h.to_client.pop("A")) == encode_empty_response(8, Operation.GET)
    h.now += 0.3
    h.core.handle_timer(h.now)
    assert h.connect_due()
    h.core.upstream_connected(h.now)
    h.send("A", encode_get(9, b"x"))
    assert [m.uid for m in h.take_upstream()] == [1]


def test_drop_answers_outstanding_with_0x02_and_queued_with_empty() -> None:
    h = Harness(max_in_flight=2)
    h.start()
    h.connect("A")
    h.connect("B")
    h.send("A", encode_have(10, b"a") + encode_have(11, b"a") + encode_have(12, b"a"))
    h.send("B", encode_have(20, b"b"))
    assert h.core.in_flight == 2 and h.core.queued == 2
    h.core.upstream_failed(h.now, "reset by peer")
    h.collect()
    a = h.take("A")
    assert [(m.uid, m.payload) for m in a] == [(10, b"\x02"), (11, b"\x02"), (12, b"")]
    assert bytes(h.to_client.get("B", b"")) == encode_empty_response(20, Operation.HAVE)
    assert h.core.in_flight == 0 and h.core.queued == 0
    assert h.core.state is Upstream.DOWN


def test_fake_server_vector_0x02_reply() -> None:
    vec = DC_CLIENT["fake_server"]
    h = Harness()
    h.start()
    h.connect("A")
    h.send("A", encode_get(9, b"whatever"))
    assert bytes(h.upstream) == bytes.fromhex(vec["forwarded_request_hex"])
    h.core.upstream_failed(h.now, "closed")
    h.collect()
    assert bytes(h.to_client["A"]) == bytes.fromhex(vec["server_closed_mid_request_response_hex"])
    assert encode_result(9, Operation.GET, Result.DISCONNECTED) == bytes.fromhex(
        vec["server_closed_mid_request_response_hex"]
    )


def test_uid_counter_continues_across_reconnects() -> None:
    h = Harness(retry_ms=10)
    h.start()
    h.connect("A")
    h.send("A", encode_have(5, b"x"))
    assert [m.uid for m in h.take_upstream()] == [1]
    h.core.upstream_failed(h.now, "gone")
    h.now += 1
    h.start()
    h.send("A", encode_have(5, b"x"))
    assert [m.uid for m in h.take_upstream()] == [2]


def test_client_vanishing_mid_request_is_dropped_alone() -> None:
    h = Harness()
    h.start()
    h.connect("A")
    h.connect("B")
    h.send("A", encode_get(1, b"a"))
    h.send("B", encode_get(1, b"b"))
    h.core.client_closed(h.clients["A"])
    h.collect()
    assert h.answer_all(b"data") == 2
    assert "A" not in h.to_client
    assert [(m.uid, m.payload) for m in h.take("B")] == [(1, b"data")]
    assert h.core.stats.discarded == 1
    assert h.core.state is Upstream.UP and h.core.in_flight == 0


def test_garbage_from_one_client_closes_only_that_client() -> None:
    h = Harness()
    h.start()
    h.connect("A")
    h.connect("B")
    h.send("B", encode_have(3, b"b"))
    h.send("A", b"GET / HTTP/1.0\r\n\r\n")
    assert h.closed == ["A"]
    h.send("A", encode_have(4, b"a"))  # late bytes after the close are ignored
    assert h.answer_all() == 1
    assert [m.uid for m in h.take("B")] == [3]
    assert h.core.clients == 1


def test_per_client_order_with_many_in_flight() -> None:
    rng = random.Random(5)
    h = Harness(max_in_flight=64)
    h.start()
    names = [f"c{i}" for i in range(20)]
    for n in names:
        h.connect(n)
    expected: dict[str, list[int]] = {n: [] for n in names}
    for _ in range(50):
        for n in rng.sample(names, 7):
            uids = [rng.randrange(1 << 32) for _ in range(rng.randrange(1, 30))]
            expected[n] += uids
            h.send(n, b"".join(encode_have(u, n.encode()) for u in uids))
        assert h.core.in_flight <= 64
        # The server answers a random prefix of what it has, in order.
        msgs = h.take_upstream()
        k = rng.randrange(len(msgs) + 1)
        h.reply(b"".join(encode_response(m.uid, m.operation, m.payload) for m in msgs[:k]))
        rest = msgs[k:]
        h.reply(b"".join(encode_response(m.uid, m.operation, m.payload) for m in rest))
    while h.core.in_flight:
        h.answer_all(None)
    for n in names:
        got = h.take(n)
        assert [m.uid for m in got] == expected[n]
        assert all(m.payload == n.encode() for m in got)


def test_round_robin_when_the_table_is_full() -> None:
    h = Harness(max_in_flight=2)
    h.start()
    h.connect("A")
    h.connect("B")
    h.send("A", b"".join(encode_have(i, b"a") for i in range(10)))
    h.send("B", encode_have(100, b"b"))
    h.answer_all()  # A0, A1 answered; the next slots go to A and then B
    upstream = h.take_upstream()
    assert [m.payload for m in upstream] == [b"a", b"b"]


def test_multi_frame_payload_is_forwarded_and_refragmented() -> None:
    h = Harness()
    h.start()
    h.connect("A")
    payload = bytes(range(256)) * 20  # 5120 bytes: 3 frames
    h.send("A", encode_message(False, 77, Operation.GET, b"id"))
    up = h.take_upstream()
    big = encode_response(up[0].uid, Operation.GET, payload)
    h.reply(big[:3000])
    assert "A" not in h.to_client
    h.reply(big[3000:])
    assert bytes(h.to_client["A"]) == encode_response(77, Operation.GET, payload)
    add = encode_message(False, 5, Operation.ADD, payload)
    h.send("A", add[:100])
    assert not h.upstream
    h.send("A", add[100:])
    assert bytes(h.upstream) == encode_message(False, 2, Operation.ADD, payload)


def test_patch_level_is_normalised_like_c() -> None:
    h = Harness()
    h.start()
    h.connect("A")
    frame = bytearray(encode_have(1, b"x"))
    frame[2:4] = b"\xab\xcd"
    h.send("A", bytes(frame))
    assert bytes(h.upstream) == encode_have(1, b"x")


@pytest.mark.parametrize("kind", ["unknown uid", "wrong op", "garbage"])
def test_bad_upstream_reply_resets_the_upstream(kind: str) -> None:
    h = Harness()
    h.start()
    h.connect("A")
    h.send("A", encode_have(1, b"x") + encode_have(2, b"y"))
    first = h.take_upstream()[0]
    if kind == "unknown uid":
        bad = encode_response(999, Operation.HAVE, b"\x00")
    elif kind == "wrong op":
        bad = encode_response(first.uid, Operation.GET, b"\x00")
    else:
        bad = b"\xff" * 20
    h.reply(bad)
    assert h.resets == 1
    assert h.core.state is Upstream.DOWN
    assert [(m.uid, m.payload) for m in h.take("A")] == [(1, b"\x02"), (2, b"\x02")]


def test_request_timeout_answers_0x02_and_resets() -> None:
    h = Harness(request_timeout_ms=500, retry_ms=1000)
    h.start()
    h.connect("A")
    h.send("A", encode_have(1, b"x"))
    h.now += 0.4
    h.tick()
    assert h.resets == 0
    h.now += 0.2
    h.tick()
    assert h.resets == 1
    assert [(m.uid, m.payload) for m in h.take("A")] == [(1, b"\x02")]
    # A late answer on the old connection is ignored.
    h.reply(encode_response(1, Operation.HAVE, b"\x00"))
    assert "A" not in h.to_client


def test_idle_clients_are_closed() -> None:
    h = Harness(idle_ms=300)
    h.start()
    h.connect("A")
    h.connect("B")
    h.send("B", encode_have(1, b"x"))  # outstanding: not idle
    h.now += 0.31
    h.tick()
    assert h.closed == ["A"]
    h.answer_all()
    h.now += 0.31
    h.tick()
    assert h.closed == ["A", "B"]


def test_max_clients() -> None:
    core: Multiplexer[int] = Multiplexer(ProxyLimits(max_clients=2))
    assert core.add_client(1, 0.0) is not None
    assert core.add_client(2, 0.0) is not None
    assert core.add_client(3, 0.0) is None
    assert core.stats.rejected_clients == 1


def test_any_chunking_gives_the_same_bytes() -> None:
    """Whole frames take a fast path, split ones the full decoder: same result."""
    stream = b"".join(
        encode_message(False, uid, op, payload)
        for uid, op, payload in [
            (1, Operation.HAVE, b"a"),
            (2, Operation.ADD, b"\x00" * 8 + b"z" * 3000),
            (3, Operation.GET, b""),
            (4, Operation.REMOVE, b"r" * 2048),
        ]
    )
    expected: bytes | None = None
    for step in (1, 3, 14, 15, 100, 2062, len(stream)):
        h = Harness()
        h.start()
        h.connect("A")
        for i in range(0, len(stream), step):
            h.send("A", stream[i : i + step])
        if expected is None:
            expected = bytes(h.upstream)
            assert [m.uid for m in h.take_upstream()] == [1, 2, 3, 4]
        else:
            assert bytes(h.upstream) == expected, step


def test_answers_out_of_order_wait_for_the_clients_order() -> None:
    h = Harness()
    h.start()
    h.connect("A")
    h.send("A", encode_have(1, b"x") + encode_get(2, b"y"))
    first, second = h.take_upstream()
    h.reply(encode_response(second.uid, Operation.GET, b"later"))
    assert "A" not in h.to_client
    h.reply(encode_response(first.uid, Operation.HAVE, b"\x00"))
    assert [(m.uid, m.payload) for m in h.take("A")] == [(1, b"\x00"), (2, b"later")]


def test_next_deadline_is_the_earliest_timer() -> None:
    h = Harness(retry_ms=300, request_timeout_ms=500, idle_ms=1000)
    deadline = h.core.next_deadline()
    assert deadline is not None and deadline <= h.now  # the first attempt is due at once
    h.start()
    assert h.core.next_deadline() is None  # connected, nothing outstanding, no client
    h.connect("A")
    assert h.core.next_deadline() == pytest.approx(101.0)  # A's idle timeout
    h.now = 100.1
    h.send("A", encode_have(1, b"x"))
    assert h.core.next_deadline() == pytest.approx(100.6)  # the request's timeout
    h.core.handle_timer(100.599)  # a timer firing early changes nothing
    assert h.collect().events == ()
    h.answer_all()
    assert h.core.next_deadline() == pytest.approx(101.0)  # A was active since: a check...
    h.now = 101.0
    h.tick()
    assert h.closed == []
    assert h.core.next_deadline() == pytest.approx(101.1)  # ...that moves the deadline
    h.core.upstream_failed(h.now, "gone")
    assert h.core.next_deadline() == pytest.approx(101.1)
    h.now = 101.1
    h.tick()
    assert h.closed == ["A"]
    assert h.core.next_deadline() == pytest.approx(101.3)  # the next attempt
    h.now = 101.3
    h.tick()
    assert h.connects == 2 and h.core.state is Upstream.CONNECTING
    assert h.core.next_deadline() is None  # connecting: the shell's connect timeout rules


def test_events_report_an_outage_once_and_its_end() -> None:
    h = Harness(retry_ms=100)
    h.tick()
    h.core.upstream_failed(h.now, "refused")
    assert list(h.collect().events) == [UpstreamLost("refused", False, 100.0)]
    h.now += 0.1
    h.tick()
    h.core.upstream_failed(h.now, "refused")
    assert h.collect().events == ()  # still the same outage
    h.now += 0.1
    h.tick()
    h.core.upstream_connected(h.now)
    assert list(h.collect().events) == [UpstreamRestored()]
    h.core.upstream_failed(h.now, "reset by peer")
    assert list(h.collect().events) == [UpstreamLost("reset by peer", True, 100.0)]


def test_rejected_and_bad_clients_are_reported() -> None:
    h = Harness(max_clients=1)
    h.start()
    h.connect("A")
    assert h.core.add_client("B", h.now) is None
    assert list(h.collect().events) == [ClientRejected(1)]
    client = h.clients["A"]
    h.core.client_data(client, b"\x00\x11\x00\x00\x05" + bytes(9), h.now)
    [event] = h.core.drain().events
    assert isinstance(event, BadInput)
    assert (event.client, event.number) == ("A", 1) and "is_response" in event.reason
    assert h.core.clients == 0


def test_local_client_backlog_counts_unanswered_requests() -> None:
    h = Harness(max_in_flight=1)
    h.start()
    client = h.connect("A")
    h.send("A", encode_have(1, b"x") + encode_have(2, b"y"))
    assert client.backlog == 2 and h.core.in_flight == 1 and h.core.queued == 1
    h.answer_all()
    assert client.backlog == 1
    h.answer_all()
    assert client.backlog == 0


# ---------------------------------------------------------------- hardening


def add_frame(uid: int, payload: bytes) -> bytes:
    return encode_message(False, uid, Operation.ADD, payload)


def test_short_add_is_refused_locally_and_never_forwarded() -> None:
    """dc_server closes the shared connection for an ADD under 8 bytes: close the client."""
    h = Harness()
    h.start()
    h.connect("good")
    h.connect("bad")
    h.send("good", encode_have(1, b"g"))
    h.send("bad", encode_have(7, b"b") + add_frame(8, b"\x00\x00"))
    assert h.closed == ["bad"]
    forwarded = h.take_upstream()
    assert [m.payload for m in forwarded] == [b"g", b"b"]  # the ADD never went upstream
    h.reply(b"".join(encode_response(m.uid, m.operation, b"\x01") for m in forwarded))
    assert [m.uid for m in h.take("good")] == [1]
    assert "bad" not in h.to_client and h.core.stats.bad_requests == 1
    assert h.core.state is Upstream.UP


@pytest.mark.parametrize("size", range(14))
def test_add_check_matches_the_servers_parser(size: int) -> None:
    """Exactly the ADDs parse_add_request raises for are refused; refusals with a
    result code (timeout, id range, corrupt) are the server's to answer."""
    payload = (b"\xff" * 4 + b"\x00\x00\x00\x63" + b"x" * 8)[:size]
    try:
        parse_add_request(payload)
        server_closes = False
    except ProtocolError:
        server_closes = True
    h = Harness()
    h.start()
    h.connect("A")
    h.send("A", add_frame(1, payload))
    assert (h.closed == ["A"]) is server_closes
    assert len(h.take_upstream()) == (0 if server_closes else 1)


def test_short_add_with_no_server_closes_the_client_too() -> None:
    h = Harness()
    h.connect("A")
    h.send("A", add_frame(1, b""))
    assert h.closed == ["A"] and "A" not in h.to_client


def test_a_greedy_client_gets_its_share_and_no_more() -> None:
    h = Harness(max_in_flight=8, client_in_flight=4)
    h.start()
    greedy = h.connect("G")
    h.connect("B")
    h.send("G", b"".join(encode_have(i, b"g") for i in range(1000)))
    assert h.core.in_flight == 4 and greedy.in_flight == 4
    h.send("B", encode_have(1, b"b"))  # forwarded at once: G holds only its share
    queued = Decoder(expect_response=False).feed(bytes(h.upstream))  # a look, not a take
    assert [m.payload for m in queued] == [b"g"] * 4 + [b"b"]
    answered = 0
    while h.core.in_flight:
        answered += h.answer_all()
        assert greedy.in_flight <= 4
    assert answered == 1001
    assert [m.uid for m in h.take("G")] == list(range(1000))


def test_scarce_slots_go_round_robin_one_request_per_client() -> None:
    h = Harness(max_in_flight=3, client_in_flight=3)
    h.start()
    for name in "ABC":
        h.connect(name)
    h.send("A", b"".join(encode_have(i, b"a") for i in range(50)))
    h.send("B", b"".join(encode_have(i, b"b") for i in range(50)))
    h.send("C", b"".join(encode_have(i, b"c") for i in range(50)))
    pending = h.take_upstream()
    assert [m.payload for m in pending] == [b"a"] * 3  # A came first, slots were free
    order: list[bytes] = []
    for _ in range(3):
        h.reply(b"".join(encode_response(m.uid, m.operation, b"\x01") for m in pending))
        pending = h.take_upstream()
        order += [m.payload for m in pending]
    # Then one request per client per turn: A's pipeline does not starve B and C.
    assert order == [b"a", b"b", b"c"] * 3


def test_big_requests_are_capped_in_bytes_and_others_go_between_them() -> None:
    """ADDs of 32 KiB from one client put at most the byte cap ahead of another's GET."""
    h = Harness(max_in_flight_bytes=64 * 1024, client_in_flight=16)
    h.start()
    h.connect("storm")
    h.connect("lookup")
    big = b"S" * (32 * 1024 - 8 - 3)  # payloads of exactly 32 KiB
    h.send("storm", b"".join(encode_add(i, b"s%02d" % i, big, 60_000) for i in range(16)))
    first = h.take_upstream()
    assert len(first) == 2, [len(m.payload) for m in first]  # the cap, not 16 slots
    h.send("lookup", encode_get(1, b"sid"))
    assert h.take_upstream() == []  # waits for bytes to come back, not behind 14 more ADDs
    order: list[str] = []
    pending = first
    while pending:
        h.reply(b"".join(encode_response(m.uid, m.operation, b"\x00") for m in pending))
        pending = h.take_upstream()
        assert sum(len(m.payload) for m in pending) <= 64 * 1024 + 64, pending
        order += ["get" if m.operation is Operation.GET else "add" for m in pending]
    # Round-robin: the lookup goes out with the first requests released.
    assert "get" in order[:2], order
    assert order.count("add") == 14, order
    assert [m.uid for m in h.take("lookup")] == [1]


def test_output_budget_blocks_forwarding_and_stalled_clients_are_evicted() -> None:
    h = Harness(client_output_budget=1000, write_stall_ms=2000, request_timeout_ms=60_000)
    h.start()
    slow = h.connect("S")
    h.connect("F")
    h.core.client_output(slow, 5000, h.now)  # over budget: blocked
    h.send("S", encode_have(1, b"s"))
    h.send("F", encode_have(2, b"f"))
    assert [m.payload for m in h.take_upstream()] == [b"f"]  # S is held back
    assert h.core.next_deadline() == pytest.approx(h.now + 2.0)
    h.core.client_output(slow, 200, h.now + 1)  # drained to a quarter: forwarded again
    h.collect()
    assert [m.payload for m in h.take_upstream()] == [b"s"]
    h.core.client_output(slow, 5000, h.now + 1)
    h.now += 3.1
    h.tick()
    out_events = h.core.drain().events
    assert h.core.stats.stalled == 1 and h.core.clients == 1
    assert h.core.buffered == 0
    del out_events


def test_stall_eviction_event_is_typed() -> None:
    h = Harness(client_output_budget=1000, write_stall_ms=100)
    h.start()
    c = h.connect("S")
    h.core.client_output(c, 2000, h.now)
    h.now += 0.2
    h.core.handle_timer(h.now)
    [event] = h.core.drain().events
    assert event == ClientEvicted("S", 1, Eviction.STALLED, True)


def test_total_buffer_cap_closes_the_biggest_holders_first() -> None:
    h = Harness(client_output_budget=1 << 20, max_buffered=100_000)
    h.start()
    a, b, c = h.connect("A"), h.connect("B"), h.connect("C")
    h.core.client_output(a, 30_000, h.now)
    h.core.client_output(b, 60_000, h.now)
    assert h.core.buffered == 90_000
    h.core.client_output(c, 20_000, h.now)  # 110 000 > cap: B (the most) goes
    evicted = [e for e in h.core.drain().events if isinstance(e, ClientEvicted)]
    assert [(e.client, e.cause) for e in evicted] == [("B", Eviction.OVER_BUFFER)]
    assert h.core.buffered == 50_000 and h.core.clients == 2


def test_at_max_clients_the_longest_idle_makes_room() -> None:
    h = Harness(max_clients=3, evict_idle_ms=1000)
    h.start()
    h.connect("old")
    h.now += 0.5
    h.connect("older-but-busy")
    h.send("older-but-busy", encode_have(1, b"x"))  # outstanding: never displaced
    h.connect("recent")
    h.now += 0.4
    assert h.core.add_client("new1", h.now) is None  # nobody idle for 1 s yet
    h.now += 0.2
    assert h.core.add_client("new2", h.now) is not None  # "old" is idle 1.1 s
    evicted = [e for e in h.core.drain().events if isinstance(e, ClientEvicted)]
    assert [(e.client, e.cause) for e in evicted] == [("old", Eviction.DISPLACED)]
    assert h.core.stats.displaced == 1 and h.core.stats.rejected_clients == 1


def test_reports_are_rate_limited_with_a_count_per_interval() -> None:
    h = Harness(max_clients=1, request_timeout_ms=60_000)
    h.start()
    h.connect("A")
    h.send("A", encode_have(1, b"x"))  # busy: cannot be displaced
    for i in range(20):
        assert h.core.add_client(f"x{i}", h.now) is None
    events = list(h.core.drain().events)
    assert events == [ClientRejected(1)] * LOG_BURST
    assert h.core.next_deadline() == pytest.approx(h.now + LOG_INTERVAL)
    h.now += LOG_INTERVAL
    h.core.handle_timer(h.now)
    [summary] = h.core.drain().events
    assert isinstance(summary, Suppressed) and summary.count == 20 - LOG_BURST
    bad = Harness()
    logged = []
    for i in range(30):  # bad clients: every one is closed, few are logged one by one
        bad.connect(f"b{i}")
        bad.core.client_data(bad.clients[f"b{i}"], b"\x00" * 14, bad.now)
        logged += [e.log for e in bad.core.drain().events if isinstance(e, BadInput)]
    assert logged == [True] * LOG_BURST + [False] * (30 - LOG_BURST)
    assert bad.core.clients == 0 and bad.core.stats.bad_requests == 30
    bad.now += LOG_INTERVAL
    bad.core.handle_timer(bad.now)
    summaries = [e for e in bad.core.drain().events if isinstance(e, Suppressed)]
    assert [s.count for s in summaries] == [30 - LOG_BURST]


def test_a_closed_client_gives_back_its_buffers() -> None:
    h = Harness()
    h.start()
    c = h.connect("A")
    h.send("A", encode_have(1, b"x") + encode_have(2, b"y")[:10])  # half a frame buffered
    assert c.decoder.buffered > 0
    h.core.client_output(c, 4096, h.now)
    h.core.client_closed(c)
    assert c.decoder.buffered == 0 and not c.waiting and h.core.buffered == 0
