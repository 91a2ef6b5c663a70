"""roadwork: stage 1 of a two-stage roadwork detector with a calibrated exit guarantee.

The library is usable without the CLI; heavy modules (torch, timm, transformers) are imported lazily so that
``import roadwork_cli`` and ``roadwork --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from roadwork_cli.version import __version__

if TYPE_CHECKING:
    from roadwork_cli.export import export_bundle
    from roadwork_cli.scoring import score_source
    from roadwork_cli.stage1 import Prediction, Stage1Model, load_bundle

__all__ = ["__version__", "load_bundle", "Stage1Model", "Prediction", "export_bundle", "score_source"]

# Public name -> the module that defines it; imported on first use (torch is heavy).
_LAZY = {
    "load_bundle": "stage1",
    "Stage1Model": "stage1",
    "Prediction": "stage1",
    "export_bundle": "export",
    "score_source": "scoring",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"roadwork_cli.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'roadwork_cli' has no attribute {name!r}")
