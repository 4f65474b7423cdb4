"""The shape of the package: dependencies point one way, down the layers; modules and functions stay small;
task knowledge lives in the tasks. Read from the source (ast), so a function-level import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import tuneforge
from tuneforge.tasks.registry import task_names

PACKAGE = Path(tuneforge.__file__).parent
# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("tuneforge.errors", "tuneforge.limits", "tuneforge.tasks.registry"),
    ("tuneforge.config",),
    ("tuneforge.artifacts",),
    ("tuneforge.data",),
    ("tuneforge.models",),
    ("tuneforge.strategies",),
    ("tuneforge.tasks",),
    ("tuneforge.training",),
    ("tuneforge.use",),
    ("tuneforge.tuning",),
    ("tuneforge.api", "tuneforge.cli", "tuneforge.__main__", "tuneforge"),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("tuneforge", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _layer(module: str) -> int:
    matches = [(len(prefix), index) for index, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module} is in no layer of LAYERS: add it"
    return max(matches)[1]


def _imports(modules: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported tuneforge module, line)}, module-level and function-level alike."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from tuneforge.x import y` imports the submodule tuneforge.x.y when there is one
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            found |= {(target, node.lineno) for target in targets if target in modules and target != name}
        graph[name] = found
    return graph


def test_every_import_points_down_the_layers():
    modules = _modules()
    upward = [f"{name}:{line} imports {target}" for name, targets in _imports(modules).items()
              for target, line in targets if _layer(target) > _layer(name)]
    assert not upward, "\n".join(sorted(upward))


def test_importing_a_module_imports_nothing_above_it_through_its_packages():
    """Importing tuneforge.tasks.registry runs tuneforge/tasks/__init__.py first: a package's __init__ may
    import only what every module inside it may (the registry sits on the lowest layer)."""
    modules = _modules()
    graph = _imports(modules)
    upward = []
    for name in modules:
        parts = name.split(".")
        for package in (".".join(parts[:i]) for i in range(2, len(parts))):
            upward += [f"{name} (layer {_layer(name)}) imports {target} through {package}/__init__.py:{line}"
                       for target, line in graph.get(package, ()) if _layer(target) > _layer(name)]
    assert not upward, "\n".join(sorted(set(upward)))


def test_no_import_cycles():
    graph = {name: {target for target, _ in targets} for name, targets in _imports(_modules()).items()}

    def reaches(start: str, goal: str) -> bool:
        todo, seen = [start], {start}
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if reaches(b, a))
    assert not cycles, "\n".join(cycles)


def test_no_function_level_import_of_a_tuneforge_module():
    """A function-level import would be there only to dodge a cycle: every tuneforge import is at the top."""
    hidden = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(function):
                module = node.module if isinstance(node, ast.ImportFrom) else \
                    node.names[0].name if isinstance(node, ast.Import) else ""
                if module and module.split(".")[0] == "tuneforge":
                    hidden.append(f"{name}:{node.lineno} {module}")
    assert not hidden, "\n".join(hidden)


def test_modules_and_functions_stay_small():
    long_modules = [f"{path.relative_to(PACKAGE)}: {n} lines" for path in PACKAGE.rglob("*.py")
                    if (n := len(path.read_text().splitlines())) > 400]
    long_functions = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: "
                                      f"{node.end_lineno - node.lineno + 1} lines")
    assert not long_modules + long_functions, "\n".join(long_modules + long_functions)


def test_task_names_appear_only_in_the_tasks():
    """Outside tuneforge/tasks/, code asks the task instead of comparing its name (docs and help texts may
    name tasks: they are longer strings, not a name on its own)."""
    names = set(task_names())
    naming = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "tasks"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                naming.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not naming, "\n".join(naming)
