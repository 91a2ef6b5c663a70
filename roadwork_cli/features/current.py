"""The run's current features, and through them the run's backbone.

``cache-features`` writes ``features/current.json`` (:class:`~roadwork_cli.io.records.CurrentFeatures`): the
fingerprint of the cache folder the later stages use, whose ``meta.json`` holds the backbone's spec. From then on the
run has a backbone, and a stage that builds one (``cache-features`` again, ``train`` in any mode) takes it from there
rather than from the settings' default: a run cached with ``--backbone tiny_vit`` must not be fine-tuned on
efficientnet_lite0 because the flag was not repeated. A stage that is given another backbone explicitly (flag,
environment or settings file) refuses it with the command that switches the run, except ``cache-features``, which is
that command.
"""

from __future__ import annotations

from typing import Any

from roadwork_cli.config import Settings
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import read_json
from roadwork_cli.io.records import read_best_record, read_current
from roadwork_cli.io.run import RunDir

__all__ = ["run_backbone_spec", "with_run_backbone"]


def run_backbone_spec(run: RunDir) -> dict[str, Any] | None:
    """The spec (name, weights, image_size, ...) of the run's backbone, or None while the run has none.

    The backbone of the current features; without features (a run trained with ``--mode train`` only), that of the
    best record, whose weights are then the fine-tuned ones and so not the base's: its spec has no ``weights``.
    """
    current = read_current(run)
    if current is not None:
        meta = run.feature_meta(current.fingerprint)
        spec = read_json(meta).get("backbone") if meta.exists() else None
        return dict(spec) if isinstance(spec, dict) and spec.get("name") else None
    if not run.best_record.exists():
        return None
    record = read_best_record(run)
    spec = dict(record.backbone.get("spec", record.backbone))
    if record.adapters is not None:
        spec.pop("weights", None)
    return spec if spec.get("name") else None


def with_run_backbone(run: RunDir, settings: Settings, stage: str, switch: bool = False) -> Settings:
    """``settings`` whose ``model.backbone`` / ``weights`` / ``image_size`` are the run's (when it has a backbone).

    Args:
        run: The run directory.
        settings: Resolved settings; a ``model.backbone`` set explicitly (flag, environment, settings file) counts.
        stage: Who was given the backbone, for the message (e.g. "`train`").
        switch: The stage chooses the run's backbone (``cache-features``): an explicit one wins.

    Raises:
        UsageError: An explicit backbone other than the run's, in a stage that cannot switch it.
    """
    spec = run_backbone_spec(run)
    model = settings.model
    explicit = "backbone" in model.model_fields_set
    if spec is None or (explicit and switch):
        return settings
    if explicit and model.backbone != spec["name"]:
        raise UsageError(
            f"{stage} was given backbone {model.backbone!r}, but this run's backbone is {spec['name']!r} (its "
            f"features and trained head were computed with it). To switch the run to {model.backbone!r}, run "
            f"`roadwork cache-features --run {run.root} --backbone {model.backbone}` first; to keep "
            f"{spec['name']!r}, drop model.backbone (flag, ROADWORK_MODEL__BACKBONE or the settings file)."
        )
    update = {
        "backbone": spec["name"],
        "weights": spec.get("weights", model.weights),
        "image_size": spec.get("image_size"),
    }
    return settings.model_copy(update={"model": model.model_copy(update=update)})
