"""dc_test: passes against our dc_server in every mode, refuses bad arguments,
and catches a server that answers wrongly."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path

import pytest

from tests.distcache.fakepeer import fake_peer, reply
from tests.procs import running, tool, wait_proxy_connected
from tlscache.cli.dc_test import main
from tlscache.distcache.client import Client
from tlscache.distcache.protocol import Message, Operation


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize(
    "mode",
    [
        (),
        ("-persistent",),
        ("-persistent", "-concurrency", "4"),
        ("-concurrency", "3"),
        ("-pipeline", "16", "-concurrency", "2"),
    ],
    ids=["per-op", "persistent", "threads", "threads-per-op", "pipelined"],
)
def test_passes_against_dc_server(
    dc_server: str, mode: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run(capsys, "-connect", dc_server, "-sessions", "40", "-ops", "1500", *mode)
    assert code == 0, err
    workers = int(mode[mode.index("-concurrency") + 1]) if "-concurrency" in mode else 1
    assert f"Info, {40 * workers} sessions generated, will run 1500 random tests" in err
    assert "Info, all tests complete" in err
    assert "ops/s, latency p50" in err


@pytest.mark.integration
def test_command_line_entry_point(dc_server_tcp: str) -> None:
    proc = subprocess.run(
        tool("dc_test", "-connect", dc_server_tcp, "-persistent", "-progress", "100"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == "Info, 10 sessions generated, will run 1000 random tests"
    assert "Info, total operations =    1000" in lines
    assert "Info, all tests complete" in lines
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal


@pytest.mark.integration
def test_progress_bar_on_a_terminal(dc_server_unix: str) -> None:
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            tool("dc_test", "-connect", dc_server_unix, "-persistent", "-ops", "3000"),
            stdout=subprocess.DEVNULL,
            stderr=slave,
        )
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once the child has gone
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(master)
    out = b"".join(chunks).decode()
    assert "\r[" in out and "ops/s" in out
    assert "Info, all tests complete" in out


@pytest.mark.integration
def test_big_sessions(dc_server_unix: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ("-connect", dc_server_unix, "-datamin", "3000", "-datamax", "4096", "-idmax", "64")
    code, err = _run(capsys, *args, "-ops", "500", "-pipeline", "4")
    assert code == 0, err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["-connect"],
        ["-connect", "IP:1234"],
        ["-connect", "NOPE:x"],
        ["-connect", "IP:127.0.0.1:1", "-sessions", "0"],
        ["-connect", "IP:127.0.0.1:1", "-sessions", "513"],
        ["-connect", "IP:127.0.0.1:1", "-ops", "1000001"],
        ["-connect", "IP:127.0.0.1:1", "-datamin", "3"],
        ["-connect", "IP:127.0.0.1:1", "-datamax", "4097"],
        ["-connect", "IP:127.0.0.1:1", "-datamin", "200", "-datamax", "100"],
        ["-connect", "IP:127.0.0.1:1", "-idmin", "0"],
        ["-connect", "IP:127.0.0.1:1", "-idmax", "65"],
        ["-connect", "IP:127.0.0.1:1", "-timeout", "3601"],
        ["-connect", "IP:127.0.0.1:1", "-timeout", "5", "-timevar", "5"],
        ["-connect", "IP:127.0.0.1:1", "-sessions", "ten"],
        ["-connect", "IP:127.0.0.1:1", "-bogus"],
        ["-connect", "IP:127.0.0.1:1", "-concurrency", "0"],
        ["-connect", "IP:127.0.0.1:1", "-ops", "2", "-concurrency", "3"],
    ],
)
def test_bad_arguments_exit_1(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    assert "Error, " in capsys.readouterr().err


def test_unreachable_server_is_a_transaction_failure(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "-connect", "UNIX:/nonexistent/dc.sock")
    assert code == 1
    assert "Error, transaction failure" in err
    assert "Info, 0 tests succeeded before the first failure" in err


def _always_yes(m: Message) -> bytes:
    """A broken cache: claims to hold everything and returns junk for GET."""
    return reply(m, b"junk-session" if m.operation is Operation.GET else b"\x00")


def _forgetful(m: Message) -> bytes:
    """A cache that accepts every ADD but never stores anything."""
    return reply(m, b"\x00" if m.operation is Operation.ADD else b"\x01")


def _wrong_uid(m: Message) -> bytes:
    return reply(Message(True, m.uid + 1, m.operation, b""), b"\x01")


@pytest.mark.parametrize("handler", [_always_yes, _forgetful, _wrong_uid])
@pytest.mark.parametrize("mode", [(), ("-pipeline", "4")], ids=["blocking", "pipelined"])
def test_detects_a_wrong_server(
    handler: object, mode: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with fake_peer(handler) as address:  # type: ignore[arg-type]
        code, err = _run(capsys, "-connect", address, "-persistent", "-seed", "7", *mode)
    assert code == 1
    assert "Error, " in err
    assert "tests succeeded before the first failure" in err
    assert "all tests complete" not in err


@pytest.mark.integration
@pytest.mark.parametrize("mode", [(), ("-persistent",), ("-pipeline", "8")])
def test_passes_through_dc_client(
    dc_server_tcp: str, tmp_path: Path, mode: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    local = f"UNIX:{tmp_path / 'dc_client.sock'}"
    argv = tool("dc_client", "-server", dc_server_tcp, "-listen", local)
    with running(argv, ready=local, stderr=subprocess.DEVNULL):
        wait_proxy_connected(local, timeout=10.0)
        code, err = _run(capsys, "-connect", local, "-sessions", "20", "-ops", "800", *mode)
    assert code == 0, err


def test_a_worker_thread_dying_fails_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unforeseen exception in a worker thread must not pass for a complete run."""

    def broken_have(self: Client, session_id: bytes, **kw: object) -> bool:
        raise RuntimeError("unforeseen")

    monkeypatch.setattr(Client, "have", broken_have)
    monkeypatch.setattr("threading.excepthook", lambda args: None)  # keep the output clean
    with fake_peer(_forgetful) as address:
        code, err = _run(
            capsys, "-connect", address, "-persistent", "-concurrency", "2", "-seed", "3"
        )
    assert code == 1
    assert "operations were checked" in err
    assert "all tests complete" not in err


def test_percentiles_are_nearest_rank() -> None:
    from tlscache.cli.dc_test import Report

    report = Report(
        sessions=1,
        ops=100,
        done=100,
        elapsed=1.0,
        latencies_ns=[i * 1000 for i in range(1, 101)],
        error=None,
    )
    assert report.percentile_us(0.5) == 50.0
    assert report.percentile_us(0.99) == 99.0  # not the maximum
    assert report.percentile_us(1.0) == 100.0
    one = Report(sessions=1, ops=1, done=1, elapsed=1.0, latencies_ns=[7000], error=None)
    assert one.percentile_us(0.5) == one.percentile_us(0.99) == 7.0
    assert Report(1, 1, 0, 1.0, [], "x").percentile_us(0.5) == 0.0
