"""A farm of every backend kind (threaded, Twisted, stdlib asyncio): each serves ``/metrics``
under the same names, its handshake records follow what the clients saw, and the farm's status
page shows who resumed whose, agreeing with the clients and with the report's table.

One farm started as a user would start it, Python's ``ssl`` clients through the balancer, and
prometheus_client's own parser reading what each backend serves.
"""

from __future__ import annotations

import dataclasses
import html.parser
import json
import re
import urllib.request
from collections.abc import Iterator
from pprint import pformat

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.farmctl import HOST, FarmProc, farm
from tlscache_farm.certs import ensure_demo_certs
from tlscache_farm.config import FarmConfig, WorkloadConfig
from tlscache_farm.handshakes import UNKNOWN, HandshakeLog, claimed_maker
from tlscache_farm.kinds import farm_resumptions, parse_kinds, resumption_matrix
from tlscache_farm.records import BackendStatus, FarmStatus, HandshakeCounts, Resumptions, decode
from tlscache_farm.report import Run, who_resumed_whose
from tlscache_farm.status import render_farm
from tlscache_farm.workload import WorkloadResult, run_workload

KINDS = parse_kinds("threaded,twisted,stdlib")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- without processes ---------------------------------------------------------------------------


def test_only_backend_names_count_as_makers() -> None:
    named = ["backend-2", " backend-12 ", None, "", "backend-0", "backend-1\r\nX: y", "apache"]
    assert [claimed_maker(v) for v in named] == [
        "backend-2",
        "backend-12",
        *[UNKNOWN] * 5,
    ]


def test_log_counts_handshakes_and_who_made_the_resumed_ones() -> None:
    log = HandshakeLog()
    full = log.complete("127.0.0.1:1", False, "TLSv1.3", "aa", 2.0)
    first = log.complete("127.0.0.1:2", True, "TLSv1.3", "bb", 0.5)
    second = log.complete("127.0.0.1:3", True, "TLSv1.2", "cc", 0.7)
    log.fail()
    log.made_by(full, "backend-3")  # a full handshake made its own session: not counted
    log.made_by(first, "backend-3")
    log.made_by(second, "somebody")
    snap = log.snapshot()
    state = pformat(snap)
    assert snap.counts == HandshakeCounts(1, 2, 1), state
    assert snap.by_version == {"TLSv1.3": 2, "TLSv1.2": 1}, state
    assert snap.resumed_from == {"backend-3": 1, UNKNOWN: 1}, state
    assert [r.made_by for r in snap.recent] == [None, "backend-3", UNKNOWN], state
    assert snap.latency.full.p50 == 2.0 and snap.latency.resumed.p99 == 0.7, state


def _status(name: str, resumed_from: dict[str, int]) -> BackendStatus:
    fields: dict[str, object] = {
        "name": name,
        **dict.fromkeys(("listen", "admin", "tls", "cache_mode"), ""),
        **dict.fromkeys(("pid", "connections", "active", "requests"), 0),
        "dc_address": None,
        "uptime_s": 1.0,
        "handshakes": {},
        "by_version": {},
        "recent": [],
        "handshake_ms": {},
        "cache": None,
        "resumed_from": resumed_from,
    }
    return decode(BackendStatus, json.dumps(fields))


def test_one_count_for_status_page_and_report() -> None:
    statuses = [
        _status("backend-1", {"backend-2": 2, UNKNOWN: 1}),
        _status("backend-2", {"backend-1": 1, "backend-3": 4}),
        None,  # did not answer
        _status("backend-4", {"backend-1": 3}),  # threaded again: the kinds cycle
    ]
    r = farm_resumptions(statuses, KINDS)
    state = pformat(r)
    assert r.unknown == 1, state
    assert r.by_kind_dict() == {
        (a, b): {
            ("twisted", "threaded"): 2,
            ("threaded", "threaded"): 3,
            ("threaded", "twisted"): 1,
            ("stdlib", "twisted"): 4,
        }.get((a, b), 0)
        for a in KINDS
        for b in KINDS
    }, state
    assert r.by_backend_dict()[("backend-1", "backend-4")] == 3, state
    page = render_farm(_farm_status(r), "token")
    assert _page_matrix(page, "whose-kinds") == r.by_kind_dict(), page


def _farm_status(resumptions: Resumptions) -> FarmStatus:
    text = (
        '{"balancer_url":"","tls":"1.3","cache":"distcache","dc_server":null,"run_dir":"",'
        '"balancer":null,"backends":[],"processes":[]}'
    )
    return dataclasses.replace(decode(FarmStatus, text), resumptions=resumptions)


