"""The package's import graph has no circle, and each part imports only the parts below it
(docs/architecture.md). Every import statement counts, also those inside functions: an import
deferred to call time is still a dependency."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(unresolved: set[str] | None = None) -> dict[str, set[str]]:
    """Module -> the package's modules it imports. Imports of sapo modules that do not exist go
    into `unresolved`."""
    files = {module_name(p): p for p in (SRC / "sapo").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    unresolved = set() if unresolved is None else unresolved
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import x` depends on pkg.x where x is a module, else on pkg itself
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
            unresolved |= {f"{name} -> {t}" for t in targets if t.split(".")[0] == "sapo" and t not in files}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_sees_imports_of_every_kind():
    graph = import_graph()
    assert "sapo.errors" in graph["sapo.config"]  # from .errors import ConfigError
    assert "sapo.algorithms.objectives" in graph["sapo.algorithms"]  # from . import objectives
    assert "sapo.training.trainer" in graph["sapo"]  # inside __getattr__
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_circle_and_no_import_of_a_module_that_is_not_there():
    unresolved: set[str] = set()
    assert cycles(import_graph(unresolved)) == []
    assert not unresolved


# What each part may import of the package besides itself and the shared leaves (errors.py,
# _registry.py); every part is listed.
ALLOWED = {
    "sapo.errors": set(),
    "sapo._registry": set(),
    "sapo.algorithms": set(),
    "sapo.model": set(),
    "sapo.engines": {"sapo.model"},
    "sapo.rewards": set(),
    "sapo.tasks": {"sapo.rewards"},
    "sapo.data": {"sapo.tasks", "sapo.rewards"},
    "sapo.trl_names": set(),
    "sapo.config": {"sapo.algorithms", "sapo.trl_names"},
    "sapo.training": {"sapo.algorithms", "sapo.model", "sapo.engines", "sapo.rewards", "sapo.data", "sapo.config"},
    "sapo.experiments": {"sapo.algorithms", "sapo.config", "sapo.training"},
    "sapo.demo": {"sapo.config"},
    "sapo.warmstart": {"sapo.model", "sapo.tasks"},
    "sapo.cli": {"sapo", "sapo.algorithms", "sapo.config", "sapo.data", "sapo.demo", "sapo.engines", "sapo.experiments",
                 "sapo.model", "sapo.rewards", "sapo.tasks", "sapo.training", "sapo.warmstart"},
    "sapo": {"sapo.algorithms", "sapo.config", "sapo.model", "sapo.tasks", "sapo.training"},
    "sapo.__main__": {"sapo.cli"},
}


def part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_every_part_has_its_rule():
    assert {part(module) for module in import_graph()} == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_part_imports_only_the_parts_below_it(layer):
    leaves = {"sapo.errors", "sapo._registry"}
    wrong = {f"{module} -> {target}" for module, targets in import_graph().items() if part(module) == layer
             for target in targets if part(target) not in {layer, *leaves, *ALLOWED[layer]}}
    assert not wrong
