"""The import structure of the package: layers (what may import what, see docs/architecture.md) and no cycles.

Imports are read from the source (every ``import`` statement, also inside functions; ``if TYPE_CHECKING:``
blocks excepted, they never run), so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Layer of each module, by longest matching prefix: a module may import its own layer and the ones below.
LAYERS = {
    "evotool": 0,  # core: errors, io, config, options, models, data, lens, metrics, hooks, generation, trace, stages, world
    # model operations: decoding methods and layer removal / skipping / speculative drafts
    "evotool.mitigate.base": 1, "evotool.mitigate.processors": 1, "evotool.mitigate.methods": 1,
    "evotool.prune.static": 1, "evotool.prune.runtime": 1, "evotool.prune.select": 1, "evotool.prune.calibrate": 1,
    "evotool.prune.speed": 1, "evotool.prune.speculative": 1,
    "evotool.evals": 2,  # metrics and the eval harness
    "evotool.analysis": 3, "evotool.prune": 3, "evotool.mitigate": 3, "evotool.world.train": 3,  # jobs
    "evotool.stages.behaviour": 3, "evotool.stages.check": 3, "evotool.zoo": 3,
    "evotool.integrations": 3,  # evotool inside transformers, lmms-eval and the Hub
    "evotool.cli": 4, "evotool.__main__": 4,
    "evotool.recipes": 5,  # compositions: nothing imports them
}
# The package root's one public shortcut, ``evotool.decoding`` (imported on first use, see evotool/__init__.py).
FACADE = {("evotool", "evotool.integrations.hf")}


def package_dirs() -> dict[str, Path]:
    """Import package -> folder, from pyproject.toml's package-dir table."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {pkg: ROOT / folder for pkg, folder in table.items()}


@cache
def modules() -> dict[str, Path]:
    """Every module of the package (dotted name -> file)."""
    dirs = package_dirs()
    out = {}
    for pkg, folder in dirs.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if not any(name.startswith(other + ".") or name == other for other in dirs if other != pkg and other.startswith(pkg + ".")):
                out[name] = path
    return out


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> set[str]:
    """The package modules ``name`` imports (an ``import a.b.c`` names ``a.b.c``; ``from a.b import c`` names
    ``a.b.c`` when that is a module, else ``a.b``)."""
    found: set[str] = set()
    known = modules()

    def visit(node: ast.AST) -> None:
        if _type_checking(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("evotool"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evotool"):
            found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(known[name].read_text()))
    return {m for m in found if m in known and m != name and (name, m) not in FACADE}


def layer(name: str) -> int:
    return LAYERS[max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)]


def test_modules_are_found() -> None:
    names = modules()
    assert {"evotool.stages.file", "evotool.prune.run", "evotool.evals.harness", "evotool.recipes.prune_pipeline",
            "evotool.mitigate.methods.dola"} <= set(names)


def test_every_import_goes_down_the_layers() -> None:
    bad = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
           for m in modules() for d in imports(m) if layer(d) > layer(m)]
    assert not bad, "\n".join(bad)


def test_no_library_module_imports_the_recipes() -> None:
    bad = [f"{m} imports {d}" for m in modules() if not m.startswith("evotool.recipes")
           for d in imports(m) if d.startswith("evotool.recipes")]
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    """Importing a module also runs its parent packages' ``__init__``, so those count as imported too."""
    known = modules()

    def with_parents(deps: set[str], name: str) -> set[str]:
        out = set()
        for d in deps:
            parts = d.split(".")
            out |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        return {d for d in out if d in known and d != name and not name.startswith(d + ".")}

    graph = {m: with_parents(imports(m), m) for m in known}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
