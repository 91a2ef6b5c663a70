"""The run directory: one folder per experiment, one well-known path per artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from roadwork_cli.errors import UsageError


@dataclass(frozen=True)
class RunDir:
    """Paths of every artifact in ``runs/<run_id>/`` (see docs/architecture.md, "Artifacts").

    Example:
        >>> run = RunDir("runs/demo")
        >>> run.splits.name
        'splits.json'
    """

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def rejected(self) -> Path:
        return self.root / "rejected.jsonl"

    @property
    def provenance(self) -> Path:
        """Fingerprints of the inputs each stage read (see ``roadwork_cli.io.provenance``)."""
        return self.root / "provenance.json"

    @property
    def split_cache(self) -> Path:
        """What ``split`` learnt about each input file (keyed by path, size and mtime), so re-runs skip decoding."""
        return self.root / "split_cache.jsonl"

    @property
    def synthetic(self) -> Path:
        """Where ``synthetic:N`` sources render their images."""
        return self.root / "synthetic"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def current_features(self) -> Path:
        """Which cache folder (fingerprint) and backbone the later stages use; written by ``cache-features``."""
        return self.features / "current.json"

    def feature_cache(self, fingerprint: str) -> Path:
        """One cache folder: ``meta.json``, ``index.json``, shards, ``failed.json``."""
        return self.features / fingerprint

    def feature_meta(self, fingerprint: str) -> Path:
        """One cache folder's ``meta.json``: backbone spec, preprocessing, decode recipe, augmentation, dtype."""
        return self.feature_cache(fingerprint) / "meta.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_record(self) -> Path:
        """The selected epoch's record: head config, backbone spec and fingerprint, epoch, metrics (``BestRecord``)."""
        return self.checkpoints / "best.json"

    @property
    def best_weights(self) -> Path:
        """The selected head's weights (safetensors)."""
        return self.checkpoints / "best.safetensors"

    @property
    def best_backbone(self) -> Path:
        """``train --mode train`` with adapters: the selected epoch's backbone, adapters merged (safetensors)."""
        return self.checkpoints / "best_backbone.safetensors"

    @property
    def warm_start_weights(self) -> Path:
        """``train --mode train``: the train_cached head it started from, kept for a resumed run."""
        return self.checkpoints / "warm_start.safetensors"

    @property
    def warm_start_record(self) -> Path:
        """The backbone fingerprint of :attr:`warm_start_weights`."""
        return self.checkpoints / "warm_start.json"

    @property
    def last_checkpoint(self) -> Path:
        """Everything a re-run needs to resume training (tensors and JSON types only; ``weights_only=True``)."""
        return self.checkpoints / "last.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def scores(self) -> Path:
        """Per-split raw score CSVs written by training (``scores/<split>.csv``)."""
        return self.root / "scores"

    def score_file(self, split: str) -> Path:
        """Training's raw scores of one split: ``id,label,p_roadwork,gate,logit_cls,logit_gate,logit_aux``."""
        return self.scores / f"{split}.csv"

    @property
    def calibration(self) -> Path:
        return self.root / "calibration"

    @property
    def scaling(self) -> Path:
        return self.calibration / "scaling.json"

    @property
    def scrc_params(self) -> Path:
        return self.calibration / "scrc_params.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.eval / "report.json"

    def split_report(self, split: str) -> Path:
        """The report of ``evaluate --split``: ``eval/report.json`` for test, ``eval/split-<split>/report.json`` else.

        Each split's report has a folder of its own, so evaluating val_calib never overwrites the test report.
        """
        return self.report if split == "test" else self.eval / f"split-{split}" / "report.json"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle.tar"

    def ensure(self) -> RunDir:
        """Create the run folder if needed and return self."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self

    def require(self, path: Path, made_by: str) -> Path:
        """Return ``path`` or raise a usage error saying which command makes it."""
        if not path.exists():
            raise UsageError(f"{path} does not exist; run `roadwork {made_by} --run {self.root}` first.")
        return path
