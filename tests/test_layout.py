"""The package's layout: imports point one way, and no module reaches into another's private names.

Every ``import`` is read from the source (function-level ones too, which a runtime import graph
would miss), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnxlrf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported onnxlrf module, names imported from it) for every import statement in ``path``."""
    me = module_name(path)
    package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "onnxlrf" or module.startswith("onnxlrf."):
                names = [alias.name for alias in node.names]
                submodules = [n for n in names if (PACKAGE.parent / (module + "." + n).replace(".", "/")).exists()
                              or (PACKAGE.parent / ((module + "." + n).replace(".", "/") + ".py")).exists()]
                for sub in submodules:
                    found.append((module + "." + sub, []))
                found.append((module, [n for n in names if n not in submodules]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("onnxlrf")]
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_no_import_cycle() -> None:
    modules = package_modules()
    graph = {name: {target for target, _ in imports(path) if target in modules and target != name}
             for name, path in modules.items()}
    # A package's __init__ that re-exports its modules is not a dependency of those modules.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_no_private_names_cross_modules() -> None:
    offenders = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        for module, names in imports(path):
            offenders += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names if n.startswith("_")
                          and n != "__version__"]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_stages_import_only_lower_floors() -> None:
    """Stages import only the floors below them (bottom first); the CLI sits on top."""
    floors = [
        {"onnxlrf", "onnxlrf.errors", "onnxlrf.termination", "onnxlrf.progress", "onnxlrf.onnx_io", "onnxlrf.models",
         "onnxlrf.data", "onnxlrf.export"},
        {"onnxlrf.graph"},
        {"onnxlrf.runtime"},
        {"onnxlrf.measure"},
        {"onnxlrf.costs"},
        {"onnxlrf.planning"},
        {"onnxlrf.techniques"},
        {"onnxlrf.verify"},
        {"onnxlrf.pipeline", "onnxlrf.inspection"},
        {"onnxlrf.report"},
        {"onnxlrf.cli"},
    ]

    def floor(module: str) -> int:
        parts = module.split(".")
        for depth in range(len(parts), 0, -1):
            prefix = ".".join(parts[:depth])
            for index, members in enumerate(floors):
                if prefix in members:
                    return index
        raise AssertionError(f"{module} is on no floor: add it to this test's list")

    upward = []
    for name, path in package_modules().items():
        for target, _ in imports(path):
            if target.startswith("onnxlrf.models."):
                continue
            if floor(target) > floor(name) and not _allowed_upward(name, target):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def _allowed_upward(module: str, target: str) -> bool:
    """The measured latency cost times each technique's rewrite of a layer: costs.latency sits above the
    plans and rewrite passes it measures (the module graph stays acyclic, test_no_import_cycle)."""
    return module == "onnxlrf.costs.latency" and target.startswith(("onnxlrf.techniques.", "onnxlrf.planning."))
