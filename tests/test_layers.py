"""The package's shape: one-way layers, no import circle, no hidden imports.

A small AST walk over ``mcis_dist`` (no module is imported). The layers, lowest first, are the
ones docs/ARCHITECTURE.md describes; a module may import its own layer and the layers below it,
never above, and the module graph has no circle. An import inside a function is allowed only
with a ``# lazy: <reason>`` comment on its line (an optional extra, a heavy library a command
does not need, a probe that must not fail at import time); it may never point upwards either.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mcis_dist"

# Lowest first. A module belongs to the first layer with a matching prefix, most specific wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mcis_dist", "mcis_dist.config", "mcis_dist.storage", "mcis_dist.errors")),
    ("formats", ("mcis_dist.formats",)),
    (
        "maths",
        (
            "mcis_dist.models",
            "mcis_dist.data",
            "mcis_dist.losses",
            "mcis_dist.crf",
            "mcis_dist.evaluation",
            "mcis_dist.cams.maps",
            "mcis_dist.cams.infer",
            "mcis_dist.affinity.labels",
            "mcis_dist.affinity.loss",
            "mcis_dist.affinity.random_walk",
            "mcis_dist.masks.modes",
            "mcis_dist.seg.infer",
            "mcis_dist.shards.boxes",
            "mcis_dist.shards.images",
            "mcis_dist.shards.photos",
            "mcis_dist.shards.sources",
            "mcis_dist.shards.synthetic",
        ),
    ),
    ("runtime", ("mcis_dist.runtime",)),
    (
        "stages",
        (
            "mcis_dist.shards",
            "mcis_dist.train",
            "mcis_dist.cams",
            "mcis_dist.affinity",
            "mcis_dist.masks",
            "mcis_dist.seg",
        ),
    ),
    (
        "top",
        (
            "mcis_dist.pipeline",
            "mcis_dist.demo",
            "mcis_dist.report",
            "mcis_dist.tune",
            "mcis_dist.cli",
        ),
    ),
]
LAYER_INDEX = {name: i for i, (name, _) in enumerate(LAYERS)}
# The maths and everything under it run without a Ray cluster: they may not import Ray at all,
# except a lazy probe (a function-level import with a reason).
NO_RAY_BELOW = LAYER_INDEX["runtime"]
LAZY_MARK = "# lazy:"
MAX_LINES = 400
LONG_MARK = "Over 400 lines because"


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return best


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # an mcis_dist module, or an outside top-level package name
    line: int
    in_function: bool
    lazy_reason: bool
    internal: bool


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def imports(known: dict[str, Path]) -> list[Import]:
    found: list[Import] = []
    for name, path in known.items():
        source = path.read_text()
        lines = source.splitlines()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(
            node: ast.AST, in_function: bool, name=name, package=package, lines=lines
        ) -> None:
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets: list[str] = []
                    if isinstance(child, ast.Import):
                        targets = [alias.name for alias in child.names]
                    else:
                        base = child.module or ""
                        if child.level:
                            parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                            base = ".".join(parts + ([base] if base else []))
                        # `from pkg import submodule` imports the submodule; `from mod import x`
                        # imports mod: the most specific module that exists wins.
                        targets = [
                            _resolve(f"{base}.{alias.name}", known) or base for alias in child.names
                        ]
                    span = "\n".join(lines[child.lineno - 1 : (child.end_lineno or child.lineno)])
                    for target in targets:
                        internal = target.split(".")[0] == "mcis_dist"
                        if internal:
                            target = _resolve(target, known)
                            if target == name:
                                continue
                        else:
                            target = target.split(".")[0]
                        found.append(
                            Import(
                                name, target, child.lineno, in_function, LAZY_MARK in span, internal
                            )
                        )
                visit(child, inside)

        visit(ast.parse(source, str(path)), False)
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return known, imports(known)


def where(imp: Import, known: dict[str, Path]) -> str:
    return f"{known[imp.importer].relative_to(PACKAGE.parent)}:{imp.line}"


def test_every_module_has_a_layer(graph):
    known, _ = graph
    for name in known:
        layer_of(name)


def test_no_import_circle(graph):
    known, found = graph
    edges: dict[str, set[str]] = {name: set() for name in known}
    for imp in found:
        if imp.internal:
            edges[imp.importer].add(imp.target)
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0
    for root in known:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    assert not circles, f"import circles: {circles}"


def test_no_upward_import(graph):
    known, found = graph
    upward = [
        f"{where(imp, known)} {imp.importer} ({LAYERS[layer_of(imp.importer)][0]}) imports "
        f"{imp.target} ({LAYERS[layer_of(imp.target)][0]})"
        for imp in found
        if imp.internal and layer_of(imp.target) > layer_of(imp.importer)
    ]
    assert not upward, "imports that point up a layer:\n" + "\n".join(upward)


def test_function_level_imports_state_a_reason(graph):
    known, found = graph
    hidden = [
        f"{where(imp, known)} {imp.importer} imports {imp.target} inside a function"
        for imp in found
        if imp.in_function and not imp.lazy_reason
    ]
    assert not hidden, (
        f"move these to the top of the module, or say why they must wait ({LAZY_MARK} ...):\n"
        + "\n".join(hidden)
    )


def test_lower_layers_run_without_ray(graph):
    known, found = graph
    eager = [
        f"{where(imp, known)} {imp.importer} imports ray"
        for imp in found
        if imp.target == "ray" and layer_of(imp.importer) < NO_RAY_BELOW and not imp.lazy_reason
    ]
    assert not eager, "\n".join(eager)


def test_long_modules_say_why(graph):
    known, _ = graph
    silent = []
    for name, path in known.items():
        source = path.read_text()
        n = len(source.splitlines())
        if n > MAX_LINES and LONG_MARK not in (ast.get_docstring(ast.parse(source)) or ""):
            silent.append(f"{name}: {n} lines")
    assert not silent, (
        f"split these or say why in the module docstring ('{LONG_MARK} ...'):\n" + "\n".join(silent)
    )


def test_comments_point_inside_the_repository():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{i}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if "REFERENCE §" in line or "REFERENCE.md" in line
    ]
    assert not offenders, offenders


# The checker itself, on a package made for the purpose: it must see what it claims to see.
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_sees_circles_upward_and_hidden_imports(tmp_path):
    _write(
        tmp_path / "mcis_dist",
        {
            "__init__.py": "",
            "storage.py": "def f():\n    from mcis_dist import cli\n",
            "cli.py": "from mcis_dist.runtime.paths import x\nimport ray\n",
            "runtime/__init__.py": "",
            "runtime/paths.py": "from mcis_dist import cli\nx = 1\n",
            "models/__init__.py": "def g():\n    import ray  # lazy: optional probe\n",
        },
    )
    known = modules(tmp_path / "mcis_dist")
    found = imports(known)
    by = {(i.importer, i.target): i for i in found}
    assert by[("mcis_dist.storage", "mcis_dist.cli")].in_function
    assert not by[("mcis_dist.storage", "mcis_dist.cli")].lazy_reason
    assert layer_of("mcis_dist.cli") > layer_of("mcis_dist.storage")  # an upward import
    assert by[("mcis_dist.cli", "mcis_dist.runtime.paths")].internal
    assert by[("mcis_dist.runtime.paths", "mcis_dist.cli")]  # with the line above: a circle
    assert by[("mcis_dist.models", "ray")].lazy_reason
    assert not by[("mcis_dist.cli", "ray")].internal
    assert layer_of("mcis_dist.cams.infer") == LAYER_INDEX["maths"]
    assert layer_of("mcis_dist.cams.stage") == LAYER_INDEX["stages"]
