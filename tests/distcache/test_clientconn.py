"""ClientConnection: the client's reply rules, checked with bytes alone."""

from __future__ import annotations

import ast
import inspect
from typing import Any

import pytest

from tlscache.distcache import clientconn
from tlscache.distcache.clientconn import (
    ClientConnection,
    Request,
    add_request,
    get_request,
    have_request,
    remove_request,
)
from tlscache.distcache.protocol import Operation, Result, encode_response
from tlscache.exceptions import ClientError, ServerUnavailable

SID = b"session-id-0001"
SESSION = b"\x30" + b"s" * 140


def answer(uid: int, operation: Operation, payload: bytes) -> bytes:
    return encode_response(uid, operation, payload)


def test_no_io_imports() -> None:
    tree = ast.parse(inspect.getsource(clientconn))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"socket", "asyncio", "selectors", "logging", "ssl", "threading"}


def test_uids_count_from_one_and_wrap() -> None:
    conn = ClientConnection()
    requests = [have_request(SID) for _ in range(3)]
    for request in requests:
        conn.send(request)
    assert [r.uid for r in requests] == [1, 2, 3]
    conn._uid = 0xFFFFFFFF
    last = get_request(SID)
    conn.send(last)
    assert last.uid == 0


def test_every_kind_of_answer() -> None:
    conn = ClientConnection()
    add, get, miss, remove, have = (
        add_request(SID, SESSION, 1000),
        get_request(SID),
        get_request(b"other"),
        remove_request(SID),
        have_request(SID),
    )
    sent: list[Request[Any]] = [add, get, miss, remove, have]
    data = b"".join(conn.send(r) for r in sent)
    assert data[:4] == b"\x00\x11\x00\x00" and data[4] == 0  # requests, protocol level 0x0011
    replies = (
        answer(add.uid, Operation.ADD, b"\x65")
        + answer(get.uid, Operation.GET, SESSION)
        + answer(miss.uid, Operation.GET, b"\x01")
        + answer(remove.uid, Operation.REMOVE, b"\x00")
        + answer(have.uid, Operation.HAVE, b"\x01")
    )
    done = []
    for i in range(len(replies)):  # one byte at a time
        done += conn.receive_data(replies[i : i + 1])
    assert done == [add, get, miss, remove, have]
    assert add.result() is Result.ADD_MATCHING_SESSION
    assert get.result() == SESSION
    assert miss.result() is None
    assert remove.result() is True
    assert have.result() is False


def test_replies_matched_by_uid_in_any_order() -> None:
    conn = ClientConnection()
    first, second = have_request(SID), have_request(b"x")
    conn.send(first)
    conn.send(second)
    assert conn.receive_data(answer(second.uid, Operation.HAVE, b"\x00")) == [second]
    assert not first.done
    assert conn.receive_data(answer(first.uid, Operation.HAVE, b"\x01")) == [first]
    assert (first.result(), second.result()) == (False, True)


@pytest.mark.parametrize("payload", [b"", b"\x02"], ids=["empty", "disconnected"])
def test_proxy_without_server(payload: bytes) -> None:
    conn = ClientConnection()
    request = get_request(SID)
    conn.send(request)
    conn.receive_data(answer(request.uid, Operation.GET, payload))
    with pytest.raises(ServerUnavailable):
        request.result()


@pytest.mark.parametrize(
    ("operation", "payload"),
    [(Operation.HAVE, b"\x00\x00"), (Operation.HAVE, b"\x07"), (Operation.REMOVE, b"\x00")],
    ids=["length", "result", "operation"],
)
def test_wrong_answer_fails_only_its_request(operation: Operation, payload: bytes) -> None:
    conn = ClientConnection()
    request = have_request(SID)
    conn.send(request)
    conn.receive_data(answer(request.uid, operation, payload))
    with pytest.raises(ClientError) as info:
        request.result()
    assert not isinstance(info.value, ServerUnavailable)
    after = have_request(SID)
    conn.send(after)
    assert conn.receive_data(answer(after.uid, Operation.HAVE, b"\x00")) == [after]


