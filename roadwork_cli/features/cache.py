"""Feature cache: one backbone forward per (image, view), kept in ``<run>/features/<fingerprint>/``.

Layout of a cache folder::

    meta.json                 backbone spec, fingerprint, feature_dim, preprocessing, views, recipe (decode +
                              preprocessing + compute precision, which predict and evaluate --source follow),
                              augmentation (spec and fingerprint of the views >= 1)
    index.json                {"shards": [{"file", "rows"}], "entries": {id: {view: [shard, row]}},
                               "augmentation": fingerprint the views >= 1 were drawn with}
    failed.json               {id: reason} for images that could not be read (skipped, never retried silently)
    shard_00000.safetensors   "features": (rows, D) float16
    parts/                    under torchrun, until rank 0 has merged them: each rank's rows of each shard; after an
                              interrupt, the finished batches of the shard in flight (until the re-run writes it)

Images are read through :mod:`roadwork_cli.data.decode`, the one decode path that predict and evaluate --source
use too (draft decoding of large JPEGs included; ``data.jpeg_draft: false`` caches into a ``-fulldecode`` folder).
View 0 is the clean :func:`~roadwork_cli.data.transforms.eval_transform` of every split image; views 1..K (K =
``features.views``) are ``data.augment`` (:func:`~roadwork_cli.data.transforms.create_augmentation`) draws of
training images with a seed derived from ``(id, view)``, so any view can be recomputed bit for bit.

Resume: the work list is the fixed, ordered list of (id, view) pairs not yet in the index, cut into shards of
``features.shard_size`` rows. Each shard is written atomically, then the index. An interrupt (Ctrl-C, SIGTERM, an
error) keeps the finished batches of the shard in flight in ``parts/`` (see :class:`_Parts`), and the re-run takes
them instead of computing them. While a shard is in flight its finished batches are also kept there every
:data:`PENDING_EVERY_S` seconds, so a SIGKILL loses at most about that much work, which the re-run recomputes with
the same batches. Either way the finished cache is byte for byte the one an uninterrupted run writes. A re-run
with nothing missing does no forward pass at all. A different backbone, weights or preprocessing has a different
fingerprint and therefore a different folder: stale features are never reused. Another ``data.augment`` (or NATIX
level mix) keeps the folder and its clean views but forgets the augmented ones, which the run then recomputes.

Under torchrun (``dist``), rank r of W computes batches r, r+W, ... of that same plan and writes them as parts; rank 0
merges the parts shard by shard into exactly the folder one process writes (same shards, index and bytes).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from roadwork_cli.config import Settings
from roadwork_cli.errors import UsageError
from roadwork_cli.io.atomic import atomic_path, atomic_write_json, read_json
from roadwork_cli.io.records import CurrentFeatures, read_current, write_current
from roadwork_cli.io.run import RunDir

if TYPE_CHECKING:  # types only: the backbone module (timm) and the process group are imported where they run
    from roadwork_cli.model.backbones import Backbone
    from roadwork_cli.runtime.distributed import Distributed

__all__ = [
    "CacheSummary",
    "CachedFeatures",
    "FeatureStore",
    "SplitTable",
    "cache_features",
    "decoder_suffix",
    "load_cached",
    "read_split_table",
]

PENDING_EVERY_S = 60.0
"""While a shard is in flight, its finished batches are also written to ``parts/`` this often (seconds), so that a
SIGKILL (the kernel's OOM killer, a scheduler) loses at most about this much work, not the whole shard."""


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


class FeatureStore:
    """Reader/writer of one ``features/<fingerprint>/`` folder (see module docstring for the layout)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = read_json(self.index_path) if self.index_path.exists() else {}
        self.shards: list[dict[str, Any]] = list(index.get("shards", []))
        self.entries: dict[str, dict[str, list[int]]] = dict(index.get("entries", {}))
        self.failed: dict[str, str] = dict(index.get("failed", {}))
        self.augmentation: str | None = index.get("augmentation")

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

    def keep_views_of(self, augmentation: str) -> int:
        """Forget the augmented views (>= 1) drawn under another augmentation fingerprint; returns how many.

        The clean views stay. The forgotten rows stay in their shard files, unreferenced. An index that names no
        augmentation (written before it was recorded) counts as another one: its views are recomputed. The change
        is in memory until the index is next written (:meth:`write_index`).
        """
        if self.augmentation == augmentation:
            return 0
        dropped = 0
        for views in self.entries.values():
            for view in [v for v in views if v != "0"]:
                del views[view]
                dropped += 1
        self.augmentation = augmentation
        return dropped

    def write_index(self) -> None:
        """Write ``index.json`` (shards, entries, failures, augmentation) atomically."""
        index = {"version": 1, "shards": self.shards, "entries": self.entries, "failed": self.failed}
        if self.augmentation is not None:
            index["augmentation"] = self.augmentation
        atomic_write_json(self.index_path, index)

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
        self.write_index()
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


def decoder_suffix(decoder: str, device: Any = None) -> str:
    """The cache-folder suffix of ``data.decoder`` (``""`` for pil, ``"-cudadecode"`` for cuda), checked to run here.

    GPU-decoded pixels equal the PIL path's only within a tolerance, so their features never share a folder (or a
    fingerprint) with PIL-decoded ones.

    Raises:
        UsageError: ``cuda`` on a machine without CUDA (or with a non-CUDA ``runtime.device``), or an unknown decoder.
    """
    from roadwork_cli.data.decode import check_decoder

    check_decoder(decoder, device)
    return "" if decoder == "pil" else f"-{decoder}decode"


def _resolve_fingerprint(run: RunDir, fingerprint: str | None) -> str:
    if fingerprint is not None:
        return fingerprint
    current = read_current(run)
    if current is not None:
        return current.fingerprint
    folders = [p.parent.name for p in run.features.glob("*/meta.json")] if run.features.exists() else []
    if len(folders) == 1:
        return folders[0]
    raise UsageError(f"No cached features in {run.features}; run `roadwork cache-features --run {run.root}` first.")


def load_cached(run: RunDir, fingerprint: str | None = None) -> CachedFeatures:
    """Load one cache folder (default: the one the last ``cache-features`` wrote) into memory as float32."""
    fingerprint = _resolve_fingerprint(run, fingerprint)
    folder = run.feature_cache(fingerprint)
    if not run.feature_meta(fingerprint).exists():
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


_Record = tuple[list[tuple[str, int]], torch.Tensor, dict[str, str]]
"""What one batch gave: its keys ``[(id, view)]``, their ``(B_ok, D)`` rows, and ``{id: reason}`` of its failures."""


def _join(records: Sequence[_Record]) -> _Record:
    """The records of one shard's batches as one shard: keys, rows and failures in batch order."""
    failed: dict[str, str] = {}
    for _, _, bad in records:
        failed.update(bad)
    return [key for keys, _, _ in records for key in keys], torch.cat([rows for _, rows, _ in records]), failed


