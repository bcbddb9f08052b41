"""The farm's status and control page (loopback only).

``GET /`` (HTML) and ``GET /status.json``; ``POST /process/NAME/{stop,start,restart}`` kills or
starts one process, so that a demo can take the cache away and bring it back.
``/dc_server/ACTION`` is short for ``/process/dc_server/ACTION``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import httpd
from . import status as status_page
from .config import HOST, FarmError
from .records import ProcessInfo, encode

if TYPE_CHECKING:
    from .orchestrator import Farm

ACTIONS = ("stop", "start", "restart")


def _act(farm: Farm, name: str, action: str) -> ProcessInfo:
    """Stop and/or start ``name`` on the main thread (children must be started there)."""
    sup = farm.supervisor
    if action in ("stop", "restart"):
        info = sup.on_main_thread(lambda: sup.kill(name))
        if action == "stop":
            return info
    return sup.on_main_thread(lambda: sup.restart(name))


def route(farm: Farm, request: httpd.Request) -> httpd.Response:
    """One request to the control page."""
    if request.method in ("GET", "HEAD"):
        if request.path == "/status.json":
            return httpd.json(encode(farm.gather(), indent=1))
        if request.path in ("/", "/status"):
            return httpd.html(status_page.render_farm(farm.gather()))
        return httpd.text(404, "not found\n")
    if request.method != "POST":
        return httpd.text(405, "GET or POST\n")
    parts = request.path.strip("/").split("/")
    if len(parts) == 2:
        parts = ["process", *parts]
    if len(parts) != 3 or parts[0] != "process" or parts[2] not in ACTIONS:
        return httpd.text(404, "POST /process/NAME/{stop,start,restart}\n")
    try:
        info = _act(farm, parts[1], parts[2])
    except KeyError:
        return httpd.text(404, f"no process {parts[1]!r} in this farm\n")
    except FarmError as exc:
        return httpd.text(500, f"{exc}\n")
    if "then=page" in request.query:
        # A button of the status page: back to the page, which shows the new state.
        return httpd.Response(303, b"", headers=(("Location", "/"),))
    return httpd.json(encode(info))


def start_control_page(farm: Farm, port: int) -> httpd.HttpServer:
    """Serve the page from a background thread until ``close()``."""
    try:
        return httpd.HttpServer(HOST, port, lambda request: route(farm, request))
    except OSError as exc:
        raise FarmError(f"farm status page: port {port} (--status-port): {exc.strerror}") from None