@pytest.mark.parametrize(
    "reply",
    [
        answer(99, Operation.HAVE, b"\x00"),  # a uid nobody sent
        b"GARBAGE-GARBAGE-GARBAGE",
        answer(1, Operation.HAVE, b"\x00") + b"\x00\x11",  # then half a frame nobody asked for
    ],
    ids=["uid", "garbage", "extra"],
)
def test_out_of_step_raises(reply: bytes) -> None:
    conn = ClientConnection("IP:127.0.0.1:1")
    conn.send(have_request(SID))
    with pytest.raises(ClientError) as info:
        conn.receive_data(reply)
    assert not isinstance(info.value, ServerUnavailable)


def test_owed_replies_are_settled_in_order_and_counted() -> None:
    conn = ClientConnection()
    owed = [add_request(SID, SESSION, 1000) for _ in range(4)]
    for request in owed:
        conn.send_nowait(request)
        conn.owe(request)
    assert conn.owed == 4
    have = have_request(SID)
    conn.send(have)
    replies = (
        answer(owed[0].uid, Operation.ADD, b"\x00")  # stored
        + answer(owed[1].uid, Operation.ADD, b"\x65")  # one with this id exists: stored
        + answer(owed[2].uid, Operation.ADD, b"\x66")  # refused
        + answer(owed[3].uid, Operation.ADD, b"")  # no server
        + answer(have.uid, Operation.HAVE, b"\x00")
    )
    assert conn.receive_data(replies) == [have]
    assert conn.owed == 0
    assert conn.take_write_failures() == 2
    assert conn.take_write_failures() == 0


@pytest.mark.parametrize(
    "bad",
    [
        lambda uid: answer(uid + 1, Operation.ADD, b"\x00"),
        lambda uid: answer(uid, Operation.REMOVE, b"\x00"),
        lambda uid: answer(uid, Operation.ADD, b"\x00\x00\x00"),
    ],
    ids=["uid", "operation", "length"],
)
def test_mismatched_owed_reply_is_out_of_step(bad: object) -> None:
    conn = ClientConnection()
    request = add_request(SID, SESSION, 1000)
    conn.send_nowait(request)
    conn.owe(request)
    conn.send(have_request(SID))
    with pytest.raises(ClientError):
        conn.receive_data(bad(request.uid))  # type: ignore[operator]
    assert conn.owed == 1  # not consumed: the reply never counted as read
    assert conn.abandon() == 1
    assert conn.owed == 0


def test_a_write_that_never_went_out_is_not_owed() -> None:
    conn = ClientConnection()
    request = add_request(SID, SESSION, 1000)
    data = conn.send_nowait(request)
    assert data and conn.owed == 0
    assert conn.abandon() == 0


def test_resend_keeps_the_uid() -> None:
    broken, fresh = ClientConnection(), ClientConnection()
    for _ in range(6):
        broken.send(have_request(SID))
    request = get_request(SID)
    data = broken.send(request)
    assert broken.reply_started is False
    assert fresh.send(request) == data  # same bytes, same uid
    fresh.receive_data(answer(request.uid, Operation.GET, SESSION))
    assert request.result() == SESSION


def test_reply_started() -> None:
    conn = ClientConnection()
    owed = add_request(SID, SESSION, 1000)
    conn.send_nowait(owed)
    conn.owe(owed)
    request = get_request(SID)
    conn.send(request)
    started = []
    conn.receive_data(answer(owed.uid, Operation.ADD, b"\x00")[:5])
    started.append(conn.reply_started)  # part of an owed reply: no
    conn.receive_data(answer(owed.uid, Operation.ADD, b"\x00")[5:])
    started.append(conn.reply_started)  # nothing of the GET reply yet: no
    reply = answer(request.uid, Operation.GET, SESSION)
    conn.receive_data(reply[:20])
    started.append(conn.reply_started)
    assert started == [False, False, True]
    assert conn.receive_data(reply[20:]) == [request]


def test_bad_add_arguments_refused_before_any_bytes() -> None:
    for sid, data, timeout in [
        (b"", b"d", 1),
        (b"i" * 65, b"d", 1),
        (SID, b"", 1),
        (SID, b"d", -1),
    ]:
        with pytest.raises(ValueError):
            add_request(sid, data, timeout)


def test_result_before_the_reply_is_an_error() -> None:
    request = get_request(SID)
    with pytest.raises(RuntimeError):
        request.result()
