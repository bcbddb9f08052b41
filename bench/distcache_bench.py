"""distcache benchmarks: our dc_server against the C reference figures.

Run as ``python -m bench.distcache_bench`` (about two minutes). It starts its
own servers on loopback TCP and unix sockets, drives dc_test-style workloads
(random ADD/GET/REMOVE/HAVE with every answer checked) and raw pipelined
request streams, and reads the *server's* CPU time per operation from
``/proc/<pid>/stat`` (utime + stime): wall-clock rates of one connection are
dominated by loopback wake-ups on small VMs, CPU per operation is not.

A bare asyncio Protocol server that answers every request with a fixed
one-byte reply runs in the same session as the floor: what any Python
server must spend per request before doing any cache work.

Results go to stdout and to ``docs/bench-distcache.md`` (anything below the
notes marker in that file is kept across runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tlscache.cli.dc_test import Config, run
from tlscache.distcache.address import Address, TcpAddress, UnixAddress, parse_address
from tlscache.distcache.client import Client
from tlscache.distcache.protocol import (
    Decoder,
    encode_add,
    encode_get,
    encode_have,
)
from tlscache.distcache.sockets import connect
from tlscache_farm.procs import running

ROOT: Final = Path(__file__).resolve().parent.parent
DOC: Final = ROOT / "docs" / "bench-distcache.md"
NOTES_MARKER: Final = "<!-- notes: kept by bench/distcache_bench.py -->"
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

# Reference figures of the C distcache 2.0 tools on the same kind of machine
# (2 vCPU, Debian 12, loopback, medians of 5 runs).
C_PERSISTENT_100B_TCP: Final = 39_306  # dc_test -sessions 100 -ops 10000 -persistent, ops/s
C_PERSISTENT_1500B_TCP: Final = 38_744
C_PERSISTENT_100B_UNIX: Final = 58_686
C_PER_OP_TCP: Final = 10_474  # new connection per operation
C_PER_OP_UNIX: Final = 26_332
C_FOUR_PROCS_TCP: Final = 40_740  # 4 dc_test processes at once, persistent, aggregate
C_CPU_US_TCP: Final = 13.0  # dc_server CPU per op, persistent, TCP
C_CPU_US_UNIX: Final = 8.0  # same, unix socket (8-9 us)
C_FULL_ADD: Final = 6_193  # ADD rate while filling 60000 x 1500 B
C_FULL_LOOKUP: Final = 1_732  # GET-hit / HAVE-miss rate with 60000 x 1500 B resident
C_FULL_RSS_MIB: Final = 92.6  # RSS with 60000 x 1500 B resident
C_BASE_RSS_MIB: Final = 1.9  # RSS of an empty C dc_server (about id + data + 45-55 B/entry)

#: Bound on every timed loop of the benchmark, in seconds.
SLICE: Final = 0.8
#: Each row is run this many times; the table shows the median (the machines are noisy).
REPS: Final = 3


# ---------------------------------------------------------------- processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def server(
    argv: Sequence[str], address: str
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """Run a server process for the block, output discarded (SIGTERM, then SIGKILL, at the end)."""
    return running(argv, ready=address, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dc_server_argv(address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tlscache.cli.dc_server", "-listen", address, "--quiet", *extra]


def echo_argv(address: str, loop: str) -> list[str]:
    return [sys.executable, "-m", "bench.distcache_bench", "--echo", address, "--loop", loop]


# ---------------------------------------------------------------- the floor server


class _Echo(asyncio.Protocol):
    """Answers every distcache request with a one-byte 0x01 reply, doing nothing else."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        end = len(buf)
        while end - pos >= 14:
            stop = pos + 14 + int.from_bytes(buf[pos + 12 : pos + 14], "big")
            if stop > end:
                break
            out.append(b"\x00\x11\x00\x00\x01" + buf[pos + 5 : pos + 11] + b"\x01\x00\x01\x01")
            pos = stop
        self.buf = buf[pos:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


def serve_echo(address: str, loop_kind: str) -> None:
    """The floor reference: a bare asyncio Protocol server (``--echo``)."""
    addr = parse_address(address)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if isinstance(addr, UnixAddress):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr.path)
            srv = await loop.create_unix_server(_Echo, addr.path)
        else:
            assert isinstance(addr, TcpAddress)
            srv = await loop.create_server(_Echo, addr.host, addr.port, reuse_address=True)
        await srv.serve_forever()

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# ---------------------------------------------------------------- load generators


