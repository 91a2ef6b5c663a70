"""Deterministic, leakage-free train / val_select / val_calib / test splits (``splits.json``).

Every new image is read and fully decoded once (re-runs use the validation cache described below); its id is the
sha256 of its bytes. Exact duplicates collapse into one sample (the copy with the smallest locator wins, so the outcome
does not depend on reading order); copies that disagree on the label are all rejected. Related images (a group: a
manifest/parquet ``group`` column, or frames of one clip with ``group_by="filename"``) share one split.

The split of a sample (or group) is a pure function of the seed and its key:
``u = int(sha256(f"{seed}:{key}"), 16) / 2**256`` mapped through the cumulative fractions. Hence the same sources and
seed give a byte-identical ``splits.json``, adding images never moves earlier ones, and each label is spread over the
splits in the configured proportions in expectation (the hash is independent of the label, so the assignment is
stratified by label in expectation without any state that new images could perturb).

With ``data.stratify`` the proportions hold exactly instead of in expectation, which matters for small sets (a 60-image
set can otherwise leave val_calib without a single negative): per label, units are ordered by the same hash and cut at
the largest-remainder rounding of ``count * fraction``. The result is still a pure function of the samples and the
seed (same sources and seed -> the same file byte for byte), but adding images shifts the cut points, so earlier
images can move between splits; keep it off for data sets that grow.

Re-running ``split`` re-reads every source but decodes only inputs it has not seen: ``<run>/split_cache.jsonl``
remembers the sha256 and fingerprints (or the rejection reason) of each input by path, size and modification time, and
is appended to as validation goes, so a split killed half way resumes where it stopped.

Near-duplicates (re-encodes, resizes, small crops: different bytes, same content) are found from a perceptual hash
and a colour thumbnail of the image decoded for validation (:mod:`roadwork_cli.data.near_duplicates`). Each sample
records its hash and its cluster; ``splits.json`` gets a ``near_duplicates`` report (clusters per split and across
splits, the latter being leakage). ``group_by="near_duplicates"`` keeps each cluster in one split, and ``"auto"``
does so for the samples without a group column. A group key that depends on a cluster (its smallest sample id) can
change when a new image joins or bridges clusters, so with near-duplicate grouping an added image can move its
cluster.

Example:
    >>> summary = build_splits(["data/"], DataSettings(), RunDir("runs/x"))  # doctest: +SKIP
    >>> Splits.load(RunDir("runs/x").splits).ids("train")[:1]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path

from roadwork_cli.config import DataSettings
from roadwork_cli.data.images import ImageRejected, decode_image, parse_locator, read_bytes
from roadwork_cli.data.near_duplicates import find_clusters, fingerprint, hash_value, summarize
from roadwork_cli.data.pixels import reason_kind
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
        phash: 64-bit perceptual hash (16 hex digits); None in files written before hashes were recorded.
        near_duplicate: Id of its near-duplicate cluster (16 hex digits of the cluster's smallest sample id), or None
            when it has no near-duplicate (``data.near_duplicate_bits``, ``data.near_duplicate_max_difference``).
    """

    id: str
    path: str
    label: int
    source: str
    group: str | None = None
    phash: str | None = None
    near_duplicate: str | None = None

    def to_dict(self) -> dict:
        # phash and near_duplicate are additive keys: readers of the contract's four keys are unaffected.
        return {
            "path": self.path,
            "label": self.label,
            "source": self.source,
            "group": self.group,
            "phash": self.phash,
            "near_duplicate": self.near_duplicate,
        }


