"""dc_snoop's command line."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from tests.procs import free_port, tool, wait_connectable
from tlscache.cli.dc_snoop import build_parser, main


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    code = info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "Error, must provide -listen"),
        (("-listen", "IP:127.0.0.1:1"), "Error, no server specified!"),
        (("-listen", "IP:1", "-server", "IP:2"), "listen-only"),
        (
            ("-listen", "IP:1", "-server", "IP:127.0.0.1:2", "-connect", "IP:127.0.0.1:3"),
            "more than once",
        ),
        (("-listen", "NOPE", "-server", "IP:127.0.0.1:2"), "Error,"),
    ],
)
def test_bad_arguments_exit_1(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    code, err = run_main(capsys, *argv)
    assert code == 1
    assert message in err


def test_address_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, err = run_main(capsys, "-listen", f"IP:127.0.0.1:{port}", "-server", "IP:127.0.0.1:1")
    assert code == 1
    assert f"Error, address already in use: IP:127.0.0.1:{port}" in err


def test_usage_shows_required_switches_without_brackets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    usage = build_parser().format_usage()
    assert " -listen ADDR -server ADDR " in usage
    assert "[-listen" not in usage and "[-server" not in usage
    code, err = run_main(capsys, "-bogus")  # the usage printed with an error is the same
    assert code == 1 and " -listen ADDR -server ADDR " in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_main(capsys, "-help")
    assert code == 0


@pytest.mark.integration
def test_json_to_stdout_and_quiet(dc_server_tcp: str, tmp_path: Path) -> None:
    address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_snoop", "-listen", address, "-server", dc_server_tcp, "-json", "-", "-quiet")
    out_path = tmp_path / "out.jsonl"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE)
        try:
            wait_connectable(address, proc=proc)
            result = subprocess.run(
                tool("dc_test", "-connect", address, "-sessions", "4", "-ops", "30", "-persistent"),
                capture_output=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr.decode()
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0
    assert err == b""  # -quiet: no text lines
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert sum(1 for r in records if r.get("dir") == "client->server" and "op" in r) == 30
    assert sum(1 for r in records if r.get("dir") == "server->client" and "op" in r) == 30
    assert all(isinstance(r["time"], float) for r in records)
