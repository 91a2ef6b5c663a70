"""Data-source readers: turn a source spec string into labelled image records, without decoding any image.

A spec is auto-detected (see :func:`detect_kind`):

* a folder of class subfolders (``roadwork``/``no_roadwork`` or aliases such as ``1``/``0``, ``positive``/``negative``,
  ``none``; nested folders below a class folder are fine), optionally below source-split folders (Kaggle style:
  ``DIR/train/roadwork/…``, ``DIR/val/no_roadwork/…``; see :func:`folder_source`),
* a ``.csv`` or ``.jsonl`` manifest with ``path,label`` and an optional ``group`` (paths relative to the manifest),
* a ``.parquet`` file or a folder of them (an image column holding bytes or ``{"bytes", "path"}`` structs, ``label``
  and optional ``group``), streamed batch by batch,
* a COCO ``.json`` (image-level label from its annotations of roadwork categories; standard ``annotations/`` +
  ``images/`` layout or ``data.coco_image_dir``),
* ``synthetic:N`` (the built-in generator renders N images into ``<run>/synthetic/<class>/``).

Readers are registered timm-style (:func:`register_source`, :func:`list_sources`, :func:`create_source`). Each
yields :class:`SourceRecord` objects; inputs that can't become a record (unknown class folder, bad label) come out as
:class:`SourceRejection` so that the caller can list them in ``rejected.jsonl``. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from roadwork_cli.config import DEFAULT_COCO_POSITIVE_CATEGORIES, DataSettings
from roadwork_cli.data.images import detect_image_column, image_cell_bytes, make_locator
from roadwork_cli.errors import UsageError
from roadwork_cli.io.manifest import ManifestColumnsError, read_manifest
from roadwork_cli.registry import Registry

POSITIVE_ALIASES = frozenset({"roadwork", "1", "positive", "pos", "yes", "true"})
NEGATIVE_ALIASES = frozenset({"noroadwork", "0", "negative", "neg", "none", "no", "false", "background"})
SOURCE_SPLIT_FOLDERS = frozenset({"train", "training", "val", "valid", "validation", "test", "testing"})
GROUP_COLUMNS = ("group", "group_id", "sequence", "sequence_id", "clip", "clip_id", "scene_id")
GROUP_READING_MODES = ("auto", "column", "filename")
"""``data.group_by`` values that use a source's group column (``filename`` prefers it to the file name)."""
PARQUET_BATCH_ROWS = 64


@dataclass(frozen=True)
class SourceRecord:
    """One labelled image found in a source.

    Attributes:
        locator: File path or ``<file.parquet>#row=<i>``.
        label: 1 roadwork, 0 no roadwork.
        source: The spec string as given.
        group: Grouping key from the source (manifest/parquet ``group`` column), or None.
        data: The encoded bytes when the reader already holds them (parquet), so they are not read twice.
    """

    locator: str
    label: int
    source: str
    group: str | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class SourceRejection:
    """An input of a source that cannot become a record, e.g. a file in an unknown class folder."""

    locator: str
    reason: str
    source: str


SourceItem = SourceRecord | SourceRejection


@dataclass
class Source:
    """A resolved spec: its kind, a record iterator factory and, when cheap to know, the number of items."""

    spec: str
    kind: str
    records: Callable[[], Iterator[SourceItem]]
    size_hint: int | None = None
    prepare: Callable[[bool], None] | None = None
    """Optional slow set-up (rendering synthetic scenes) run before iteration; its argument enables a progress bar."""

    def __iter__(self) -> Iterator[SourceItem]:
        return self.records()


SOURCES: Registry[Callable[..., Source]] = Registry("data source kind")
"""Readers ``fn(spec, settings, synthetic_dir) -> Source`` by the kind :func:`detect_kind` gives a spec."""


register_source = SOURCES.register
"""Decorator registering a reader ``fn(spec, settings, synthetic_dir) -> Source`` under a kind (duplicates refused)."""


def list_sources() -> list[str]:
    """Names of the registered source kinds."""
    return SOURCES.names()


