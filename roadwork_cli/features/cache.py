"""Feature cache: one backbone forward per (image, view), kept in ``<run>/features/<fingerprint>/``.

Layout of a cache folder::

    meta.json                 backbone spec, fingerprint, feature_dim, preprocessing, views, recipe (decode +
                              preprocessing + compute precision, which predict and evaluate --source follow)
    index.json                {"shards": [{"file", "rows"}], "entries": {id: {view: [shard, row]}}}
    failed.json               {id: reason} for images that could not be read (skipped, never retried silently)
    shard_00000.safetensors   "features": (rows, D) float16

Images are read through :mod:`roadwork_cli.data.decode`, the one decode path that predict and evaluate --source
use too (draft decoding of large JPEGs included; ``data.jpeg_draft: false`` caches into a ``-fulldecode`` folder).
View 0 is the clean :func:`~roadwork_cli.data.transforms.eval_transform` of every split image; views 1..K (K =
``features.views``) are ``data.augment`` (:func:`~roadwork_cli.data.transforms.create_augmentation`) draws of
training images with a seed derived from ``(id, view)``, so any view can be recomputed bit for bit.

Resume: the work list is the fixed, ordered list of (id, view) pairs not yet in the index, cut into shards of
``features.shard_size`` rows. Each shard is written atomically, then the index; a SIGKILL loses at most the shard
in flight, and the re-run recomputes exactly that shard with the same batches (hence identical features). A re-run
with nothing missing does no forward pass at all. A different backbone, weights or preprocessing has a different
fingerprint and therefore a different folder: stale features are never reused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_path, atomic_write_json, read_json
from roadwork_cli.io.run import RunDir

__all__ = [
    "CacheSummary",
    "CachedFeatures",
    "FeatureStore",
    "SplitTable",
    "cache_features",
    "load_cached",
    "read_split_table",
    "view_seed",
]

CURRENT_FILE = "current.json"


# --------------------------------------------------------------------------------------------------------- splits


@dataclass
class SplitTable:
    """The parts of ``splits.json`` this layer needs: ordered ids per split, locator and label per id."""

    seed: int
    splits: dict[str, list[str]]
    paths: dict[str, str]
    labels: dict[str, int]

    def ids(self, split: str) -> list[str]:
        return list(self.splits.get(split, []))


def read_split_table(run: RunDir) -> SplitTable:
    """Read ``run.splits`` (written by ``roadwork split``; format in docs/architecture.md)."""
    from roadwork_cli.data.splits import SPLIT_NAMES, Splits

    splits = Splits.load(run.require(run.splits, "split"))
    return SplitTable(
        seed=int(splits.seed),
        splits={name: list(splits.ids(name)) for name in SPLIT_NAMES},
        paths={i: str(s.path) for i, s in splits.samples.items()},
        labels={i: int(s.label) for i, s in splits.samples.items()},
    )


# ---------------------------------------------------------------------------------------------------------- store


def view_seed(image_id: str, view: int) -> int:
    """Seed of the augmentation of ``view`` of ``image_id`` (independent of batch, worker and run)."""
    return int.from_bytes(hashlib.sha256(f"{image_id}:{view}".encode()).digest()[:8], "little") & (2**63 - 1)


class FeatureStore:
    """Reader/writer of one ``features/<fingerprint>/`` folder (see module docstring for the layout)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = read_json(self.index_path) if self.index_path.exists() else {}
        self.shards: list[dict[str, Any]] = list(index.get("shards", []))
        self.entries: dict[str, dict[str, list[int]]] = dict(index.get("entries", {}))
        self.failed: dict[str, str] = dict(index.get("failed", {}))

    @property
    def index_path(self) -> Path:
        return self.folder / "index.json"

    @property
    def meta_path(self) -> Path:
        return self.folder / "meta.json"

    @property
    def failed_path(self) -> Path:
        return self.folder / "failed.json"

    def has(self, image_id: str, view: int) -> bool:
        return str(view) in self.entries.get(image_id, {})

    def add_shard(self, keys: Sequence[tuple[str, int]], features: torch.Tensor, failed: dict[str, str]) -> None:
        """Write one shard atomically, then the index (entries and failures in one atomic write).

        A crash before the index write leaves an orphan shard file that the re-run overwrites; a crash after it
        leaves a complete, consistent cache. ``failed.json`` is a readable copy of the failures.
        """
        if len(keys) != features.shape[0]:
            raise ValueError("one feature row per key")
        if not keys and not failed:
            return
        number = len(self.shards)
        if keys:
            name = f"shard_{number:05d}.safetensors"
            with atomic_path(self.folder / name) as tmp:
                save_file({"features": features.to(torch.float16).contiguous()}, str(tmp))
            self.shards.append({"file": name, "rows": len(keys)})
            for row, (image_id, view) in enumerate(keys):
                self.entries.setdefault(image_id, {})[str(view)] = [number, row]
        self.failed.update(failed)
        index = {"version": 1, "shards": self.shards, "entries": self.entries, "failed": self.failed}
        atomic_write_json(self.index_path, index)
        if failed:
            atomic_write_json(self.failed_path, self.failed)


