"""Aggregate throughput of many local clients through dc_client, and straight to dc_server.

Run as ``python -m bench.proxy_bench``. It starts one dc_server (TCP loopback)
and one dc_client (unix socket -> that server), then for 1, 4 and 16 client
processes, persistent and connect-per-operation, counts the operations all
clients complete in a fixed time, through the proxy and directly. Each client
is a minimal blocking loop over pre-encoded requests (ADD / GET / HAVE / REMOVE
of its own 100-byte sessions) so that the load generator costs as little CPU
as possible; every reply is checked for its uid, operation and expected result.

The C figures are the reference measurements of the original distcache tools
on the same kind of machine (docs: c-baseline): the C dc_client proxy managed
19,063 ops/s for one persistent dc_test, 11,854 ops/s with a connection per
operation, and about 18,605 ops/s in aggregate with 4 clients (per-op); it is
the bottleneck of that path (one request in flight to the server at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

from tlscache.distcache.protocol import (
    HEADER,
    HEADER_SIZE,
    encode_add,
    encode_response,
    encode_get,
    encode_have,
    encode_remove,
)

# Reference figures of the C distcache (ops/s), from the baseline measurements.
C_PROXY_PERSISTENT = 19_063  # 1 dc_test -persistent via C dc_client
C_PROXY_PER_OP = 11_854  # 1 dc_test, new connection per op, via C dc_client
C_PROXY_AGGREGATE_4 = 18_605  # 4 dc_test at once via C dc_client (aggregate)
C_SERVER_PERSISTENT_TCP = 39_306  # 1 dc_test -persistent straight to C dc_server (TCP)
C_SERVER_AGGREGATE_4_TCP = 40_740  # 4 dc_test -persistent at once, C dc_server (TCP)
C_SERVER_PER_OP_TCP = 10_474  # 1 dc_test per-op straight to C dc_server (TCP)
TARGET = 3 * C_PROXY_AGGREGATE_4

SESSIONS_PER_CLIENT = 16
DATA = b"d" * 100
ROOT = Path(__file__).resolve().parent.parent


def _script(worker: int) -> list[tuple[bytes, int, int, bytes]]:
    """(request, uid, operation, expected reply payload) for one round over the sessions."""
    ops: list[tuple[bytes, int, int, bytes]] = []
    uid = worker << 20
    for s in range(SESSIONS_PER_CLIENT):
        sid = f"bench-{os.getpid()}-{worker}-{s}".encode()
        uid += 4
        ops += [
            (encode_add(uid, sid, DATA, 600_000), uid, 0, b"\x00"),
            (encode_get(uid + 1, sid), uid + 1, 1, DATA),
            (encode_have(uid + 2, sid), uid + 2, 3, b"\x00"),
            (encode_remove(uid + 3, sid), uid + 3, 2, b"\x00"),
        ]
    return ops


def _connect(target: str) -> socket.socket:
    if target.startswith("UNIX:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(target[5:])
    else:
        _, host, port = target.split(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _roundtrip(sock: socket.socket, frame: bytes, uid: int, op: int, expect: bytes) -> None:
    sock.sendall(frame)
    buf = sock.recv(65536)
    while len(buf) < HEADER_SIZE or len(buf) < HEADER_SIZE + HEADER.unpack_from(buf)[6]:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed mid-reply")
        buf += more
    _, _, r_uid, _, r_op, _, dlen = HEADER.unpack_from(buf)
    if r_uid != uid or r_op != op or buf[HEADER_SIZE : HEADER_SIZE + dlen] != expect:
        raise AssertionError(f"bad reply to uid {uid}: {buf[:40].hex()}")


def _worker(
    target: str, persistent: bool, worker: int, start_at: float, seconds: float, out: Connection
) -> None:
    script = _script(worker)
    done = 0
    error = ""
    try:
        while time.time() < start_at:
            time.sleep(0.001)
        end = time.monotonic() + seconds
        sock = _connect(target) if persistent else None
        while time.monotonic() < end:
            for frame, uid, op, expect in script:
                if sock is None:
                    with _connect(target) as s:
                        _roundtrip(s, frame, uid, op, expect)
                else:
                    _roundtrip(sock, frame, uid, op, expect)
                done += 1
        if sock is not None:
            sock.close()
    except Exception as exc:
        error = repr(exc)
    out.send((done, error))
    out.close()


def _pipelined_worker(
    target: str, lanes: int, depth: int, worker: int, start_at: float, seconds: float, out: Connection
) -> None:
    """``lanes`` persistent connections, each with ``depth`` requests sent at once.

    Every round sends one batch of ``depth`` requests on each connection, then reads
    each connection's answers; the answers are deterministic, so a batch is checked
    with one comparison against the bytes the server must return.
    """
    batches: list[list[tuple[bytes, bytes]]] = []
    for lane in range(lanes):
        script = _script(worker * 64 + lane)
        lane_batches = []
        for i in range(0, len(script), depth):
            chunk = script[i : i + depth]
            req = b"".join(frame for frame, _, _, _ in chunk)
            rep = b"".join(encode_response(uid, op, exp) for _, uid, op, exp in chunk)
            lane_batches.append((req, rep))
        batches.append(lane_batches)
    rounds = list(zip(*batches, strict=True))
    done = 0
    error = ""
    socks: list[socket.socket] = []
    try:
        while time.time() < start_at:
            time.sleep(0.001)
        end = time.monotonic() + seconds
        socks = [_connect(target) for _ in range(lanes)]
        while time.monotonic() < end:
            for batch in rounds:
                for sock, (req, _) in zip(socks, batch, strict=True):
                    sock.sendall(req)
                for sock, (_, rep) in zip(socks, batch, strict=True):
                    buf = sock.recv(65536)
                    while len(buf) < len(rep):
                        more = sock.recv(65536)
                        if not more:
                            raise ConnectionError("closed mid-reply")
                        buf += more
                    if buf != rep:
                        raise AssertionError(f"bad replies: {buf[:40].hex()}")
                    done += depth
    except Exception as exc:
        error = repr(exc)
    for sock in socks:
        sock.close()
    out.send((done, error))
    out.close()


def measure(
    target: str, clients: int, persistent: bool, seconds: float, lanes: int = 0, depth: int = 0
) -> float:
    """Aggregate ops/s of ``clients`` processes hammering ``target`` for ``seconds``.

    With ``lanes`` and ``depth`` each process pipelines (see :func:`_pipelined_worker`).
    """
    ctx = mp.get_context("fork")
    start_at = time.time() + 0.3
    pipes = []
    procs = []
    for w in range(clients):
        r, w_end = ctx.Pipe(duplex=False)
        if lanes:
            args = (target, lanes, depth, w, start_at, seconds, w_end)
            p = ctx.Process(target=_pipelined_worker, args=args)
        else:
            p = ctx.Process(target=_worker, args=(target, persistent, w, start_at, seconds, w_end))
        p.start()
        w_end.close()
        pipes.append(r)
        procs.append(p)
    total = 0
    errors = []
    for r in pipes:
        if r.poll(seconds + 30):
            done, error = r.recv()
            total += done
            if error:
                errors.append(error)
        else:
            errors.append("worker did not report")
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]}")
    return total / seconds


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(target: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _connect(target).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _wait_proxy_up(target: str, timeout: float = 10.0) -> None:
    """dc_client answers "no server" (empty) until its first connect completes."""
    deadline = time.monotonic() + timeout
    while True:
        with _connect(target) as s:
            s.sendall(encode_have(1, b"probe"))
            reply = s.recv(100)
        if len(reply) >= HEADER_SIZE and HEADER.unpack_from(reply)[6] == 1:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("dc_client never connected to dc_server")
        time.sleep(0.02)


@contextlib.contextmanager
def _process(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _c_reference(path: str, clients: int, persistent: bool) -> int:
    if path == "direct":
        if not persistent:
            return C_SERVER_PER_OP_TCP
        return C_SERVER_PERSISTENT_TCP if clients == 1 else C_SERVER_AGGREGATE_4_TCP
    if clients == 1:
        return C_PROXY_PERSISTENT if persistent else C_PROXY_PER_OP
    return C_PROXY_AGGREGATE_4  # the C proxy is saturated from 4 clients on


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.proxy_bench", description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per row")
    ap.add_argument("--clients", default="1,4,16", help="client process counts")
    ap.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    ap.add_argument("--no-direct", action="store_true", help="skip the direct dc_server rows")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    seconds = max(0.5, min(args.seconds, 5.0))  # keeps a run under two minutes

    py = sys.executable
    server = f"IP:127.0.0.1:{_free_port()}"
    rows: list[tuple[str, str, int, float, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        proxy = f"UNIX:{tmp}/dc_client.sock"
        proxy1 = f"UNIX:{tmp}/dc_client_1.sock"
        server_cmd = [py, "-m", "tlscache.cli.dc_server", "-listen", server, "-sessions", "60000"]
        client_cmd = [py, "-m", "tlscache.cli.dc_client", "-server", server, "--loop", args.loop]
        with (
            _process(server_cmd),
            _process([*client_cmd, "-listen", proxy]) as proxy_proc,
            _process([*client_cmd, "-listen", proxy1, "--max-in-flight", "1"]) as proxy1_proc,
        ):
            _wait(server)
            _wait(proxy)
            _wait(proxy1)
            _wait_proxy_up(proxy)
            _wait_proxy_up(proxy1)
            plan: list[tuple[str, str]] = [("dc_client", proxy)]
            if not args.no_direct:
                plan.append(("direct", server))
            for persistent in (True, False):
                mode = "persistent" if persistent else "per-op"
                for n in counts:
                    for path, target in plan:
                        cpu0 = _cpu_seconds(proxy_proc.pid)
                        rate = measure(target, n, persistent, seconds)
                        cpu = _cpu_seconds(proxy_proc.pid) - cpu0
                        us = 1e6 * cpu / (rate * seconds) if path == "dc_client" and rate else 0.0
                        ref = _c_reference(path, n, persistent)
                        rows.append((path, mode, n, rate, ref, us))
                        extra = f", proxy CPU {us:.1f} us/op" if us else ""
                        print(
                            f"{path:>10} {mode:>10} {n:>3} clients: {rate:>9,.0f} ops/s "
                            f"({rate / ref:.2f}x C){extra}",
                            flush=True,
                        )
            top = max(counts)
            cpu0 = _cpu_seconds(proxy1_proc.pid)
            rate = measure(proxy1, top, True, seconds)
            us = 1e6 * (_cpu_seconds(proxy1_proc.pid) - cpu0) / (rate * seconds)
            rows.append(
                ("dc_client --max-in-flight 1", "persistent", top, rate, C_PROXY_AGGREGATE_4, us)
            )
            print(f"dc_client --max-in-flight 1, {top} persistent clients: {rate:,.0f} ops/s")

    print()
    print("| path | connections | clients | ops/s | C reference ops/s | ratio | proxy CPU us/op |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for path, mode, n, rate, ref, us in rows:
        cpu_text = f"{us:.1f}" if us else "-"
        print(f"| {path} | {mode} | {n} | {rate:,.0f} | {ref:,} | {rate / ref:.2f}x | {cpu_text} |")
    best = max(r for p, _, _, r, _, _ in rows if p == "dc_client")
    print()
    print(
        f"best aggregate through dc_client: {best:,.0f} ops/s = {best / C_PROXY_AGGREGATE_4:.2f}x "
        f"the C proxy's {C_PROXY_AGGREGATE_4:,} (target {TARGET:,}, 3x)"
    )
    print(
        "proxy CPU per operation: the C dc_client spends ~23-40 us (baseline); "
        "1e6 / (us/op) is what one core of proxy could carry."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