def parse_label(value) -> int | None:
    """0/1 from a label value (ints, bools, floats 0.0/1.0, or the aliases, case-insensitive); None if unknown.

    Example:
        >>> parse_label("No_Roadwork"), parse_label(1), parse_label("positive"), parse_label("maybe")
        (0, 1, 1, None)
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return int(value) if value in (0, 1) else None
    if value is None:
        return None
    key = str(value).strip().lower().replace("_", "").replace("-", "").replace(" ", "")
    if key in ("1.0",):
        return 1
    if key in ("0.0",):
        return 0
    if key in POSITIVE_ALIASES:
        return 1
    if key in NEGATIVE_ALIASES:
        return 0
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _walk_files(root: Path) -> list[Path]:
    """Every non-hidden file below ``root``, sorted, so that reading order is deterministic."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        found.extend(Path(folder) / f for f in files if not _is_hidden(f))
    return sorted(found)


def _parquet_files(root: Path) -> list[Path]:
    return [p for p in _walk_files(root) if p.suffix.lower() == ".parquet"]


def _is_split_folder(folder: Path) -> bool:
    """A source-split folder (``train/``, ``val/``, ``valid/``, ``test/``) holding class folders."""
    return folder.name.lower() in SOURCE_SPLIT_FOLDERS and any(
        child.is_dir() and parse_label(child.name) is not None for child in folder.iterdir()
    )


def detect_kind(spec: str) -> str:
    """The kind of a source spec: folder, csv, jsonl, parquet, coco or synthetic.

    Raises:
        UsageError: The spec names nothing readable.
    """
    if spec.lower().startswith("synthetic:"):
        return "synthetic"
    path = Path(spec)
    if path.is_dir():
        subdirs = [p for p in path.iterdir() if p.is_dir() and not _is_hidden(p.name)]
        if any(parse_label(p.name) is not None or _is_split_folder(p) for p in subdirs):
            return "folder"
        if _parquet_files(path):
            return "parquet"
        if subdirs:
            return "folder"  # class folders with unknown names: every file is reported as rejected
        raise UsageError(f"source {spec!r} is a folder without class subfolders or parquet files")
    if not path.exists():
        raise UsageError(
            f"source {spec!r} does not exist (expected a folder, .csv/.jsonl/.parquet/.json or synthetic:N)"
        )
    suffix = path.suffix.lower()
    kinds = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".json": "coco"}
    if suffix not in kinds:
        raise UsageError(
            f"source {spec!r}: unknown kind (expected a folder, .csv/.jsonl/.parquet/.json or synthetic:N)"
        )
    return kinds[suffix]


def create_source(spec: str, settings: DataSettings | None = None, synthetic_dir: str | Path | None = None) -> Source:
    """Resolve a spec string into a :class:`Source`.

    Args:
        spec: The source spec as the user gave it.
        settings: Data settings (parquet image column, COCO categories, synthetic options); defaults if None.
        synthetic_dir: Folder where ``synthetic:N`` renders its images (``RunDir.synthetic``).

    Raises:
        UsageError: Unknown or unreadable spec.
    """
    settings = settings or DataSettings()
    kind = detect_kind(spec)
    return SOURCES.get(kind)(spec, settings, synthetic_dir)


@register_source("folder")
def folder_source(spec: str, settings: DataSettings, synthetic_dir=None) -> Source:
    """A folder of class subfolders, optionally below source-split folders; other files are rejections.

    With ``DIR/train/roadwork/…`` (Kaggle style) the source split is kept as a hint in each record's ``source``
    (``DIR/train``), so the split table shows where images came from. It is deliberately not used as the group or
    as our split: the group forces images into one split together (all of the source's train set would land in one
    of ours), and our hash split is what keeps ``splits.json`` reproducible and val_calib independent of how the
    source was cut. Clip-level grouping still works through ``data.group_by``.
    """
    root = Path(spec)
    files = _walk_files(root)

    def records() -> Iterator[SourceItem]:
        for file in files:
            parts = file.relative_to(root).parts
            source = spec
            if len(parts) > 2 and parts[0].lower() in SOURCE_SPLIT_FOLDERS and parse_label(parts[1]) is not None:
                source = (root / parts[0]).as_posix()
                parts = parts[1:]
            if len(parts) == 1:
                yield SourceRejection(str(file), "not inside a class folder", spec)
                continue
            label = parse_label(parts[0])
            if label is None:
                yield SourceRejection(str(file), f"unknown class folder {parts[0]!r}", spec)
                continue
            yield SourceRecord(str(file), label, source)

    return Source(spec, "folder", records, len(files))


