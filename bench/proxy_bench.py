"""Aggregate throughput of many local clients through dc_client, and straight to dc_server.

Run as ``python -m bench.proxy_bench``. It starts one dc_server (TCP loopback)
and one dc_client (unix socket -> that server), then for 1, 4 and 16 client
processes, persistent and connect-per-operation, counts the operations all
clients complete in a fixed time, through the proxy and directly. Each client
is a minimal blocking loop over pre-encoded requests (ADD / GET / HAVE / REMOVE
of its own 100-byte sessions) so that the load generator costs as little CPU
as possible; every reply is checked for its uid, operation and expected result.

Then the workloads where each application process keeps several requests in
flight (``PIPELINED``): every process holds a few persistent connections and
sends a batch of requests on each before reading the answers (one comparison
checks a whole batch, the answers being deterministic). These measure the
proxy rather than the Python load generators.

Every row reports the dc_client process's CPU time per operation (user +
system, from /proc, with the kernel's share) and dc_server's: figures that do
not depend on how busy the shared machine is, unlike the ops/s.

The C figures are the reference measurements of the original distcache tools
on the same kind of machine (2 vCPU, loopback): the C dc_client proxy managed
19,063 ops/s for one persistent dc_test, 11,854 ops/s with a connection per
operation, and about 18,605 ops/s in aggregate with 4 clients (per-op); it is
the bottleneck of that path (one request in flight to the server at a time).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection

from tlscache.distcache.protocol import (
    HEADER,
    HEADER_SIZE,
    encode_add,
    encode_get,
    encode_have,
    encode_remove,
    encode_response,
)
from tlscache_farm.procs import free_port, running, wait_proxy_connected

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
    target: str,
    lanes: int,
    depth: int,
    worker: int,
    start_at: float,
    seconds: float,
    out: Connection,
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


def _cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process (Linux /proc; zeros elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    return sum(_cpu_times(pid))


def _c_reference(path: str, clients: int, persistent: bool) -> int:
    if path == "direct":
        if not persistent:
            return C_SERVER_PER_OP_TCP
        return C_SERVER_PERSISTENT_TCP if clients == 1 else C_SERVER_AGGREGATE_4_TCP
    if clients == 1:
        return C_PROXY_PERSISTENT if persistent else C_PROXY_PER_OP
    return C_PROXY_AGGREGATE_4  # the C proxy is saturated from 4 clients on


# Workloads where each application process keeps several requests in flight:
# (label, processes, connections per process, requests in flight per connection).
PIPELINED = [
    ("4 conns x 1 each", 8, 4, 1),
    ("4 conns x 8 each", 4, 4, 8),
    ("2 conns x 4 each", 16, 2, 4),
]


class _Row:
    __slots__ = ("cpu", "kernel", "label", "n", "path", "rate", "ref", "server_cpu")

    def __init__(
        self,
        path: str,
        label: str,
        n: int,
        rate: float,
        ref: int,
        cpu: float,
        kernel: float,
        server_cpu: float,
    ) -> None:
        self.kernel = kernel  # the share of ``cpu`` spent in the kernel
        self.path = path
        self.label = label
        self.n = n
        self.rate = rate
        self.ref = ref
        self.cpu = cpu
        self.server_cpu = server_cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.proxy_bench", description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per row")
    ap.add_argument("--clients", default="1,4,16", help="client process counts")
    ap.add_argument("--loop", default="auto", choices=("auto", "asyncio", "uvloop"))
    ap.add_argument("--no-direct", action="store_true", help="skip the direct dc_server rows")
    ap.add_argument("--no-pipelined", action="store_true", help="skip the pipelined workloads")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")][:4]
    seconds = max(0.5, min(args.seconds, 3.0))  # keeps a run under two minutes

    py = sys.executable
    server = f"IP:127.0.0.1:{free_port()}"
    rows: list[_Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        proxy = f"UNIX:{tmp}/dc_client.sock"
        proxy1 = f"UNIX:{tmp}/dc_client_1.sock"
        server_cmd = [py, "-m", "tlscache.cli.dc_server", "-listen", server, "-sessions", "60000"]
        client_cmd = [py, "-m", "tlscache.cli.dc_client", "-server", server, "--loop", args.loop]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        with (
            running(server_cmd, ready=server, **quiet) as server_proc,
            running([*client_cmd, "-listen", proxy], ready=proxy, **quiet) as proxy_proc,
            running(
                [*client_cmd, "-listen", proxy1, "--max-in-flight", "1"], ready=proxy1, **quiet
            ) as proxy1_proc,
        ):
            wait_proxy_connected(proxy, timeout=10.0)
            wait_proxy_connected(proxy1, timeout=10.0)

            def run(
                path: str,
                label: str,
                target: str,
                n: int,
                persistent: bool,
                ref: int,
                lanes: int = 0,
                depth: int = 0,
                proxy_pid: int = proxy_proc.pid,
            ) -> None:
                user0, sys0 = _cpu_times(proxy_pid)
                srv0 = _cpu_seconds(server_proc.pid)
                rate = measure(target, n, persistent, seconds, lanes, depth)
                ops = rate * seconds
                user1, sys1 = _cpu_times(proxy_pid)
                user, kern = (user1 - user0, sys1 - sys0) if path != "direct" else (0.0, 0.0)
                srv = _cpu_seconds(server_proc.pid) - srv0
                share = kern / (user + kern) if user + kern else 0.0
                row = _Row(
                    path, label, n, rate, ref, 1e6 * (user + kern) / ops, share, 1e6 * srv / ops
                )
                rows.append(row)
                extra = (
                    f", proxy CPU {row.cpu:.1f} us/op ({100 * row.kernel:.0f}% kernel)"
                    if row.cpu
                    else ""
                )
                print(
                    f"{path:>10} {label:>18} {n:>3} procs: {rate:>9,.0f} ops/s "
                    f"({rate / ref:.2f}x C){extra}, server CPU {row.server_cpu:.1f} us/op",
                    flush=True,
                )

            plan: list[tuple[str, str]] = [("dc_client", proxy)]
            if not args.no_direct:
                plan.append(("direct", server))
            for persistent in (True, False):
                mode = "persistent" if persistent else "per-op"
                for n in counts:
                    for path, target in plan:
                        run(path, mode, target, n, persistent, _c_reference(path, n, persistent))
            top = max(counts)
            run(
                "dc_client --max-in-flight 1",
                "persistent",
                proxy1,
                top,
                True,
                C_PROXY_AGGREGATE_4,
                proxy_pid=proxy1_proc.pid,
            )
            if not args.no_pipelined:
                for label, n, lanes, depth in PIPELINED:
                    for path, target in plan:
                        ref = (
                            C_PROXY_AGGREGATE_4 if path == "dc_client" else C_SERVER_AGGREGATE_4_TCP
                        )
                        run(path, label, target, n, True, ref, lanes, depth)

    print()
    print(
        "| path | connections | processes | ops/s | C reference ops/s | ratio "
        "| proxy CPU us/op (kernel share) | server CPU us/op |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu_text = f"{r.cpu:.1f} ({100 * r.kernel:.0f}%)" if r.cpu else "-"
        print(
            f"| {r.path} | {r.label} | {r.n} | {r.rate:,.0f} | {r.ref:,} | {r.rate / r.ref:.2f}x "
            f"| {cpu_text} | {r.server_cpu:.1f} |"
        )
    proxied = [r for r in rows if r.path == "dc_client"]
    print()
    for title, group in (
        ("one request in flight per connection", [r for r in proxied if r.label == "persistent"]),
        ("connection per operation", [r for r in proxied if r.label == "per-op"]),
        ("several requests in flight per process", [r for r in proxied if "conns" in r.label]),
    ):
        if not group:
            continue
        best = max(group, key=lambda r: r.rate)
        verdict = "meets" if best.rate >= TARGET else "misses"
        print(
            f"{title}: best {best.rate:,.0f} ops/s ({best.label}, {best.n} procs) = "
            f"{best.rate / C_PROXY_AGGREGATE_4:.2f}x the C proxy's {C_PROXY_AGGREGATE_4:,}; "
            f"{verdict} the 3x target ({TARGET:,})"
        )
    print(
        "proxy CPU per operation: the C dc_client spends ~23-40 us (baseline); "
        "1e6 / (us/op) is what one core of proxy could carry."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
