"""dc_client's command line: C switch names, ranges and error exits."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.procs import running, tool
from tlscache.cli.dc_client import build_parser, main


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "Error, no server specified!"),
        (("-server", "IP:127.0.0.1:1", "-connect", "IP:127.0.0.1:2"), "more than once"),
        (("-server", "IP:9999"), "listen-only"),
        (("-server", "IP:127.0.0.1:1", "-retry", "0"), "out of range"),
        (("-server", "IP:127.0.0.1:1", "-retry", "3600001"), "out of range"),
        (("-server", "IP:127.0.0.1:1", "-retry", "5s"), "not a decimal"),
        (("-server", "IP:127.0.0.1:1", "-idle", "3600001"), "out of range"),
        (("-server", "IP:127.0.0.1:1", "-listen", "TCP:1"), "Error,"),
        (("-server",), "expected one argument"),
        (("-server", "IP:127.0.0.1:1", "-bogus"), "unrecognized"),
        (("-server", "IP:127.0.0.1:1", "--loop", "tokio"), "invalid choice"),
    ],
)
def test_bad_arguments_exit_1(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, err = run_main(capsys, *argv)
    assert code == 1
    assert message in err


def test_unbindable_listen_address(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_main(
        capsys, "-server", "IP:127.0.0.1:1", "-listen", f"UNIX:{tmp_path}/no/such/dir/s"
    )
    assert code == 1
    assert "Error, bad listen address" in err


def test_address_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err = run_main(capsys, "-server", "IP:127.0.0.1:1", "-listen", f"IP:127.0.0.1:{port}")
    assert code == 1
    assert f"Error, address already in use: IP:127.0.0.1:{port}" in err


def test_usage_shows_the_required_server_without_brackets() -> None:
    usage = build_parser().format_usage()
    assert " -server ADDR " in usage and "[-server ADDR" not in usage
    assert "[-listen ADDR]" in usage


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("-h", "-help", "-?", "--help"):
        code, _ = run_main(capsys, flag)
        assert code == 0
        out = capsys.readouterr()
    help_text = build_parser().format_help()
    for switch in (
        "-listen",
        "-server",
        "-connect",
        "-retry",
        "-idle",
        "-daemon",
        "-pidfile",
        "-user",
        "-sockowner",
        "-sockgroup",
        "-sockperms",
        "-killable",
        "--request-timeout",
        "--max-in-flight",
        "--max-clients",
        "--evict-idle",
        "--client-in-flight",
        "--client-output-budget",
        "--write-stall-timeout",
        "--max-buffered",
        "--loop",
    ):
        assert switch in help_text
    del out


def test_defaults() -> None:
    args = build_parser().parse_args(["-connect", "IP:127.0.0.1:9"])
    assert args.retry == 5000 and args.idle == 0 and args.listen is None
    assert args.max_in_flight == 512 and args.max_clients == 1024


def test_hardening_defaults_are_documented_in_help() -> None:
    args = build_parser().parse_args(["-connect", "IP:127.0.0.1:9"])
    assert (args.client_in_flight, args.evict_idle) == (16, 1000)
    assert (args.client_output_budget, args.write_stall_timeout) == (262144, 10000)
    assert args.max_buffered == 32 * 1024 * 1024
    help_text = " ".join(build_parser().format_help().split())
    for default in ("(default 16)", "(default 1000)", "(default 262144)", "(default 10000)"):
        assert default in help_text
    assert "(default 33554432)" in help_text


@pytest.mark.integration
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_runs_as_module_and_stops_cleanly(dc_server_tcp: str, tmp_path: Path, loop: str) -> None:
    sock = tmp_path / "c.sock"
    pidfile = tmp_path / "pid"
    argv = tool(
        "dc_client",
        "-listen",
        f"UNIX:{sock}",
        "-connect",
        dc_server_tcp,
        "-sockperms",
        "0600",
        "-pidfile",
        str(pidfile),
        "--loop",
        loop,
    )
    with running(argv, ready=f"UNIX:{sock}") as proc:
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert pidfile.read_text() == str(proc.pid)
        result = subprocess.run(
            tool(
                "dc_test",
                "-connect",
                f"UNIX:{sock}",
                "-sessions",
                "5",
                "-ops",
                "100",
                "-persistent",
            ),
            capture_output=True,
            timeout=60,
        )
        # The first requests may race dc_client's first connect ("no server" answers).
        if result.returncode != 0:
            result = subprocess.run(
                tool("dc_test", "-connect", f"UNIX:{sock}", "-sessions", "5", "-ops", "100"),
                capture_output=True,
                timeout=60,
            )
        assert result.returncode == 0, result.stderr.decode()
        proc.send_signal(2)  # SIGINT
        assert proc.wait(timeout=30) == 0
    assert not sock.exists()


@pytest.mark.integration
def test_killable_sigusr1(dc_server_tcp: str, tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    argv = tool("dc_client", "-listen", f"UNIX:{sock}", "-server", dc_server_tcp)
    with running(argv, ready=f"UNIX:{sock}") as proc:
        proc.send_signal(10)  # SIGUSR1 is ignored without -killable
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=0.3)
    with running([*argv, "-killable"], ready=f"UNIX:{sock}") as proc:
        proc.send_signal(10)
        assert proc.wait(timeout=30) == 0
