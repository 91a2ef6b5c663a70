"""Deterministic, leakage-free train / val_select / val_calib / test splits (``splits.json``).

Every image is read and fully decoded once; its id is the sha256 of its bytes. Exact duplicates collapse into one
sample (the copy with the smallest locator wins, so the outcome does not depend on reading order); copies that
disagree on the label are all rejected. Related images (a group: a manifest/parquet ``group`` column, or frames of
one clip with ``group_by="filename"``) share one split.

The split of a sample (or group) is a pure function of the seed and its key:
``u = int(sha256(f"{seed}:{key}"), 16) / 2**256`` mapped through the cumulative fractions. Hence the same sources and
seed give a byte-identical ``splits.json``, adding images never moves earlier ones, and each label is spread over the
splits in the configured proportions in expectation (the hash is independent of the label, so the assignment is
stratified by label in expectation without any state that new images could perturb).

Example:
    >>> summary = build_splits(["data/"], DataSettings(), RunDir("runs/x"))  # doctest: +SKIP
    >>> Splits.load(RunDir("runs/x").splits).ids("train")[:1]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from roadwork_cli.config import DataSettings
from roadwork_cli.data.images import ImageRejected, decode_image, parse_locator, read_bytes
from roadwork_cli.data.sources import Source, SourceRecord, SourceRejection, create_source
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_write_json, atomic_write_text, read_json
from roadwork_cli.io.run import RunDir

SPLIT_NAMES = ("train", "val_select", "val_calib", "test")
SPLITS_VERSION = 1
_FRAME_SUFFIX = re.compile(r"^(?P<stem>.*?)[ ._-]*(?:frame)?[ ._-]*\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One usable, de-duplicated image.

    Attributes:
        id: sha256 of the image bytes (hex).
        path: Locator (file path or ``<file.parquet>#row=<i>``).
        label: 1 roadwork, 0 no roadwork.
        source: The source spec it came from.
        group: Group key, or None when the sample stands alone.
    """

    id: str
    path: str
    label: int
    source: str
    group: str | None = None

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "source": self.source, "group": self.group}


@dataclass
class Splits:
    """The content of ``splits.json``."""

    seed: int
    splits: dict[str, list[str]]
    samples: dict[str, Sample]
    version: int = SPLITS_VERSION

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Splits:
        """Read ``splits.json``.

        Raises:
            UsageError: Missing file or not in the contract's format.
        """
        try:
            raw = read_json(path)
            samples = {
                sid: Sample(sid, s["path"], int(s["label"]), s["source"], s.get("group"))
                for sid, s in raw["samples"].items()
            }
            splits = {name: list(raw["splits"].get(name, [])) for name in SPLIT_NAMES}
            seed = int(raw["seed"])
        except FileNotFoundError:
            raise UsageError(f"{path} does not exist; run `roadwork split` first.") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path} is not a valid splits file: {exc!r}") from None
        missing = [sid for ids in splits.values() for sid in ids if sid not in samples]
        if missing:
            raise UsageError(f"{path} lists ids without a sample entry, e.g. {missing[0]}")
        return cls(seed, splits, samples, int(raw.get("version", SPLITS_VERSION)))

    def ids(self, split_name: str) -> list[str]:
        """Sample ids of one split, in file order.

        Raises:
            UsageError: Unknown split name.
        """
        if split_name not in SPLIT_NAMES:
            raise UsageError(f"unknown split {split_name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return list(self.splits.get(split_name, []))

    def split_of(self, sample_id: str) -> str | None:
        """The split holding ``sample_id`` (None if absent)."""
        for name in SPLIT_NAMES:
            if sample_id in self.splits.get(name, ()):
                return name
        return None

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "seed": self.seed,
            "splits": {name: list(self.splits.get(name, [])) for name in SPLIT_NAMES},
            "samples": {sid: s.to_dict() for sid, s in self.samples.items()},
        }


