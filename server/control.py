"""The farm's status and control page (loopback only).

``GET /`` (HTML) and ``GET /status.json``; ``POST /process/NAME/{stop,start,restart}`` kills or
starts one process, so that a demo can take the cache away and bring it back.
``/dc_server/ACTION`` is short for ``/process/dc_server/ACTION``.

A POST stops processes, so a browser must not be made to send one by some other site, nor by a
page that re-points its own name at 127.0.0.1 (DNS rebinding). Every request must name the
farm's own address in ``Host`` (:func:`httpd.host_guard`), and a POST is refused unless

* it comes from this page: ``Origin`` and ``Referer``, when present, are the farm's own origin,
  and ``Sec-Fetch-Site``, when present, says ``same-origin`` or ``none``;
* it carries this run's token, as the form field ``token`` (the page's buttons embed it) or the
  ``X-Tlscache-Token`` header (scripts read it from ``RUN_DIR/control-token``).
"""

from __future__ import annotations

import hmac
import os
import secrets
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from . import httpd
from . import status as status_page
from .config import HOST, FarmError
from .records import ProcessInfo, encode

if TYPE_CHECKING:
    from .orchestrator import Farm

ACTIONS = ("stop", "start", "restart")
TOKEN_FILE = "control-token"
TOKEN_HEADER = "X-Tlscache-Token"
TOKEN_FIELD = "token"
#: ``Sec-Fetch-Site`` values a POST may carry: from the page itself, or typed by its user.
FETCH_SITES_ALLOWED = frozenset({"same-origin", "none"})


def _act(farm: Farm, name: str, action: str) -> ProcessInfo:
    """Stop and/or start ``name`` on the main thread (children must be started there)."""
    sup = farm.supervisor
    if action in ("stop", "restart"):
        info = sup.on_main_thread(lambda: sup.kill(name))
        if action == "stop":
            return info
    return sup.on_main_thread(lambda: sup.restart(name))


def _origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of ``url``, lower case; None if it has no host."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme.lower()}://{host.lower()}" + (f":{port}" if port is not None else "")


class ControlPage:
    """The page of one farm: its token, the origins it belongs to, and its HTTP server."""

    def __init__(self, farm: Farm, port: int, token: str | None = None) -> None:
        self.farm = farm
        self.token = token or secrets.token_urlsafe(32)
        try:
            self.server = httpd.HttpServer(HOST, port, self.route)
        except OSError as exc:
            raise FarmError(
                f"farm status page: port {port} (--status-port): {exc.strerror}"
            ) from None
        self.port = self.server.port
        self.origins = frozenset(f"http://{host}" for host in httpd.loopback_hosts(self.port))

    def close(self) -> None:
        self.server.close()

    def write_token(self, run_dir: Path) -> Path:
        """The token in ``run_dir`` (mode 0600), for scripts that drive the page."""
        path = run_dir / TOKEN_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(self.token + "\n")
        return path

    # -- requests ------------------------------------------------------------------------------

    def route(self, request: httpd.Request) -> httpd.Response:
        """One request to the control page (its Host already checked by the server)."""
        if request.method in ("GET", "HEAD"):
            if request.path == "/status.json":
                return httpd.json(encode(self.farm.gather(), indent=1))
            if request.path in ("/", "/status"):
                return httpd.html(status_page.render_farm(self.farm.gather(), self.token))
            return httpd.text(404, "not found\n")
        if request.method != "POST":
            return httpd.text(405, "GET or POST\n")
        refusal = self.refusal(request)
        if refusal is not None:
            return httpd.text(403, f"refused: {refusal}\n")
        parts = request.path.strip("/").split("/")
        if len(parts) == 2:
            parts = ["process", *parts]
        if len(parts) != 3 or parts[0] != "process" or parts[2] not in ACTIONS:
            return httpd.text(404, "POST /process/NAME/{stop,start,restart}\n")
        try:
            info = _act(self.farm, parts[1], parts[2])
        except KeyError:
            return httpd.text(404, f"no process {parts[1]!r} in this farm\n")
        except FarmError as exc:
            return httpd.text(500, f"{exc}\n")
        if "then=page" in request.query:
            # A button of the status page: back to the page, which shows the new state.
            return httpd.Response(303, b"", headers=(("Location", "/"),))
        return httpd.json(encode(info))

    def refusal(self, request: httpd.Request) -> str | None:
        """Why a POST may not act (None: it may): not from this page, or without the token."""
        for name in ("origin", "referer"):
            values = request.header_values(name)
            if len(values) > 1:
                return f"more than one {name.title()} header"
            if values and _origin_of(values[0]) not in self.origins:
                return f"{name.title()} is not this page ({', '.join(sorted(self.origins))})"
        site = request.header_values("sec-fetch-site")
        if site and (len(site) > 1 or site[0].strip().lower() not in FETCH_SITES_ALLOWED):
            return "sent by another site (Sec-Fetch-Site)"
        if not self._token_ok(request):
            return (
                f"missing or wrong token: send the {TOKEN_HEADER} header with the contents of "
                f"RUN_DIR/{TOKEN_FILE}, or use the buttons of the page"
            )
        return None

    def _token_ok(self, request: httpd.Request) -> bool:
        candidates = request.header_values(TOKEN_HEADER)
        if not candidates and request.body:
            try:
                form = urllib.parse.parse_qs(
                    request.body.decode("ascii"), max_num_fields=8, strict_parsing=False
                )
            except (UnicodeDecodeError, ValueError):
                return False
            candidates = form.get(TOKEN_FIELD, [])
        if len(candidates) != 1:
            return False
        expected = self.token.encode()
        return hmac.compare_digest(candidates[0].strip().encode("utf-8", "replace"), expected)


def start_control_page(farm: Farm, port: int) -> ControlPage:
    """Serve the page from a background thread until ``close()``; its token goes to the run
    directory."""
    page = ControlPage(farm, port)
    try:
        page.write_token(farm.run_dir)
    except OSError:
        page.close()
        raise
    return page
