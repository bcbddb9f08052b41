"""dc_snoop: the relay as a real process (the analyser alone: test_analyser.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import free_port, running, tool
from tlscache.distcache.protocol import encode_get, encode_have, encode_response

# ---------------------------------------------------------------- real processes


class Snoop:
    """A running dc_snoop whose text log goes to a file (a pipe could fill up and stall it)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    def stop(self) -> str:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        return self.log_path.read_text()


@contextlib.contextmanager
def snoop(server: str, tmp_path: Path, *extra: str) -> Iterator[tuple[str, Snoop]]:
    address = f"IP:127.0.0.1:{free_port()}"
    argv = tool("dc_snoop", "-listen", address, "-server", server, *extra)
    log_path = tmp_path / f"snoop-{address.rsplit(':', 1)[1]}.log"
    with open(log_path, "wb") as log, running(argv, ready=address, stderr=log.fileno()) as proc:
        yield address, Snoop(proc, log_path)


@pytest.mark.integration
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-op"])
def test_dc_test_through_snoop(dc_server_tcp: str, tmp_path: Path, persistent: bool) -> None:
    jpath = tmp_path / "snoop.jsonl"
    ops = 200
    with snoop(dc_server_tcp, tmp_path, "-json", str(jpath)) as (address, sn):
        argv = tool("dc_test", "-connect", address, "-sessions", "10", "-ops", str(ops))
        if persistent:
            argv.append("-persistent")
        result = subprocess.run(argv, capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr.decode()
        time.sleep(0.2)
        log = sn.stop()
    lines = log.splitlines()
    assert sum(" client->server uid=" in line for line in lines) == ops
    assert sum(" server->client uid=" in line for line in lines) == ops
    records = [json.loads(line) for line in jpath.read_text().splitlines()]
    messages = [r for r in records if "dir" in r and "event" not in r]
    assert len(messages) == 2 * ops
    assert {r["op"] for r in messages} == {"ADD", "GET", "REMOVE", "HAVE"}
    used = [r for r in records if r.get("event") == "close" and r["messages_c2s"]]
    assert len(used) == (1 if persistent else ops)  # no 10-pair limit


class Scripted:
    """A server that answers every connection with fixed bytes and records what it gets."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.address = f"IP:127.0.0.1:{self.listener.getsockname()[1]}"
        self.received: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                buf = bytearray()
                self.received.append(buf)
                t = threading.Thread(target=self._serve, args=(conn, buf), daemon=True)
                self.threads.append(t)
                t.start()

    def _serve(self, conn: socket.socket, buf: bytearray) -> None:
        with conn, contextlib.suppress(OSError):
            conn.sendall(self.answer)
            conn.settimeout(5)
            while data := conn.recv(65536):
                buf += data


@pytest.mark.integration
def test_bytes_unchanged_and_malformed_traffic_relayed(tmp_path: Path) -> None:
    answer = encode_response(1, 3, b"\x00") + b"\xde\xad\xbe\xef" * 300
    sent = encode_have(1, b"x") + encode_get(2, b"y" * 5000) + b"GET / HTTP/1.0\r\n\r\n" * 50
    fake = Scripted(answer)
    try:
        with snoop(fake.address, tmp_path, "-hexdump") as (address, sn):
            with socket.create_connection(("127.0.0.1", int(address.rsplit(":", 1)[1]))) as c:
                c.sendall(sent)
                c.shutdown(socket.SHUT_WR)
                got = bytearray()
                c.settimeout(5)
                while len(got) < len(answer):
                    data = c.recv(65536)
                    if not data:
                        break
                    got += data
            for t in fake.threads:
                t.join(5)
            log = sn.stop()
        assert bytes(got) == answer
        assert [bytes(r) for r in fake.received if r] == [sent]
        # Once per direction per connection (the readiness probe was connection 1).
        assert log.count("#2 client->server MALFORMED") == 1
        assert log.count("#2 server->client MALFORMED") == 1
        assert log.count("#2 client->server uid=") == 2
        assert log.count("#2 server->client uid=") == 1
        assert "    0000  79 79 79 79 79 79 79 79" in log  # -hexdump of the GET payload
    finally:
        fake.listener.close()


@pytest.mark.integration
def test_dc_client_to_server_through_snoop(dc_server_tcp: str, tmp_path: Path) -> None:
    with snoop(dc_server_tcp, tmp_path) as (snoop_addr, sn):
        proxy = f"UNIX:{tmp_path / 'p.sock'}"
        argv = tool("dc_client", "-listen", proxy, "-server", snoop_addr, "-retry", "300")
        with running(argv, ready=proxy):
            deadline = time.monotonic() + 5
            while True:  # until dc_client's first connect has completed
                r = subprocess.run(
                    tool("dc_test", "-connect", proxy, "-sessions", "1", "-ops", "1"),
                    capture_output=True,
                    timeout=30,
                )
                if r.returncode == 0:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.05)
            result = subprocess.run(
                tool("dc_test", "-connect", proxy, "-sessions", "10", "-ops", "150"),
                capture_output=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr.decode()
            time.sleep(0.2)
        log = sn.stop()
    requests = [line for line in log.splitlines() if " client->server uid=" in line]
    # dc_client's own uid counter: consecutive on its one connection.
    uids = [int(line.split("uid=")[1].split()[0], 16) for line in requests]
    assert len(uids) >= 151
    assert uids == list(range(uids[0], uids[0] + len(uids)))
    assert log.count(" requests / ") == 2  # the readiness probe and dc_client's one
