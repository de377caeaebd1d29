"""The import graph between the project's modules: no import cycles, and the layers of the
design hold (M-Loss is a pure measure: no merge methods, no Lightning, no shells; the
stability measures and the reports take plain data: no Lightning, no callbacks).

Every module under ``merging/`` is parsed with ``ast`` (nothing is imported); every
``import`` statement counts, also those inside functions and ``if TYPE_CHECKING:`` blocks.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "merging"

# Cycles that predate the rule, as the sets of modules that import each other (one strongly
# connected component each). The architecture issue removes them; a cycle not listed here, or
# a listed one that grows, fails the test.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _imported_names(name: str, path: Path) -> set[str]:
    """Every dotted name ``path`` imports: ``import a.b`` and ``from a import b`` give ``a.b``
    (``b`` a module, or a name defined in ``a``); relative imports are resolved against the
    module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            names.update(source if alias.name == "*" else f"{source}.{alias.name}" for alias in node.names)
    return names


def _as_project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The project module a dotted name lives in (its longest prefix that is a module).

    ``from merging.methods import classic`` is an edge to ``merging.methods.classic`` only:
    the parent package runs first on any submodule import, which is not counted as an edge
    (every package that re-exports its submodules would otherwise be a cycle)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


@functools.cache
def _import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(graph, raw)``: project module -> the project modules it imports, and -> every
    dotted name it imports (third-party ones included)."""
    modules = _project_modules()
    graph: dict[str, set[str]] = {}
    raw: dict[str, set[str]] = {}
    for name, path in modules.items():
        raw[name] = _imported_names(name, path)
        targets = {_as_project_module(n, modules) for n in raw[name]}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph, raw


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_path(graph: dict[str, set[str]], component: frozenset[str]) -> list[str]:
    """One concrete cycle inside a component, as ``[a, b, ..., a]``, for the message."""
    start = min(component)
    path, seen = [start], {start}
    while True:
        step = min(w for w in graph[path[-1]] if w in component)
        if step in seen:
            return path[path.index(step) :] + [step]
        path.append(step)
        seen.add(step)


def test_the_graph_sees_the_project():
    graph, _ = _import_graph()
    assert "merging.mloss.meter" in graph and "merging.mloss.gap" in graph["merging.mloss.meter"]
    assert "merging.mloss" in graph["merging.methods.mties"]


def test_no_import_cycles_between_project_modules():
    graph, _ = _import_graph()
    new = [c for c in _cycles(graph) if c not in KNOWN_CYCLES]
    assert not new, "import cycles: " + "; ".join(" -> ".join(_cycle_path(graph, c)) for c in new)


MLOSS_MUST_NOT_IMPORT = (
    "merging.methods",
    "merging.callbacks",
    "merging.modules",
    "lightning",
    "pytorch_lightning",
)
"""M-Loss is a measure below the merge methods (M-TIES uses it) and the Lightning shells."""


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _mloss_imports() -> dict[str, set[str]]:
    _, raw = _import_graph()
    return {module: names for module, names in raw.items() if _within(module, "merging.mloss")}


@pytest.mark.parametrize("forbidden", MLOSS_MUST_NOT_IMPORT)
def test_mloss_is_a_pure_measure(forbidden):
    offenders = {
        module: sorted(n for n in names if _within(n, forbidden)) for module, names in _mloss_imports().items()
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert not offenders, f"merging.mloss imports {forbidden}: {offenders}"


def test_only_the_mloss_metric_imports_torchmetrics():
    importers = {
        module for module, names in _mloss_imports().items() if any(_within(n, "torchmetrics") for n in names)
    }
    assert importers == {"merging.mloss.metric"}, f"torchmetrics imported by {sorted(importers)}"


EXPERIMENTS = "merging.experiments"
"""The experiment drivers (demo, scenarios, the digits diagnostics runner, their training loops)."""

TRAINER_FACTORY = "merging.experiments.trainers"
"""``quiet_trainer`` and the scripts' hardware options: for experiment scripts only."""

FACE = "merging.cli"
"""The one library module that may reach the experiments: ``merging diagnose`` imports the
digits runner inside its dispatch."""


def _importers_of(target: str, *, exempt: set[str]) -> dict[str, list[str]]:
    _, raw = _import_graph()
    offenders = {
        module: sorted(n for n in names if _within(n, target))
        for module, names in raw.items()
        if not _within(module, EXPERIMENTS) and module not in exempt
    }
    return {module: names for module, names in offenders.items() if names}


def test_the_library_does_not_import_the_experiments():
    offenders = _importers_of(EXPERIMENTS, exempt={FACE})
    assert not offenders, f"library modules import {EXPERIMENTS}: {offenders}"


def test_no_library_module_imports_the_trainer_factory():
    offenders = _importers_of(TRAINER_FACTORY, exempt=set())
    assert not offenders, f"library modules import the Trainer factory: {offenders}"


def _module_level_imports(path: Path) -> set[str]:
    """The modules ``path`` imports outside any function or class body."""
    names: set[str] = set()
    pending = list(ast.parse(path.read_text(), filename=str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
        pending.extend(ast.iter_child_nodes(node))
    return names


def test_the_cli_imports_the_experiments_only_inside_its_dispatch():
    path = _project_modules()[FACE]
    eager = sorted(n for n in _module_level_imports(path) if _within(n, EXPERIMENTS))
    assert not eager, f"{FACE} imports {eager} at module level"


PURE_MUST_NOT_IMPORT = ("lightning", "pytorch_lightning", "merging.callbacks")
"""The stability measures and the reports work on tensors and plain data; the callbacks call them."""


def _stability_and_report_imports() -> dict[str, set[str]]:
    _, raw = _import_graph()
    return {
        module: names
        for module, names in raw.items()
        if module == "merging.report" or module.startswith("merging.stability")
    }


def test_the_stability_and_report_modules_are_seen():
    assert {"merging.stability", "merging.stability_stats", "merging.report"} <= set(_stability_and_report_imports())


@pytest.mark.parametrize("forbidden", PURE_MUST_NOT_IMPORT)
def test_stability_and_reports_import_no_lightning_and_no_callbacks(forbidden):
    offenders = {
        module: sorted(n for n in names if _within(n, forbidden))
        for module, names in _stability_and_report_imports().items()
    }
    offenders = {module: names for module, names in offenders.items() if names}
    assert not offenders, f"{sorted(offenders)} import {forbidden}: {offenders}"


MAX_MODULE_LINES = 700
"""A reader holds one concern per module: no library module grows past this."""


def test_no_library_module_is_over_the_line_budget():
    long = {
        name: n
        for name, path in _project_modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_module_reaches_into_lightnings_private_trainer():
    offenders = [
        name
        for name, path in _project_modules().items()
        if re.search(r"\._trainer\b", path.read_text())
    ]
    assert not offenders, f"use self.trainer (Lightning's public API), not _trainer: {offenders}"