@dataclass
class Splits:
    """The content of ``splits.json``."""

    seed: int
    splits: dict[str, list[str]]
    samples: dict[str, Sample]
    version: int = SPLITS_VERSION
    near_duplicates: dict | None = None
    """The near-duplicate report (:func:`roadwork_cli.data.near_duplicates.summarize`); None in older files."""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Splits:
        """Read ``splits.json``.

        Raises:
            UsageError: Missing file or not in the contract's format.
        """
        try:
            raw = read_json(path)
            samples = {
                sid: Sample(
                    sid,
                    s["path"],
                    int(s["label"]),
                    s["source"],
                    s.get("group"),
                    phash=s.get("phash"),
                    near_duplicate=s.get("near_duplicate"),
                )
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
        return cls(seed, splits, samples, int(raw.get("version", SPLITS_VERSION)), raw.get("near_duplicates"))

    def ids(self, split_name: str) -> list[str]:
        """Sample ids of one split, in file order.

        Raises:
            UsageError: Unknown split name.
        """
        if split_name not in SPLIT_NAMES:
            raise UsageError(f"unknown split {split_name!r}; expected one of {', '.join(SPLIT_NAMES)}")
        return list(self.splits.get(split_name, []))

    def near_duplicate_clusters(self, split_name: str) -> dict[str, list[str]]:
        """Near-duplicate clusters with two or more images inside one split: cluster id -> its sample ids there.

        What calibration needs to know before it counts val_calib images as independent draws.

        Raises:
            UsageError: Unknown split name.
        """
        members: dict[str, list[str]] = defaultdict(list)
        for sid in self.ids(split_name):
            cluster = self.samples[sid].near_duplicate
            if cluster is not None:
                members[cluster].append(sid)
        return {cluster: ids for cluster, ids in sorted(members.items()) if len(ids) > 1}

    def split_of(self, sample_id: str) -> str | None:
        """The split holding ``sample_id`` (None if absent)."""
        for name in SPLIT_NAMES:
            if sample_id in self.splits.get(name, ()):
                return name
        return None

    def to_dict(self) -> dict:
        out = {
            "version": self.version,
            "seed": self.seed,
            "splits": {name: list(self.splits.get(name, [])) for name in SPLIT_NAMES},
            "samples": {sid: s.to_dict() for sid, s in self.samples.items()},
        }
        if self.near_duplicates is not None:
            out["near_duplicates"] = self.near_duplicates
        return out


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
    near_duplicates: dict = field(default_factory=dict)
    """The near-duplicate report written to ``splits.json`` (:func:`roadwork_cli.data.near_duplicates.summarize`)."""

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

    def label_totals(self) -> dict[str, dict[int, int]]:
        """``{split: {0: negatives, 1: positives}}`` over all sources."""
        totals = {name: {0: 0, 1: 0} for name in SPLIT_NAMES}
        for (split, label, _), count in self.counts.items():
            totals[split][label] += count
        return totals

    def warnings(self, positives_needed: int | None = None, min_per_class: int = 10) -> list[str]:
        """Problems of a small or one-class data set that later stages would otherwise hit as NaN or infeasibility,
        then near-duplicate leakage (:meth:`near_duplicate_warnings`). Arguments as :meth:`size_warnings`."""
        return self.size_warnings(positives_needed, min_per_class) + self.near_duplicate_warnings()

    def size_warnings(self, positives_needed: int | None = None, min_per_class: int = 10) -> list[str]:
        """Problems of a small or one-class data set that later stages would otherwise hit as NaN or infeasibility.

        Args:
            positives_needed: Fewest exited roadwork images that can certify the calibration targets at all
                (``calibration.stats.positives_needed``); None skips that check.
            min_per_class: Below this many images of a class, val_select's metrics and scaling fits are noise.

        Returns:
            One sentence per problem, empty when none.
        """
        totals = self.label_totals()
        found: list[str] = []
        positives = sum(t[1] for t in totals.values())
        negatives = sum(t[0] for t in totals.values())
        if not positives or not negatives:
            only = "roadwork" if positives else "no_roadwork"
            found.append(
                f"every usable image is {only}: this is a one-class data set, so no classifier can be trained or "
                "calibrated on it. Check the labels (class folder names, manifest labels, "
                "data.coco_positive_categories)."
            )
            return found
        for split in ("train", "val_select"):
            neg, pos = totals[split][0], totals[split][1]
            if not neg or not pos:
                found.append(
                    f"{split} has {pos} roadwork and {neg} no_roadwork images: with one class missing, "
                    + (
                        "the head cannot learn the other."
                        if split == "train"
                        else "model selection and probability scaling are undefined (AUROC and MCC print as nan)."
                    )
                )
            elif split == "val_select" and min(neg, pos) < min_per_class:
                found.append(
                    f"val_select has {pos} roadwork and {neg} no_roadwork images: fewer than {min_per_class} of a "
                    "class makes model selection and probability scaling noisy."
                )
        neg, pos = totals["val_calib"][0], totals["val_calib"][1]
        if not neg and not pos:
            found.append("val_calib has no images: calibrate has nothing to choose thresholds on. Add data or raise "
                         "the val_calib fraction.")  # fmt: skip
            return found + self._test_warnings(totals)
        if positives_needed is not None and pos < positives_needed:
            found.append(
                f"val_calib has {pos} roadwork images, but certifying the false-negative target needs at least "
                f"{positives_needed} roadwork images among the exits (so more in val_calib), even with no miss: "
                "calibrate will be infeasible. Add data, raise the val_calib fraction, or relax "
                "calibration.fnr / delta / grid_size."
            )
        elif not pos:
            found.append("val_calib has no roadwork image: the false-negative target cannot be certified, so "
                         "calibrate will be infeasible.")  # fmt: skip
        if not neg:
            found.append("val_calib has no no_roadwork image: the coverage bound cannot be estimated for negatives.")
        return found + self._test_warnings(totals)

    @staticmethod
    def _test_warnings(totals: dict[str, dict[int, int]]) -> list[str]:
        """The test split's problems: evaluate measures nothing, or one of FNR / FPR on exits is undefined."""
        neg, pos = totals["test"][0], totals["test"][1]
        if not neg and not pos:
            return ["test has no images: evaluate has nothing to measure the certified targets on."]
        if not pos:
            return [f"test has 0 roadwork and {neg} no_roadwork images: FNR on exits is not testable on it, so "
                    "evaluate cannot check the false-negative target (and --strict fails)."]  # fmt: skip
        if not neg:
            return [f"test has {pos} roadwork and 0 no_roadwork images: FPR on exits and MCC are undefined on it."]
        return []

    def near_duplicate_warnings(self) -> list[str]:
        """Leakage (near-duplicate clusters in more than one split, per split pair) and clusters of mixed labels."""
        report = self.near_duplicates
        found = []
        if report and report.get("mixed_labels"):
            found.append(
                f"{report['mixed_labels']} near-duplicate clusters hold both roadwork and no_roadwork images: check "
                "their labels (splits.json lists each sample's near_duplicate cluster)."
            )
        if not report or not report.get("across_splits"):
            return found
        pairs = ", ".join(f"{pair}: {n}" for pair, n in report.get("split_pairs", {}).items())
        return found + [
            f"{report['across_splits']} near-duplicate clusters (perceptual hashes within {report['threshold_bits']} "
            f"bits, thumbnails alike) have images in more than one split ({pairs}): leakage that inflates validation "
            "and test metrics. Set data.group_by to 'near_duplicates' (or 'auto') to keep each cluster in one split."
        ]


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


def _unit_interval(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from ``"{seed}:{key}"``: the same key and seed always give the same number."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) / 2**256


def _largest_remainder(total: int, fractions: tuple[float, ...]) -> list[int]:
    """Integer counts summing to ``total`` closest to ``total * fractions`` (ties go to the earlier split).

    Example:
        >>> _largest_remainder(13, (0.7, 0.1, 0.1, 0.1))
        [9, 2, 1, 1]
    """
    raw = [total * f for f in fractions]
    counts = [int(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def assign_stratified(units: dict[str, tuple[int, int]], seed: int, fractions: tuple[float, ...]) -> dict[str, str]:
    """Splits that hold each label in exactly the configured proportions (up to whole groups).

    Args:
        units: Unit key (a sample id, or ``group:<g>``) -> ``(label, number of images)``; a group of mixed labels
            counts under its majority label.
        seed: Split seed.
        fractions: Fractions of train / val_select / val_calib / test.

    Returns:
        Unit key -> split name. Per label, units are ordered by their hash and cut where the running image count
        crosses the rounded targets, so single images give exact counts and groups stay whole.
    """
    by_label: dict[int, list[str]] = defaultdict(list)
    for key, (label, _) in units.items():
        by_label[label].append(key)
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        keys = sorted(by_label[label], key=lambda k: (_unit_interval(k, seed), k))
        targets = _largest_remainder(sum(units[k][1] for k in keys), fractions)
        ends = [sum(targets[: i + 1]) for i in range(len(targets))]
        position = 0
        for key in keys:
            index = next((i for i, end in enumerate(ends) if position < end), len(ends) - 1)
            assignment[key] = SPLIT_NAMES[index]
            position += units[key][1]
    return assignment


def assign_split(key: str, seed: int, fractions: tuple[float, ...]) -> str:
    """The split of a sample or group key: a uniform hash of ``"{seed}:{key}"`` through the cumulative fractions."""
    u = _unit_interval(key, seed)
    cumulative = 0.0
    for name, fraction in zip(SPLIT_NAMES, fractions, strict=True):
        cumulative += fraction
        if u < cumulative:
            return name
    # Rounding can leave the cumulative sum a hair under 1: the last split with a positive fraction takes the rest.
    return next(name for name, f in reversed(list(zip(SPLIT_NAMES, fractions, strict=True))) if f > 0)


Validation = tuple[str | None, str | None, str | None, str | None]
"""``(sha256, reason, phash, thumbnail)`` of one input: sha256 and fingerprints of a usable image, or a reason."""


def _validate(record: SourceRecord, settings: DataSettings) -> Validation:
    """``(sha256, None, phash, thumb)`` for a usable image, ``(None, reason, None, None)`` otherwise. Runs in threads.

    The fingerprints (:func:`~roadwork_cli.data.near_duplicates.fingerprint`) are computed from the image decoded for
    validation, so near-duplicate search costs no second decode; a failure there leaves the image usable, only
    unclustered (phash None).
    """
    try:
        data = record.data if record.data is not None else read_bytes(record.locator, settings.max_file_bytes)
        image = decode_image(data, settings.max_image_pixels, settings.max_file_bytes)
    except ImageRejected as exc:
        return None, exc.reason, None, None
    except Exception as exc:  # noqa: BLE001 - one bad input must never abort the whole split
        return None, f"unreadable: {type(exc).__name__}: {exc}", None, None
    try:
        phash, thumb = fingerprint(image)
    except Exception:  # noqa: BLE001 - a fingerprint is a report, not a reason to drop a valid image
        phash = thumb = None
    return hashlib.sha256(data).hexdigest(), None, phash, thumb


class ValidationCache:
    """Per-input results of earlier validations (sha256 and fingerprints, or a reason), keyed by path, size and mtime.

    An input whose file has the same size and modification time (nanoseconds) as when it was validated, under the
    same image limits, is not decoded again. New results are appended line by line and flushed in small batches, so
    a split killed half way keeps what it did; :meth:`save` rewrites the file with only the inputs of this run.
    Entries of usable images written before fingerprints were cached have none and are validated again once.
    """

    FLUSH_EVERY = 64

    def __init__(self, path: Path, limits: str):
        self.path = path
        self.limits = limits
        self.known: dict[tuple, Validation] = {}
        self.used: dict[tuple, Validation] = {}
        self._handle = None
        self._unflushed = 0
        if path.exists():
            with open(path, encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                        key = (entry["locator"], entry["size"], entry["mtime_ns"], entry["limits"])
                        if entry.get("sha256") is not None and "thumb" not in entry:
                            continue  # cached before fingerprints were: decode once more to get them
                        fingerprints = (entry.get("phash"), entry.get("thumb"))
                        self.known[key] = (entry.get("sha256"), entry.get("reason"), *fingerprints)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line torn by a kill: that input is simply validated again

    def key(self, locator: str) -> tuple | None:
        """The cache key of a locator, or None when its file cannot be stat'ed (it is then validated as usual)."""
        path, _, _ = parse_locator(locator)
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return (locator, stat.st_size, stat.st_mtime_ns, self.limits)

    def get(self, key: tuple | None) -> Validation | None:
        if key is None or key not in self.known:
            return None
        self.used[key] = self.known[key]
        return self.known[key]

    def add(self, key: tuple | None, result: Validation) -> None:
        if key is None or key in self.used:
            return
        self.used[key] = self.known[key] = result
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in save()/close()
        self._handle.write(self._line(key, *result))
        self._unflushed += 1
        if self._unflushed >= self.FLUSH_EVERY:
            self._handle.flush()
            self._unflushed = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def save(self) -> None:
        """Keep only this run's inputs (old entries of moved or deleted files go), atomically."""
        self.close()
        atomic_write_text(self.path, "".join(self._line(k, *v) for k, v in sorted(self.used.items())))

    @staticmethod
    def _line(key: tuple, digest: str | None, reason: str | None, phash: str | None, thumb: str | None) -> str:
        locator, size, mtime_ns, limits = key
        entry = {"locator": locator, "size": size, "mtime_ns": mtime_ns, "limits": limits}
        entry.update({"sha256": digest, "phash": phash, "thumb": thumb} if digest is not None else {"reason": reason})
        return _jsonl_line(entry)


def _done(result: Validation) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def _group_of(record: SourceRecord, group_by: str) -> str | None:
    if group_by in ("none", "near_duplicates"):
        return None
    if group_by == "filename":
        return record.group if record.group is not None else group_from_filename(record.locator)
    return record.group  # "auto" and "column": the source's group field when present


def _absolute(locator: str) -> str:
    path, row, column = parse_locator(locator)
    path = os.path.abspath(path)
    return path if row is None else f"{path}#row={row}" + (f"&column={column}" if column else "")


def _absolute_source(source: str) -> str:
    """A source spec as splits.json records it: absolute, like the sample paths (``synthetic:N`` stays as it is).

    A relative spec (``--source photos``) would tie the record to the folder ``split`` ran in: a bundle could then
    not say where its images were relative to their source (``export.portable_splits``). A spec that names no file or
    folder (``synthetic:N``) is kept as given.
    """
    if not source or not os.path.exists(source):
        return source
    return os.path.abspath(source)


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
    from roadwork_cli.io.progress import progress_bar

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
    fingerprints: dict[str, tuple[str, str | None]] = {}  # sha256 -> (perceptual hash, thumbnail)
    n_inputs = 0
    window = max(8, workers * 8)  # bounded in-flight work keeps memory flat on large parquet sets
    cache = ValidationCache(run.split_cache, f"{settings.max_image_pixels}:{settings.max_file_bytes}")
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar("validating", total, "img", progress) as step,
        closing(cache),
    ):
        pending: list = []

        def drain(limit: int) -> None:
            while len(pending) > limit:
                record, key, future = pending.pop(0)
                result = future.result()
                cache.add(key, result)
                digest, reason, phash, thumb = result
                if phash is not None:
                    fingerprints[digest] = (phash, thumb)
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
                key = cache.key(_absolute(item.locator))
                known = cache.get(key)
                future = _done(known) if known is not None else pool.submit(_validate, item, settings)
                pending.append((item, key, future))
                drain(window)
        drain(0)
        cache.save()

    by_id: dict[str, list[SourceRecord]] = defaultdict(list)
    for digest, record in accepted:
        by_id[digest].append(record)
    samples: dict[str, Sample] = {}
    shown: dict[str, str] = {}  # each sample's source as the user gave it, for the summary's counts
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
        phash = fingerprints[digest][0] if digest in fingerprints else None
        samples[digest] = Sample(digest, winner.locator, winner.label, winner.source, group, phash)
        shown[digest] = winner.source
    clusters = find_clusters(
        {d: hash_value(s.phash) for d, s in samples.items() if s.phash is not None},
        settings.near_duplicate_bits,
        {d: fingerprints[d][1] for d in samples if d in fingerprints},
        settings.near_duplicate_max_difference,
    )
    samples = _with_near_duplicates(samples, clusters, settings.group_by)

    splits: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    counts: Counter = Counter()
    unit_of = {d: f"group:{s.group}" if s.group is not None else d for d, s in samples.items()}
    stratified = _stratified_units(samples, unit_of, settings) if settings.stratify else None
    for digest in sorted(samples):
        sample = samples[digest]
        key = unit_of[digest]
        name = stratified[key] if stratified is not None else assign_split(key, settings.seed, settings.fractions)
        splits[name].append(digest)
        counts[(name, sample.label, shown[digest])] += 1

    split_of = {d: name for name, ids in splits.items() for d in ids}
    labels = {d: s.label for d, s in samples.items()}
    near_duplicates = summarize(
        clusters, split_of, SPLIT_NAMES, settings.near_duplicate_bits, settings.near_duplicate_max_difference, labels
    )
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
        rejected_reasons=dict(Counter(reason_kind(reason) for _, reason in rejected)),
        near_duplicates=near_duplicates,
    )
    if not samples:
        summary.seconds = time.perf_counter() - started
        reasons = ", ".join(f"{count} {kind}" for kind, count in Counter(summary.rejected_reasons).most_common())
        raise UsageError(
            f"no usable image in {', '.join(sources)}: {n_inputs} inputs, {len(rejected)} rejected "
            f"({reasons or 'no input found'}; every reason in {run.rejected})"
        )
    recorded = {d: replace(sample, source=_absolute_source(sample.source)) for d, sample in samples.items()}
    atomic_write_json(run.splits, Splits(settings.seed, splits, recorded, near_duplicates=near_duplicates).to_dict())
    summary.splits_path = run.splits
    summary.seconds = time.perf_counter() - started
    return summary


def _with_near_duplicates(samples: dict[str, Sample], clusters: dict[str, str], group_by: str) -> dict[str, Sample]:
    """Samples with their near-duplicate cluster recorded and, where ``group_by`` asks, used as their group.

    ``near_duplicates``: a cluster is the group of its members. ``auto``: a group column comes first; a cluster's
    members without one join the smallest column group among its members, or the cluster's own group when none has
    one, so a clip and a re-upload of one of its frames stay together.
    """
    if not clusters:
        return samples
    column_groups: dict[str, list[str]] = defaultdict(list)
    for digest, cluster in clusters.items():
        if samples[digest].group is not None:
            column_groups[cluster].append(samples[digest].group)
    out = dict(samples)
    for digest, cluster in clusters.items():
        sample = samples[digest]
        key = cluster[:16]
        group = sample.group
        if group_by == "near_duplicates":
            group = f"near_duplicate:{key}"
        elif group_by == "auto" and group is None:
            group = min(column_groups[cluster]) if column_groups[cluster] else f"near_duplicate:{key}"
        out[digest] = Sample(
            sample.id, sample.path, sample.label, sample.source, group, sample.phash, near_duplicate=key
        )
    return out


def _stratified_units(samples: dict[str, Sample], unit_of: dict[str, str], settings: DataSettings) -> dict[str, str]:
    """Unit key -> split under ``data.stratify`` (a group's label is its majority label, ties roadwork)."""
    members: dict[str, list[int]] = defaultdict(list)
    for digest, sample in samples.items():
        members[unit_of[digest]].append(sample.label)
    units = {key: (int(2 * sum(labels) >= len(labels)), len(labels)) for key, labels in members.items()}
    return assign_stratified(units, settings.seed, settings.fractions)


def _jsonl_line(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"