@dataclass
class SplitSummary:
    """What ``build_splits`` did.

    Attributes:
        counts: Number of samples per ``(split, label, source)``.
        n_inputs: Items read from all sources (before validation and de-duplication).
        n_samples: Usable unique samples written to ``splits.json``.
        n_rejected: Lines of ``rejected.jsonl``.
        n_duplicates: Extra copies of identical bytes that were folded into one sample.
        seconds: Wall time of reading, validating and writing.
    """

    counts: dict[tuple[str, int, str], int] = field(default_factory=dict)
    n_inputs: int = 0
    n_samples: int = 0
    n_rejected: int = 0
    n_duplicates: int = 0
    seconds: float = 0.0
    splits_path: Path | None = None
    rejected_path: Path | None = None
    rejected_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.n_inputs / self.seconds if self.seconds > 0 else 0.0

    def rows(self) -> list[tuple[str, int, str, int]]:
        """``(split, label, source, count)`` rows in split order, then label, then source."""
        order = {name: i for i, name in enumerate(SPLIT_NAMES)}
        keys = sorted(self.counts, key=lambda k: (order[k[0]], k[1], k[2]))
        return [(split, label, source, self.counts[(split, label, source)]) for split, label, source in keys]

    def split_totals(self) -> dict[str, int]:
        totals = dict.fromkeys(SPLIT_NAMES, 0)
        for (split, _, _), count in self.counts.items():
            totals[split] += count
        return totals


def group_from_filename(locator: str) -> str | None:
    """Group key of a file from its name: a trailing frame number and separators are stripped.

    Parquet rows have no file name and get None. An all-digit name (``clip/0001.jpg``) groups by its folder.

    Example:
        >>> group_from_filename("data/roadwork/clip_0001.jpg")
        'data/roadwork/clip'
    """
    path, row, _ = parse_locator(locator)
    if row is not None:
        return None
    file = Path(path)
    match = _FRAME_SUFFIX.match(file.stem)
    stem = match["stem"] if match else file.stem
    if not stem:
        return str(file.parent)
    return str(file.parent / stem)


def assign_split(key: str, seed: int, fractions: tuple[float, ...]) -> str:
    """The split of a sample or group key: a uniform hash of ``"{seed}:{key}"`` through the cumulative fractions."""
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) / 2**256
    cumulative = 0.0
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        cumulative += fraction
        if u < cumulative:
            return name
    # Rounding can leave the cumulative sum a hair under 1: the last split with a positive fraction takes the rest.
    return next(name for name, f in reversed(list(zip(SPLIT_NAMES, fractions, strict=True))) if f > 0)


def _validate(record: SourceRecord, settings: DataSettings) -> tuple[str | None, str | None]:
    """``(sha256, None)`` for a usable image, ``(None, reason)`` otherwise. Runs in worker threads."""
    try:
        data = record.data if record.data is not None else read_bytes(record.locator, settings.max_file_bytes)
        decode_image(data, settings.max_image_pixels, settings.max_file_bytes)
    except ImageRejected as exc:
        return None, exc.reason
    except Exception as exc:  # noqa: BLE001 - one bad input must never abort the whole split
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    return hashlib.sha256(data).hexdigest(), None


def _group_of(record: SourceRecord, group_by: str) -> str | None:
    if group_by == "none":
        return None
    if group_by == "filename":
        return record.group if record.group is not None else group_from_filename(record.locator)
    return record.group  # "auto" and "column": the source's group field when present


def _absolute(locator: str) -> str:
    path, row, column = parse_locator(locator)
    path = os.path.abspath(path)
    return path if row is None else f"{path}#row={row}" + (f"&column={column}" if column else "")


def _read_sources(sources: list[str], settings: DataSettings, run: RunDir, progress: bool) -> list[Source]:
    resolved = [create_source(spec, settings, run.synthetic) for spec in sources]
    for source in resolved:
        if source.prepare is not None:
            source.prepare(progress)
    return resolved


