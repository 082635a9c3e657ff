"""The package's shape: one import namespace, no import cycles, the library below the apps.

Imports are read with `ast` from the source folders, counting imports inside functions
(lazy ones), and leaving out only `if TYPE_CHECKING:` blocks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
# The import namespace and the folder each sub-package lives in (pyproject's package-dir).
FOLDERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
# Sub-packages of e2v.client that are applications; every other module there is library.
APPLICATIONS = ("batch", "gateway", "live", "evaluation", "heads")


def modules() -> dict[str, Path]:
    """Every module of the namespace: dotted name -> file."""
    found = {}
    for package, folder in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name not in found:  # e2v.client's own folder wins over e2v's mapping
                found[name] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """(module or module.attribute, line) for each import in the file, lazy ones included."""
    is_package = path.name == "__init__.py"
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield f"{module}.{alias.name}", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def graph() -> dict[str, set[str]]:
    """module -> the modules of the namespace it imports."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for imported, _ in imported_names(path, name):
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _application(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["e2v", "client"] and len(parts) > 2 and parts[2] in APPLICATIONS:
        return parts[2]
    return None


def test_the_library_imports_no_application():
    """e2v.client's own modules (decode, VAD, segments, Triton client, results, ...) import
    nothing from the applications built on them, nor from export, loadtest or serve."""
    library = [m for m in modules() if m.startswith("e2v.client") and _application(m) is None]
    assert library
    offending = {
        module: sorted(
            t
            for t in graph()[module]
            if _application(t) or not t.startswith(("e2v.client", "e2v.contract"))
        )
        for module in library
    }
    assert {m: t for m, t in offending.items() if t} == {}


def test_every_import_of_ours_is_through_the_namespace():
    """`import client...` would work from the repository root (its folder is on sys.path),
    and then load a second copy of the module: only `e2v.` names are allowed."""
    tops = {folder.split("/")[0] for folder in FOLDERS.values()} - {"e2v"}
    sources = [*modules().values(), *sorted((ROOT / "tests").glob("*.py"))]
    sources += sorted((ROOT / "scripts").glob("*.py"))
    stray = [
        f"{path.relative_to(ROOT)}:{line}: {imported}"
        for path in sources
        for imported, line in imported_names(path, "tests")
        if imported.split(".")[0] in tops
    ]
    assert stray == []


# Modules that only run inside another program: Triton's Python backend (its stub provides
# triton_python_backend_utils), Locust's gevent-patched processes, `python -m e2v`.
NOT_IMPORTABLE_ALONE = (
    "e2v.__main__",
    "e2v.model_repository.python_backend.",
    "e2v.loadtest.locustfile",
    "e2v.loadtest.driver",
    "e2v.loadtest.users",
    "e2v.loadtest.shapes",
)


def test_every_module_imports():
    """Each module imports, its lazy imports aside: a name moved away breaks here, at once,
    not in the one test that happens to reach it (in a fresh interpreter: nothing of this
    one's state helps)."""
    names = [m for m in sorted(modules()) if not m.startswith(NOT_IMPORTABLE_ALONE)]
    probe = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"
    result = subprocess.run(
        [sys.executable, "-c", probe, *names], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_lazy_imports_name_what_exists():
    """`from e2v.x import name` inside a function names a module or attribute that exists."""
    known = modules()
    missing = []
    for module, path in known.items():
        for imported, line in imported_names(path, module):
            target, _, attribute = imported.rpartition(".")
            if imported in known or target not in known or not attribute:
                continue
            tree = ast.parse(known[target].read_text())
            defined = {
                n.name
                for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            }
            defined |= {
                t.id
                for n in ast.walk(tree)
                if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Name)
            }
            defined |= {
                (a.asname or a.name).split(".")[0]
                for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names
            }
            if attribute not in defined:
                missing.append(f"{path.relative_to(ROOT)}:{line}: {imported}")
    assert missing == []
