"""Free ports for test and farm processes: pytest-xdist workers pick from disjoint shares."""

from __future__ import annotations

from tlscache_farm.procs import _PICK_RANGE, _pick_range


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
