"""The sans-IO modules stay free of I/O: no socket, asyncio, selectors or logging imports.

Checked on the source (``ast``), so a forbidden import is caught even where it
sits in a function body or an ``if TYPE_CHECKING`` block; imports of other
tlscache modules are followed, so I/O cannot come in through them either.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from tlscache.distcache import SANS_IO_MODULES
from tlscache.memcache import SANS_IO_MODULES as MEMCACHE_SANS_IO_MODULES

FORBIDDEN = frozenset({"socket", "asyncio", "selectors", "logging"})


def imported_modules(name: str) -> set[str]:
    """Every module the source of ``name`` imports, as absolute dotted names."""
    module = importlib.import_module(name)
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(), module.__file__)
    package = name if Path(module.__file__).name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{prefix}.{base}" if base else prefix
            found.add(base)
            if base.startswith("tlscache"):
                # "from tlscache.distcache import sockets" imports a module, not a name.
                found.update(
                    f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")
                )
    return found


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except ImportError:  # the parent is a module, so this is a name in it
        return False


def io_imports(name: str, seen: set[str] | None = None) -> list[str]:
    """The forbidden imports of ``name`` and of the tlscache modules it imports."""
    seen = set() if seen is None else seen
    seen.add(name)
    bad: list[str] = []
    for imported in sorted(imported_modules(name)):
        if imported.partition(".")[0] in FORBIDDEN:
            bad.append(f"{name} imports {imported}")
        elif imported.startswith("tlscache.") and imported not in seen:
            bad += io_imports(imported, seen)
    return bad


@pytest.mark.parametrize("name", SANS_IO_MODULES + MEMCACHE_SANS_IO_MODULES)
def test_module_is_sans_io(name: str) -> None:
    assert io_imports(name) == []


def test_the_check_catches_an_io_import() -> None:
    assert "tlscache.distcache.sockets imports socket" in io_imports("tlscache.distcache.sockets")
    assert any("asyncio" in line for line in io_imports("tlscache.distcache.server"))
