"""``/metrics`` on a backend's admin port: Prometheus text (format 0.0.4) for a scraper.

The registry is built at the first scrape, after the backend has installed its cache. Without
prometheus_client (the ``metrics`` extra) the page answers 503 with the reason in one line, and
the rest of the backend runs as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import httpd
from .records import BackendStatus

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from tlscache import SessionCache

__all__ = ["MetricsPage"]


class MetricsPage:
    """The ``/metrics`` page of one backend."""

    def __init__(
        self,
        status: Callable[[], BackendStatus],
        cache: Callable[[], SessionCache | None],
    ) -> None:
        self._status = status
        self._cache = cache
        self._lock = threading.Lock()
        self._registry: CollectorRegistry | None = None

    def response(self) -> httpd.Response:
        try:
            from . import metrics_export
        except ImportError as exc:
            return httpd.text(
                503,
                f"/metrics needs prometheus_client (pip install 'tlscache[metrics]'): "
                f"cannot import {exc.name}\n",
            )
        with self._lock:
            if self._registry is None:
                self._registry = metrics_export.backend_registry(self._status, self._cache())
            registry = self._registry
        return httpd.Response(200, metrics_export.render(registry), metrics_export.CONTENT_TYPE)
