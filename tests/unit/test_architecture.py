"""The layering of docs/ARCHITECTURE.md, checked on the source with ``ast`` (nothing is imported).

Every ``import`` statement in pipeline/, stages/ and data/ counts, at module level and inside functions
alike (a function-level import is still a dependency, only a later one). Two rules:

- no import cycles between project modules;
- ``stages/`` imports from ``pipeline/`` only its contract part (``STAGE_CONTRACT``), and from ``data/``
  only the data contract (``data.formats``); ``data/`` imports from ``pipeline/`` only the contract and
  never ``stages/``.

``python tests/unit/test_architecture.py [ROOT]`` prints the import cycles and rule violations of a checkout
(e.g. an older commit checked out with ``git worktree add``).
"""

from __future__ import annotations

import ast
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages", "data")

# What stages/ (and data/) may import from pipeline/: the run config, manifests and atomic writes, the
# StageRun context, model sources/loading, the offline DeepSpeed JSON helpers (``fill_auto``: pure
# JSON, no stage imports), the stage process's logging set-up (``pipeline.console``), where config paths
# resolve (``pipeline.paths``; both standard library only), the stage registry (``pipeline.registry``:
# ``StageSpec``, which every stage's declaration module builds; standard library only), the config
# sections stages share (``pipeline.sections``, which the stages' own sections are built from) and the stop
# requests a stage acts on (``pipeline.preemption``: signals, stop file, deadline; standard library only).
# Never the orchestrator, plan, procs, launchers, Slurm, report, memory planner or server.
STAGE_CONTRACT = frozenset({"pipeline.config", "pipeline.manifest", "pipeline.stage", "pipeline.models",
                            "pipeline.deepspeed_check", "pipeline.console", "pipeline.paths", "pipeline.registry",
                            "pipeline.sections", "pipeline.preemption"})
# What stages/ may import from data/: the data contract and the demo tasks' lookup tables (read by the rule
# judge); never the generator script ``data.make_demo``.
DATA_CONTRACT = frozenset({"data.formats", "data.demo_tasks"})

# Known violations of the rules above (importer, imported), tolerated while a module is restructured; an
# entry that no longer occurs is reported as a warning by test_stages_import_only_the_pipeline_contract.
# Empty since stages/rlaif was restructured (checkpoint resolution in pipeline.models, data.demo_tasks).
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project packages under ``root``."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module (``pipeline.config.X`` -> ``pipeline.config``)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that ``module`` imports anywhere in its file (module level and in functions)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(filter(None, (_resolve(alias.name, modules) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:  # ``from pipeline import memory`` imports the module pipeline.memory
                resolved = _resolve(f"{target}.{alias.name}", modules) or _resolve(target, modules)
                if resolved:
                    found.add(resolved)
    found.discard(module)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted; [] = no cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycle_edges(graph: dict[str, set[str]], component: list[str]) -> list[tuple[str, str]]:
    """The import edges inside one cycle (strongly connected component)."""
    members = set(component)
    return sorted((a, b) for a in component for b in graph[a] if b in members)


def layering_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs that break the stages/ and data/ rules of the module doc."""
    bad: set[tuple[str, str]] = set()
    for module, targets in graph.items():
        top = module.split(".")[0]
        for target in targets:
            target_top = target.split(".")[0]
            if top in ("stages", "data") and target_top == "pipeline" and target not in STAGE_CONTRACT:
                bad.add((module, target))
            elif top == "stages" and target_top == "data" and target not in DATA_CONTRACT:
                bad.add((module, target))
            elif top == "data" and target_top == "stages":
                bad.add((module, target))
    return bad


# ------------------------------------------------------------------------------------------------ tests
def test_walker_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "stages").mkdir()
    (tmp_path / "data").mkdir()
    for package in PACKAGES:
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "config.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from .b import x\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline import a\n")
    (tmp_path / "stages" / "s.py").write_text("import pipeline.a\nfrom pipeline.config import X\n")
    graph = import_graph(tmp_path)
    assert graph["pipeline.a"] == {"pipeline.b"}
    assert graph["pipeline.b"] == {"pipeline.a"}
    assert import_cycles(graph) == [["pipeline.a", "pipeline.b"]]
    assert graph["stages.s"] == {"pipeline.a", "pipeline.config"}
    assert layering_violations(graph) == {("stages.s", "pipeline.a")}


def test_no_import_cycles_between_project_modules():
    graph = import_graph()
    cycles = {" <-> ".join(c): cycle_edges(graph, c) for c in import_cycles(graph)}
    assert not cycles, f"import cycles (importer, imported): {cycles}"


def test_stages_import_only_the_pipeline_contract():
    violations = layering_violations(import_graph())
    new = sorted(violations - KNOWN_VIOLATIONS)
    assert not new, (f"these imports break the layering of docs/ARCHITECTURE.md: {new}; stages/ may import "
                     f"{sorted(STAGE_CONTRACT | DATA_CONTRACT)}")
    fixed = sorted(KNOWN_VIOLATIONS - violations)
    if fixed:
        warnings.warn(f"no longer occur, remove from KNOWN_VIOLATIONS in tests/unit/test_architecture.py: {fixed}",
                      stacklevel=1)


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else REPO
    graph = import_graph(root)
    components = import_cycles(graph)
    print(f"{root}: {len(graph)} modules, {sum(map(len, graph.values()))} import edges, "
          f"{len(components)} import cycle(s)")
    for component in components:
        print(f"  cycle: {', '.join(component)}")
        for a, b in cycle_edges(graph, component):
            print(f"    {a} -> {b}")
    for a, b in sorted(layering_violations(graph)):
        print(f"  layering: {a} -> {b}")
