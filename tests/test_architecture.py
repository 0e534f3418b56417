"""The package's shape, checked on its source: dependencies point down, no import circles, short functions,
short test modules (docs/design.md)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "primesvt_plugin"

# Bottom to top; a module may import modules of its own layer or below. Imports inside functions and under
# TYPE_CHECKING count too.
LAYERS = [
    ("errors", "files", "targets"),
    ("registry",),
    ("hookspecs",),
    ("plugins",),
    ("pruning",),
    ("deploy",),
    ("distributed", "serialization"),
    ("pipeline",),
    ("builtins", "pipeline.cli", "pipeline.launcher", "__init__", "__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py") if "recipes" not in path.parts}


def layer_of(module: str) -> int:
    """The highest layer whose prefix names ``module`` (``pipeline.cli`` is above ``pipeline``)."""
    found = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or module.startswith(prefix + ".")]
    assert found, f"primesvt_plugin.{module} is in no layer of tests/test_architecture.py"
    return max(found)[1]


def imports_of(module: str) -> set[str]:
    """The package modules ``module`` imports (resolved to a module of MODULES)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.startswith("primesvt_plugin"):
                target = node.module.removeprefix("primesvt_plugin").lstrip(".")
            else:
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}" if target else alias.name
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("primesvt_plugin").lstrip(".") for a in node.names
                      if a.name.startswith("primesvt_plugin.")}
    return {m for m in found if m in MODULES and m != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def test_dependencies_point_down():
    upward = sorted(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
                    for module, targets in GRAPH.items() for target in targets if layer_of(target) > layer_of(module))
    assert upward == []


def test_no_import_circles():
    cycles, stack, state = [], [], {}

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert cycles == []


def functions(path: Path):
    """(name, lines of code) of every function: its docstring does not count (a hook spec is mostly one)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines -= first.end_lineno - first.lineno + 1
            yield node.name, lines


@pytest.mark.parametrize("limit", [60])
def test_no_function_over_60_lines(limit):
    long = sorted(f"{module}.{name}: {lines}" for module, path in MODULES.items()
                  for name, lines in functions(path) if lines > limit)
    assert long == []


def test_no_test_module_over_800_lines():
    long = sorted(f"{path.name}: {n}" for path in (ROOT / "tests").glob("test_*.py")
                  if (n := len(path.read_text().splitlines())) > 800)
    assert long == []


def test_tests_take_fixtures_from_conftest_never_import_it():
    importing = sorted(path.name for path in (ROOT / "tests").glob("*.py")
                       if any(isinstance(node, ast.ImportFrom) and node.module == "conftest"
                              for node in ast.walk(ast.parse(path.read_text()))))
    assert importing == []
