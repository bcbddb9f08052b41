"""dc_client's Multiplexer: local client bytes, upstream bytes and timer events at random.

The input is a script read with atheris' FuzzedDataProvider: each step connects or
closes a local client, sends it bytes, moves the upstream (connected, failed, random
bytes, or well-formed answers to requests in flight), advances the clock and fires
the timer, and drains. Invariants: no exception escapes; every write to a client
decodes as whole responses; what goes upstream decodes as whole requests.
"""

from __future__ import annotations

import atheris

from tests.fuzz.seeds import encoded_requests, recorded_requests
from tlscache.distcache.multiplexer import ConnectUpstream, LocalClient, Multiplexer, ProxyLimits
from tlscache.distcache.protocol import Decoder, Message, encode_response

_STEPS = 12


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mux: Multiplexer[int] = Multiplexer(
        ProxyLimits(
            retry_ms=1 + fdp.ConsumeIntInRange(0, 50),
            idle_ms=fdp.ConsumeIntInRange(0, 100),
            request_timeout_ms=1 + fdp.ConsumeIntInRange(0, 100),
            max_in_flight=1 + fdp.ConsumeIntInRange(0, 8),
            max_clients=1 + fdp.ConsumeIntInRange(0, 4),
        )
    )
    now = 1000.0
    clients: dict[int, LocalClient[int]] = {}
    answers: dict[int, Decoder] = {}  # ctx -> decoder of what it was sent
    upstream = Decoder(expect_response=False)
    sent_up: list[Message] = []  # requests upstream, not yet answered by the fuzzer
    connecting = False
    ctx = 0
    for _ in range(200):
        if fdp.remaining_bytes() == 0:
            break
        step = fdp.ConsumeIntInRange(0, _STEPS - 1)
        if step == 0:
            ctx += 1
            client = mux.add_client(ctx, now)
            if client is not None:
                clients[ctx] = client
                answers[ctx] = Decoder(expect_response=True)
        elif step in (1, 2) and clients:
            key = list(clients)[fdp.ConsumeIntInRange(0, len(clients) - 1)]
            if step == 1:
                size = fdp.ConsumeIntInRange(0, 300)
                mux.client_data(clients[key], fdp.ConsumeBytes(size), now)
            else:
                mux.client_closed(clients.pop(key))
        elif step == 3 and connecting:
            connecting = False
            mux.upstream_connected(now)
            upstream = Decoder(expect_response=False)
            sent_up.clear()
        elif step == 4:
            connecting = False
            mux.upstream_failed(now, "fuzz")
        elif step == 5:
            mux.upstream_data(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 100)), now)
        elif step in (6, 7) and sent_up:
            # Answer requests in flight, well formed, in order or not.
            i = fdp.ConsumeIntInRange(0, len(sent_up) - 1) if step == 7 else 0
            m = sent_up.pop(i)
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            mux.upstream_data(encode_response(m.uid, m.operation, payload), now)
        elif step == 8:
            now += fdp.ConsumeIntInRange(0, 200) / 1000.0
        elif step == 9:
            due = mux.next_deadline()
            if due is not None:
                now = max(now, due)
            mux.handle_timer(now)
        else:
            mux.handle_timer(now)
        out = mux.drain()
        for event in out.events:
            if isinstance(event, ConnectUpstream):
                connecting = True
        assert type(out.upstream) is bytes
        sent_up += upstream.feed(out.upstream)
        assert not upstream.in_message, "part of a request sent upstream"
        for key, chunk in out.writes:
            assert type(chunk) is bytes and chunk, (key, chunk)
            answers[key].feed(chunk)  # raises on a malformed response
            assert not answers[key].in_message, "part of a response written to a client"
        assert mux.next_deadline() is None or isinstance(mux.next_deadline(), float)


def seeds() -> list[bytes]:
    streams = recorded_requests() + encoded_requests()
    out = []
    for i, stream in enumerate(streams[:40]):
        # Settings, then: add client, timer (connect), connected, send, answer, drain.
        head = bytes([i % 7, 3, 10, 2, 1])
        body = bytes([0, 10, 9, 3, 1, 0]) + len(stream[:300]).to_bytes(2, "little")
        out.append(head + body + stream[:300] + bytes([6, 0, 5, 7, 1, 8, 200, 9] * 4))
    return out
