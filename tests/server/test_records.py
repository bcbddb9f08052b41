"""The farm's typed records survive their JSON form, and the JSON of a stranger does not pass."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tlscache import MemoryStore, SessionCache
from tlscache_farm.records import (
    BackendEntry,
    BackendStatus,
    FarmStatus,
    Handshake,
    HandshakeCounts,
    HandshakeLatency,
    Percentiles,
    ProcessInfo,
    decode,
    encode,
)


def backend_status() -> BackendStatus:
    cache = SessionCache(MemoryStore(), timeout=300)
    return BackendStatus(
        name="backend-1",
        pid=1234,
        listen="https://127.0.0.1:9001/",
        admin="http://127.0.0.1:9101/status.json",
        tls="1.3",
        cache_mode="memory",
        dc_address=None,
        uptime_s=1.5,
        connections=3,
        active=0,
        requests=3,
        handshakes=HandshakeCounts(full=2, resumed=1),
        by_version={"TLSv1.3": 3},
        recent=[Handshake(1.0, "127.0.0.1:5000", True, "TLSv1.3", "ab12", 0.5)],
        handshake_ms=HandshakeLatency(Percentiles.of([2.0, 1.0]), Percentiles()),
        cache=cache.stats(),
    )


def test_farm_status_round_trips_through_json() -> None:
    status = FarmStatus(
        balancer_url="https://localhost:8443/",
        tls="1.3",
        cache="memory",
        dc_server=None,
        run_dir="/tmp/x",
        balancer=None,
        backends=[BackendEntry("backend-1", "127.0.0.1:9001", backend_status())],
        processes=[ProcessInfo("backend-1", 1234, "running", "https://127.0.0.1:9001/", "/l")],
    )
    assert decode(FarmStatus, encode(status)) == status
    assert decode(FarmStatus, encode(status, indent=1)) == status


def test_percentiles_are_nearest_rank() -> None:
    p = Percentiles.of(float(x) for x in range(100, 0, -1))  # 1..100, unsorted
    assert (p.p50, p.p99) == (50.0, 99.0)  # the 99th smallest of 100, not the largest
    assert Percentiles.of([]) == Percentiles(None, None)
    assert Percentiles.of([]).text() == "-"


@pytest.mark.parametrize(
    "change",
    [
        {"pid": "1234"},  # a string where a number belongs
        {"name": None},  # nothing where a name belongs
        {"handshakes": [1, 0, 0]},  # a list where an object belongs
        {"recent": {}},  # an object where a list belongs
    ],
)
def test_json_that_does_not_fit_is_refused(change: dict[str, object]) -> None:
    data = dataclasses.asdict(backend_status())
    data.update(change)
    with pytest.raises(ValueError):
        decode(BackendStatus, json.dumps(data))
