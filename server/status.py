"""HTML for people: one backend's status page and the farm's aggregated page.

The JSON next to each page carries the same data for machines; these functions only render it,
so that nothing on a status page is computed differently from what the JSON says.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
from collections.abc import Callable

from tlscache import CacheStats

from .records import (
    BackendStatus,
    BalancerBackend,
    FarmStatus,
    Handshake,
    Resumptions,
    TicketStatus,
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:72em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f3f3f3}td{white-space:nowrap}
.yes{color:#070;font-weight:bold}.no{color:#a50}.dead{color:#b00}
code{background:#f6f6f6;padding:0 .2em}form{margin:0}
"""


def page(title: str, body: str, refresh: int | None = None) -> str:
    """A complete HTML document."""
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'>{meta}"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _e(value: object) -> str:
    return html.escape("-" if value is None else str(value))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _yes(flag: bool) -> str:
    return '<span class="yes">resumed</span>' if flag else '<span class="no">full</span>'


def _state(state: str) -> str:
    return _e(state) if state == "running" else f'<b class="dead">{_e(state)}</b>'


def _control(name: str, state: str, token: str) -> str:
    """A button that POSTs /process/NAME/stop (a SIGKILL) or /process/NAME/start, with the
    run's token (the control page refuses a POST without it)."""
    action = "stop" if state == "running" else "start"
    title = "SIGKILL, like a crash" if action == "stop" else "start again on the same address"
    return (
        f'<form method="post" action="/process/{html.escape(name)}/{action}?then=page">'
        f'<input type="hidden" name="token" value="{html.escape(token)}">'
        f'<button title="{title}">{action}</button></form>'
    )


def _rate(resumed: int, full: int) -> str:
    total = resumed + full
    return f"{100.0 * resumed / total:.1f}%" if total else "-"


def _cache_rows(cache: CacheStats) -> list[list[str]]:
    """Every counter of the cache statistics as a key/value row."""
    rows: list[list[str]] = []
    for f in dataclasses.fields(cache):
        value = getattr(cache, f.name)
        if isinstance(value, tuple) and len(value) > 8:
            rows.append([_e(f.name), _e(f"[{len(value)} values]")])
        elif isinstance(value, float):
            rows.append([_e(f.name), _e(f"{value:.3f}")])
        else:
            rows.append([_e(f.name), _e(value)])
    return rows


def _recent_rows(recent: list[Handshake], with_backend: bool) -> list[list[str]]:
    rows = []
    for r in reversed(recent):
        when = datetime.datetime.fromtimestamp(r.time).strftime("%H:%M:%S.%f")[:-3]
        row = [_e(when)]
        if with_backend:
            row.append(_e(r.backend))
        row += [_yes(r.resumed), f"<code>{_e(r.session_id)}</code>", _e(r.version)]
        row += [_ms(r.handshake_ms), _e(r.made_by if r.resumed else "")]
        rows.append(row)
    return rows


def _cache_html(s: BackendStatus) -> str:
    if s.cache is not None:
        return _table(["cache counter", "value"], _cache_rows(s.cache))
    if s.cache_error is not None:
        return f"<p>Session cache <b>{_e(s.cache_mode)}</b>: {_e(s.cache_error)}</p>"
    return f"<p>Session cache: <b>{_e(s.cache_mode)}</b>.</p>"


#: The ticket counters on the status pages, with their column titles.
TICKET_COLUMNS: tuple[tuple[str, Callable[[TicketStatus], object]], ...] = (
    ("issued", lambda t: t.issued),
    ("decrypted", lambda t: t.decrypted),
    ("renewed", lambda t: t.renewed),
    ("rejected", lambda t: t.rejected),
    ("rotations", lambda t: t.rotations),
    ("store failures", lambda t: t.store_failures),
    ("keys held", lambda t: t.keys_held),
    ("current period", lambda t: t.current_period),
    ("key", lambda t: "shared" if t.current_shared else "local"),
)


def _ticket_cells(t: TicketStatus | None) -> list[str]:
    if t is None:
        return ["-"] * len(TICKET_COLUMNS)
    cells = [_e(value(t)) for _, value in TICKET_COLUMNS]
    if not t.current_shared:
        cells[-1] = '<b class="dead">local</b>'
    return cells


def _tickets_html(s: BackendStatus) -> str:
    """The backend's ticket keys: what it issued and accepted, and the key it issues under."""
    if s.tickets is None:
        return ""
    titles = [title for title, _ in TICKET_COLUMNS]
    return (
        f"<h2>Session tickets</h2><p>Resumption <b>{_e(s.resumption)}</b>, one shared key per "
        f"{_e(s.tickets.period_s)} s.</p>{_table(titles, [_ticket_cells(s.tickets)])}"
    )


