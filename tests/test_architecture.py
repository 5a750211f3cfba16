"""The package's shape: no import cycles between lkspec's own modules, and no file too long to read.

A cycle hides behind an import placed inside a function: it works until someone moves the import to the
top, or imports the modules in another order, and then fails with a half-initialised module. So the graph
counts every import of an `lkspec` module wherever it sits (module level, functions, methods, relative
imports), and the checker is itself tested on a planted cycle so that it cannot pass by seeing nothing.

Importing `lkspec.a.b` also runs `lkspec/a/__init__.py`; that counts as an edge to `lkspec.a`, except from
modules inside `lkspec.a` (their package is already being imported when they run). A module that takes a
name from its own package (`from lkspec.a import X` inside `lkspec.a.b`) does depend on that package's
`__init__`, so that is an edge.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 400


@dataclass(frozen=True)
class Edge:
    """One import: which module needs which, and the line that says so (for the failure message)."""

    src: str
    dst: str
    where: str  # "path:line: import statement", joined by "; " when several lines make the same edge


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file}; a package's `__init__.py` is the package's own node."""
    out = {}
    for f in sorted((root / package).rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(root: Path, package: str) -> list[Edge]:
    """Every import between modules of `package` under `root`, wherever in the file it is written."""
    modules = module_files(root, package)
    found: dict[tuple[str, str], list[str]] = {}  # (importer, imported) -> the import lines, in file order
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]  # the package relative imports start from
        text = path.read_text()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            explicit: list[str] = []  # modules whose own code the statement needs
            if isinstance(node, ast.Import):
                explicit = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import sub` takes the submodule pkg.sub when there is one; any other name comes
                # from pkg's own code
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                explicit = subs if len(subs) == len(node.names) else [base, *subs]
            else:
                continue
            statement = " ".join((ast.get_source_segment(text, node) or "").split()).replace("( ", "(")
            where = f"{path.relative_to(root)}:{node.lineno}: {statement}"
            for t in explicit:
                if t != package and not t.startswith(package + "."):
                    continue
                # each enclosing package the import runs on the way (unless it is already running: an
                # ancestor of the importer), then the module itself
                dsts = [a for a in _ancestors(t) if a not in _ancestors(name)] + [t]
                for dst in dsts:
                    if dst in modules and dst != name:
                        lines = found.setdefault((name, dst), [])
                        if where not in lines:
                            lines.append(where)
    return [Edge(src, dst, "; ".join(sorted(wheres, key=_line_no))) for (src, dst), wheres in found.items()]


def _line_no(where: str) -> int:
    return int(where.split(":")[1])


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The cycles, as the edges that close them: the strongly connected components (Tarjan), then the
    shortest cycle through each of their modules, so that breaking one cycle does not hide another."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.src, []).append(e)
        graph.setdefault(e.dst, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            if e.dst not in index:
                visit(e.dst)
                low[v] = min(low[v], low[e.dst])
            elif e.dst in on_stack:
                low[v] = min(low[v], index[e.dst])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles: dict[tuple[tuple[str, str], ...], list[Edge]] = {}
    for comp in sccs:
        for start in sorted(comp):
            cycle = _shortest_cycle(graph, comp, start)
            first = min(range(len(cycle)), key=lambda i: cycle[i].src)  # rotate: start at the smallest name
            cycle = cycle[first:] + cycle[:first]
            cycles.setdefault(tuple((e.src, e.dst) for e in cycle), cycle)
    return sorted(cycles.values(), key=lambda c: [e.src for e in c])


def _shortest_cycle(graph: dict[str, list[Edge]], comp: set[str], start: str) -> list[Edge]:
    """Breadth-first from `start` back to it, inside its component (there always is a way back)."""
    prev: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in sorted(graph[v], key=lambda e: e.dst):
                if e.dst == start:
                    path = [e]
                    while path[0].src != start:
                        path.insert(0, prev[path[0].src])
                    return path
                if e.dst in comp and e.dst not in prev:
                    prev[e.dst] = e
                    nxt.append(e.dst)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but has no cycle")


def describe(cycle: list[Edge]) -> str:
    """`a -> b -> a`, then the import line behind each arrow."""
    names = " -> ".join([cycle[0].src, *(e.dst for e in cycle)])
    return names + "".join(f"\n    {e.src} -> {e.dst}  ({e.where})" for e in cycle)


def long_files(root: Path, package: str, limit: int = MAX_LINES) -> dict[str, int]:
    return {str(f.relative_to(root)): n for f in module_files(root, package).values()
            if (n := len(f.read_text().splitlines())) > limit}


# ----- the checker, tested on a package with a planted cycle ------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "from pkg.low.base import thing\n",
        "pkg/low/base.py": "def thing():\n    from pkg.high import reader\n    return reader\n",
        "pkg/high/__init__.py": "",
        "pkg/high/reader.py": "from pkg.low.base import thing\n",
        "pkg/leaf.py": "import os\n",
    })
    cycles = find_cycles(import_edges(tmp_path, "pkg"))
    assert [describe(c).splitlines()[0] for c in cycles] == [
        "pkg.high.reader -> pkg.low -> pkg.low.base -> pkg.high.reader",
        "pkg.high.reader -> pkg.low.base -> pkg.high.reader",
    ]
    assert "pkg/low/base.py:2: from pkg.high import reader" in describe(cycles[1])


def test_checker_sees_every_import_form(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import pkg.b\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "class K:\n    def m(self):\n        from .sub.d import x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from pkg import a\n",
        "pkg/e.py": "from pkg.sub import d\n",
        "pkg/f.py": "import pkg\nfrom pkg import __version__\n",
    })
    edges = {(e.src, e.dst) for e in import_edges(tmp_path, "pkg")}
    assert {("pkg.a", "pkg.b"), ("pkg.b", "pkg.c"), ("pkg.c", "pkg.sub.d"), ("pkg.c", "pkg.sub"),
            ("pkg.sub.d", "pkg.a"), ("pkg.e", "pkg.sub"), ("pkg.e", "pkg.sub.d")} <= edges
    assert ("pkg.sub.d", "pkg") not in edges  # taking a submodule from the running package needs no more of it
    assert ("pkg.f", "pkg") in edges  # a name from the package's own __init__ does
    cycles = find_cycles(import_edges(tmp_path, "pkg"))
    assert [describe(c).splitlines()[0] for c in cycles] == ["pkg.a -> pkg.b -> pkg.c -> pkg.sub.d -> pkg.a"]


def test_checker_counts_the_package_init_an_import_runs(tmp_path: Path) -> None:
    """drafts.base reaching into export.importers also runs export/__init__, which imports the exporter."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/drafts/__init__.py": "from pkg.drafts.base import load\n",
        "pkg/drafts/base.py": "from pkg.export.rules import names\n",
        "pkg/export/__init__.py": "from pkg.export.exporter import export\n",
        "pkg/export/exporter.py": "from pkg.drafts import load\n",
        "pkg/export/rules.py": "names = 1\n",
    })
    cycles = find_cycles(import_edges(tmp_path, "pkg"))
    assert [describe(c).splitlines()[0] for c in cycles] == [
        "pkg.drafts -> pkg.drafts.base -> pkg.export -> pkg.export.exporter -> pkg.drafts"]


def test_checker_sees_a_module_that_needs_its_own_package(tmp_path: Path) -> None:
    """`from pkg.drafts import Draft` in a module the package __init__ imports first: a half-initialised package."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/drafts/__init__.py": "from pkg.drafts.medusa import Medusa\nfrom pkg.drafts.base import Draft\n",
        "pkg/drafts/base.py": "class Draft: ...\n",
        "pkg/drafts/medusa.py": "from pkg.drafts import Draft\n",
    })
    cycles = find_cycles(import_edges(tmp_path, "pkg"))
    assert [describe(c).splitlines()[0] for c in cycles] == ["pkg.drafts -> pkg.drafts.medusa -> pkg.drafts"]


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/drafts/__init__.py": "from pkg.drafts import base\nfrom .base import load\n",
        "pkg/drafts/base.py": "import torch\nfrom pkg import errors\n",
        "pkg/errors.py": "",
    })
    edges = import_edges(tmp_path, "pkg")
    assert {(e.src, e.dst) for e in edges} == {("pkg.drafts", "pkg.drafts.base"), ("pkg.drafts.base", "pkg.errors")}
    assert find_cycles(edges) == []


# ----- lkspec itself ---------------------------------------------------------------------------------------

def test_lkspec_has_no_import_cycles() -> None:
    edges = import_edges(SRC, "lkspec")
    assert len({e.src for e in edges}) > 20, "the checker found almost no imports; is SRC right?"
    cycles = find_cycles(edges)
    assert not cycles, "import cycles in src/lkspec:\n" + "\n".join(describe(c) for c in cycles)


def test_drafts_import_nothing_from_the_stages_above() -> None:
    """Every stage loads drafts, so `lkspec.drafts` reaching up (as it once did into export's importers) ties
    the lowest layer to the top one; a cycle test alone would not stop a new one-way upward arrow."""
    above = ("lkspec.export", "lkspec.train", "lkspec.evaluate", "lkspec.cli", "lkspec.pipeline", "lkspec.specdec")
    upward = [f"{e.src} -> {e.dst} ({e.where})" for e in import_edges(SRC, "lkspec")
              if (e.src == "lkspec.drafts" or e.src.startswith("lkspec.drafts."))
              and any(e.dst == a or e.dst.startswith(a + ".") for a in above)]
    assert not upward, "lkspec.drafts imports from a stage above it:\n" + "\n".join(upward)


def test_no_source_file_is_over_400_lines() -> None:
    over = long_files(SRC, "lkspec")
    assert not over, f"files over {MAX_LINES} lines (split them by what they own): {over}"
