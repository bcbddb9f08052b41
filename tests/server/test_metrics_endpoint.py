"""A farm backend's ``/metrics``: Prometheus text on its admin port that follows real handshakes.

One real backend process (``python -m tlscache_farm.backend``, from the command line the farm
uses), Python's ``ssl`` client making full and resumed handshakes over loopback, and
prometheus_client's own parser reading what the backend serves.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import sys
from collections.abc import Iterator
from pprint import pformat

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tlscache
import tlscache_farm
from tlscache_farm.certs import CertPaths, ensure_demo_certs
from tlscache_farm.config import BackendConfig, CacheConfig, backend_argv
from tlscache_farm.metrics import MetricsPage
from tlscache_farm.procs import free_port, running
from tlscache_farm.records import BackendStatus

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return ensure_demo_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def backend(certs: CertPaths) -> Iterator[tuple[int, int]]:
    """A TLS 1.2 backend with its own in-process cache; yields its TLS and admin ports."""
    port, admin = free_port(), free_port()
    cfg = BackendConfig(
        "backend-1",
        port,
        admin,
        str(certs.cert),
        str(certs.key),
        tls="1.2",
        cache=CacheConfig("memory"),
    )
    with running(backend_argv(cfg), ready=f"IP:127.0.0.1:{admin}"):
        yield port, admin


def get(admin: int, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def scrape(admin: int) -> Samples:
    status, content_type, body = get(admin, "/metrics")
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def handshake(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None
) -> tuple[bool, ssl.SSLSession | None]:
    """One connection and one request; whether it resumed, and the session to resume next."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(b"GET /info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        for _ in range(1000):  # bounded: the server closes after its answer
            try:
                if not tls.recv(65536):
                    break
            except ssl.SSLZeroReturnError:
                break
        return bool(tls.session_reused), tls.session


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after[key] - before.get(key, 0.0)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_metrics_follow_full_and_resumed_handshakes(
    certs: CertPaths, backend: tuple[int, int]
) -> None:
    port, admin = backend
    before = scrape(admin)
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    reused, session = handshake(ctx, port, None)
    resumed = 0
    for _ in range(3):
        reused, session = handshake(ctx, port, session)
        resumed += reused
    after = scrape(admin)
    lookups = {
        o: delta(before, after, "tlscache_session_lookups_total", outcome=o)
        for o in ("hit", "miss", "error", "timeout", "skipped")
    }
    moved = {
        "full": delta(before, after, "tlscache_farm_handshakes_total", result="full"),
        "resumed": delta(before, after, "tlscache_farm_handshakes_total", result="resumed"),
        "stored": delta(before, after, "tlscache_session_writes_total", outcome="stored"),
        "timed": delta(before, after, "tlscache_session_store_lookup_duration_seconds_count"),
        **lookups,
    }
    state = f"resumed by the client: {resumed}\nmoved: {pformat(moved)}\nafter: {pformat(after)}"
    assert resumed == 3, state
    assert (moved["full"], moved["resumed"]) == (1, 3), state
    assert moved["stored"] >= 1, state
    # OpenSSL's internal cache is off: every resumption was a hit in ours.
    assert moved["hit"] == 3, state
    assert moved["timed"] == sum(lookups.values()), state
    assert after[("tlscache_session_breaker_state", (("state", "closed"),))] == 1, state


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_status_page_links_to_metrics(backend: tuple[int, int]) -> None:
    status, _, body = get(backend[1], "/status")
    assert status == 200 and "href='/metrics'" in body, body


def test_without_prometheus_client_the_page_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes an import fail as if the package were not installed; the
    # modules that import it are imported afresh (monkeypatch puts everything back after).
    for name in [n for n in sys.modules if n.split(".")[0] == "prometheus_client"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    for package, module in ((tlscache, "metrics"), (tlscache_farm, "metrics_export")):
        monkeypatch.delitem(sys.modules, f"{package.__name__}.{module}", raising=False)
        monkeypatch.delattr(package, module, raising=False)

    def no_status() -> BackendStatus:
        raise AssertionError("not asked for without prometheus_client")

    response = MetricsPage(no_status, lambda: None).response()
    assert response.status == 503, response
    assert response.body.count(b"\n") == 1, response
    assert response.body.startswith(b"/metrics needs prometheus_client"), response