class _Cells(html.parser.HTMLParser):
    """The cells of one who-resumed-whose table of the status page."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside = table_id, False
        self.cell: tuple[str, str] | None = None
        self.cells: dict[tuple[str, str], int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == self.table_id
        elif tag == "td" and self.inside and "data-made-by" in a:
            self.cell = (a["data-made-by"] or "", a["data-resumed-by"] or "")

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cells[self.cell] = int(data)
            self.cell = None


def _page_matrix(page: str, table_id: str) -> dict[tuple[str, str], int]:
    parser = _Cells(table_id)
    parser.feed(page)
    return parser.cells


# -- one farm of every kind ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kinds_farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmProc]:
    certs_dir = tmp_path_factory.mktemp("certs")
    ensure_demo_certs(certs_dir)
    extra = ("--backend-kinds", ",".join(KINDS))
    with farm(tmp_path_factory.mktemp("kinds"), certs_dir, extra=extra) as f:
        yield f


def _get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def _scrape(admin: str) -> Samples:
    """Every sample of one backend's /metrics (on its admin port)."""
    content_type, body = _get(admin.replace("/status.json", "/metrics"))
    assert content_type.startswith("text/plain; version=0.0.4"), (content_type, body)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _admins(f: FarmProc) -> dict[str, str]:
    return {b["name"]: b["status"]["admin"] for b in f.status()["backends"]}


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_every_kind_counts_what_its_clients_saw(kinds_farm: FarmProc) -> None:
    f = kinds_farm
    admins = _admins(f)
    before = {name: _scrape(url) for name, url in admins.items()}
    workload = WorkloadConfig(clients=10, reconnects=3, concurrency=4, pause_ms=5, time_limit=60)
    result: WorkloadResult = run_workload(HOST, f.port, ca=str(f.ca), tls="1.3", workload=workload)
    after = {name: _scrape(url) for name, url in admins.items()}
    status = decode(FarmStatus, _get(f"{f.status_url}/status.json")[1])
    page = f.page()

    summary = result.summary()
    metric = "tlscache_farm_handshakes_total"
    moved = {
        name: {
            r: _value(after[name], metric, result=r) - _value(before[name], metric, result=r)
            for r in ("full", "resumed", "failed")
        }
        for name in admins
    }
    hits = {
        name: _value(after[name], "tlscache_session_lookups_total", outcome="hit")
        - _value(before[name], "tlscache_session_lookups_total", outcome="hit")
        for name in admins
    }
    state = (
        f"clients saw: {pformat(summary)}\nmetrics moved: {pformat(moved)}\nhits: {pformat(hits)}"
        f"\nfarm: {pformat(status)}\nfirst error: "
        f"{next((s.error for s in result.samples if s.error), None)}"
    )
    assert summary.errors == 0 and summary.skipped == 0, state
    assert summary.connections == 40 and summary.resumed > 0, state

    # The same metric names on every kind: the threaded backend's are the reference.
    names = {name: {key[0] for key in after[name]} for name in admins}
    kinds = {b.name: b.status.kind for b in status.backends if b.status}
    assert kinds == {"backend-1": "threaded", "backend-2": "twisted", "backend-3": "stdlib"}, state
    for name in ("backend-2", "backend-3"):
        assert names[name] == names["backend-1"], (
            name,
            sorted(names[name] ^ names["backend-1"]),
            state,
        )

    # Each backend's counters moved by exactly the handshakes its clients saw there; with
    # OpenSSL's internal cache off, every resumption was a hit in the shared cache.
    for name in admins:
        tally = summary.per_backend.get(name)
        seen = (tally.full, tally.resumed) if tally else (0, 0)
        assert (moved[name]["full"], moved[name]["resumed"]) == seen, (name, state)
        assert hits[name] >= moved[name]["resumed"], (name, state)

    # Every resumption named its maker, and the makers the clients named add up per backend.
    makers = {
        name: {
            dict(key[1])["made_by"]: value - before[name].get(key, 0.0)
            for key, value in after[name].items()
            if key[0] == "tlscache_farm_resumed_from_total"
        }
        for name in admins
    }
    for name in admins:
        clients_named: dict[str, int] = {}
        for sample in result.ok:
            if sample.backend == name and sample.resumed and sample.origin:
                clients_named[sample.origin] = clients_named.get(sample.origin, 0) + 1
        counted = {maker: n for maker, n in makers[name].items() if n}
        assert counted == clients_named, (name, makers, state)

    # Per-handshake records on every kind: timed, with the maker of each resumed session.
    for entry in status.backends:
        s = entry.status
        assert s is not None, state
        assert s.handshake_ms.full.p50 is not None and s.handshake_ms.full.p50 > 0, state
        assert s.recent and all(r.handshake_ms > 0 for r in s.recent), (entry.name, state)
        assert all(r.made_by for r in s.recent if r.resumed), (entry.name, state)

    # Who resumed whose: the clients' own pairs, the status page, its JSON and the report agree.
    clients = resumption_matrix(
        ((s.origin, s.backend) for s in result.ok if s.offered and s.resumed), KINDS
    )
    everything = {(a, b): clients.get((a, b), 0) for a in KINDS for b in KINDS}
    on_page = _page_matrix(page, "whose-kinds")
    in_json = status.resumptions.by_kind_dict()
    run = Run("shared", result, status)
    base = FarmConfig(certs=ensure_demo_certs(f.ca.parent), backend_kinds=KINDS)
    report: dict[tuple[str, str], int] = {}
    for line in who_resumed_whose([run], base)[1:]:
        m = re.fullmatch(r"\s+(\w+) -> (\w+)\s+(\d+)", line)
        assert m, line
        report[m[1], m[2]] = int(m[3])
    matrices = f"clients {everything}\npage {on_page}\njson {in_json}\nreport {report}\n{state}"
    assert on_page == in_json == report == everything, matrices
    assert status.resumptions.unknown == 0, matrices
    assert sum(everything.values()) == summary.resumed, matrices
    by_backend = _page_matrix(page, "whose-backends")
    assert sum(by_backend.values()) == summary.resumed, (by_backend, matrices)
