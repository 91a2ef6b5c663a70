"""The package's imports follow its layering (docs/architecture.md, "Layers"): dependencies point one way, down.

Every module of ``roadwork_cli`` is parsed with ``ast``; every import counts, including those inside functions (the
lazy imports that keep the CLI fast are still dependencies). Only ``if TYPE_CHECKING:`` blocks are skipped: they never
run. A module may import its own component, anything in a lower layer, and, within the middle layer, only the edges
listed in ``MIDDLE_EDGES``.
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
    "scoring": 2,
    "robustness": 2,
    "features": 2,
    "training": 2,
    "calibration": 2,
    "reporting": 2,
    # below: building blocks
    "model": 1,
    "data": 1,
    "metrics": 1,
    # bottom: knows no models or images
    "io": 0,
    "config": 0,
    "errors": 0,
    "version": 0,
}

MIDDLE_EDGES: set[tuple[str, str]] = {
    ("stage1", "calibration"),  # the model applies the calibrated exit rule
    ("export", "stage1"),  # export builds the model once to check that its parts fit
    ("scoring", "stage1"),  # scoring a source runs the model
    ("training", "features"),  # train_cached trains on the feature cache
    ("reporting", "calibration"),  # reports apply and describe the calibrated rule
    ("reporting", "scoring"),  # evaluate --source scores the source first
    ("robustness", "stage1"),  # evaluate --robustness runs the model on challenge views
    ("robustness", "calibration"),  # ... applies the calibrated rule to their scores
    ("robustness", "reporting"),  # ... and reports them like clean data
}

# Imports that stay within one layer below the middle: the bottom layer's own small graph.
BOTTOM_EDGES: set[tuple[str, str]] = {
    ("io", "errors"),
    ("io", "version"),
    ("config", "errors"),
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


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """Collects ``(line, imported module)`` for every import outside ``if TYPE_CHECKING:`` blocks."""

    def __init__(self, module: str, is_package: bool):
        self.module = module
        self.is_package = is_package
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

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
    return (source, target) in MIDDLE_EDGES | BOTTOM_EDGES


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
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from roadwork_cli.model import x", []),
        ("from .. import stage1", ["roadwork_cli.stage1"]),
        ("from roadwork_cli import __version__", ["roadwork_cli"]),
    ],
)
def test_the_import_reader_sees_lazy_relative_and_skips_type_checking(code, expected):
    visitor = _Imports("roadwork_cli.data.images", is_package=False)
    visitor.visit(ast.parse(code))
    assert [name for _, name in visitor.found if name.startswith("roadwork_cli")] == expected


def test_the_rules_refuse_upward_and_unlisted_middle_imports():
    assert not _allowed("data", "reporting")  # the progress import that data/ used to make
    assert not _allowed("io", "")  # the bundle writer used to import the package root for its version
    assert not _allowed("calibration", "stage1") and not _allowed("features", "training")
    assert _allowed("stage1", "calibration") and _allowed("data", "io") and _allowed("cli", "pipeline")