@dataclass(slots=True)
class Result:
    """One row of the results table."""

    group: str
    name: str
    ops: int
    seconds: float
    server_cpu: float | None = None
    c_rate: float | None = None
    c_cpu_us: float | None = None
    note: str = ""

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float | None:
        if self.server_cpu is None or not self.ops:
            return None
        return self.server_cpu / self.ops * 1e6


#: Work to do after a measurement (outside it), e.g. removing a dc_test run's sessions.
_after: list[Callable[[], None]] = []


def measured(
    pid: int | None, fn: Callable[[], tuple[int, float]]
) -> tuple[int, float, float | None]:
    """Run ``fn`` (returns ops, seconds) and the server CPU seconds it cost."""
    before = cpu_seconds(pid) if pid else 0.0
    ops, seconds = fn()
    cpu = cpu_seconds(pid) - before if pid else None
    while _after:
        _after.pop()()
    return ops, seconds, cpu


def _remove_all(address: Address, ids: list[bytes]) -> None:
    with Client(address, deadline_ms=5000) as client:
        for sid in ids:
            client.remove(sid)


_seeds = iter(range(1, 1_000_000))


def dc_test_load(address: Address, **kw: object) -> Callable[[], tuple[int, float]]:
    """A dc_test run (every answer checked), bounded by ops and by SLICE seconds.

    Each run gets its own seed, hence its own session ids: earlier runs' sessions
    stay in the server and must not collide with the model of this one.
    """

    def go() -> tuple[int, float]:
        seed = next(_seeds)
        cfg = Config(address=address, quiet=True, max_seconds=SLICE, seed=seed)
        for key, value in kw.items():
            setattr(cfg, key, value)
        report = run(cfg)
        if report.error is not None:
            raise RuntimeError(f"dc_test failed: {report.error}")
        # Back-to-back runs share the server: empty it again, outside the measurement.
        _after.append(lambda: _remove_all(address, report.stored))
        return report.done, report.elapsed

    return go


def one_at_a_time(
    address: Address,
    call: Callable[[Client], object],
    limit: int = 50_000,
    persistent: bool = True,
) -> Callable[[], tuple[int, float]]:
    """One request at a time on one persistent connection (the C client's pattern),
    or on a new connection per request (``persistent=False``, mod_socache_dc's)."""

    def go() -> tuple[int, float]:
        with Client(address, deadline_ms=5000, persistent=persistent) as client:
            call(client)  # connect outside the timed part
            ops = 0
            start = time.perf_counter()
            end = start + SLICE
            while ops < limit and time.perf_counter() < end:
                for _ in range(100):
                    call(client)
                ops += 100
            return ops, time.perf_counter() - start

    return go


def _blast_conn(
    address: Address,
    frames: list[bytes],
    expect: bytes | None,
    depth: int,
    limit: int,
    end: float,
    counts: list[int],
    slot: int,
) -> None:
    """Send ``depth`` requests at a time, read their replies, check them, repeat."""
    sock = connect(address, timeout=10.0)
    decoder = Decoder(expect_response=True)
    batches = [
        (b"".join(frames[i : i + depth]), len(frames[i : i + depth]))
        for i in range(0, len(frames), depth)
    ]
    done = 0
    try:
        while done < limit:
            for batch, n in batches:
                sock.sendall(batch)
                got = 0
                while got < n:
                    data = sock.recv(262144)
                    if not data:
                        raise RuntimeError("server closed the connection")
                    for msg in decoder.feed(data):
                        if expect is not None and msg.payload != expect:
                            raise RuntimeError(f"unexpected reply {msg.payload[:16]!r}")
                        got += 1
                done += n
                if done >= limit or time.perf_counter() > end:
                    break
            if time.perf_counter() > end:
                break
    finally:
        sock.close()
        counts[slot] = done


