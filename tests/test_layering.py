"""The package's imports follow its layering (docs/architecture.md, "Layers"): dependencies point one way, down.

Every module of ``roadwork_cli`` is parsed with ``ast``; every import counts, including those inside functions (the
lazy imports that keep the CLI fast are still dependencies) and those under ``if TYPE_CHECKING:`` (a type a module
names is a dependency of its design, even where it never runs). A module may import its own component, anything in a
lower layer, and, within a layer, only the edges listed in ``SAME_LAYER_EDGES``. Beyond the layers the package has no
import circle between modules and no module imports another module's private (``_``-prefixed) name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import roadwork_cli

PACKAGE = Path(roadwork_cli.__file__).parent

# Component (first name under roadwork_cli; "" is the package root) -> layer; higher layers may import lower ones.
LAYERS: dict[str, int] = {
    # top: the command line, the demo orchestration, and the package root (a lazy facade over the library API)
    "": 3,
    "__main__": 3,
    "cli": 3,
    "pipeline": 3,
    # middle: the stages
    "stage1": 2,
    "export": 2,
    "hf_export": 2,
    "scoring": 2,
    "robustness": 2,
    "serving": 2,
    "natix": 2,
    "batch_ray": 2,
    "features": 2,
    "training": 2,
    "calibration": 2,
    "reporting": 2,
    # below: building blocks
    "model": 1,
    "data": 1,
    "metrics": 1,
    "runtime": 1,
    # bottom: knows no models or images
    "io": 0,
    "config": 0,
    "errors": 0,
    "version": 0,
    "registry": 0,
}

SAME_LAYER_EDGES: set[tuple[str, str]] = {
    ("stage1", "calibration"),  # the model applies the calibrated exit rule
    ("export", "stage1"),  # export builds the model once to check that its parts fit
    ("hf_export", "stage1"),  # the HF export folds the model's head and scaling and checks p against it
    ("scoring", "stage1"),  # scoring a source runs the model
    ("training", "features"),  # train_cached trains on the feature cache
    ("reporting", "calibration"),  # reports apply and describe the calibrated rule
    ("reporting", "scoring"),  # evaluate --source scores the source first
    ("serving", "stage1"),  # serve's workers load the bundle as predict does
    ("natix", "stage1"),  # the miner's detector loads the bundle as predict does
    ("batch_ray", "stage1"),  # each Ray actor loads the bundle as predict does
    ("natix", "robustness"),  # ... its remap is placed on val_select's NATIX challenge levels
    ("natix", "calibration"),  # ... calibrated with the run's rule
    ("natix", "export"),  # ... and export --natix writes the bundle it ships
    ("robustness", "stage1"),  # evaluate --robustness runs the model on challenge views
    ("robustness", "calibration"),  # ... applies the calibrated rule to their scores
    ("robustness", "reporting"),  # ... and reports them like clean data
    ("model", "data"),  # a backbone declares its input recipe (data.preprocessing), which the decode path follows
    ("io", "errors"),
    ("io", "version"),
    ("config", "errors"),
    ("registry", "errors"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _component(module: str) -> str | None:
    """``roadwork_cli.data.decode`` -> ``data``; the root -> ``""``; outside the package -> None."""
    parts = module.split(".")
    if parts[0] != "roadwork_cli":
        return None
    return parts[1] if len(parts) > 1 else ""


class _Imports(ast.NodeVisitor):
    """Collects ``(line, imported module)`` for every import, ``if TYPE_CHECKING:`` blocks included."""

    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.is_package = is_package
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(node.lineno, alias.name) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            package = self.module.split(".")
            base = package[: len(package) - node.level + (1 if self.is_package else 0)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == "roadwork_cli":  # `from roadwork_cli import x`: x may be a submodule
            for alias in node.names:
                sub = f"roadwork_cli.{alias.name}"
                self.found.append((node.lineno, sub if _component(sub) in LAYERS else target))
        else:
            self.found.append((node.lineno, target))


def _edges() -> list[tuple[str, int, str, str]]:
    """``(file, line, importer component, imported component)`` of every cross-component import."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        source = _component(module)
        for line, imported in visitor.found:
            target = _component(imported)
            if target is not None and target != source:
                edges.append((str(path.relative_to(PACKAGE.parent)), line, source, target))
    return edges


def _allowed(source: str, target: str) -> bool:
    if LAYERS[target] < LAYERS[source]:
        return True
    if LAYERS[source] == LAYERS[target] == 3:
        return True  # the top layer is one program: cli runs the demo pipeline and prints the root's version
    return (source, target) in SAME_LAYER_EDGES


def test_every_component_has_a_layer():
    components = {_component(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert components - set(LAYERS) == set(), "place each new module in LAYERS (and in docs/architecture.md)"


def test_imports_point_down():
    wrong = [
        f"{file}:{line}: {source or 'roadwork_cli'} (layer {LAYERS[source]}) imports {target or 'roadwork_cli'} "
        f"(layer {LAYERS[target]})"
        for file, line, source, target in _edges()
        if source in LAYERS and target in LAYERS and not _allowed(source, target)
    ]
    assert wrong == [], "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("from roadwork_cli.reporting.progress import progress_bar", ["roadwork_cli.reporting.progress"]),
        ("def f():\n    import roadwork_cli.stage1", ["roadwork_cli.stage1"]),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from roadwork_cli.model import x",
            ["roadwork_cli.model"],
        ),
        ("from .. import stage1", ["roadwork_cli.stage1"]),
        ("from roadwork_cli import __version__", ["roadwork_cli"]),
    ],
)
def test_the_import_reader_sees_lazy_relative_and_type_checking_imports(code, expected):
    visitor = _Imports("roadwork_cli.data.images", is_package=False)
    visitor.visit(ast.parse(code))
    assert [name for _, name in visitor.found if name.startswith("roadwork_cli")] == expected


def test_the_rules_refuse_upward_and_unlisted_middle_imports():
    assert not _allowed("data", "reporting")  # the progress import that data/ used to make
    assert not _allowed("io", "")  # the bundle writer used to import the package root for its version
    assert not _allowed("calibration", "stage1") and not _allowed("features", "training")
    assert _allowed("stage1", "calibration") and _allowed("data", "io") and _allowed("cli", "pipeline")


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _module_imports() -> tuple[dict[str, set[str]], list[str]]:
    """The module graph (importer -> imported modules of the package) and every private name taken from elsewhere.

    ``from a.b import c`` is an edge to ``a.b.c`` where that is a module, else to ``a.b``. A package's ``__init__``
    that a submodule imports only to reach a sibling is not a step of a circle, so edges from a module to its own
    parent packages are left out.
    """
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private: list[str] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = name.split(".")
                    base = package[: len(package) - node.level + (1 if is_package else 0)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        graph[name].add(f"{target}.{alias.name}")
                    elif target in modules:
                        graph[name].add(target)
                        if alias.name.startswith("_") and not alias.name.startswith("__") and target != name:
                            private.append(f"{name} imports {alias.name} from {target}")
        graph[name] -= {name} | {other for other in graph[name] if name.startswith(other + ".")}
    return graph, private


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
    return circles


def test_no_import_circle_between_modules():
    graph, _ = _module_imports()
    assert _circles(graph) == [], "modules that import each other (lazy and TYPE_CHECKING imports count)"


def test_no_module_imports_a_private_name_of_another():
    _, private = _module_imports()
    assert private == [], "make the name public or move it to the module that uses it"


def test_the_checks_find_a_circle_and_a_private_import():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []
