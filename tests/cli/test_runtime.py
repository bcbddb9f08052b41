"""The run-time helpers shared by the long-running tools: stop signals, loops, socket files."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlscache.cli import dc_server, runtime
from tlscache.cli.options import Parser
from tlscache.distcache.address import UnixAddress, parse_address
from tlscache.distcache.sockets import listen

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def restore_signals() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_signal_before_the_loop_is_recorded_then_stops_it() -> None:
    signals = runtime.StopSignals(killable=True)
    os.kill(os.getpid(), signal.SIGUSR1)  # start-up goes on
    assert signals.requested
    stopped: list[bool] = []
    loop = asyncio.new_event_loop()
    try:
        signals.attach(loop, lambda: stopped.append(True))
    finally:
        loop.close()
    assert stopped == [True]


def test_signal_in_the_loop_calls_stop() -> None:
    signals = runtime.StopSignals(killable=False)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN

    async def scenario() -> None:
        stop = asyncio.Event()
        signals.attach(asyncio.get_running_loop(), stop.set)
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), 5)

    asyncio.run(scenario())
    assert signals.received == [signal.SIGTERM]


def test_usr_signals_left_alone_when_asked() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    runtime.StopSignals(usr_signals=False)
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_dc_server_stop_during_start_up_finishes_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop signal while dc_server starts does not cut a start-up step in two."""
    import tlscache.cli.daemon as daemon

    real_write = daemon.write_pidfile

    def write_after_signal(path: str) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        real_write(path)

    monkeypatch.setattr(daemon, "write_pidfile", write_after_signal)
    pidfile = tmp_path / "pid"
    sock_path = tmp_path / "sock"
    with pytest.raises(SystemExit) as info:
        dc_server.main(["-listen", f"UNIX:{sock_path}", "-pidfile", str(pidfile), "--quiet"])
    assert info.value.code == 0
    assert pidfile.read_text() == str(os.getpid())
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(OSError):
        probe.connect(str(sock_path))  # the listener was closed


def test_loop_option_and_factory() -> None:
    parser = Parser("tool", "")
    runtime.add_loop_option(parser)
    assert parser.parse_args([]).loop == "auto"
    assert runtime.loop_name(runtime.checked_loop_factory("asyncio")) == "asyncio"
    loop = runtime.new_loop("asyncio")
    loop.close()


def test_socket_file_removed_only_if_still_ours(tmp_path: Path) -> None:
    addr = parse_address(f"UNIX:{tmp_path / 's'}")
    assert isinstance(addr, UnixAddress)
    listen(addr).close()
    inode = runtime.socket_file_inode(addr)
    runtime.remove_socket_file(addr, inode)
    assert not os.path.exists(addr.path)
    listen(addr).close()  # replaced by someone else: a different inode, kept
    (tmp_path / "other").touch()
    runtime.remove_socket_file(addr, (tmp_path / "other").stat().st_ino)
    assert os.path.exists(addr.path)
    assert runtime.socket_file_inode(parse_address("IP:127.0.0.1:1")) is None
