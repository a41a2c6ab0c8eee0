"""Import boundaries of the adapter package, read from the source (type-checking imports included).

The adapter types must not depend on the parsers, so the engine and layers can
hold adapters and Medusa heads without pulling in file formats, and a new
format can never create an import cycle through the types.
"""

from __future__ import annotations

import ast
from pathlib import Path

import loraserve

PACKAGE = Path(loraserve.__file__).parent
TYPES_MODULE = "loraserve.adapters.lora_weights"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every `loraserve.*` module `path` imports, at any nesting level (so `if TYPE_CHECKING:` counts)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {m for m in found if m.startswith("loraserve")}


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_types_module_imports_no_parser() -> None:
    imported = _graph()[TYPES_MODULE]
    assert imported <= {"loraserve.adapters.errors"}, imported


def test_no_import_cycle_among_adapter_modules() -> None:
    graph = {m: deps for m, deps in _graph().items() if m.startswith("loraserve.adapters")}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if dep not in graph:
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, module, dep])}"
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_layers_import_only_adapter_types() -> None:
    for path in (PACKAGE / "layers").rglob("*.py"):
        adapters = {m for m in _imports(path) if m.startswith("loraserve.adapters")}
        assert adapters <= {TYPES_MODULE}, f"{path.name} imports {sorted(adapters)}"