def write_feature_cache(
    folder: Path,
    meta: dict[str, Any],
    keys: Sequence[tuple[str, int]],
    features: torch.Tensor,
    shard_size: int = 2048,
) -> FeatureStore:
    """Write precomputed ``(N, D)`` features for ``keys`` = [(id, view)] as a cache folder (benchmarks, tests)."""
    store = FeatureStore(folder)
    atomic_write_json(store.meta_path, meta)
    for start in range(0, len(keys), shard_size):
        store.add_shard(keys[start : start + shard_size], features[start : start + shard_size], {})
    return store


@dataclass
class CachedFeatures:
    """All cached rows of one fingerprint in memory.

    Attributes:
        fingerprint: The backbone fingerprint (folder name).
        meta: Contents of ``meta.json`` (backbone spec, preprocessing, feature_dim).
        features: ``(R, D)`` float32 tensor of every cached row.
        rows: ``{id: {view: row}}`` into ``features``.
        failed: ``{id: reason}`` of images that could not be read.
    """

    fingerprint: str
    meta: dict[str, Any]
    features: torch.Tensor
    rows: dict[str, dict[int, int]]
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def row_table(self, ids: Sequence[str], views: int) -> np.ndarray:
        """``(len(ids), views + 1)`` int64 row numbers; -1 where a view is missing (view 0 missing = not cached)."""
        table = np.full((len(ids), views + 1), -1, dtype=np.int64)
        for i, image_id in enumerate(ids):
            for view, row in self.rows.get(image_id, {}).items():
                if view <= views:
                    table[i, view] = row
        return table


def _resolve_fingerprint(run: RunDir, fingerprint: str | None) -> str:
    if fingerprint is not None:
        return fingerprint
    current = run.features / CURRENT_FILE
    if current.exists():
        return str(read_json(current)["fingerprint"])
    folders = [p.name for p in run.features.glob("*/meta.json")] if run.features.exists() else []
    if len(folders) == 1:
        return Path(folders[0]).parent.name
    raise UsageError(f"No cached features in {run.features}; run `roadwork cache-features --run {run.root}` first.")


def load_cached(run: RunDir, fingerprint: str | None = None) -> CachedFeatures:
    """Load one cache folder (default: the one the last ``cache-features`` wrote) into memory as float32."""
    fingerprint = _resolve_fingerprint(run, fingerprint)
    folder = run.features / fingerprint
    if not (folder / "meta.json").exists():
        raise UsageError(
            f"No cached features for fingerprint {fingerprint} in {run.features}; run `roadwork cache-features`."
        )
    store = FeatureStore(folder)
    meta = read_json(store.meta_path)
    dim = int(meta["feature_dim"])
    blocks = [load_file(str(folder / shard["file"]))["features"] for shard in store.shards]
    features = torch.cat(blocks).float() if blocks else torch.zeros(0, dim)
    offsets = np.cumsum([0] + [int(s["rows"]) for s in store.shards])
    rows = {
        image_id: {int(view): int(offsets[shard] + row) for view, (shard, row) in views.items()}
        for image_id, views in store.entries.items()
    }
    return CachedFeatures(fingerprint=fingerprint, meta=meta, features=features, rows=rows, failed=dict(store.failed))


# ----------------------------------------------------------------------------------------------------- extraction


