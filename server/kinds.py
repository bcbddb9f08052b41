"""``--backend-kinds``: which server each backend runs as, read without importing any of them.

Backend *i* (1-based) runs as kind ``(i - 1) mod len`` of the list: the threaded pyOpenSSL
server (:mod:`.backend`), a twisted.web server (:mod:`.backend_twisted`) or an asyncio server
on the standard library's ``ssl`` (:mod:`.backend_stdlib`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from .config import BACKEND_KINDS, BackendKind

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
    """Resumptions by (kind that made the session, kind that resumed it), from the clients'
    (backend of the session's full handshake, backend of the resumption) pairs."""
    matrix: dict[tuple[BackendKind, BackendKind], int] = {}
    for made, resumed in pairs:
        a, b = backend_kind(kinds, made), backend_kind(kinds, resumed)
        if a is not None and b is not None:
            matrix[a, b] = matrix.get((a, b), 0) + 1
    return matrix


def matrix_lines(
    matrices: list[dict[tuple[BackendKind, BackendKind], int]],
    kinds: tuple[BackendKind, ...],
    width: int,
) -> list[str]:
    """One row per (made by, resumed by) pair of the kinds in use, one cell per matrix."""
    used = list(dict.fromkeys(kinds))
    lines = ["  who resumed whose (session made by -> resumed by, as the clients saw it)"]
    for a in used:
        for b in used:
            label = f"    {a} -> {b}"
            lines.append(f"{label:<36}" + "".join(f"{m.get((a, b), 0):>{width}}" for m in matrices))
    return lines
