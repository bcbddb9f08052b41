"""The down period on its own: an injected clock, no servers."""

from __future__ import annotations

import threading

import pytest

from tlscache.exceptions import ConfigurationError
from tlscache.stores.base import ServerHealth
from tlscache.stores.health import Admission, DownPeriod


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(down: DownPeriod) -> dict[str, object]:
    return {
        "failures": down.failures,
        "down_until": down.down_until,
        "up": down.up,
        "available": down.available(),
        "snapshot": down.snapshot("s"),
    }


def test_up_until_a_failure_then_skipped_for_the_period() -> None:
    clock = Clock()
    down = DownPeriod(5.0, clock)
    assert down.admit() is Admission.CALL and down.up, state(down)
    assert down.snapshot("s") == ServerHealth("s", True, 0, None)
    down.failed()
    assert down.snapshot("s") == ServerHealth("s", False, 1, 5.0), state(down)
    clock.now += 4.9
    assert [down.admit() for _ in range(3)] == [Admission.SKIP] * 3, state(down)
    assert not down.available(), state(down)


def test_one_probe_per_period_and_its_outcome() -> None:
    clock = Clock()
    down = DownPeriod(5.0, clock)
    down.failed()
    clock.now += 5.0
    assert down.available(), state(down)
    assert down.admit() is Admission.PROBE, state(down)
    assert down.admit() is Admission.SKIP, state(down)  # the others wait for the probe
    assert not down.up and not down.available(), state(down)
    down.failed()  # the probe failed: a new period from now
    assert down.snapshot("s") == ServerHealth("s", False, 2, 5.0), state(down)
    clock.now += 5.0
    assert down.admit() is Admission.PROBE, state(down)
    down.succeeded()
    assert down.snapshot("s") == ServerHealth("s", True, 0, None), state(down)
    assert down.admit() is Admission.CALL, state(down)


def test_up_only_after_a_success_not_after_a_wait() -> None:
    clock = Clock()
    down = DownPeriod(5.0, clock)
    down.failed()
    clock.now += 60.0  # nobody has asked it since
    assert down.snapshot("s") == ServerHealth("s", False, 1, 0.0), state(down)


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    clock = Clock()
    down = DownPeriod(5.0, clock)
    down.failed()
    clock.now += 5.0
    assert down.admit() is Admission.PROBE
    down.abandoned()
    assert down.admit() is Admission.PROBE, state(down)
    assert down.failures == 1, state(down)


def test_a_probe_that_never_reports_delays_only_one_period() -> None:
    clock = Clock()
    down = DownPeriod(5.0, clock)
    down.failed()
    clock.now += 5.0
    assert down.admit() is Admission.PROBE  # and then nothing is heard of it
    clock.now += 4.9
    assert down.admit() is Admission.SKIP, state(down)
    clock.now += 0.1
    assert down.admit() is Admission.PROBE, state(down)


def test_abandoning_while_up_changes_nothing() -> None:
    down = DownPeriod(5.0, Clock())
    down.abandoned()
    assert down.up and down.failures == 0, state(down)


def test_zero_period_probes_at_once() -> None:
    down = DownPeriod(0.0, Clock())
    down.failed()
    assert down.admit() is Admission.PROBE, state(down)


def test_negative_or_nan_period_is_refused() -> None:
    for bad in (-1.0, float("nan")):
        with pytest.raises(ConfigurationError):
            DownPeriod(bad, Clock())


def test_concurrent_callers_get_exactly_one_probe() -> None:
    clock = Clock()
    down = DownPeriod(5.0, clock)
    down.failed()
    clock.now += 5.0
    start = threading.Barrier(8)
    seen: list[Admission] = []
    lock = threading.Lock()

    def call() -> None:
        start.wait(timeout=10)
        for _ in range(50):
            got = down.admit()
            with lock:
                seen.append(got)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    counts = {a: seen.count(a) for a in Admission}
    assert counts == {Admission.CALL: 0, Admission.PROBE: 1, Admission.SKIP: 399}, counts