def _shard_batches(n_items: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Batches that never straddle a shard boundary, so a resumed shard sees exactly the batches of a clean run."""
    batches = []
    for start in range(0, n_items, shard_size):
        stop = min(start + shard_size, n_items)
        batches += [list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size)]
    return batches


@dataclass
class CacheSummary:
    """What ``cache_features`` did."""

    fingerprint: str
    folder: Path
    backbone: str
    feature_dim: int
    total: int
    computed: int
    reused: int
    failed: int
    forward_passes: int
    seconds: float
    images_per_second: float
    shards: int


def cache_features(
    run: RunDir,
    settings: Any,
    progress: bool = False,
    backbone: Any = None,
    on_shard: Callable[[int], None] | None = None,
) -> CacheSummary:
    """Extract and cache features of every split image (view 0) and K augmented views of training images.

    Args:
        run: Run directory with ``splits.json``.
        settings: Resolved :class:`~roadwork_cli.config.Settings`.
        progress: Show a rich progress bar (images/s) on stderr.
        backbone: A ready :class:`~roadwork_cli.model.backbones.Backbone` (default: built from ``settings.model``).
        on_shard: Called with the shard number after each shard is safely on disk (tests simulate crashes here).
    """
    from roadwork_cli.data.decode import DecodeRecipe, ImageDataset, create_loader, recipe_record, to_model_input
    from roadwork_cli.data.transforms import augmentation_from_settings
    from roadwork_cli.io.progress import progress_bar
    from roadwork_cli.io.provenance import record
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.device import autocast, compute_dtype, precision_tag, resolve_device

    started = time.perf_counter()
    table = read_split_table(run)
    if settings.runtime.threads:
        torch.set_num_threads(settings.runtime.threads)
    if backbone is None:
        backbone = create_backbone(
            settings.model.backbone, weights=settings.model.weights, image_size=settings.model.image_size
        )
    device = resolve_device(settings.runtime.device)
    dtype = compute_dtype(device, settings.runtime.precision)
    # Reduced-precision features differ from fp32 ones, so they live in a folder of their own.
    fingerprint = backbone.fingerprint if dtype is None else f"{backbone.fingerprint}-{precision_tag(dtype)}"
    recipe = DecodeRecipe(
        backbone.preprocessing,
        jpeg_draft=settings.data.jpeg_draft is not False,
        max_pixels=settings.data.max_image_pixels,
        max_file_bytes=settings.data.max_file_bytes,
    )
    if not recipe.jpeg_draft:  # full decoding gives other pixels for large JPEGs: a folder of its own
        fingerprint += "-fulldecode"
    folder = run.features / fingerprint
    store = FeatureStore(folder)
    for stale in folder.glob(".*.tmp"):  # temp files of a write that SIGKILL interrupted
        stale.unlink(missing_ok=True)
    meta = {
        "version": 1,
        "fingerprint": fingerprint,
        "backbone": backbone.spec,
        "feature_dim": backbone.feature_dim,
        "preprocessing": backbone.preprocessing.to_dict(),
        "dtype": "float16",
        "compute_precision": precision_tag(dtype),
        "views": int(settings.features.views),
        "recipe": recipe_record(recipe, precision_tag(dtype)),
    }
    atomic_write_json(store.meta_path, meta)

    ordered: list[tuple[str, int]] = []
    seen: set[str] = set()
    for split in table.splits:
        for image_id in table.ids(split):
            if image_id not in seen:
                seen.add(image_id)
                ordered.append((image_id, 0))
    for view in range(1, settings.features.views + 1):
        ordered += [(image_id, view) for image_id in table.ids("train")]
    todo = [key for key in ordered if not store.has(*key) and key[0] not in store.failed]
    reused = sum(1 for key in ordered if store.has(*key))

    model = backbone.to(device)
    if settings.features.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shard_size = settings.features.shard_size
    batches = _shard_batches(len(todo), shard_size, settings.features.batch_size)
    forward_passes = computed = 0
    failed_total = 0
    if todo:
        # View 0 is the clean eval transform; view v > 0 one seeded draw of the train transform.
        dataset = ImageDataset(
            [table.paths[image_id] for image_id, _ in todo],
            recipe,
            seeds=[None if view == 0 else view_seed(image_id, view) for image_id, view in todo],
            augment=augmentation_from_settings(settings.data, backbone.preprocessing, output="uint8"),
        )
        loader = create_loader(
            dataset, batch_sampler=batches, workers=settings.features.workers, pin_memory=device.type == "cuda"
        )
        shard_keys: list[tuple[str, int]] = []
        shard_rows: list[torch.Tensor] = []
        shard_failed: dict[str, str] = {}
        shard_end = min(shard_size, len(todo))
        done = 0
        with progress_bar("cache-features", total=len(todo), unit="img", enabled=progress) as advance:
            for indices, batch, bad in loader:
                for index, reason in bad:
                    shard_failed[todo[index][0]] = reason
                if batch is not None:
                    batch = to_model_input(batch, backbone.preprocessing, device, settings.features.channels_last)
                    with torch.inference_mode(), autocast(device, dtype):
                        feats = model(batch).float().cpu()  # (B, D)
                    forward_passes += 1
                    shard_rows.append(feats)
                    shard_keys += [todo[i] for i in indices]
                n = len(indices) + len(bad)
                done += n
                advance(n)
                if done == shard_end:
                    rows = torch.cat(shard_rows) if shard_rows else torch.zeros(0, backbone.feature_dim)
                    store.add_shard(shard_keys, rows, shard_failed)
                    computed += len(shard_keys)
                    failed_total += len(shard_failed)
                    if on_shard is not None:
                        on_shard(len(store.shards) - 1)
                    shard_keys, shard_rows, shard_failed = [], [], {}
                    shard_end = min(shard_end + shard_size, len(todo))
    atomic_write_json(run.features / CURRENT_FILE, {"fingerprint": fingerprint, "backbone": backbone.name})
    record(run, "cache-features", [run.splits])
    seconds = time.perf_counter() - started
    return CacheSummary(
        fingerprint=fingerprint,
        folder=folder,
        backbone=backbone.name,
        feature_dim=backbone.feature_dim,
        total=len(ordered),
        computed=computed,
        reused=reused,
        failed=len(store.failed),
        forward_passes=forward_passes,
        seconds=seconds,
        images_per_second=computed / seconds if seconds > 0 else 0.0,
        shards=len(store.shards),
    )