def group_column_of(columns, settings: DataSettings, where: str) -> str | None:
    """The group column among ``columns`` (a manifest header or a parquet schema's names), matched case-insensitively.

    ``data.group_column`` when set, else the first of :data:`GROUP_COLUMNS` present. The column is only looked for
    when ``data.group_by`` reads it (auto, column, filename).

    Args:
        columns: Column names as the file spells them.
        settings: Data settings (group_column, group_by).
        where: The file, for the error message.

    Returns:
        The column's name as spelled in ``columns``, or None when there is none (and none is required).

    Raises:
        UsageError: A named group column is missing, or group_by is 'column' and no group column exists; otherwise
            the frames of one clip would silently become independent images spread over the splits.
    """
    if settings.group_by not in GROUP_READING_MODES:
        return None
    names = {str(c).strip().lower(): str(c) for c in columns if c is not None}
    if settings.group_column:
        wanted = settings.group_column.strip().lower()
        if wanted not in names:
            raise UsageError(
                f"group column {settings.group_column!r} (data.group_column) not found in {where}; its columns are "
                f"{sorted(names.values())}"
            )
        return names[wanted]
    found = next((names[c] for c in GROUP_COLUMNS if c in names), None)
    if found is None and settings.group_by == "column":
        raise UsageError(
            f"data.group_by is 'column' but {where} has no group column (looked for {', '.join(GROUP_COLUMNS)}); "
            f"name it with data.group_column. Its columns are {sorted(names.values())}"
        )
    return found


def _manifest_columns(spec: str) -> list[str]:
    """A manifest's column names (lower-cased): a CSV's header row, or every key of a JSON-lines file."""
    columns: dict[str, None] = {}
    for row in read_manifest(Path(spec), spec):
        columns.update(dict.fromkeys(row.columns))
        if Path(spec).suffix.lower() == ".csv":
            break  # every CSV row has the header's columns
    return list(columns)


def _manifest_records(spec: str, settings: DataSettings) -> Iterator[SourceItem]:
    """The records of a CSV / JSON-lines manifest (rows read by ``io.manifest``; label and group read here)."""
    try:  # streamed: the header check raises before the first row, so nothing was yielded when it fails
        # Finding the group column costs a pass over a JSON-lines file: only when group_by reads a column at all.
        reads_groups = settings.group_by in GROUP_READING_MODES
        group_column = group_column_of(_manifest_columns(spec), settings, f"manifest {spec}") if reads_groups else None
        for row in read_manifest(Path(spec), spec, required=("label",)):
            if row.error is not None:
                yield SourceRejection(row.where, row.error, spec)
            elif row.path is None:
                yield SourceRejection(row.where, "manifest row without a path", spec)
            elif (label := parse_label(row.columns.get("label"))) is None:
                reason = f"bad label {row.columns.get('label')!r} (expected 0/1 or roadwork/no_roadwork)"
                yield SourceRejection(row.path, reason, spec)
            else:
                yield SourceRecord(row.path, label, spec, row.text(group_column) if group_column else None)
    except ManifestColumnsError as exc:
        raise UsageError(f"manifest {spec} needs 'path' and 'label' columns, has {exc.fields}") from None


@register_source("csv")
def csv_source(spec: str, settings: DataSettings, synthetic_dir=None) -> Source:
    """A ``path,label[,group]`` CSV manifest; paths are relative to the manifest's folder."""
    return Source(spec, "csv", lambda: _manifest_records(spec, settings))


