"""The whole stage-1 pipeline in one call: what ``roadwork demo`` runs.

synthetic scenes -> split -> cache features -> train (cached) -> calibrate (SCRC-I) -> evaluate -> export -> predict.

Every stage is the same library function the single-stage commands call, and each one resumes or re-uses its
artifacts, so re-running the demo after an interruption (or after it finished) picks up where it stopped.

Example:
    >>> settings = demo_settings(None, per_class=200, run="runs/small_demo")  # doctest: +SKIP
    >>> summary = run_demo(settings)  # doctest: +SKIP
    >>> summary.report["guarantee"]["satisfied"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadwork_cli.config import Settings, deep_merge, load_settings, settings_from_env, settings_from_yaml
from roadwork_cli.io.atomic import atomic_write_text
from roadwork_cli.io.run import RunDir

DEMO_RUN = Path("runs/demo")
DEMO_PER_CLASS = 2500
"""Synthetic images per class. Chosen so that val_calib (30 %) holds ~750 positives, ~600 of them exiting at 80 %
coverage: SCRC-I with a Bonferroni correction over 10 gate values needs >= ~262 exited positives even with zero
misses, and ~500+ to tolerate a few. The whole demo stays under 10 minutes on 2 CPU cores with efficientnet_lite0."""

DEMO_DEFAULTS: dict[str, Any] = {
    # A large val_calib: the certificate's strength grows with the number of calibration positives.
    "data": {"fractions": [0.4, 0.1, 0.3, 0.2]},
    # The band rule (defer iff tau <= p < b) certifies a higher accuracy on exits than the gate rule (exit iff
    # g >= lambda) on the demo's val_calib at the same targets. The scaling default stays: both rules are monotone in
    # p, so Platt, temperature or no scaling give the same decisions.
    "calibration": {"fnr": 0.02, "coverage": 0.8, "delta": 0.1, "rule": "band"},
    # A heavier miss term pulls the hardest roadwork scenes up, so SCRC-I certifies a larger tau: more accuracy on
    # exits at the same coverage, for a little plain accuracy at p >= 0.5. The gate term is off: it shares the trunk
    # and costs accuracy on exits, while calibration picks softmax response over the gate here anyway.
    # The SGD-trained cls, not the default cross-validated logistic regression (train.cls_fit): the logistic fit ranks
    # as well overall but puts the hardest roadwork lower, so the certified tau cuts deeper and fewer images exit
    # correctly at the same certified FNR and coverage.
    "train": {"loss": {"fn_weight": 10.0, "gate_correctness": 0.0}, "cls_fit": "sgd"},
}
"""Demo settings that sit between the global defaults and the user's YAML / environment / flags."""

N_PREDICT_EXAMPLES = 8


def demo_settings(
    config_file: Path | None = None,
    per_class: int | None = None,
    run: str | Path | None = None,
    environ: dict[str, str] | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> Settings:
    """Settings for the demo: defaults < demo defaults < YAML < ``ROADWORK_*`` environment < flags.

    The data source is always ``synthetic:2N`` with N = ``per_class`` (default ``DEMO_PER_CLASS``). ``run``,
    ``device`` and ``threads`` are the flags: ``None`` leaves the value to the lower layers.
    """
    layered: dict[str, Any] = deep_merge({}, DEMO_DEFAULTS)
    if config_file is not None:
        layered = deep_merge(layered, settings_from_yaml(config_file))
    layered = deep_merge(layered, settings_from_env(environ))
    n = int(per_class) if per_class is not None else DEMO_PER_CLASS
    if n <= 0:
        from roadwork_cli.errors import UsageError

        raise UsageError(f"--per-class must be positive (got {n}).")
    flags: dict[str, Any] = {"data": {"sources": [f"synthetic:{2 * n}"]}}
    run_dir = run if run is not None else (layered.get("runtime") or {}).get("run") or DEMO_RUN
    flags["runtime"] = {"run": str(run_dir), "device": device, "threads": threads}
    return load_settings(None, deep_merge(layered, flags), environ={})


@dataclass
class StageResult:
    """One finished stage: its name, the library function's summary, and wall time."""

    name: str
    summary: Any
    seconds: float


@dataclass
class DemoSummary:
    """Everything the demo produced."""

    run: RunDir
    stages: list[StageResult] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    bundle: Path | None = None
    predictions: list[tuple[Any, int]] = field(default_factory=list)
    """(Prediction, true label) for a few held-out test images, predicted from the exported bundle."""

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)


def run_demo(
    settings: Settings,
    progress: bool = False,
    on_stage: Callable[[StageResult], None] | None = None,
) -> DemoSummary:
    """Run every stage on ``settings`` (see ``demo_settings``) and return what each produced.

    Args:
        settings: Resolved settings; ``data.sources`` and ``runtime.run`` must be set.
        progress: Show progress bars on stderr.
        on_stage: Called after each stage (the CLI prints its table there).

    Raises:
        InfeasibleError: The calibration targets cannot be certified and ``calibration.allow_infeasible`` is off
            (everything up to calibration is written and re-used by the next run).
    """
    from roadwork_cli.calibration.api import calibrate_run
    from roadwork_cli.data.splits import Splits, build_splits
    from roadwork_cli.export import export_bundle
    from roadwork_cli.features.cache import cache_features
    from roadwork_cli.reporting.evaluate import evaluate_run
    from roadwork_cli.stage1 import load_bundle
    from roadwork_cli.training.api import train

    if settings.runtime.run is None:
        from roadwork_cli.errors import UsageError

        raise UsageError("The demo needs a run directory (runtime.run).")
    run = RunDir(settings.runtime.run).ensure()
    atomic_write_text(run.config, settings.to_yaml())
    summary = DemoSummary(run=run)

    def stage(name: str, work: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = work()
        record = StageResult(name, result, time.perf_counter() - started)
        summary.stages.append(record)
        if on_stage is not None:
            on_stage(record)
        return result

    stage("split", lambda: build_splits(settings.data.sources, settings.data, run, progress=progress))
    stage("cache-features", lambda: cache_features(run, settings, progress=progress))
    stage("train", lambda: train(run, settings, progress=progress))
    stage("calibrate", lambda: calibrate_run(run, settings.calibration))
    summary.report = stage("evaluate", lambda: evaluate_run(run, settings, split="test"))
    summary.bundle = stage("export", lambda: export_bundle(run, settings.export.out, settings))

    def predict_examples() -> list[tuple[Any, int]]:
        splits = Splits.load(run.splits)
        test = [splits.samples[i] for i in splits.ids("test")]
        # A few of each class, in a fixed order, so the printed examples are the same on every run.
        picked = [s for s in test if s.label == 1][: N_PREDICT_EXAMPLES // 2]
        picked += [s for s in test if s.label == 0][: N_PREDICT_EXAMPLES - len(picked)]
        model = load_bundle(
            summary.bundle,
            device=settings.runtime.device,
            precision=settings.runtime.precision,
            runtime=settings.predict.runtime,
        )
        predictions = model.predict([s.path for s in picked], batch_size=settings.predict.batch_size)
        return list(zip(predictions, [s.label for s in picked], strict=True))

    summary.predictions = stage("predict", predict_examples)
    return summary