def _tickets_table(data: FarmStatus) -> str:
    """Per backend, its ticket counters (the farm's page), when the farm uses tickets."""
    if not any(b.status and b.status.tickets for b in data.backends):
        return ""
    rows = [
        [_e(b.name), *_ticket_cells(b.status.tickets if b.status else None)] for b in data.backends
    ]
    table = _table(["backend", *(title for title, _ in TICKET_COLUMNS)], rows)
    return (
        f"<h2>Session tickets</h2><p>Resumption <b>{_e(data.resumption)}</b>: decrypted + "
        f"renewed are the handshakes resumed by ticket; a local key is not shared.</p>{table}"
    )


def render_backend(s: BackendStatus) -> str:
    """One backend's page: its handshakes, latency and cache counters."""
    hs, lat = s.handshakes, s.handshake_ms
    summary = _table(
        ["connections", "active", "requests", "full", "resumed", "failed", "resumed share"],
        [
            [
                _e(s.connections),
                _e(s.active),
                _e(s.requests),
                _e(hs.full),
                _e(hs.resumed),
                _e(hs.failed),
                _rate(hs.resumed, hs.full),
            ]
        ],
    )
    latency = _table(
        ["server handshake ms", "p50", "p99"],
        [
            ["full", _ms(lat.full.p50), _ms(lat.full.p99)],
            ["resumed", _ms(lat.resumed.p50), _ms(lat.resumed.p99)],
        ],
    )
    recent = _table(
        ["time", "handshake", "session id", "TLS", "ms", "session made by"],
        _recent_rows(s.recent, with_backend=False),
    )
    keys = f" Key ring <code>{_e(s.keys)}</code>." if s.keys else ""
    body = (
        f"<p>{_e(s.kind)} backend, pid {_e(s.pid)}, TLS &le; {_e(s.tls)}, "
        f"cache <b>{_e(s.cache_mode)}</b> "
        f"({_e(s.dc_address)}), up {_e(s.uptime_s)} s.{keys} JSON: "
        "<a href='/status.json'>/status.json</a>, Prometheus: <a href='/metrics'>/metrics</a>.</p>"
        f"{summary}{latency}<h2>Session cache</h2>{_cache_html(s)}{_tickets_html(s)}"
        f"<h2>Recent handshakes</h2>{recent}"
    )
    return page(f"tlscache backend {s.name}", body, refresh=5)


def _backend_row(s: BackendStatus, balancer: BalancerBackend | None) -> list[str]:
    hs, lat, cache = s.handshakes, s.handshake_ms, s.cache
    return [
        _e(s.name),
        _e(balancer.connections if balancer else None),
        _e(hs.full),
        _e(hs.resumed),
        _rate(hs.resumed, hs.full),
        _e(cache.hits if cache else None),
        _e(cache.misses if cache else None),
        _ms(lat.full.p50) + " / " + _ms(lat.resumed.p50),
        _e(_lookup_latency(cache)),
    ]


#: The counters of sealed values a backend's cache refused, with their column titles: a
#: refusal is a full handshake, and a rising count says why (a retired key, a forged value...).
SEAL_COUNTERS: tuple[tuple[str, Callable[[CacheStats], int]], ...] = (
    ("refused", lambda c: c.sealed_refused),
    ("malformed", lambda c: c.sealed_malformed),
    ("unknown key", lambda c: c.sealed_unknown_key),
    ("retired key", lambda c: c.sealed_retired_key),
    ("tampered", lambda c: c.sealed_tampered),
    ("expired", lambda c: c.sealed_expired),
)


def _seal_table(data: FarmStatus) -> str:
    """Per backend, the sealed values its cache refused, by reason."""
    rows = []
    for b in data.backends:
        cache = b.status.cache if b.status else None
        cells = [_e(counter(cache)) if cache else "-" for _, counter in SEAL_COUNTERS]
        rows.append([_e(b.name), *cells])
    return _table(["backend", *(title for title, _ in SEAL_COUNTERS)], rows)


def _cache_servers_table(data: FarmStatus) -> str:
    """memcached / redis-servers: health as the backends see it, and the sessions each holds
    (counted by the backends at each write, per the server their store placed it on)."""
    if not data.cache_servers:
        return ""
    rows = [
        [
            _e(c.name),
            _e(c.address),
            "up" if c.up else f'<b class="dead">down for {_e(", ".join(c.down_for))}</b>',
            _e(c.failures),
            _e(c.keys),
            "-" if c.share is None else f"{100.0 * c.share:.1f}%",
        ]
        for c in data.cache_servers
    ]
    table = _table(["cache server", "address", "health", "failures", "sessions", "share"], rows)
    return f"<h2>Cache servers</h2>{table}"