@register_source("jsonl")
def jsonl_source(spec: str, settings: DataSettings, synthetic_dir=None) -> Source:
    """A JSON-lines manifest, one ``{"path", "label", "group"?}`` object per line."""
    return Source(spec, "jsonl", lambda: _manifest_records(spec, settings))


@register_source("parquet")
def parquet_source(spec: str, settings: DataSettings, synthetic_dir=None) -> Source:
    """A parquet file or a folder of them, streamed in small batches (never the whole data set in memory)."""
    import pyarrow.parquet as pq

    root = Path(spec)
    files = _parquet_files(root) if root.is_dir() else [root]
    total = 0
    plans = []
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except Exception as exc:  # noqa: BLE001 - a corrupt file of a folder is reported, the others still read
            plans.append((file, None, f"unreadable parquet file: {type(exc).__name__}: {exc}"))
            continue
        schema = parquet.schema_arrow
        image_column = detect_image_column(schema, settings.parquet_image_column)
        if "label" not in schema.names:
            raise UsageError(f"parquet file {file} has no 'label' column; columns are {schema.names}")
        group_column = group_column_of(schema.names, settings, f"parquet file {file}")
        # Name the column in the locator only when auto-detection would not find it again.
        named = None if detect_image_column(schema) == image_column else image_column
        plans.append((file, (image_column, group_column, named), None))
        total += parquet.metadata.num_rows

    def records() -> Iterator[SourceItem]:
        for file, plan, error in plans:
            if plan is None:
                yield SourceRejection(str(file), error, spec)
                continue
            image_column, group_column, named = plan
            columns = [image_column, "label"] + ([group_column] if group_column else [])
            row = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                images = batch.column(image_column).to_pylist()
                labels = batch.column("label").to_pylist()
                groups = batch.column(group_column).to_pylist() if group_column else [None] * len(labels)
                for cell, raw_label, group in zip(images, labels, groups, strict=True):
                    locator = make_locator(file, row, named)
                    row += 1
                    label = parse_label(raw_label)
                    if label is None:
                        yield SourceRejection(locator, f"bad label {raw_label!r}", spec)
                        continue
                    try:
                        data = image_cell_bytes(cell, base_dir=file.parent)
                    except UsageError as exc:
                        yield SourceRejection(locator, getattr(exc, "reason", str(exc)), spec)
                        continue
                    yield SourceRecord(locator, label, spec, None if group is None else str(group), data)

    return Source(spec, "parquet", records, total)


def normalize_category(name: str) -> str:
    """A category name for matching: lower case, ``_``/``-`` as spaces, runs of spaces collapsed.

    Example:
        >>> normalize_category("Tubular_Marker"), normalize_category("  work-vehicle ")
        ('tubular marker', 'work vehicle')
    """
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def coco_positive_ids(categories: dict, wanted: list[str], spec: str) -> set | None:
    """Ids of the categories that make an image roadwork; None means any annotation does (``"*"``).

    Raises:
        UsageError: A configured name matches no category of the file, or (with the default list) none of the
            file's categories is a roadwork one; the message lists the file's categories.
    """
    if "*" in wanted:
        return None
    names = {cid: normalize_category(name) for cid, name in categories.items()}
    wanted_names = {normalize_category(name) for name in wanted}
    positive = {cid for cid, name in names.items() if name in wanted_names}
    available = ", ".join(sorted({str(n) for n in categories.values()})) or "none"
    default = wanted_names == {normalize_category(n) for n in DEFAULT_COCO_POSITIVE_CATEGORIES}
    if default:
        if not positive:
            raise UsageError(
                f"COCO file {spec}: none of its categories is in the default roadwork list, so every image would be "
                f"no_roadwork. Its categories are: {available}. Set data.coco_positive_categories to the ones that "
                "mean roadwork (or ['*'] if any annotation does)."
            )
        return positive
    unmatched = sorted(n for n in wanted if normalize_category(n) not in set(names.values()))
    if unmatched:
        raise UsageError(
            f"COCO file {spec}: data.coco_positive_categories names {unmatched}, which match no category of the file. "
            f"Its categories are: {available}."
        )
    return positive


