"""What every kind of backend records of its handshakes, in one place.

The threaded, Twisted and stdlib backends time a handshake from the accepted connection to its
end, as each of them can, and hand the result here: the counters (full, resumed, failed, by
TLS version), the latency windows, the recent handshakes, and for a resumed handshake which
backend made its session. That last fact the client has: a backend sees the id it looked up,
not which other process issued it (that would take every backend publishing every id it
issues). A client of the farm says it in the
``X-Tlscache-Made-By`` request header; a resumption without a usable header counts under
:data:`UNKNOWN`. The header only feeds a display counter: it is checked to be a backend name
and is never logged.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from .records import Handshake, HandshakeCounts, HandshakeLatency, Percentiles

#: The request header in which a client names the backend that made the session it resumed.
MADE_BY_HEADER = "X-Tlscache-Made-By"
#: The key of resumptions whose maker no client named.
UNKNOWN = "unknown"
RECENT = 50
LATENCY_WINDOW = 2000
_BACKEND_NAME = re.compile(r"backend-[1-9][0-9]{0,3}")


def claimed_maker(value: str | None) -> str:
    """The backend a client named in :data:`MADE_BY_HEADER`, or :data:`UNKNOWN` if it named
    none or something that is not a backend name (the counters stay bounded)."""
    if value is not None and _BACKEND_NAME.fullmatch(value.strip()):
        return value.strip()
    return UNKNOWN


@dataclass(frozen=True)
class HandshakeSnapshot:
    """The log's state at one moment, for a status record."""

    counts: HandshakeCounts
    by_version: dict[str, int]
    recent: list[Handshake]
    latency: HandshakeLatency
    resumed_from: dict[str, int]


class HandshakeLog:
    """Handshake counters, latency and recent handshakes of one backend (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.full = 0
        self.resumed = 0
        self.failed = 0
        self.by_version: dict[str, int] = {}
        self.latency_full: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.latency_resumed: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.recent: deque[Handshake] = deque(maxlen=RECENT)
        self.resumed_from: dict[str, int] = {}

    def fail(self) -> None:
        """A handshake that did not complete."""
        with self._lock:
            self.failed += 1

    def complete(
        self, peer: str, resumed: bool, version: str, session_id: str | None, ms: float
    ) -> Handshake:
        """A completed handshake of ``ms`` milliseconds; the entry to pass to :meth:`made_by`."""
        entry = Handshake(
            time=time.time(),
            peer=peer,
            resumed=resumed,
            version=version,
            session_id=session_id,
            handshake_ms=round(ms, 3),
        )
        with self._lock:
            if resumed:
                self.resumed += 1
                self.latency_resumed.append(ms)
            else:
                self.full += 1
                self.latency_full.append(ms)
            self.by_version[version] = self.by_version.get(version, 0) + 1
            self.recent.append(entry)
        return entry

    def made_by(self, entry: Handshake, header: str | None) -> None:
        """The first request of a resumed connection names (or not) the session's maker."""
        if not entry.resumed:
            return
        maker = claimed_maker(header)
        with self._lock:
            self.resumed_from[maker] = self.resumed_from.get(maker, 0) + 1
            for i in range(len(self.recent) - 1, -1, -1):
                if self.recent[i] is entry:
                    self.recent[i] = replace(entry, made_by=maker)
                    break

    def snapshot(self) -> HandshakeSnapshot:
        with self._lock:
            full_ms, res_ms = list(self.latency_full), list(self.latency_resumed)
            counts = HandshakeCounts(self.full, self.resumed, self.failed)
            by_version, recent = dict(self.by_version), list(self.recent)
            resumed_from = dict(self.resumed_from)
        latency = HandshakeLatency(Percentiles.of(full_ms), Percentiles.of(res_ms))
        return HandshakeSnapshot(counts, by_version, recent, latency, resumed_from)
