"""The house rules a reviewer would otherwise check by hand: module sizes, no import circle, no sys.path edits."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ad2_ds"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set) -> set:
    """The ad2_ds modules ``path`` imports, at the top or inside a function (a lazy import is still a dependency)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            named = [f"{base}.{a.name}" for a in node.names]
            # `from . import sharded` names a module; `from .base import Teacher` names something in one
            targets = named if all(m in modules for m in named) else [base]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `from .x import name` names a module or something inside one
                t = t.rpartition(".")[0]
            if t and t != name and t != "ad2_ds":
                out.add(t)
    return out


def _cycles(graph: dict) -> list:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return comps


def test_no_module_of_the_library_is_over_450_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by concern: {long}"


def test_the_library_has_no_import_circle():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in files}
    graph = {_module_name(p): _imports(p, modules) for p in files}
    assert graph["ad2_ds.run"] >= {"ad2_ds.default_teacher", "ad2_ds.distill"}  # the checker sees lazy imports too
    assert not _cycles(graph)


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_edits_sys_path():
    edits = []
    for folder in ("ad2_ds", "recipes", "tests", "benchmarks", "scripts"):
        for p in (ROOT / folder).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if (
                    re.search(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=", line)
                    and p.name != "test_house.py"
                ):
                    edits.append(f"{p.relative_to(ROOT)}:{i}")
    assert not edits, f"install the package (scripts/setup_env.sh) or load the file by path instead: {edits}"