def _coco_image_dirs(path: Path, image_dir: Path | None) -> list[Path]:
    """Where a COCO file's images may be: the configured folder, beside the json, and the standard layout.

    The standard layout is ``annotations/instances_<split>.json`` with images in ``images/`` or ``images/<split>/``
    (``<split>`` as in the file name, e.g. ``train2017``) one level up.
    """
    if image_dir is not None:
        return [Path(image_dir)]
    split = path.stem.split("_", 1)[1] if path.stem.startswith("instances_") else None
    bases = [path.parent, path.parent / "images"]
    for images in (path.parent.parent / "images", path.parent.parent):
        if split:
            bases.append(images / split)
        bases.append(images)
    return list(dict.fromkeys(bases))


@register_source("coco")
def coco_source(spec: str, settings: DataSettings, synthetic_dir=None) -> Source:
    """A COCO json: label 1 if an image has an annotation of a positive category (``data.coco_positive_categories``).

    Images are looked up in ``data.coco_image_dir`` when set, else beside the json and in the standard
    ``annotations/`` + ``images/`` layout (:func:`_coco_image_dirs`).
    """
    path = Path(spec)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"COCO file {spec} is not readable JSON: {exc}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise UsageError(f"COCO file {spec} has no 'images' list")
    categories = {c.get("id"): str(c.get("name", "")) for c in coco.get("categories") or [] if isinstance(c, dict)}
    positive_ids = coco_positive_ids(categories, list(settings.coco_positive_categories), spec)
    positive: set = set()
    for annotation in coco.get("annotations") or []:
        if positive_ids is None or annotation.get("category_id") in positive_ids:
            positive.add(annotation.get("image_id"))
    images = sorted(coco["images"], key=lambda im: str(im.get("file_name", "")))
    bases = _coco_image_dirs(path, settings.coco_image_dir)

    def locate(file_name: str) -> str | None:
        candidate = Path(file_name)
        if candidate.is_absolute():
            return str(candidate)
        return next((str(base / candidate) for base in bases if (base / candidate).is_file()), None)

    def records() -> Iterator[SourceItem]:
        for image in images:
            file_name = image.get("file_name")
            if not file_name:
                yield SourceRejection(f"{spec}#image_id={image.get('id')}", "COCO image without file_name", spec)
                continue
            locator = locate(str(file_name))
            if locator is None:
                searched = ", ".join(str(b) for b in bases)
                yield SourceRejection(
                    str(bases[0] / str(file_name)),
                    f"COCO image not found (looked in {searched}; set data.coco_image_dir)",
                    spec,
                )
                continue
            yield SourceRecord(locator, int(image.get("id") in positive), spec)

    return Source(spec, "coco", records, len(images))


def parse_synthetic_spec(spec: str) -> int:
    """N from ``synthetic:N``.

    Raises:
        UsageError: N is not a positive integer.
    """
    count = spec.split(":", 1)[1].strip()
    if not count.isdigit() or int(count) <= 0:
        raise UsageError(f"source {spec!r}: expected synthetic:N with a positive integer N")
    return int(count)


@register_source("synthetic")
def synthetic_source(spec: str, settings: DataSettings, synthetic_dir=None) -> Source:
    """``synthetic:N``: N rendered scenes (half per class) written as files, re-used on re-runs."""
    count = parse_synthetic_spec(spec)
    if synthetic_dir is None:
        raise UsageError(f"source {spec!r} needs a run directory to render into (pass --run)")

    def prepare(progress: bool = False) -> list[tuple[str, int]]:
        from roadwork_cli.data.synthetic import render_dataset

        return render_dataset(Path(synthetic_dir), count, settings, progress=progress)

    def records() -> Iterator[SourceItem]:
        for locator, label in prepare(False):  # cheap after prepare(): existing files are re-used
            yield SourceRecord(locator, label, spec)

    return Source(spec, "synthetic", records, count, prepare)
