"""Free ports for test and farm processes: pytest-xdist workers pick from disjoint shares."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlscache_farm import procs
from tlscache_farm.config import CacheConfig, CertPaths, FarmConfig
from tlscache_farm.ports import plan_ports
from tlscache_farm.procs import _PICK_RANGE, _pick_range, free_port


def test_workers_pick_from_disjoint_shares_of_the_range() -> None:
    shares = [
        _pick_range({"PYTEST_XDIST_WORKER": f"gw{i}", "PYTEST_XDIST_WORKER_COUNT": "3"})
        for i in range(3)
    ]
    ports = [set(share) for share in shares]
    state = f"shares={shares}"
    assert all(p for p in ports), state
    assert not (ports[0] & ports[1] or ports[0] & ports[2] or ports[1] & ports[2]), state
    assert all(set(share) <= set(_PICK_RANGE) for share in shares), state
    assert sum(len(p) for p in ports) > len(_PICK_RANGE) - 3, state


def test_outside_xdist_or_with_odd_values_the_whole_range() -> None:
    for env in (
        {},
        {"PYTEST_XDIST_WORKER": "master"},
        {"PYTEST_XDIST_WORKER": "gw5", "PYTEST_XDIST_WORKER_COUNT": "2"},
        {"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "x"},
    ):
        assert _pick_range(env) == _PICK_RANGE, env


@pytest.mark.parametrize("cache", ["distcache", "memcached", "redis-cluster"])
def test_internal_ports_never_take_the_ports_promised_to_the_balancer_and_status_page(
    monkeypatch: pytest.MonkeyPatch, cache: str
) -> None:
    """``--port`` is bound by the balancer, which starts last: until then it is free, and
    another process (the orchestrator picks in its own process) must not pick it."""
    port, status_port = free_port(), free_port()
    # The orchestrator's view: it never handed these out, and they are all its range holds.
    monkeypatch.setattr(procs, "_handed_out", set())
    monkeypatch.setattr(procs, "_PICK", [port, status_port])
    cfg = FarmConfig(
        certs=CertPaths(Path("cert.pem"), Path("key.pem"), None),
        cache=CacheConfig(mode=cache),  # type: ignore[arg-type]
        port=port,
        status_port=status_port,
        base_port=0,
    )
    plan = plan_ports(cfg)
    internal = [plan.dc_server, plan.balancer_admin, *plan.cache_servers, *plan.cluster_buses]
    internal += [p for b in plan.backends for p in (b.tls, b.admin)]
    state = f"port={port} status_port={status_port} plan={plan}"
    assert port not in internal and status_port not in internal, state
    assert len(set(internal)) == len(internal), state