def render_farm(data: FarmStatus, token: str) -> str:
    """The farm's page: who resumed where, hit/miss and cache latency for every backend; its
    buttons carry ``token``."""
    procs = _table(
        ["process", "pid", "state", "address", ""],
        [
            [
                _e(p.name),
                _e(p.pid),
                _state(p.state),
                _e(p.address),
                _control(p.name, p.state, token),
            ]
            for p in data.processes
        ],
    )
    rows = []
    recent: list[Handshake] = []
    bal_counts = {b.address: b for b in data.balancer.backends} if data.balancer else {}
    for b in data.backends:
        s = b.status
        if s is None:
            rows.append([_e(b.name), '<b class="dead">unreachable</b>'] + ["-"] * 7)
            continue
        rows.append(_backend_row(s, bal_counts.get(b.address)))
        recent += [dataclasses.replace(r, backend=s.name) for r in s.recent]
    backends = _table(
        [
            "backend",
            "balancer conns",
            "full",
            "resumed",
            "resumed share",
            "cache hits",
            "cache misses",
            "hs ms p50 full / resumed",
            "cache lookup p50 / p99",
        ],
        rows,
    )
    recent.sort(key=lambda r: r.time)
    servers = _cache_servers_table(data)
    who = _table(
        ["time", "backend", "handshake", "session id", "TLS", "server ms", "session made by"],
        _recent_rows(recent[-60:], with_backend=True),
    )
    keys = (
        f"<h2>Sealed sessions refused</h2><p>Sessions are sealed with the key ring "
        f"<code>{_e(data.keys)}</code>; a stored value that does not open is a miss, "
        f"counted here by reason.</p>{_seal_table(data)}"
        if data.keys
        else ""
    )
    body = (
        f"<p>Balancer <code>{_e(data.balancer_url)}</code>, TLS &le; {_e(data.tls)}, "
        f"cache <b>{_e(data.cache)}</b>, resumption <b>{_e(data.resumption)}</b>. "
        "JSON: <a href='/status.json'>/status.json</a>.</p>"
        f"<h2>Backends</h2>{backends}{_tickets_table(data)}{servers}{keys}"
        f"<h2>Processes</h2>{procs}"
        f"{_whose_html(data.resumptions)}"
        "<h2>Who resumed where</h2><p>TLS 1.2: one session id, full on one backend and then "
        "resumed on others, is a session shared across the farm. TLS 1.3: every ticket has its "
        "own id, and a resumed handshake shows the id of the ticket it used.</p>"
        f"{who}"
    )
    return page("tlscache farm", body, refresh=3)


def _matrix_table(
    table_id: str, rows: list[str], columns: list[str], counts: dict[tuple[str, str], int]
) -> str:
    """A matrix: one row per maker, one column per resumer, a count in each cell (each cell
    names its pair in ``data-`` attributes, for scripts)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in [CORNER, *columns])
    body = "".join(
        f"<tr><th>{_e(a)}</th>"
        + "".join(
            f'<td data-made-by="{_e(a)}" data-resumed-by="{_e(b)}">{_e(counts.get((a, b), 0))}</td>'
            for b in columns
        )
        + "</tr>"
        for a in rows
    )
    return f'<table id="{_e(table_id)}"><tr>{head}</tr>{body}</table>'


#: The corner cell of a who-resumed-whose matrix: what its rows and columns are.
CORNER = "made by \u2193 resumed by \u2192"


def _whose_html(r: Resumptions) -> str:
    """Who resumed whose: by kind (rows made the session, columns resumed it), then by backend."""
    names = sorted(
        {c.made_by for c in r.by_backend} | {c.resumed_by for c in r.by_backend},
        key=lambda n: (len(n), n),
    )
    by_backend = _matrix_table("whose-backends", names, names, r.by_backend_dict()) if names else ""
    return (
        "<h2>Who resumed whose</h2><p>Resumed handshakes by the backend kind that made the "
        "session (rows) and the kind that resumed it (columns), as the backends recorded them; "
        "the client names the maker in its request (the farm's clients do), and "
        f"<b>{_e(r.unknown)}</b> resumed handshakes named none.</p>"
        f"{_matrix_table('whose-kinds', r.kinds, r.kinds, r.by_kind_dict())}"
        f"{by_backend}"
    )


def _lookup_latency(cache: CacheStats | None) -> str | None:
    """Store lookup latency as the cache reports it (p50 / p99, ms)."""
    if cache is None or not sum(cache.latency_counts):
        return None  # no lookup yet: "0.00 ms" would be a measurement nobody made
    return f"{_ms(cache.latency_p50_ms)} / {_ms(cache.latency_p99_ms)} ms"
