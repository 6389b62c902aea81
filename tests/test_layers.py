"""The package layering of docs/ARCHITECTURE.md, checked on the source: a lower layer never imports a higher
one (not even inside a function), monitor and trainer are siblings, and module-level imports form no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NS = "dlsr_monitor"

# folder -> the folders it may import. Order = the layers, bottom up.
ALLOWED: dict[str, set[str]] = {
    "dlsr": set(),
    "config": set(),
    "common": {"dlsr", "config"},
    "monitor": {"dlsr", "config", "common"},
    "trainer": {"dlsr", "config", "common"},
    "console": {"dlsr", "config", "common"},
    "demo": {"dlsr", "config", "common", "monitor", "trainer", "console"},
    "bench": {"dlsr", "config", "common", "monitor", "demo"},
    "cli": {"dlsr", "config", "common", "monitor", "trainer", "console", "demo", "bench"},
}


def _modules() -> dict[str, Path]:
    """Dotted module name (as installed) -> file."""
    out = {}
    for pkg in ALLOWED:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join(parts)
            out[name if pkg == "dlsr" else f"{NS}.{name}"] = path
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "dlsr":
        return "dlsr"
    if parts[0] == NS and len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return None


def _imports(tree: ast.AST, *, top_level_only: bool) -> set[str]:
    """Imported module names; with `top_level_only`, only those run at import time (not in functions or
    under `if TYPE_CHECKING:`)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if top_level_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit_list(child.orelse)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{a.name}" for a in child.names)
            visit(child)

    def visit_list(nodes: list[ast.stmt]) -> None:
        for n in nodes:
            visit(ast.Module(body=[n], type_ignores=[]))

    visit(tree)
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def test_every_package_is_known():
    folders = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}
    assert folders == set(ALLOWED), "a new top-level package needs its place in ALLOWED and ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_from_a_higher_layer(module):
    own = _layer(module)
    if module.endswith(".__main__"):
        own = "cli"  # `python -m monitor` / `python -m trainer` are process edges, like the console script
    bad = sorted(
        name
        for name in _imports(TREES[module], top_level_only=False)
        if (layer := _layer(name)) is not None and layer != own and layer not in ALLOWED[own]
    )
    assert not bad, f"{module} ({own}) imports {bad}; allowed: {sorted(ALLOWED[own])}"


def test_no_module_level_import_cycle():
    graph = {
        name: {m for m in _imports(tree, top_level_only=True) if m in MODULES and m != name}
        for name, tree in TREES.items()
    }
    # A package's __init__ is imported before its submodules: an edge to `pkg.mod` also runs `pkg`.
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name)


def test_every_module_imports_in_a_fresh_interpreter():
    """Import each module as the first import of a process (catches order-dependent imports); one process per
    package keeps it fast, modules in reverse order so none profits from a sibling imported before it."""
    for pkg in ALLOWED:
        names = sorted((m for m in MODULES if _layer(m) == pkg and not m.endswith("__main__")), reverse=True)
        code = "import importlib,sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
        res = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 0, f"{pkg}: {res.stderr.strip().splitlines()[-1:]}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_bare_import_of_our_folders(module):
    """Installed, only `dlsr` and `dlsr_monitor.<folder>` exist: `from config import ...` works in a checkout
    (tests put the repository on the path) but fails in a container."""
    bare = sorted(
        name for name in _imports(TREES[module], top_level_only=False) if name.split(".")[0] in set(ALLOWED) - {"dlsr"}
    )
    assert not bare, f"{module} imports {bare}; write dlsr_monitor.{bare[0]}"
