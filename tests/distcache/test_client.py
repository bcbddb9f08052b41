"""The blocking Client against a real dc_server and against scripted peers."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.distcache.fakepeer import fake_peer, reply, silent_peer
from tests.procs import free_port, running, tool
from tlscache.deadline import Deadline
from tlscache.distcache.client import Client
from tlscache.distcache.protocol import MAX_PAYLOAD, Message, Operation, Result
from tlscache.exceptions import AddressError, ClientError, ClientTimeout, ServerUnavailable

SID = b"session-id-0001"


@pytest.mark.integration
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-op"])
def test_every_operation(dc_server: str, persistent: bool) -> None:
    with Client(dc_server, persistent=persistent) as client:
        assert client.get(SID) is None
        assert client.have(SID) is False
        assert client.remove(SID) is False
        assert client.add(SID, b"D" * 1500, 60_000) is Result.OK
        assert client.add(SID, b"E" * 1500, 60_000) is Result.ADD_MATCHING_SESSION
        assert client.have(SID) is True
        assert client.get(SID) == b"D" * 1500
        assert client.remove(SID) is True
        assert client.get(SID) is None
        assert client.have(SID) is False


@pytest.mark.integration
def test_biggest_session_round_trips(dc_server_tcp: str) -> None:
    sid = b"x" * 64
    data = os.urandom(MAX_PAYLOAD - 8 - len(sid))  # 16 frames each way
    with Client(dc_server_tcp) as client:
        assert client.add(sid, data, 10_000) is Result.OK
        assert client.get(sid) == data
        with pytest.raises(ValueError):
            client.add(b"y" * 64, data + b"!", 10_000)  # one byte too many: never sent


def test_add_arguments_checked_before_sending() -> None:
    with silent_peer() as address, Client(address, deadline_ms=50) as client:
        for sid, data, timeout in [
            (b"", b"data", 1000),
            (b"i" * 65, b"data", 1000),
            (SID, b"", 1000),
            (SID, b"data", 604_800_001),
            (SID, b"data", -1),
        ]:
            with pytest.raises(ValueError):
                client.add(sid, data, timeout)


def test_listen_only_address_refused() -> None:
    with pytest.raises(AddressError):
        Client("IP:9999")


def test_deadline_against_a_server_that_never_answers() -> None:
    # The peer never answers: without the deadline a call would wait forever, so the
    # upper bounds are loose (a loaded machine adds scheduling delay, not tens of seconds).
    with silent_peer() as address, Client(address, deadline_ms=200) as client:
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            client.get(SID)
        took = time.monotonic() - started
        assert 0.15 < took < 20.0, f"took {took:.3f} s for a 200 ms deadline"
    # A call's own deadline wins over the client's (60 s here: waiting for it would show).
    with silent_peer() as address, Client(address, deadline_ms=60_000) as client:
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            client.have(SID, deadline=Deadline.after_ms(50))
        took = time.monotonic() - started
        assert 0.04 < took < 30.0, f"took {took:.3f} s for a 50 ms call deadline"


def test_a_spent_deadline_is_a_timeout_before_any_connect() -> None:
    accepted: list[Message] = []
    with fake_peer(lambda m: accepted.append(m)) as address:
        with Client(address, deadline_ms=60_000) as client:
            spent = Deadline.after_ms(0)
            for call in (
                lambda: client.get(SID, deadline=spent),
                lambda: client.add_nowait(SID, b"data", 1000, deadline=spent),
            ):
                started = time.monotonic()
                with pytest.raises(ClientTimeout):
                    call()
                took = time.monotonic() - started
                # Not the client's 60 s deadline: the spent one, at once.
                assert took < 30.0, f"took {took:.3f} s"
            assert client._idle == []
        time.sleep(0.2)  # a request that was sent would have reached the peer by now
    assert accepted == [], accepted  # nothing was ever sent


def test_connection_refused_is_a_client_error() -> None:
    with Client(f"IP:127.0.0.1:{free_port()}") as client, pytest.raises(ClientError):
        client.get(SID)
    with Client("UNIX:/nonexistent/dc.sock") as client, pytest.raises(ClientError):
        client.get(SID)


@pytest.mark.parametrize("payload", [b"", b"\x02"], ids=["empty", "disconnected"])
def test_proxy_without_server_is_server_unavailable(payload: bytes) -> None:
    with fake_peer(lambda m: reply(m, payload)) as address, Client(address) as client:
        with pytest.raises(ServerUnavailable):
            client.get(SID)
        with pytest.raises(ServerUnavailable):
            client.have(SID)
        with pytest.raises(ServerUnavailable):
            client.add(SID, b"data", 1000)
        with pytest.raises(ServerUnavailable):
            client.remove(SID)


def test_short_get_reply_is_a_miss() -> None:
    with fake_peer(lambda m: reply(m, b"\x00abc")) as address, Client(address) as client:
        assert client.get(SID) is None


def _wrong_uid(m: Message) -> bytes:
    return reply(Message(True, (m.uid + 1) & 0xFFFFFFFF, m.operation, b""), b"\x00")


def _wrong_op(m: Message) -> bytes:
    return reply(Message(True, m.uid, Operation.REMOVE, b""), b"\x00")


@pytest.mark.parametrize(
    "handler",
    [
        _wrong_uid,
        _wrong_op,
        lambda m: reply(m, b"\x00\x00"),  # HAVE answered with two bytes
        lambda m: reply(m, b"\x07"),  # unknown result
        lambda m: b"GARBAGE-GARBAGE-GARBAGE",
        lambda m: None,  # connection closed without a reply
    ],
    ids=["uid", "operation", "length", "result", "garbage", "eof"],
)
def test_bad_replies_are_client_errors(handler: object) -> None:
    with fake_peer(handler) as address, Client(address) as client:  # type: ignore[arg-type]
        with pytest.raises(ClientError) as info:
            client.have(SID)
        assert not isinstance(info.value, ServerUnavailable)


def test_broken_connection_is_not_reused() -> None:
    calls: list[int] = []

    def handler(m: Message) -> bytes:
        calls.append(m.uid)
        return reply(m, b"\x00" if len(calls) != 2 else b"\x09")

    with fake_peer(handler) as address, Client(address) as client:
        assert client.have(SID) is True
        with pytest.raises(ClientError):
            client.have(SID)
        assert client.have(SID) is True  # a fresh connection, not the poisoned one
        assert not client._idle or len(client._idle) == 1


@pytest.mark.integration
def test_reconnects_after_server_restart(tmp_path: Path) -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_server", "-listen", address)
    with Client(address, deadline_ms=3000) as client:
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            assert client.add(SID, b"D" * 200, 60_000) is Result.OK
            assert client.have(SID) is True
        with pytest.raises(ClientError):
            client.have(SID)  # nobody listening now
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            assert client.have(SID) is False  # new server, empty cache
            assert client.add(SID, b"D" * 200, 60_000) is Result.OK
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            # The pooled connection died with the old server: retried transparently.
            assert client.have(SID) is False


@pytest.mark.integration
def test_threads_share_one_client(dc_server_tcp: str) -> None:
    errors: list[BaseException] = []
    client = Client(dc_server_tcp, pool_size=4, deadline_ms=5000)

    def work(n: int) -> None:
        try:
            for i in range(150):
                sid = f"t{n}-{i}".encode()
                data = bytes([n]) * (100 + i)
                assert client.add(sid, data, 60_000) is Result.OK
                assert client.get(sid) == data
                assert client.remove(sid) is True
                assert client.have(sid) is False
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    client.close()
    assert not errors
    assert len(client._idle) == 0


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_uses_its_own_connection(dc_server_unix: str) -> None:
    with Client(dc_server_unix) as client:
        assert client.add(SID, b"parent" * 20, 60_000) is Result.OK
        parent_conn = client._idle[0]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            ok = client.get(SID) == b"parent" * 20 and client._idle[0] is not parent_conn
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client._idle == [parent_conn]
        assert client.have(SID) is True  # the parent's connection survived the child


def test_closed_client_refuses_calls() -> None:
    with silent_peer() as address:
        client = Client(address)
        client.close()
        with pytest.raises(ClientError):
            client.get(SID)


def test_connection_that_timed_out_is_not_reused() -> None:
    seen: list[int] = []

    def handler(m: Message) -> bytes:
        seen.append(m.uid)
        if len(seen) == 1:
            time.sleep(0.3)
        return reply(m, b"\x00")

    with fake_peer(handler) as address, Client(address) as client:
        with pytest.raises(ClientTimeout):
            client.have(SID, deadline=Deadline.after_ms(100))
        assert client.have(SID) is True  # a new connection: the stale reply is never read
        assert len(client._idle) == 1


def test_call_finishing_during_close_does_not_refill_the_pool() -> None:
    """close() racing with a call that returns its connection: nothing stays open."""
    with fake_peer(lambda m: reply(m, b"\x00")) as address:
        client = Client(address)
        real_lock = client._lock

        class CloseWhileWaiting:
            """The lock; at check-in a close() from another thread wins it just before us."""

            entered = 0

            def __enter__(self) -> None:
                self.entered += 1
                if self.entered == 2:  # 1: check-out, 2: check-in
                    client._lock = real_lock
                    client.close()
                real_lock.acquire()

            def __exit__(self, *exc: object) -> None:
                real_lock.release()

        client._lock = CloseWhileWaiting()  # type: ignore[assignment]
        assert client.have(SID) is True
        assert client._idle == []


# ------------------------------------------------------------ add_nowait (pipelined ADDs)


@pytest.mark.integration
def test_add_nowait_then_get_on_the_same_client(dc_server: str) -> None:
    with Client(dc_server) as client:
        client.add_nowait(SID, b"D" * 1500, 60_000)
        assert len(client._idle) == 1
        assert client._idle[0].proto.owed != 0  # the reply is owed, not read
        assert client.get(SID) == b"D" * 1500  # reads the owed reply first, same connection
        assert len(client._idle) == 1
        assert not client._idle[0].proto.owed
        client.add_nowait(SID, b"E" * 1500, 60_000)  # ADD_MATCHING_SESSION: counts as stored
        assert client.have(SID) is True
        assert client.nowait_failures == 0


@pytest.mark.integration
@pytest.mark.parametrize("finish", ["close", "drain"])
def test_many_add_nowait_all_stored(dc_server_tcp: str, finish: str) -> None:
    sids = [f"many-{i}".encode() for i in range(300)]
    client = Client(dc_server_tcp, max_owed=16)
    for sid in sids:
        client.add_nowait(sid, sid * 10, 60_000)
        assert client._idle[0].proto.owed <= 16  # bounded: read before sending more
    if finish == "drain":
        assert client.drain() is True
        assert not client._idle[0].proto.owed
    client.close()
    assert client.nowait_failures == 0
    with Client(dc_server_tcp) as check:
        assert all(check.get(sid) == sid * 10 for sid in sids)


@pytest.mark.integration
def test_add_nowait_replies_count_as_confirmed_once_read(dc_server_unix: str) -> None:
    """A sent ADD proves nothing about the server; its reply, once read, does."""
    with Client(dc_server_unix) as client:
        client.add_nowait(SID, b"D" * 200, 60_000)
        assert client.nowait_confirmed == 0  # sent, not answered as far as we know
        assert client.have(SID) is True  # reads the owed reply first
        assert (client.nowait_confirmed, client.nowait_failures) == (1, 0)
        client.add_nowait(b"2" + SID, b"D" * 200, 60_000)
        assert client.drain() is True
        assert (client.nowait_confirmed, client.nowait_failures) == (2, 0)


def test_owed_error_replies_do_not_break_the_next_call() -> None:
    answers = {Operation.ADD: b"\x66", Operation.HAVE: b"\x00", Operation.GET: b"\x01"}
    with fake_peer(lambda m: reply(m, answers[m.operation])) as address, Client(address) as client:
        client.add_nowait(SID, b"data", 1000)  # refused: ADD_TIMEOUT_RANGE
        client.add_nowait(SID, b"data", 1000)
        assert client.have(SID) is True
        assert client.nowait_failures == 2
        assert len(client._idle) == 1  # a refusal is an answer: the connection stays
        answers[Operation.ADD] = b""  # dc_client's "no server"
        client.add_nowait(SID, b"data", 1000)
        assert client.get(SID) is None
        assert client.nowait_failures == 3
        assert len(client._idle) == 1


@pytest.mark.integration
def test_owed_duplicate_id_against_dc_server(dc_server_unix: str) -> None:
    with Client(dc_server_unix) as client:
        for _ in range(5):
            client.add_nowait(SID, b"D" * 300, 60_000)  # 0x65 four times: "stored"
        assert client.get(SID) == b"D" * 300
        assert client.nowait_failures == 0


@pytest.mark.parametrize("bad", ["uid", "operation", "garbage"])
def test_mismatched_owed_reply_discards_the_connection(bad: str) -> None:
    conns: list[int] = []

    def handler(m: Message) -> bytes:
        if m.operation != Operation.ADD:
            return reply(m, b"\x00")
        conns.append(m.uid)
        if bad == "uid":
            return _wrong_uid(m)
        if bad == "operation":
            return _wrong_op(m)
        return reply(m, b"\x00\x00\x00")  # an ADD answered with three bytes

    with fake_peer(handler) as address, Client(address) as client:
        client.add_nowait(SID, b"data", 1000)
        owing = client._idle[0]
        assert client.have(SID) is True  # resent on a fresh connection
        assert client.nowait_failures == 1
        assert client._idle and client._idle[0] is not owing
        assert owing.sock.fileno() == -1  # closed, never reused


@pytest.mark.integration
def test_server_dies_with_replies_owed() -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_server", "-listen", address)
    with Client(address, deadline_ms=3000) as client:
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            for i in range(10):
                client.add_nowait(b"%d" % i + SID, b"D" * 200, 60_000)
        # Nobody listening: the broken connection is dropped, the new one refused.
        # Refused, not timed out: a ClientTimeout would mean it waited for the 30 s.
        with pytest.raises(ClientError) as info:
            client.have(SID, deadline=Deadline.after_ms(30_000))
        assert not isinstance(info.value, ClientTimeout), info.value
        assert not client._idle
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            client.add_nowait(SID, b"D" * 200, 60_000)
        with running(argv, ready=address, stderr=subprocess.DEVNULL):
            # The pooled connection (owing one reply) died with the old server: the
            # send goes out on a fresh connection, and so does the next call.
            assert client.have(SID) is False
            client.add_nowait(SID, b"D" * 200, 60_000)
            assert client.have(SID) is True
            assert len(client._idle) == 1


def test_owed_replies_that_never_come_cost_at_most_the_deadline() -> None:
    # The peer never answers: the upper bounds only say "not forever, not the 60 s".
    with silent_peer() as address, Client(address, deadline_ms=60_000, max_owed=2) as client:
        client.add_nowait(SID, b"data", 1000)
        client.add_nowait(SID, b"data", 1000)  # never blocks while under the bound
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            # 2 owed: waits for them, in vain, for as long as the call's deadline
            client.add_nowait(SID, b"data", 1000, deadline=Deadline.after_ms(100))
        took = time.monotonic() - started
        assert 0.05 < took < 30.0, f"took {took:.3f} s for a 100 ms deadline"
        assert client.nowait_failures == 2
        assert not client._idle  # discarded
        client.add_nowait(SID, b"data", 1000)  # a fresh connection
        started = time.monotonic()
        with pytest.raises(ClientTimeout):
            client.get(SID, deadline=Deadline.after_ms(50))
        took = time.monotonic() - started
        assert took < 30.0, f"took {took:.3f} s for a 50 ms deadline"
        assert client.nowait_failures == 3
    assert client.drain() is True


@pytest.mark.integration
def test_add_nowait_per_op_mode_is_a_blocking_add(dc_server_tcp: str) -> None:
    with Client(dc_server_tcp, persistent=False) as client:
        client.add_nowait(SID, b"D" * 100, 60_000)
        assert client._idle == []
        assert client.have(SID) is True
        with pytest.raises(ValueError):
            client.add_nowait(SID, b"", 60_000)


@pytest.mark.integration
def test_threads_hammer_add_nowait_and_get(dc_server_tcp: str) -> None:
    errors: list[BaseException] = []
    client = Client(dc_server_tcp, pool_size=3, deadline_ms=5000, max_owed=8)
    # 480 sessions: within dc_server's default capacity of 512.
    sids = [[f"h{n}-{i}".encode() for i in range(80)] for n in range(6)]

    def work(n: int) -> None:
        try:
            for sid in sids[n]:
                client.add_nowait(sid, sid * 8, 60_000)
                got = client.get(sid)
                # Usually the same connection (so in order); another one may overtake.
                assert got in (sid * 8, None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    client.close()
    assert not errors
    assert client.nowait_failures == 0
    assert client._idle == []
    with Client(dc_server_tcp) as check:
        assert all(check.have(sid) for group in sids for sid in group)


@pytest.mark.integration
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_reads_the_parents_owed_replies(dc_server_unix: str) -> None:
    with Client(dc_server_unix) as client:
        client.add_nowait(SID, b"parent" * 20, 60_000)
        parent_conn = client._idle[0]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            client.add_nowait(b"child", b"child" * 20, 60_000)
            ok = client._idle[0] is not parent_conn and client.get(b"child") == b"child" * 20
            client.close()
            os._exit(0 if ok and client.nowait_failures == 0 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert client._idle == [parent_conn] and parent_conn.proto.owed == 1
        assert client.get(SID) == b"parent" * 20
        assert client.nowait_failures == 0
