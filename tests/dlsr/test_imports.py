"""The dlsr package's imports: each module imports on its own, dlsr needs nothing else of this repository, and
its modules form no import cycle (read from the source with `ast`, not from what happens to be imported)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DLSR = ROOT / "dlsr"
MODULES = sorted("dlsr" if p.name == "__init__.py" else f"dlsr.{p.stem}" for p in DLSR.glob("*.py"))
# The repository's other packages (monitor, trainer, config, ...): the core may not depend on them.
FIRST_PARTY = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"dlsr"}


def _tree(module: str) -> ast.Module:
    path = DLSR / "__init__.py" if module == "dlsr" else DLSR / f"{module.removeprefix('dlsr.')}.py"
    return ast.parse(path.read_text(), filename=str(path))


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names of the modules an import statement loads (`from dlsr import x` loads dlsr.x if x is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    # A relative import is relative to dlsr, a flat package.
    base = ".".join(filter(None, ["dlsr", node.module])) if node.level else (node.module or "")
    if base == "dlsr":
        return [f"dlsr.{a.name}" if (DLSR / f"{a.name}.py").is_file() else "dlsr" for a in node.names]
    return [base]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(module: str) -> set[str]:
    """Modules imported when `module` is executed: its body and top-level if/try/with blocks, not functions,
    classes or `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_targets(node))
            elif isinstance(node, ast.If):
                visit(node.orelse if _is_type_checking(node.test) else node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])
            elif isinstance(node, ast.With):
                visit(node.body)

    visit(_tree(module).body)
    return found


def _all_imports(module: str) -> set[str]:
    """Every module `module` may import, at any depth (functions included)."""
    nodes = (n for n in ast.walk(_tree(module)) if isinstance(n, ast.Import | ast.ImportFrom))
    return {name for node in nodes for name in _targets(node)}


def _graph() -> dict[str, set[str]]:
    return {m: {t for t in _top_level_imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)):
            return found
    return None


# Runs in a fresh interpreter. Between modules it forgets every dlsr module, so each one is imported on its own
# (with its own registry); torch and timm stay loaded, as importing them 16 times would take over a minute.
_IMPORT_EACH = """
import importlib, json, sys, traceback
errors = {}
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "dlsr" or m.startswith("dlsr.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException:
        errors[name] = traceback.format_exc()
print(json.dumps(errors))
"""


def test_each_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    assert {"dlsr", "dlsr.base", "dlsr.detector", "dlsr.scores", "dlsr.artifacts"} <= set(MODULES)
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *MODULES],
        cwd=ROOT,  # this checkout's dlsr, not an installed one
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert errors == {}, "\n".join(errors.values())


def test_dlsr_imports_nothing_else_of_this_repository() -> None:
    assert {"monitor", "trainer", "config"} <= FIRST_PARTY
    for module in MODULES:
        outside = sorted(n for n in _all_imports(module) if n.split(".")[0] in FIRST_PARTY)
        assert not outside, f"{module} imports {outside}"


def test_dlsr_modules_form_no_import_cycle() -> None:
    graph = _graph()
    assert "dlsr.detector" in graph["dlsr.artifacts"] and "dlsr.base" in graph["dlsr.detector"]  # sanity
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_persistence_depends_on_the_detectors_never_the_reverse() -> None:
    assert {"dlsr.base", "dlsr.detector", "dlsr.baselines"} <= _top_level_imports("dlsr.artifacts")
    for module in ("dlsr.base", "dlsr.detector", "dlsr.baselines", "dlsr.scores", "dlsr.devices"):
        assert "dlsr.artifacts" not in _all_imports(module), f"{module} imports dlsr.artifacts"
