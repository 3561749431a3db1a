"""The package's import graph: no cycles, and every import between subpackages points down the layers
of ARCHITECTURE.md. Read from the source (imports inside functions included), nothing is imported."""

import ast
import os
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "optimum_permllm"

# Lowest first: a subpackage or top-level module imports only from lower layers (and from itself).
LAYERS = [
    {"options", "saving"},
    {"sparse", "kernels"},
    {"algorithms", "nn", "data"},
    {"pipeline", "evaluation"},
    {"config"},
    {"sparsifier"},
    {"integrations"},
    {"commands"},
    {"demo", "__init__"},  # demo: `python -m optimum_permllm.demo` runs commands/demo.py
]


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    paths = [Path(folder, f) for folder, _, files in os.walk(PACKAGE) for f in files]
    for path in (p for p in paths if p.suffix == ".py"):
        parts = ("optimum_permllm",) + path.relative_to(PACKAGE).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a module's own package
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _layer(name: str) -> int:
    part = name.split(".")[1] if "." in name else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert "optimum_permllm.kernels.triton_norm" in graph and "optimum_permllm.sparsifier" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_between_subpackages_point_down_the_layers():
    upward = [f"{source} imports {target}" for source, targets in _graph().items() for target in targets
              if source.split(".")[:2] != target.split(".")[:2] and _layer(target) >= _layer(source)]
    assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("optimum_permllm.pipeline.folding") < _layer("optimum_permllm.sparsifier")
