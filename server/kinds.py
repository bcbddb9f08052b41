"""``--backend-kinds``: which server each backend runs as, read without importing any of them.

Backend *i* (1-based) runs as kind ``(i - 1) mod len`` of the list: the threaded pyOpenSSL
server (:mod:`.backend`), a twisted.web server (:mod:`.backend_twisted`) or an asyncio server
on the standard library's ``ssl`` (:mod:`.backend_stdlib`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from .config import BACKEND_KINDS, BackendKind
from .handshakes import UNKNOWN
from .records import BackendStatus, ResumptionCell, Resumptions

INSTALL_TWISTED = "pip install 'tlscache[twisted]'"


def parse_kinds(text: str) -> tuple[BackendKind, ...]:
    """``threaded,twisted`` as kinds; ValueError naming the unknown one."""
    kinds: list[BackendKind] = []
    for word in (w.strip() for w in text.split(",")):
        match = next((k for k in BACKEND_KINDS if k == word), None)
        if match is None:
            raise ValueError(f"unknown backend kind {word!r} (one of {', '.join(BACKEND_KINDS)})")
        kinds.append(match)
    return tuple(kinds)


def kind_of(kinds: tuple[BackendKind, ...], index: int) -> BackendKind:
    """The kind of backend ``index`` (1-based)."""
    return kinds[(index - 1) % len(kinds)]


def kinds_problem(kinds: tuple[BackendKind, ...]) -> str | None:
    """Why these kinds cannot run here (None: they can)."""
    if "twisted" in kinds:
        try:
            importlib.import_module("twisted.web.server")
        except ImportError:
            return f"backend kind twisted needs the 'twisted' extra: {INSTALL_TWISTED}"
    return None


def backend_kind(kinds: tuple[BackendKind, ...], name: str | None) -> BackendKind | None:
    """The kind of the backend called ``name`` (``backend-N``); None for anything else."""
    prefix, _, number = (name or "").rpartition("-")
    if prefix != "backend" or not number.isdigit() or int(number) < 1:
        return None
    return kind_of(kinds, int(number))


def resumption_matrix(
    pairs: Iterable[tuple[str | None, str | None]], kinds: tuple[BackendKind, ...]
) -> dict[tuple[BackendKind, BackendKind], int]:
    """Resumptions by (kind that made the session, kind that resumed it), from (backend of the
    session's full handshake, backend of the resumption) pairs, one per resumption."""
    return counted_matrix(((made, resumed, 1) for made, resumed in pairs), kinds)


def counted_matrix(
    counts: Iterable[tuple[str | None, str | None, int]], kinds: tuple[BackendKind, ...]
) -> dict[tuple[BackendKind, BackendKind], int]:
    """:func:`resumption_matrix` of (made by, resumed by, how many) backend triples."""
    matrix: dict[tuple[BackendKind, BackendKind], int] = {}
    for made, resumed, n in counts:
        a, b = backend_kind(kinds, made), backend_kind(kinds, resumed)
        if a is not None and b is not None and n:
            matrix[a, b] = matrix.get((a, b), 0) + n
    return matrix


def farm_resumptions(
    backends: Iterable[BackendStatus | None], kinds: tuple[BackendKind, ...]
) -> Resumptions:
    """Who resumed whose in a farm, from its backends' records (``resumed_from``): by kind
    (every pair of the kinds in use, zeros included) and by backend. The one place both the
    status page and the report count it."""
    triples: list[tuple[str, str, int]] = []
    unknown = 0
    for s in backends:
        if s is None:
            continue
        for made, n in s.resumed_from.items():
            if made == UNKNOWN:
                unknown += n
            else:
                triples.append((made, s.name, n))
    used = list(dict.fromkeys(kinds))
    by_kind = counted_matrix(triples, kinds)
    per_backend: dict[tuple[str, str], int] = {}
    for made, resumed, n in triples:
        per_backend[made, resumed] = per_backend.get((made, resumed), 0) + n
    return Resumptions(
        kinds=list(used),
        by_kind=[ResumptionCell(a, b, by_kind.get((a, b), 0)) for a in used for b in used],
        by_backend=[
            ResumptionCell(a, b, n)
            for (a, b), n in sorted(per_backend.items(), key=lambda kv: _backend_order(kv[0]))
        ],
        unknown=unknown,
    )


def _backend_order(pair: tuple[str, str]) -> tuple[int, int]:
    def number(name: str) -> int:
        tail = name.rpartition("-")[2]
        return int(tail) if tail.isdigit() else 0

    return number(pair[0]), number(pair[1])


def matrix_lines(
    matrices: list[dict[tuple[str, str], int]],
    kinds: tuple[BackendKind, ...],
    width: int,
) -> list[str]:
    """One row per (made by, resumed by) pair of the kinds in use, one cell per matrix."""
    used = list(dict.fromkeys(kinds))
    lines = ["  who resumed whose (session made by -> resumed by, as the clients named the maker)"]
    for a in used:
        for b in used:
            label = f"    {a} -> {b}"
            lines.append(f"{label:<36}" + "".join(f"{m.get((a, b), 0):>{width}}" for m in matrices))
    return lines
