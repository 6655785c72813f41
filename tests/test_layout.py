"""The folder layout is the data flow: imports run one way only, and certify never imports harden.

Every import in the two packages (module level and inside functions) is read with `ast`; a module
may import only from its own layer or a lower one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower number = earlier in the data flow. Top-level modules not listed are at the top (cli level).
LAYERS = {
    "certify": ["common", "data", "onnx_import", "specs", ("bounds", "attacks"), "bab", "verdicts", "reports"],
    "harden": ["layers", "io", ("training", "convert"), "pruning", "inspect"],
}
COMPAT_SHIMS = {"harden.loading", "harden.export", "certify.engine"}  # old flat paths, re-exports only


def _layer_of(module: str) -> tuple[str, int]:
    package, _, rest = module.partition(".")
    part = rest.split(".")[0] if rest else ""
    for level, names in enumerate(LAYERS[package]):
        if part == names or (isinstance(names, tuple) and part in names):
            return package, level
    return package, len(LAYERS[package])  # cli, __main__, __init__ and shims: the top


def _modules():
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            yield name.removesuffix(".__init__"), path


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in found if name.split(".")[0] in LAYERS]


def _edges():
    for name, path in _modules():
        for target in _imports(path):
            yield name, target


def test_certify_never_imports_harden():
    offenders = sorted({(a, b) for a, b in _edges() if a.startswith("certify") and b.startswith("harden")})
    assert not offenders


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_run_one_way(package):
    backwards = []
    for source, target in _edges():
        if not source.startswith(package + ".") or not target.startswith(package + ".") or source in COMPAT_SHIMS:
            continue
        if _layer_of(target)[1] > _layer_of(source)[1]:
            backwards.append(f"{source} imports {target}")
    assert not backwards, "\n".join(sorted(set(backwards)))


def test_no_import_cycles_between_modules():
    known = {name for name, _ in _modules()}
    graph: dict[str, set[str]] = {name: set() for name in known}
    for source, target in _edges():
        while target and target not in known:  # `from pkg.mod import name` -> pkg.mod
            target = target.rpartition(".")[0]
        if target and target != source and not (source in known and target == source.rpartition(".")[0]):
            graph[source].add(target)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_readme_api_imports_keep_working():
    # The README's Python API, by the package-level names and by the flat paths of earlier releases.
    from certify import certify_model
    from certify.engine import certify_model as flat_certify_model
    from harden import export_onnx, load_model
    from harden.export import export_onnx as flat_export_onnx
    from harden.loading import load_model as flat_load_model

    assert certify_model is flat_certify_model and certify_model.__module__ == "certify.verdicts.dataset"
    assert load_model is flat_load_model and load_model.__module__ == "harden.io.loading"
    assert export_onnx is flat_export_onnx and export_onnx.__module__ == "harden.io.export"


@pytest.mark.parametrize("package", ["certify", "harden"])
def test_every_package_level_name_resolves(package):
    # The lazy package attributes name their modules by string: a module that moves must not leave
    # a name behind that fails on first use.
    import importlib

    module = importlib.import_module(package)
    offered = module.__getattr__.names
    assert offered
    for name, where in offered.items():
        value = getattr(module, name)
        assert value.__name__ == name and value.__module__ == where
