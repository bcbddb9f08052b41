"""The farm's control page cannot be driven by another site, nor through DNS rebinding.

A real farm (``python -m tlscache_farm``); every refused POST is followed by a look at the
process it aimed at, which must still be running with the same pid.
"""

from __future__ import annotations

import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.farmctl import FarmProc, farm, request
from tlscache_farm.certs import ensure_demo_certs
from tlscache_farm.control import TOKEN_FILE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

TARGET = "backend-1"
STOP = f"/process/{TARGET}/stop"


@pytest.fixture(scope="module")
def f(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarmProc]:
    """A small farm: one backend with its own cache, and the balancer."""
    certs = tmp_path_factory.mktemp("certs")
    ensure_demo_certs(certs)
    with farm(tmp_path_factory.mktemp("control"), certs, cache="memory", backends=1) as fp:
        yield fp


def own_host(f: FarmProc) -> str:
    return f"127.0.0.1:{f.status_port}"


def target(f: FarmProc) -> tuple[str, int]:
    """(state, pid) of the process the tests aim at."""
    (proc,) = [p for p in f.status()["processes"] if p["name"] == TARGET]
    return proc["state"], proc["pid"]


def post(f: FarmProc, headers: dict[str, str], body: bytes = b"", path: str = STOP) -> int:
    status, _ = request(f.status_port, "POST", path, headers, body)
    return status


def assert_untouched(f: FarmProc, before: tuple[str, int]) -> None:
    assert before[0] == "running"
    assert target(f) == before, "a refused POST changed the process"


def test_cross_site_post_is_refused_with_and_without_the_token(f: FarmProc) -> None:
    before = target(f)
    token = f.token()
    evil = {"Host": own_host(f), "Origin": "http://evil.example"}
    assert post(f, evil) == 403
    assert post(f, {**evil, "X-Tlscache-Token": token}) == 403
    form = urllib.parse.urlencode({"token": token}).encode()
    form_headers = {**evil, "Content-Type": "application/x-www-form-urlencoded"}
    assert post(f, form_headers, form) == 403
    assert post(f, {**evil, "Origin": "null", "X-Tlscache-Token": token}) == 403
    referer = {"Host": own_host(f), "Referer": "http://evil.example/page"}
    assert post(f, {**referer, "X-Tlscache-Token": token}) == 403
    site = {"Host": own_host(f), "Sec-Fetch-Site": "cross-site", "X-Tlscache-Token": token}
    assert post(f, site) == 403
    # Another page on loopback (another port) is another origin too.
    other = {"Host": own_host(f), "Origin": f"http://127.0.0.1:{f.port}"}
    assert post(f, {**other, "X-Tlscache-Token": token}) == 403
    assert_untouched(f, before)


def test_post_without_or_with_a_wrong_token_is_refused(f: FarmProc) -> None:
    before = target(f)
    assert post(f, {"Host": own_host(f)}) == 403
    assert post(f, {"Host": own_host(f), "X-Tlscache-Token": "0" * 43}) == 403
    wrong = urllib.parse.urlencode({"token": f.token()[:-1]}).encode()
    assert post(f, {"Host": own_host(f)}, wrong) == 403
    assert_untouched(f, before)


def test_post_with_a_foreign_host_is_refused(f: FarmProc) -> None:
    before = target(f)
    token = {"X-Tlscache-Token": f.token()}
    assert post(f, {"Host": f"evil.example:{f.status_port}", **token}) in (403, 421)
    assert post(f, {"Host": "evil.example", **token}) in (403, 421)
    assert post(f, token) in (400, 403, 421)  # no Host at all (HTTP/1.1 requires one)
    assert_untouched(f, before)


def test_get_with_a_foreign_host_is_refused_on_every_status_port(f: FarmProc) -> None:
    st = f.status()
    ports = {"farm": f.status_port}
    (backend,) = st["backends"]
    ports["backend"] = urllib.parse.urlsplit(backend["status"]["admin"]).port
    ports["balancer"] = urllib.parse.urlsplit(st["balancer_status"]).port
    for what, port in ports.items():
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
            status, body = request(port, "GET", "/status.json", {"Host": host})
            assert status in (403, 421), (what, host, status)
            assert b"pid" not in body, (what, host)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
            status, body = request(port, "GET", "/status.json", {"Host": host})
            assert status == 200 and b'"pid"' in body, (what, host, status)


def test_the_token_from_the_page_works(f: FarmProc) -> None:
    token = f.token()
    # A script: the token in its header.
    assert f.post(STOP)["state"] == "stopped"
    assert target(f)[0] == "stopped"
    # The page's own button: a form with the token, sent by a browser from the page.
    headers = {
        "Host": own_host(f),
        "Origin": f"http://{own_host(f)}",
        "Referer": f"http://{own_host(f)}/",
        "Sec-Fetch-Site": "same-origin",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    form = urllib.parse.urlencode({"token": token}).encode()
    status, _ = request(f.status_port, "POST", f"/process/{TARGET}/start?then=page", headers, form)
    assert status == 303
    assert target(f)[0] == "running"


def test_token_file_is_private_and_matches_the_page(f: FarmProc) -> None:
    path = Path(f.status()["run_dir"]) / TOKEN_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == f.token()