def blast(
    address: Address,
    frames_for: Callable[[int], list[bytes]],
    expect: bytes | None,
    depth: int,
    conns: int = 1,
    limit: int = 400_000,
) -> Callable[[], tuple[int, float]]:
    """Raw pipelined load: ``conns`` connections with ``depth`` requests in flight each.

    Replies are decoded and checked, but no model is kept: this probes how fast
    the server can go when the client costs little.
    """

    def go() -> tuple[int, float]:
        counts = [0] * conns
        frame_sets = [frames_for(c) for c in range(conns)]
        start = time.perf_counter()
        end = start + SLICE
        threads = [
            threading.Thread(
                target=_blast_conn,
                args=(address, frame_sets[c], expect, depth, limit // conns, end, counts, c),
            )
            for c in range(conns)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts), time.perf_counter() - start

    return go


def have_frames(ids: list[bytes], count: int = 4096) -> Callable[[int], list[bytes]]:
    def make(conn: int) -> list[bytes]:
        return [encode_have(i, ids[(i + conn) % len(ids)]) for i in range(count)]

    return make


def get_frames(ids: list[bytes], count: int = 4096) -> Callable[[int], list[bytes]]:
    def make(conn: int) -> list[bytes]:
        return [encode_get(i, ids[(i + conn) % len(ids)]) for i in range(count)]

    return make


def fill(address: Address, ids: list[bytes], data: bytes, depth: int = 64) -> tuple[int, float]:
    """ADD every id once, ``depth`` at a time; every reply must be OK."""
    frames = [encode_add(i, sid, data, 3_600_000) for i, sid in enumerate(ids)]
    sock = connect(address, timeout=30.0)
    decoder = Decoder(expect_response=True)
    start = time.perf_counter()
    try:
        for i in range(0, len(frames), depth):
            batch = frames[i : i + depth]
            sock.sendall(b"".join(batch))
            got = 0
            while got < len(batch):
                data_in = sock.recv(262144)
                if not data_in:
                    raise RuntimeError("server closed the connection during the fill")
                for msg in decoder.feed(data_in):
                    if msg.payload != b"\x00":
                        raise RuntimeError(f"ADD failed during the fill: {msg.payload!r}")
                    got += 1
    finally:
        sock.close()
    return len(frames), time.perf_counter() - start


# ---------------------------------------------------------------- the suite


def suite(tmp: Path, quick: bool) -> tuple[list[Result], dict[str, float]]:
    results: list[Result] = []
    facts: dict[str, float] = {"load_before": os.getloadavg()[0]}
    rng = random.Random(1)
    hot_ids = [rng.randbytes(32) for _ in range(200)]
    unix = f"UNIX:{tmp / 'dc.sock'}"

    def tcp() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"IP:127.0.0.1:{s.getsockname()[1]}"

    def row(
        group: str,
        name: str,
        pid: int | None,
        load: Callable[[], tuple[int, float]],
        c_rate: float | None = None,
        c_cpu: float | None = None,
        note: str = "",
        reps: int = REPS,
    ) -> Result:
        runs = []
        for _ in range(reps):
            ops, seconds, cpu = measured(pid, load)
            runs.append(Result(group, name, ops, seconds, cpu, c_rate, c_cpu, note))
        r = sorted(runs, key=lambda x: x.rate)[len(runs) // 2]
        if pid:
            # CPU per op is the median on its own: a noisy rate says nothing about it.
            cpus = sorted(x.cpu_us or 0.0 for x in runs)
            r.server_cpu = cpus[len(cpus) // 2] * r.ops / 1e6
        results.append(r)
        cpu_text = f"{r.cpu_us:6.1f} us" if r.cpu_us is not None else "     -   "
        print(f"{group:10} {name:58} {r.rate:>10,.0f}/s  cpu/op {cpu_text}", flush=True)
        return r

    def warm_have(address: Address) -> None:
        with Client(address) as c:
            for sid in hot_ids:
                c.add(sid, b"h" * 100, 3_600_000)

    per_op_limit = 3000 if quick else 20_000
    loops = ["auto", "asyncio"] if not quick else ["auto"]

    # --- dc_server, the dc_test workloads of the C baseline, TCP and unix.
    for loop in loops:
        label = "dc_server" if loop == "auto" else "dc_server/asyncio"
        for kind, address in (("tcp", tcp()), ("unix", unix)):
            if loop != "auto" and kind == "unix":
                continue
            extra = () if loop == "auto" else ("--loop", "asyncio")
            with server(dc_server_argv(address, *extra), address) as proc:
                addr = parse_address(address)
                pid = proc.pid
                base = {"sessions": 100, "ops": 200_000, "datamin": 100, "datamax": 100}
                c_rate = C_PERSISTENT_100B_TCP if kind == "tcp" else C_PERSISTENT_100B_UNIX
                c_cpu = C_CPU_US_TCP if kind == "tcp" else C_CPU_US_UNIX
                row(
                    label,
                    f"{kind}: dc_test -persistent, 100 B, 1 conn",
                    pid,
                    dc_test_load(addr, persistent=True, **base),
                    c_rate,
                    c_cpu,
                )
                if loop != "auto":
                    row(
                        label,
                        f"{kind}: pipelined HAVE, 1 conn x 64 in flight",
                        pid,
                        blast(addr, have_frames(hot_ids), None, 64),
                    )
                    continue
                if kind == "tcp":
                    row(
                        label,
                        f"{kind}: dc_test -persistent, 1500 B, 1 conn",
                        pid,
                        dc_test_load(
                            addr,
                            persistent=True,
                            sessions=100,
                            ops=200_000,
                            datamin=1500,
                            datamax=1500,
                        ),
                        C_PERSISTENT_1500B_TCP,
                        c_cpu,
                    )
                row(
                    label,
                    f"{kind}: dc_test, new connection per op, 100 B",
                    pid,
                    dc_test_load(addr, persistent=False, **{**base, "ops": per_op_limit}),
                    C_PER_OP_TCP if kind == "tcp" else C_PER_OP_UNIX,
                )
                row(
                    label,
                    f"{kind}: dc_test -concurrency 8 -pipeline 1 (asyncio)",
                    pid,
                    dc_test_load(
                        addr,
                        concurrency=8,
                        pipeline=1,
                        persistent=True,
                        **{**base, "sessions": 50},
                    ),
                    C_FOUR_PROCS_TCP if kind == "tcp" else None,
                    note="C: 4 dc_test processes" if kind == "tcp" else "",
                )
                row(
                    label,
                    f"{kind}: dc_test -concurrency 2 -pipeline 32",
                    pid,
                    dc_test_load(addr, concurrency=2, pipeline=32, persistent=True, **base),
                )
                warm_have(addr)
                row(
                    label,
                    f"{kind}: HAVE one at a time, 1 conn",
                    pid,
                    one_at_a_time(addr, lambda c: c.have(hot_ids[0])),
                    None,
                    c_cpu,
                )
                row(
                    label,
                    f"{kind}: HAVE, new connection per op",
                    pid,
                    one_at_a_time(addr, lambda c: c.have(hot_ids[0]), persistent=False),
                )
                row(
                    label,
                    f"{kind}: pipelined HAVE, 1 conn x 64 in flight",
                    pid,
                    blast(addr, have_frames(hot_ids), b"\x00", 64),
                )
                row(
                    label,
                    f"{kind}: pipelined HAVE, 8 conns x 16 in flight",
                    pid,
                    blast(addr, have_frames(hot_ids), b"\x00", 16, conns=8),
                )

    # --- the floor: a bare Protocol server doing no work per request.
    echo_loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        echo_loops.append("uvloop")
    except ImportError:
        pass
    for loop in echo_loops:
        for kind, address in (("tcp", tcp()), ("unix", unix)):
            with server(echo_argv(address, loop), address) as proc:
                addr = parse_address(address)
                row(
                    f"floor/{loop}",
                    f"{kind}: HAVE one at a time, 1 conn",
                    proc.pid,
                    one_at_a_time(addr, lambda c: c.have(hot_ids[0])),
                )
                row(
                    f"floor/{loop}",
                    f"{kind}: HAVE, new connection per op",
                    proc.pid,
                    one_at_a_time(addr, lambda c: c.have(hot_ids[0]), persistent=False),
                )
                row(
                    f"floor/{loop}",
                    f"{kind}: pipelined HAVE, 1 conn x 64 in flight",
                    proc.pid,
                    blast(addr, have_frames(hot_ids), b"\x01", 64),
                )

    # --- a full cache: 60,000 sessions of 1,500 bytes.
    full = 10_000 if quick else 60_000
    address = tcp()
    with server(dc_server_argv(address, "-sessions", "60000"), address) as proc:
        addr = parse_address(address)
        pid = proc.pid
        with Client(addr) as c:  # touch the code paths before the baseline RSS
            c.add(b"warm-up-id", b"w" * 1500, 1000)
            c.get(b"warm-up-id")
            c.remove(b"warm-up-id")
        time.sleep(0.2)
        rss0 = rss_kib(pid)
        ids = [rng.randbytes(32) for _ in range(full)]
        data = rng.randbytes(1500)
        r = row(
            "full",
            f"tcp: fill {full:,} x 1500 B (ADD, 64 in flight)",
            pid,
            lambda: fill(addr, ids, data),
            C_FULL_ADD,
            reps=1,
        )
        time.sleep(0.2)
        rss1 = rss_kib(pid)
        facts["rss_base_mib"] = rss0 / 1024
        facts["rss_full_mib"] = rss1 / 1024
        facts["bytes_per_session"] = (rss1 - rss0) * 1024 / full
        facts["sessions"] = full
        facts["fill_rate"] = r.rate
        misses = [rng.randbytes(32) for _ in range(200)]
        row(
            "full",
            "tcp: GET hit one at a time, 1 conn",
            pid,
            one_at_a_time(addr, lambda c: c.get(ids[rng.randrange(full)])),
            C_FULL_LOOKUP,
        )
        row(
            "full",
            "tcp: HAVE miss one at a time, 1 conn",
            pid,
            one_at_a_time(addr, lambda c: c.have(misses[rng.randrange(200)])),
            C_FULL_LOOKUP,
        )
        row(
            "full",
            "tcp: GET hit, 1 conn x 64 in flight",
            pid,
            blast(addr, get_frames(ids), data, 64),
            C_FULL_LOOKUP,
        )
        row(
            "full",
            "tcp: HAVE miss, 1 conn x 64 in flight",
            pid,
            blast(addr, have_frames(misses), b"\x01", 64),
            C_FULL_LOOKUP,
        )
        with Client(addr) as c:
            facts["resident_after"] = sum(1 for sid in ids[:200] if c.have(sid))
    return results, facts


# ---------------------------------------------------------------- report


def _fmt_ratio(ours: float | None, theirs: float | None, invert: bool = False) -> str:
    if ours is None or theirs is None or not ours or not theirs:
        return ""
    value = theirs / ours if invert else ours / theirs
    return f"{value:.2f}x"


def table(results: list[Result]) -> list[str]:
    lines = [
        "| group | workload | ops | ops/s | vs C ops/s | server CPU/op | C CPU/op |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cpu = f"{r.cpu_us:.1f} us" if r.cpu_us is not None else ""
        c_cpu = f"{r.c_cpu_us:.0f} us" if r.c_cpu_us is not None else ""
        c_rate = f"{_fmt_ratio(r.rate, r.c_rate)} of {r.c_rate:,.0f}" if r.c_rate else ""
        name = f"{r.name} ({r.note})" if r.note else r.name
        lines.append(
            f"| {r.group} | {name} | {r.ops:,} | {r.rate:,.0f} | {c_rate} | {cpu} | {c_cpu} |"
        )
    return lines


def _find(results: list[Result], group: str, prefix: str) -> Result | None:
    for r in results:
        if r.group == group and r.name.startswith(prefix):
            return r
    return None


def verdicts(results: list[Result], facts: dict[str, float]) -> list[str]:
    out = []

    def cpu(group: str, prefix: str) -> float | None:
        r = _find(results, group, prefix)
        return r.cpu_us if r else None

    for kind, c_cpu in (("tcp", C_CPU_US_TCP), ("unix", C_CPU_US_UNIX)):
        one = cpu("dc_server", f"{kind}: HAVE one at a time")
        piped = cpu("dc_server", f"{kind}: pipelined HAVE, 1 conn")
        floor = cpu("floor/uvloop", f"{kind}: HAVE one at a time")
        floor_a = cpu("floor/asyncio", f"{kind}: HAVE one at a time")
        if one is not None:
            ok = "met" if one <= c_cpu else "NOT met"
            out.append(
                f"- Server CPU per op, {kind}, one request at a time: {one:.1f} us vs C "
                f"{c_cpu:.0f} us ({ok}); floor (bare Protocol server): uvloop "
                f"{floor or 0:.1f} us, asyncio {floor_a or 0:.1f} us."
            )
        if piped is not None:
            out.append(f"- Server CPU per op, {kind}, 64 requests in flight: {piped:.1f} us.")
        per_op = cpu("dc_server", f"{kind}: HAVE, new connection per op")
        per_op_floor = cpu("floor/uvloop", f"{kind}: HAVE, new connection per op")
        if per_op is not None:
            out.append(
                f"- Server CPU per op, {kind}, new connection per op: {per_op:.1f} us; floor "
                f"(uvloop) {per_op_floor or 0:.1f} us."
            )
    best = max((r for r in results if r.group == "dc_server"), key=lambda r: r.rate, default=None)
    if best is not None:
        ok = "met" if best.rate >= 100_000 else "NOT met"
        out.append(
            f"- Best aggregate rate: {best.rate:,.0f} ops/s ({best.name}); target 100k ({ok})."
        )
    look = [
        r for r in results if r.group == "full" and "in flight" in r.name and "fill" not in r.name
    ]
    if look:
        worst = min(look, key=lambda r: r.rate)
        ok = "met" if worst.rate >= 20 * C_FULL_LOOKUP else "NOT met"
        out.append(
            f"- 60,000-session cache, pipelined lookups: {worst.rate:,.0f} ops/s at worst = "
            f"{worst.rate / C_FULL_LOOKUP:.0f}x C's {C_FULL_LOOKUP:,} (target 20x: {ok})."
        )
        single = [r for r in results if r.group == "full" and "one at a time" in r.name]
        if single:
            w = min(single, key=lambda r: r.rate)
            out.append(
                f"- Same, one request at a time: {w.rate:,.0f} ops/s = "
                f"{w.rate / C_FULL_LOOKUP:.0f}x C (bound by the round trip, not the cache)."
            )
    if "bytes_per_session" in facts:
        per = facts["bytes_per_session"]
        c_per = (C_FULL_RSS_MIB - C_BASE_RSS_MIB) * 1024 * 1024 / 60_000
        ok = "met" if per <= 1.2 * c_per else "NOT met"
        out.append(
            f"- Memory: {per:,.0f} B per 1,500-byte session with a 32-byte id "
            f"(RSS {facts['rss_base_mib']:.1f} -> {facts['rss_full_mib']:.1f} MiB for "
            f"{facts['sessions']:,.0f} sessions) vs C {c_per:,.0f} B: "
            f"{per / c_per:.2f}x (target 1.2x: {ok})."
        )
    return out


def write_doc(results: list[Result], facts: dict[str, float], elapsed: float) -> None:
    notes = ""
    if DOC.exists():
        text = DOC.read_text()
        if NOTES_MARKER in text:
            notes = text[text.index(NOTES_MARKER) :]
    lines = [
        "# distcache benchmarks",
        "",
        "Generated by `python -m bench.distcache_bench` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {elapsed:.0f} s, load average before the run "
        f"{facts.get('load_before', 0):.1f}). Servers run on loopback; "
        "`server CPU/op` is the dc_server process's utime+stime (/proc/<pid>/stat) over the "
        "operations of the row, so it does not depend on the client's speed. C figures are "
        "those of the C distcache 2.0 tools measured on the same kind of machine.",
        "",
        "Rows: `dc_test ...` rows run the dc_test model (random ADD/GET/REMOVE/HAVE, every "
        "answer checked) in this process; `HAVE one at a time` uses the blocking `Client`; "
        "`in flight` rows write batches of pre-encoded requests and check every reply, to "
        "probe the server rather than the Python client. `floor/*` is a bare asyncio "
        "Protocol server that answers every request with one fixed byte: the least any "
        "Python server spends per request. `dc_server` uses its default event loop "
        "(uvloop when installed); `dc_server/asyncio` forces the stdlib loop. Every row is "
        f"bounded to {SLICE:g} s and run {REPS} times; the table shows the median run "
        "(rate) and the median server CPU per op.",
        "",
        *table(results),
        "",
        "## Targets",
        "",
        *verdicts(results, facts),
        "",
    ]
    text = "\n".join(lines)
    if notes:
        text += "\n" + notes
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text if text.endswith("\n") else text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distcache_bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller runs (a smoke test)")
    p.add_argument("--no-doc", action="store_true", help="do not rewrite the results document")
    p.add_argument("--echo", metavar="ADDR", help=argparse.SUPPRESS)
    p.add_argument("--loop", default="asyncio", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.echo:
        serve_echo(args.echo, args.loop)
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dcbench-") as tmp:
        results, facts = suite(Path(tmp), args.quick)
    elapsed = time.perf_counter() - started
    print()
    for line in verdicts(results, facts):
        print(line)
    print(f"\n{elapsed:.0f} s in all")
    if not args.no_doc and not args.quick:
        write_doc(results, facts, elapsed)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
