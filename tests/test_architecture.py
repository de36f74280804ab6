"""How qnix's modules may depend on each other, beyond what import-linter's contracts say
(pyproject.toml): no import cycle between modules, and no private name (`_x`) used outside the
module that defines it."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import grimp

from tests.conftest import ROOT

PACKAGE = ROOT / "qnix"

# ---- import cycles ---------------------------------------------------------------------------


def import_cycles(graph: grimp.ImportGraph) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's, without recursion):
    each is a set of modules every one of which imports every other, directly or not."""
    imports = {
        module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules
    }
    index: dict[str, int] = {}
    lowest: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[frozenset[str]] = []
    for root in sorted(imports):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            module, position = work.pop()
            if position == 0:
                index[module] = lowest[module] = len(index)
                stack.append(module)
                on_stack.add(module)
            imported = imports[module]
            if position < len(imported):
                work.append((module, position + 1))
                target = imported[position]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    lowest[module] = min(lowest[module], index[target])
                continue
            if work:  # back in the importer: pass the lowest index up
                importer = work[-1][0]
                lowest[importer] = min(lowest[importer], lowest[module])
            if lowest[module] == index[module]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == module:
                        break
                if len(component) > 1:
                    cycles.append(frozenset(component))
    return cycles


def test_the_cycle_finder_finds_cycles() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c", "d", "e"):
        graph.add_module(module)
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")):
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [frozenset({"a", "b", "c"})]
    graph.add_import(importer="e", imported="d")
    assert sorted(import_cycles(graph), key=sorted) == [
        frozenset({"a", "b", "c"}),
        frozenset({"d", "e"}),
    ]


def test_no_import_cycles() -> None:
    # With imports made only for type checking: they are dependencies all the same.
    cycles = import_cycles(grimp.build_graph("qnix", cache_dir=None))
    assert not cycles, f"modules that import each other: {[sorted(c) for c in cycles]}"


# ---- private names ---------------------------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an import statement names, relative ones resolved from `module`."""
    if not node.level:
        return node.module or ""
    package = module.split(".")
    package = package[: len(package) - node.level + (MODULES[module].name == "__init__.py")]
    return ".".join([*package, *([node.module] if node.module else [])])


def dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything but names and attributes."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return None if head is None else [*head, node.attr]
    return None


def private_uses(module: str, tree: ast.Module) -> Iterator[str]:
    """Private names of other qnix modules that `module` imports or reads off a module."""
    bound: dict[str, str] = {}  # a local name -> the qnix module it stands for
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            source = absolute(module, node)
            if source.split(".")[0] != "qnix":
                continue
            for alias in node.names:
                if is_private(alias.name):
                    yield f"{source}.{alias.name}"
                elif f"{source}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        parts = dotted(node.value)
        if parts is None or parts[0] not in bound:
            continue
        owner = ".".join([bound[parts[0]], *parts[1:]])
        if owner in MODULES and owner != module:
            yield f"{owner}.{node.attr}"


def test_the_private_name_finder_finds_each_form() -> None:
    source = (
        "import qnix.runtime.lifecycle\n"
        "import qnix.runtime.paths as paths\n"
        "from qnix.runtime import lifecycle\n"
        "from qnix.errors import _hidden\n"
        "from .model import _hidden_too\n"
        "lifecycle._a(); paths._b; qnix.runtime.lifecycle._c\n"
        "lifecycle.public._d; self._e; lifecycle.__name__\n"
    )
    found = set(private_uses("qnix.spec.load", ast.parse(source)))
    assert found == {
        "qnix.errors._hidden",
        "qnix.spec.model._hidden_too",
        "qnix.runtime.lifecycle._a",
        "qnix.runtime.paths._b",
        "qnix.runtime.lifecycle._c",
    }


def test_no_private_name_is_used_outside_its_module() -> None:
    found = {
        (module, name)
        for module, path in MODULES.items()
        for name in private_uses(module, ast.parse(path.read_text(encoding="utf-8")))
    }
    assert sorted(found) == []
