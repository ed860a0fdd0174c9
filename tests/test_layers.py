"""The package's architecture, checked from its source: imports point down the layers only, no two modules import
each other (no cycle at all), and no module outgrows one job (600 lines, the synthetic scene generator aside)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oxford_ir"

#: lowest first; a module may import its own layer and the layers below it (../shared/STYLE.md, "Layers")
LAYERS = [
    ("oxford_ir", "oxford_ir.errors", "oxford_ir.hashing", "oxford_ir.config", "oxford_ir.fs", "oxford_ir.images"),
    ("oxford_ir.benchmarks",),
    ("oxford_ir.data",),
    ("oxford_ir.extraction",),
    ("oxford_ir.models",),
    ("oxford_ir.retrieval",),
    ("oxford_ir.callbacks", "oxford_ir.web", "oxford_ir.run_history", "oxford_ir.run_comparison"),
    ("oxford_ir.cli",),
]
#: modules allowed to grow past the limit, and why
LONG_MODULES = {"oxford_ir.benchmarks.synthetic": "the synthetic scene generator (one job: drawing scenes)"}
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from x import y`` counts ``x.y`` when that is a module),
    type-checking-only imports included: a cycle in type hints is a cycle in the design."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def layer(name: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) - {name} for name, path in found.items()}


def test_imports_point_down_the_layers_only():
    upward = [
        f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
        for name, targets in graph().items()
        for target in sorted(targets)
        if layer(target) > layer(name) and not (name == "oxford_ir" or name.endswith("__init__"))
    ]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    # a package's __init__ importing its own modules is not a cycle of the design
    edges = {name: {t for t in targets if not name or not t.startswith(name + ".")} for name, targets in edges.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(edges.get(name, ())):
            if state.get(target) == 1:
                cycles.append([*trail[trail.index(target) :], target] if target in trail else [name, target])
            elif target not in state:
                visit(target, [*trail, target])
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_module_holds_more_than_one_job():
    long = {
        name: len(path.read_text().splitlines())
        for name, path in modules().items()
        if len(path.read_text().splitlines()) > MAX_LINES and name not in LONG_MODULES
    }
    assert long == {}


def test_the_checks_see_a_violation():
    """The graph is read from the source: a made-up upward import and a made-up cycle are caught."""
    assert layer("oxford_ir.benchmarks.metrics") < layer("oxford_ir.data.datamodule") < layer("oxford_ir.cli.train")
    assert "oxford_ir.benchmarks.metrics" in graph()["oxford_ir.benchmarks.benchmark"]
    assert layer("oxford_ir.images") == 0 and layer("oxford_ir") == 0
