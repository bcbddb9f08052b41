"""dc_server's command line: C switches, our extras, start-up failures, signals, pid file."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.procs import free_port, running, tool, wait_connectable
from tlscache.cli.dc_server import main
from tlscache.distcache.address import parse_address
from tlscache.distcache.protocol import Decoder, encode_have
from tlscache.distcache.sockets import connect


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "Error, " in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "must provide -listen"),
        (["-listen"], "-listen"),
        (["-listen", "BOGUS:1"], "unknown address prefix"),
        (["-listen", "IP:127.0.0.1:99999"], "out of range"),
        (["-listen", "IP:127.0.0.1:1", "-sessions", "63"], "-sessions 63 out of range"),
        (["-listen", "IP:127.0.0.1:1", "-sessions", "60001"], "--allow-large"),
        (["-listen", "IP:127.0.0.1:1", "-sessions", "abc"], "not a decimal"),
        (["-listen", "IP:127.0.0.1:1", "-progress", "1000001"], "out of range"),
        (["-listen", "IP:127.0.0.1:1", "-sockperms", "999"], "octal"),
        (["-listen", "IP:127.0.0.1:1", "--read-timeout", "x"], "seconds"),
        (["-listen", "IP:127.0.0.1:1", "--loop", "tokio"], "invalid choice"),
        (["-listen", "IP:127.0.0.1:1", "--max-in-flight", "0"], "out of range"),
        (["-listen", "IP:127.0.0.1:1", "--max-buffered", "x"], "not a decimal"),
        (["-listen", "IP:127.0.0.1:1", "-bogus"], "unrecognized arguments: -bogus"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert message in fails(argv, capsys)


def test_unbindable_address(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "cannot listen on" in fails(["-listen", f"IP:127.0.0.1:{port}"], capsys)


def test_unix_path_that_is_not_a_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "regular-file"
    target.write_text("keep me")
    assert "not a socket" in fails(["-listen", f"UNIX:{target}"], capsys)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("switch", ["-h", "-help", "-?", "--help"])
def test_help(switch: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([switch])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "-listen" in out and "-sessions" in out and "--read-timeout" in out
    for option in ("--max-connections", "--max-in-flight", "--output-budget", "--max-buffered"):
        assert option in out


def have_works(address: str) -> bool:
    with connect(parse_address(address), timeout=5) as sock:
        sock.sendall(encode_have(4, b"x"))
        decoder = Decoder(expect_response=True)
        while not (msgs := decoder.feed(sock.recv(100))):
            pass
        return msgs[0].payload == b"\x01"


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(sig: signal.Signals, tmp_path: Path) -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    pidfile = tmp_path / "dc_server.pid"
    argv = tool("dc_server", "-listen", address, "-pidfile", str(pidfile), "-sessions", "64")
    with running(argv, ready=address) as proc:
        assert have_works(address)  # the pid file is written before the loop serves
        assert pidfile.read_text() == str(proc.pid)
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        out = proc.stdout.read() if proc.stdout else b""
    assert out == b""


@pytest.mark.integration
def test_usr1_ignored_unless_killable() -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address), ready=address) as proc:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.3)
        assert proc.poll() is None
        assert have_works(address)
    address = f"IP:127.0.0.1:{free_port()}"
    with running(tool("dc_server", "-listen", address, "-killable"), ready=address) as proc:
        proc.send_signal(signal.SIGUSR2)
        assert proc.wait(timeout=10) == 0


@pytest.mark.integration
def test_unix_socket_with_sockperms(tmp_path: Path) -> None:
    path = tmp_path / "perm.sock"
    address = f"UNIX:{path}"
    argv = tool("dc_server", "-listen", address, "-sockperms", "0600", "--loop", "asyncio")
    with running(argv, ready=address):
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert have_works(address)


@pytest.mark.integration
def test_two_listeners_share_one_cache(tmp_path: Path) -> None:
    tcp = f"IP:127.0.0.1:{free_port()}"
    unix = f"UNIX:{tmp_path / 'both.sock'}"
    argv = tool("dc_server", "-listen", tcp, "-listen", unix, "--loop", "uvloop")
    with running(argv, ready=tcp):
        wait_connectable(unix)
        assert have_works(tcp) and have_works(unix)


@pytest.mark.integration
def test_daemon_with_pidfile(tmp_path: Path) -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    pidfile = tmp_path / "daemon.pid"
    argv = tool("dc_server", "-listen", address, "-daemon", "-pidfile", str(pidfile))
    done = subprocess.run(argv, capture_output=True, timeout=20, check=False)
    assert done.returncode == 0
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    try:
        wait_connectable(address)
        assert have_works(address)
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("daemon did not exit on SIGTERM")


@pytest.mark.integration
def test_fd_listener_serves_one_connection_then_exits() -> None:
    """``-listen FD:n`` with a connected socket: serve it, exit 0 when it closes (as C)."""
    ours, theirs = socket.socketpair()
    with ours:
        argv = tool("dc_server", "-listen", f"FD:{theirs.fileno()}")
        proc = subprocess.Popen(
            argv, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        theirs.close()
        try:
            ours.settimeout(10)
            ours.sendall(encode_have(6, b"fd"))
            decoder = Decoder(expect_response=True)
            while not (msgs := decoder.feed(ours.recv(100))):
                pass
            assert (msgs[0].uid, msgs[0].payload) == (6, b"\x01")
            ours.shutdown(socket.SHUT_RDWR)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