def build_splits(
    sources: list[str], settings: DataSettings, run: RunDir, progress: bool = False, workers: int | None = None
) -> SplitSummary:
    """Read, validate and hash every image of ``sources``; write ``run.splits`` and ``run.rejected``.

    Args:
        sources: Source specs (folders, manifests, parquet, COCO json, ``synthetic:N``).
        settings: Data settings (seed, fractions, grouping, image limits).
        run: Run directory; ``synthetic:N`` renders into ``run.synthetic``.
        progress: Show a progress bar on stderr.
        workers: Decoding threads (PIL releases the GIL while decoding); default ``min(4, cpu count)``.

    Returns:
        Counts per split x label x source, rejected and duplicate counts, timing.

    Raises:
        UsageError: No source given, an unknown spec, or no usable image at all (``rejected.jsonl`` is still
            written so the reasons can be read).
    """
    from roadwork_cli.reporting.progress import progress_bar

    if not sources:
        raise UsageError("no data source: pass --source SRC (a folder, manifest, parquet, COCO json or synthetic:N)")
    started = time.perf_counter()
    run.ensure()
    resolved = _read_sources(list(sources), settings, run, progress)
    hints = [s.size_hint for s in resolved]
    total = None if any(h is None for h in hints) else sum(hints)
    workers = workers or min(4, os.cpu_count() or 1)

    rejected: list[tuple[str, str]] = []
    accepted: list[tuple[str, SourceRecord]] = []  # (sha256, record without its bytes)
    n_inputs = 0
    window = max(8, workers * 8)  # bounded in-flight work keeps memory flat on large parquet sets
    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar("validating", total, "img", progress) as step:
        pending: list = []

        def drain(limit: int) -> None:
            while len(pending) > limit:
                record, future = pending.pop(0)
                digest, reason = future.result()
                if digest is None:
                    rejected.append((_absolute(record.locator), reason))
                else:
                    accepted.append(
                        (digest, SourceRecord(_absolute(record.locator), record.label, record.source, record.group))
                    )
                step(1)

        for source in resolved:
            for item in source:
                n_inputs += 1
                if isinstance(item, SourceRejection):
                    rejected.append((_absolute(item.locator), item.reason))
                    step(1)
                    continue
                pending.append((item, pool.submit(_validate, item, settings)))
                drain(window)
        drain(0)

    by_id: dict[str, list[SourceRecord]] = defaultdict(list)
    for digest, record in accepted:
        by_id[digest].append(record)
    samples: dict[str, Sample] = {}
    n_duplicates = 0
    for digest, copies in by_id.items():
        copies.sort(key=lambda r: (r.locator, r.source))
        labels = {r.label for r in copies}
        if len(labels) > 1:
            detail = ", ".join(f"{r.locator}={r.label}" for r in copies)
            rejected.extend((r.locator, f"duplicate bytes with conflicting labels ({detail})") for r in copies)
            continue
        n_duplicates += len(copies) - 1
        winner = copies[0]
        group = next((g for g in (_group_of(r, settings.group_by) for r in copies) if g is not None), None)
        samples[digest] = Sample(digest, winner.locator, winner.label, winner.source, group)

    splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    counts: Counter = Counter()
    for digest in sorted(samples):
        sample = samples[digest]
        key = f"group:{sample.group}" if sample.group is not None else digest
        name = assign_split(key, settings.seed, settings.fractions)
        splits[name].append(digest)
        counts[(name, sample.label, sample.source)] += 1

    rejected = sorted(set(rejected))
    lines = "".join(_jsonl_line({"path": path, "reason": reason}) for path, reason in rejected)
    atomic_write_text(run.rejected, lines)
    summary = SplitSummary(
        counts=dict(counts),
        n_inputs=n_inputs,
        n_samples=len(samples),
        n_rejected=len(rejected),
        n_duplicates=n_duplicates,
        rejected_path=run.rejected,
        rejected_reasons=dict(Counter(_reason_kind(reason) for _, reason in rejected)),
    )
    if not samples:
        summary.seconds = time.perf_counter() - started
        raise UsageError(
            f"no usable image in {', '.join(sources)}: {n_inputs} inputs, {len(rejected)} rejected "
            f"(reasons in {run.rejected})"
        )
    atomic_write_json(run.splits, Splits(settings.seed, splits, samples).to_dict())
    summary.splits_path = run.splits
    summary.seconds = time.perf_counter() - started
    return summary


def _jsonl_line(obj: dict) -> str:
    import json

    return json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"


def _reason_kind(reason: str) -> str:
    """The reason without its details, for summary counts ("unreadable: ..." -> "unreadable")."""
    for sep in (":", " ("):
        if sep in reason:
            return reason.split(sep, 1)[0]
    return reason
