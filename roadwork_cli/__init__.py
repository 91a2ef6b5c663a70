"""roadwork: stage 1 of a two-stage roadwork detector with a calibrated exit guarantee.

The library is usable without the CLI; heavy modules (torch, timm, transformers) are imported lazily so that
``import roadwork_cli`` and ``roadwork --help`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from roadwork_cli.stage1 import Prediction, Stage1Model, load_bundle

__all__ = ["__version__", "load_bundle", "Stage1Model", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in {"load_bundle", "Stage1Model", "Prediction"}:
        from roadwork_cli import stage1

        return getattr(stage1, name)
    raise AttributeError(f"module 'roadwork_cli' has no attribute {name!r}")