class _Parts:
    """Work on disk that is not a shard yet (``<folder>/parts/``): ranks' parts under torchrun, and pending batches.

    Parts (torchrun): for each shard of the plan in which rank r computed batches it writes
    ``<tag>.rank<r>.safetensors`` (its rows in batch order, float16 like a shard) and then ``<tag>.rank<r>.json`` (per
    batch: number, keys, failures), whose presence marks the part complete. ``tag`` hashes the shard's keys, the batch
    size, the world size and the augmentation fingerprint (views >= 1 are its draws): a re-run of the same plan after
    SIGKILL reuses the finished parts, any other plan ignores them. Merged shards leave the work list whole (shards are
    merged in order), so the remaining shards keep their keys and tags.

    Pending batches (any world size): on an interrupt (Ctrl-C, SIGTERM, an error), and every :data:`PENDING_EVERY_S`
    seconds while a shard is in flight, the finished batches of that shard not yet kept are written as
    ``<tag>.rank<r>.b<k>.pending.{safetensors,json}`` (same format; ``k`` is the shard-local number of the first one),
    ``tag`` hashing the shard's keys, batch size and augmentation. A batch's rows depend only on its keys, so the
    re-run of the same plan takes them instead of computing them and writes the very shard an uninterrupted run
    writes, whichever rank wrote them. They are deleted once their shard (or part) is on disk.
    """

    FOLDER = "parts"

    def __init__(
        self,
        folder: Path,
        todo: Sequence[tuple[str, int]],
        batches: Sequence[Sequence[int]],
        shard_size: int,
        rank: int,
        world_size: int,
        augmentation: str,
    ):
        self.folder = folder / self.FOLDER
        self.augmentation = augmentation
        self.todo, self.batches, self.shard_size = todo, batches, shard_size
        self.rank, self.world_size = rank, world_size
        self.batch_size = max((len(b) for b in batches), default=0)
        self.first_batch: dict[int, int] = {}  # shard -> its first batch number
        for j in range(len(batches)):
            self.first_batch.setdefault(self.shard_of(j), j)

    def shard_of(self, batch: int) -> int:
        return self.batches[batch][0] // self.shard_size

    def _tag(self, shard: int, world_size: int | None) -> str:
        keys = self.todo[shard * self.shard_size : (shard + 1) * self.shard_size]
        plan = [keys, self.batch_size] + ([] if world_size is None else [world_size]) + [self.augmentation]
        return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:20]

    def _paths(self, shard: int, rank: int) -> tuple[Path, Path]:
        stem = f"{self._tag(shard, self.world_size)}.rank{rank}"
        return self.folder / f"{stem}.safetensors", self.folder / f"{stem}.json"

    def done(self, batch: int) -> bool:
        """Whether this rank's part of ``batch``'s shard is complete on disk."""
        return self._paths(self.shard_of(batch), self.rank)[1].exists()

    @staticmethod
    def _save(features_path: Path, record_path: Path, batches: Sequence[int], records: Sequence[_Record]) -> None:
        """Rows first, then the listing whose presence marks the file pair complete."""
        _, rows, _ = _join(records)
        with atomic_path(features_path) as tmp:
            save_file({"features": rows.to(torch.float16).contiguous()}, str(tmp))
        listing = [
            {"batch": j, "keys": [list(k) for k in keys], "failed": bad}
            for j, (keys, _, bad) in zip(batches, records, strict=True)
        ]
        atomic_write_json(record_path, {"version": 1, "batches": listing})

    @staticmethod
    def _load(features_path: Path, record_path: Path) -> list[tuple[int, _Record]]:
        """The ``(batch, record)`` pairs of one file pair written by :meth:`_save`."""
        rows = load_file(str(features_path))["features"].float()  # (R, D); float16 -> float32 -> float16 is exact
        out, offset = [], 0
        for entry in read_json(record_path)["batches"]:
            keys = [(str(i), int(v)) for i, v in entry["keys"]]
            out.append((int(entry["batch"]), (keys, rows[offset : offset + len(keys)], dict(entry["failed"]))))
            offset += len(keys)
        return out

    def write(self, shard: int, batches: Sequence[int], records: Sequence[_Record]) -> None:
        """This rank's part of ``shard``: the records of its ``batches`` (in order), rows first, then the record."""
        self._save(*self._paths(shard, self.rank), batches, records)

    def write_pending(self, pending: Sequence[tuple[int, _Record]]) -> list[Path]:
        """Keep the finished batches ``[(batch, record)]`` of the shard in flight for the re-run (see class doc).

        Returns:
            The two files written (none for no batch), to delete once the shard is on disk.
        """
        if not pending:
            return []
        shard = self.shard_of(pending[0][0])
        local = [j - self.first_batch[shard] for j, _ in pending]
        stem = f"{self._tag(shard, None)}.rank{self.rank}.b{local[0]:06d}.pending"
        files = [self.folder / f"{stem}.safetensors", self.folder / f"{stem}.json"]
        self._save(*files, local, [r for _, r in pending])
        return files

    def read_pending(self, wanted: set[int]) -> tuple[dict[int, _Record], dict[int, list[Path]]]:
        """Pending batches of this plan among ``wanted``: ``{batch: record}`` and ``{shard: its pending files}``."""
        found: dict[int, _Record] = {}
        files: dict[int, list[Path]] = {}
        if not self.folder.exists():
            return found, files
        for shard, first in self.first_batch.items():
            for record_path in sorted(self.folder.glob(f"{self._tag(shard, None)}.rank*.b*.pending.json")):
                features_path = record_path.with_suffix(".safetensors")
                if not features_path.exists():
                    continue
                taken = False
                for local, record in self._load(features_path, record_path):
                    j = first + local
                    if j in wanted and j < len(self.batches) and self.shard_of(j) == shard:
                        found[j], taken = record, True
                if taken:
                    files.setdefault(shard, []).extend([features_path, record_path])
        return found, files

    def merge_into(self, store: FeatureStore) -> None:
        """Add every shard of the plan to ``store`` in order, exactly as one process adds them, then drop the parts."""
        shards: dict[int, set[int]] = {}
        for j in range(len(self.batches)):
            shards.setdefault(self.shard_of(j), set()).add(j % self.world_size)
        for shard, ranks in sorted(shards.items()):
            batches: list[tuple[int, _Record]] = []
            for rank in sorted(ranks):
                batches += self._load(*self._paths(shard, rank))
            store.add_shard(*_join([record for _, record in sorted(batches, key=lambda b: b[0])]))
        self.remove()

    def remove(self) -> None:
        """Drop the folder (everything in it is in the index now, or belongs to no plan of this cache any more)."""
        shutil.rmtree(self.folder, ignore_errors=True)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (torchrun, a scheduler, ``kill``) into KeyboardInterrupt here, so finished batches are kept.

    Only in the main thread, and only where SIGTERM still has its default action (a server keeps its own handler).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    settings: Settings,
    progress: bool = False,
    backbone: Backbone | None = None,
    on_shard: Callable[[int], None] | None = None,
    dist: Distributed | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> CacheSummary:
    """Extract and cache features of every split image (view 0) and K augmented views of training images.

    Args:
        run: Run directory with ``splits.json``.
        settings: Resolved :class:`~roadwork_cli.config.Settings`.
        progress: Show a rich progress bar (images/s) on stderr.
        backbone: A ready :class:`~roadwork_cli.model.backbones.Backbone` (default: built from ``settings.model``).
        on_shard: Called with the shard number after each shard is safely on disk (tests simulate crashes here);
            under torchrun after each of this rank's parts of a shard.
        on_batch: Called with the batch number after each computed batch (tests interrupt here).
        dist: The torchrun job (:func:`~roadwork_cli.runtime.distributed.distributed_from_env`); None or one
            process computes everything here. With W ranks, rank r computes batches r, r+W, ... of the one-process
            plan and writes them as parts; rank 0 merges the parts, shard by shard, into the layout that one process
            writes (same shards, index and bytes). The run directory must be shared by all ranks.
    """
    from roadwork_cli.config import resolve_batch_size
    from roadwork_cli.data.decode import (
        DecodeRecipe,
        ImageDataset,
        collate,
        create_loader,
        recipe_record,
        to_model_input,
    )
    from roadwork_cli.data.transforms import augment_seed, augmentation_from_settings
    from roadwork_cli.io.progress import progress_bar
    from roadwork_cli.io.provenance import record
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.runtime.device import autocast, compute_dtype, precision_tag, resolve_device
    from roadwork_cli.runtime.streams import local_pool, ordered_map, resolve_streams

    started = time.perf_counter()
    table = read_split_table(run)
    if settings.runtime.threads:
        torch.set_num_threads(settings.runtime.threads)
    threads_before = torch.get_num_threads()  # the streams set their own; this thread's is restored after
    if backbone is None:
        from roadwork_cli.features.current import with_run_backbone
        from roadwork_cli.io.atomic import atomic_write_text

        # Without an explicit --backbone the run keeps the one it has; config.yaml says which one ran.
        settings = with_run_backbone(run, settings, "`cache-features`", switch=True)
        if dist is None or dist.rank == 0:
            atomic_write_text(run.config, settings.to_yaml())
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
        decoder=settings.data.decoder,
    )
    if not recipe.jpeg_draft:  # full decoding gives other pixels for large JPEGs: a folder of its own
        fingerprint += "-fulldecode"
    fingerprint += decoder_suffix(recipe.decoder, device)  # GPU-decoded pixels: a folder of their own too
    folder = run.features / fingerprint
    store = FeatureStore(folder)
    rank, world_size = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    augmentation = augmentation_from_settings(settings.data, backbone.preprocessing, output="uint8")
    # Views drawn under another augmentation are other pixels. Every rank drops them from the index it read (rank 0
    # persists that), so all ranks plan the same work whichever version of the index they saw.
    if store.keep_views_of(augmentation.fingerprint) and rank == 0:
        store.write_index()
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
        "augmentation": {"spec": augmentation.spec, "fingerprint": augmentation.fingerprint},
    }
    if rank == 0:
        for stale in [*folder.glob(".*.tmp"), *folder.glob(f"{_Parts.FOLDER}/.*.tmp")]:  # writes SIGKILL cut short
            stale.unlink(missing_ok=True)
        atomic_write_json(store.meta_path, meta)
    if world_size > 1 and len(set(dist.all_gather_json(fingerprint))) > 1:
        raise UsageError(
            "The ranks of this torchrun job built different backbones (fingerprints differ): give every node the "
            "same --backbone, --weights file and settings."
        )

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
    batches = _shard_batches(len(todo), shard_size, resolve_batch_size(settings.features.batch_size, device.type, 64))
    # Under torchrun rank r computes batches r, r+W, ...: the one-process batches, so the same rows come out.
    mine = [j for j in range(len(batches)) if j % world_size == rank]
    parts = _Parts(folder, todo, batches, shard_size, rank, world_size, augmentation.fingerprint)
    if world_size > 1:
        mine = [j for j in mine if not parts.done(j)]  # resume: this rank's finished parts of unmerged shards
    # Resume: batches an interrupted run finished but could not fill a shard with are taken, not computed again.
    restored, pending_files = parts.read_pending(set(mine))
    taken = sum(len(restored[j][0]) for j in restored)  # rows of pending batches: reused, not computed
    compute = [j for j in mine if j not in restored]
    forward_passes = computed = 0
    if mine:
        # View 0 is the clean eval transform; view v > 0 one seeded draw of the train transform.
        dataset = ImageDataset(
            [table.paths[image_id] for image_id, _ in todo],
            recipe,
            seeds=[None if view == 0 else augment_seed(image_id, view) for image_id, view in todo],
            augment=augmentation,
        )

        def forward(indices: list[int], batch: torch.Tensor | None, bad: list) -> tuple:
            """``(indices, (B_ok, D) rows | None, bad)`` of one decoded batch."""
            if batch is None:
                return indices, None, bad
            batch = to_model_input(batch, backbone.preprocessing, device, settings.features.channels_last)
            with torch.inference_mode(), autocast(device, dtype):
                return indices, model(batch).float().cpu(), bad  # (B_ok, D)

        def decode_and_forward(j: int) -> tuple:
            # One stream's batch: decode on its threads, then the forward on the same cores (runtime/streams.py).
            pool = local_pool()
            load = dataset.__getitem__
            items = pool.map(load, batches[j]) if pool is not None else map(load, batches[j])
            return forward(*collate(list(items)))

        if device.type == "cpu":
            plan = resolve_streams(settings.features.streams, settings.runtime.threads)
            computed_batches = ordered_map(
                decode_and_forward, compute, plan.streams, init=plan.init_torch, decode_threads=plan.threads
            )
        else:  # a GPU's forward leaves the cores to decode workers beside it
            loader = create_loader(
                dataset,
                batch_sampler=[batches[j] for j in compute],
                workers=settings.features.workers,
                pin_memory=device.type == "cuda",
            )
            computed_batches = (forward(*batch) for batch in loader)
        shard_of = {j: batches[j][0] // shard_size for j in mine}
        last_of_shard = {shard: j for j, shard in shard_of.items()}
        records: list[_Record] = []  # this rank's batches of the shard in progress
        unsaved: list[tuple[int, _Record]] = []  # those of them computed by this call and not on disk yet
        saved_at = time.monotonic()
        total = sum(len(batches[j]) for j in compute)
        with (
            progress_bar("cache-features", total=total, unit="img", enabled=progress) as advance,
            _sigterm_as_interrupt(),
        ):
            try:
                for j in mine:
                    if j in restored:
                        records.append(restored[j])
                    else:
                        indices, rows, bad = next(computed_batches)
                        if rows is None:
                            rows = torch.zeros(0, backbone.feature_dim)
                        else:
                            forward_passes += 1
                        result = ([todo[i] for i in indices], rows, {todo[i][0]: reason for i, reason in bad})
                        records.append(result)
                        unsaved.append((j, result))
                        computed += len(indices)
                        advance(len(indices) + len(bad))
                        if on_batch is not None:
                            on_batch(j)
                    shard = shard_of[j]
                    if last_of_shard[shard] != j:
                        # A long shard is kept on disk as it grows, so that even a SIGKILL loses little of it.
                        if unsaved and time.monotonic() - saved_at >= PENDING_EVERY_S:
                            pending_files.setdefault(shard, []).extend(parts.write_pending(unsaved))
                            unsaved, saved_at = [], time.monotonic()
                        continue
                    if world_size == 1:
                        store.add_shard(*_join(records))
                    else:
                        parts.write(shard, [b for b in mine if shard_of[b] == shard], records)
                    records, unsaved, saved_at = [], [], time.monotonic()
                    for path in pending_files.pop(shard, []):
                        path.unlink(missing_ok=True)
                    if on_shard is not None:
                        on_shard(shard if world_size > 1 else len(store.shards) - 1)
            except BaseException:
                # Ctrl-C, SIGTERM or an error: keep this shard's finished batches so the re-run continues from here.
                # A second interrupt here only loses them: the files are written atomically.
                parts.write_pending(unsaved)
                raise
            finally:
                computed_batches.close()  # streams: drop queued batches, wait for the running ones
                torch.set_num_threads(threads_before)
    if world_size > 1:
        # Every rank's parts are on disk once all have reported their counts; rank 0 then merges them.
        counts = dist.all_gather_json([computed, forward_passes, taken])
        computed, forward_passes, taken = (sum(c[i] for c in counts) for i in range(3))
        if rank == 0:
            parts.merge_into(store)
        dist.barrier()
        store = FeatureStore(folder)  # the merged index, on every rank
    else:
        parts.remove()  # every shard of the plan is in the index: pending batches are spent
    if rank == 0:
        write_current(run, CurrentFeatures(fingerprint=fingerprint, backbone=backbone.name))
        record(run, "cache-features", [run.splits])
    seconds = time.perf_counter() - started
    return CacheSummary(
        fingerprint=fingerprint,
        folder=folder,
        backbone=backbone.name,
        feature_dim=backbone.feature_dim,
        total=len(ordered),
        computed=computed,
        reused=reused + taken,
        failed=len(store.failed),
        forward_passes=forward_passes,
        seconds=seconds,
        images_per_second=computed / seconds if seconds > 0 else 0.0,
        shards=len(store.shards),
    )
