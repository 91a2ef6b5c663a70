"""Batch scoring on Ray Data: ``roadwork predict --engine ray``, a thin shell over the same ``ScoringModel``.

The inputs are enumerated exactly as plain ``predict`` enumerates them (:func:`roadwork_cli.io.inputs.expand_inputs`:
folders, globs, ``.csv``/``.jsonl`` manifests, ``.parquet`` row locators), so every input keeps the same ``path``
key. Ray Data spreads those locators over an actor pool (``map_batches`` with a callable class and ``concurrency``);
each actor loads the bundle once (``load_bundle``: ONNX runtime preferred, ``threads`` intra-op threads per actor)
and runs ``ScoringModel.predict`` on its batches, so decoding, the rejection reasons and the calibrated decisions are
the ones ``predict`` gives. Ray does the partitioning and scheduling; there is no sharding scheme of our own.

Records stream back to the driver, which is the only writer: they are appended to ``<out>.partial.jsonl`` (a journal
in completion order) as they arrive, and when every input is done the output (JSONL, CSV or parquet, by suffix) is
written atomically **in input order**, with exactly ``predict``'s fields. A second run over an existing output or
journal is refused unless told to ``resume`` (score only the inputs without a record, then write everything in input
order; no duplicate rows) or ``overwrite``.

Ray is an optional extra (``pip install 'roadwork-cli[ray]'``) and is imported only here, inside functions.

Example:
    >>> result = score_with_ray(["frames/"], "runs/demo/bundle.tar", "scores.parquet", actors=4)  # doctest: +SKIP
    >>> result.records[0]["decision"]  # doctest: +SKIP
    'roadwork'
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roadwork_cli.errors import RoadworkError, UsageError
from roadwork_cli.io.atomic import atomic_path
from roadwork_cli.io.inputs import FIELDS, RecordWriter, expand_inputs, round_score

__all__ = ["RAY_MISSING", "RayScoring", "import_ray", "output_format", "score_with_ray"]

RAY_MISSING = "--engine ray needs Ray Data, which is not installed: pip install 'roadwork-cli[ray]'"
JOURNAL_SUFFIX = ".partial.jsonl"
OUT_FORMATS = ("jsonl", "csv", "parquet")
DEFAULT_ROWS_PER_CALL = 64
"""Inputs per actor call: large enough to amortise Ray's per-task cost, small enough to spread 1,000 inputs."""


def import_ray() -> Any:
    """``ray`` with Ray Data, or a ``UsageError`` (exit 2) that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra's Data part is what is used
    except ImportError as exc:
        raise UsageError(RAY_MISSING) from exc
    return ray


def output_format(out: Path, fmt: str | None = None) -> str:
    """The format of ``out``: ``fmt`` when given, else by suffix (``.parquet``, ``.csv``; anything else JSONL)."""
    if fmt is not None:
        if fmt not in OUT_FORMATS:
            raise UsageError(f"--engine ray writes {', '.join(OUT_FORMATS)} (got {fmt!r}).")
        return fmt
    suffix = out.suffix.lower()
    return "parquet" if suffix == ".parquet" else "csv" if suffix == ".csv" else "jsonl"


@dataclass
class RayScoring:
    """What :func:`score_with_ray` did.

    Attributes:
        records: One ``predict`` record per input, in input order (then any earlier records for inputs no longer
            given, when resuming).
        skipped: Non-image files found in folders (not scored, as in ``predict``).
        scored: Inputs scored by the actors in this run.
        resumed: Records taken over from an earlier run (``resume``).
        seconds: Wall time of the scoring (Ray start and bundle loading in the actors included).
        actors: Size of the actor pool.
        out: Where the records were written (None: only returned).
        rule: The bundle's calibrated rule (for the summary's guarantee line).
    """

    records: list[dict[str, Any]]
    skipped: list[str] = field(default_factory=list)
    scored: int = 0
    resumed: int = 0
    seconds: float = 0.0
    actors: int = 0
    out: Path | None = None
    rule: Any = None


class BundleScorer:
    """One Ray actor: the bundle loaded once, then ``predict`` on each batch of ``{"index", "item"}`` rows.

    Every input gets a row back; a failure that is not one input's (it should not happen) is recorded on each input of
    the batch instead of killing the task, so Ray never retries or drops inputs behind the caller's back.
    """

    def __init__(
        self,
        bundle: str,
        runtime: str = "auto",
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        batch_size: int | None = None,
        workers: int = 0,
        jpeg_draft: bool | None = None,
        limits: tuple[int, int] | None = None,
    ):
        from roadwork_cli.stage1 import load_bundle

        self.model = load_bundle(
            bundle, device=device, precision=precision, runtime=runtime, jpeg_draft=jpeg_draft, threads=threads
        )
        if self.model.runtime == "torch" and threads:
            import torch

            torch.set_num_threads(threads)
        if limits is not None:
            self.model.max_pixels, self.model.max_file_bytes = limits
        self.batch_size = batch_size
        self.workers = workers

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        indices = batch.column("index").to_pylist()
        items = batch.column("item").to_pylist()
        try:
            predictions = [p.to_dict() for p in self.model.predict(items, self.batch_size, self.workers)]
        except Exception as exc:  # noqa: BLE001 - a broken batch becomes error records, never a lost task
            reason = f"scoring failed: {type(exc).__name__}: {exc}"
            predictions = [{"p_roadwork": None, "gate": None, "decision": None, "error": reason} for _ in items]
        return pa.table(
            {
                "index": pa.array(indices, pa.int64()),
                "p_roadwork": pa.array([p["p_roadwork"] for p in predictions], pa.float64()),
                "gate": pa.array([p["gate"] for p in predictions], pa.float64()),
                "decision": pa.array([p["decision"] for p in predictions], pa.string()),
                "error": pa.array([p["error"] for p in predictions], pa.string()),
            }
        )


def score_with_ray(
    inputs: Sequence[str],
    bundle: str | Path,
    out: str | Path | None = None,
    *,
    fmt: str | None = None,
    address: str | None = None,
    actors: int | None = None,
    threads: int | None = None,
    batch_size: int | None = None,
    workers: int = 0,
    rows_per_call: int = DEFAULT_ROWS_PER_CALL,
    runtime: str = "auto",
    device: str = "auto",
    precision: str = "auto",
    jpeg_draft: bool | None = None,
    limits: tuple[int, int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> RayScoring:
    """Score ``inputs`` with ``bundle`` on a Ray actor pool and write ``predict``'s records to ``out``.

    Args:
        inputs: INPUT arguments as ``predict`` takes them (files, folders, globs, manifests, parquet files). The
            bundle and every input must be readable at the same path on every node of a cluster.
        bundle: bundle.tar from ``roadwork export`` (verified here before Ray starts, and by each actor).
        out: Output file (``.parquet``, ``.csv``, else JSONL), written atomically when all inputs are done; None
            returns the records only.
        fmt: Output format instead of the suffix's (``jsonl``, ``csv``, ``parquet``).
        address: Ray cluster to join (``auto``, ``ray://HEAD:10001``); None starts a local Ray on this machine (or
            uses the one already initialised in this process).
        actors: Actor pool size; None = the cluster's CPUs divided by ``threads``.
        threads: Intra-op threads per actor, and the CPUs Ray reserves for it; None = 1 (so that the actors on a
            node do not oversubscribe its cores, as onnxruntime's default of all cores per actor would).
        batch_size: Images per forward pass inside an actor (None: the model's default, as in ``predict``).
        workers: Decoding threads inside an actor (``predict.workers``).
        rows_per_call: Inputs handed to an actor per call.
        runtime: ``auto`` (ONNX when the bundle has it), ``onnx`` or ``torch``.
        device: ``runtime.device`` for each actor.
        precision: ``runtime.precision`` for each actor (as in ``load_bundle``).
        jpeg_draft: As in ``load_bundle`` (None: the bundle's recipe).
        limits: ``(max_pixels, max_file_bytes)`` for inputs (None: the model's defaults).
        resume: Keep the records of an earlier run over ``out`` (its output and/or journal) and score only the rest.
        overwrite: Start again even when ``out`` or its journal exists.
        progress: Show Ray Data's progress bars.

    Raises:
        UsageError: Ray missing, a bad combination of arguments, or ``out`` exists without ``resume``/``overwrite``.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: keep the earlier records, or start again.")
    if resume and out is None:
        raise UsageError("--resume needs --out: the records of the earlier run are read from it.")
    out = None if out is None else Path(out)
    out_fmt = None if out is None else output_format(out, fmt)
    journal = None if out is None else out.with_name(out.name + JOURNAL_SUFFIX)
    earlier: list[dict[str, Any]] = []
    if out is not None and (out.exists() or journal.exists()):
        if not (resume or overwrite):
            found = " and ".join(str(p) for p in (out, journal) if p.exists())
            raise UsageError(
                f"{found} already exists: --resume scores only the inputs without a record there, --overwrite starts "
                "again."
            )
        if resume:
            earlier = (read_records(out, out_fmt) if out.exists() else []) + (
                read_journal(journal) if journal.exists() else []
            )
    ray = import_ray()

    from roadwork_cli.stage1 import VerifiedBundle

    rule = VerifiedBundle.read(bundle).rule  # a bad bundle fails here, once, with its reason, not in every actor
    skipped: list[str] = []
    expanded = expand_inputs(inputs, skipped=skipped)
    if any(isinstance(item, bytes) for _, item, _ in expanded):
        raise UsageError("--engine ray reads files; score an image piped on stdin with plain `roadwork predict -`.")
    plan = _plan(expanded, earlier)
    todo = [(i, item) for i, (_, item, error) in enumerate(expanded) if error is None and plan[i] is None]
    if out is not None and overwrite:  # an interrupted overwrite must not leave the old output to resume with
        out.unlink(missing_ok=True)

    started = time.perf_counter()
    fresh: dict[int, dict[str, Any]] = {}
    handle = None
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        handle = open(journal, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115 - closed below
        if handle.tell() and not _ends_with_newline(journal):
            handle.write("\n")  # after a torn last line: the next record starts a line of its own
    pool = 0
    try:
        if todo:
            scorer = dict(
                bundle=str(bundle), runtime=runtime, device=device, precision=precision, threads=threads or 1,
                batch_size=batch_size, workers=workers, jpeg_draft=jpeg_draft, limits=limits,
            )  # fmt: skip
            for event in _run_pool(ray, todo, address, actors, threads, rows_per_call, progress, scorer):
                if isinstance(event, int):  # the pool's size, announced first
                    pool = event
                    continue
                index, row = event
                record = {
                    "path": expanded[index][0],
                    "p_roadwork": round_score(row["p_roadwork"]),
                    "gate": round_score(row["gate"]),
                    "decision": row["decision"],
                    "error": row["error"],
                }
                fresh[index] = record
                if handle is not None:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    handle.flush()
    except Exception as exc:  # Ray itself failed (a node lost, the cluster gone): say what is kept and how to go on
        if journal is None or not fresh:
            raise
        raise RoadworkError(
            f"Ray scoring stopped after {len(fresh)} of {len(todo)} inputs ({type(exc).__name__}: {exc}); their "
            f"records are kept in {journal}: run the same command with --resume to score the rest."
        ) from exc
    finally:
        if handle is not None:
            handle.close()
            if journal.stat().st_size == 0:  # nothing done (Ray failed to start): nothing to resume from
                journal.unlink()
    seconds = time.perf_counter() - started

    records: list[dict[str, Any]] = []
    for i, (shown, _, error) in enumerate(expanded):
        if plan[i] is not None:
            records.append(plan[i])
        elif error is not None:
            records.append({**_empty(shown), "error": error})
        else:  # Ray returns one row per input; a missing one would still be reported, never silently dropped
            records.append(fresh.get(i) or {**_empty(shown), "error": "no result came back from the Ray actor pool"})
    leftover = _leftover(earlier, plan, expanded)
    records.extend(leftover)
    if out is not None:
        write_records(records, out, out_fmt)
        journal.unlink(missing_ok=True)
    resumed = sum(r is not None for r in plan) + len(leftover)
    return RayScoring(records, skipped, len(fresh), resumed, seconds, pool, out, rule)


def _empty(path: str) -> dict[str, Any]:
    return {"path": path, "p_roadwork": None, "gate": None, "decision": None, "error": None}


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


def _plan(expanded: list[tuple[str, Any, str | None]], earlier: list[dict[str, Any]]) -> list[dict | None]:
    """Per input, the earlier record that stands for it (matched by ``path``, each record used once) or None."""
    by_path: dict[str, deque[dict[str, Any]]] = defaultdict(deque)
    for record in earlier:
        by_path[record["path"]].append(record)
    plan: list[dict | None] = []
    for shown, _, _ in expanded:
        queue = by_path.get(shown)
        plan.append(queue.popleft() if queue else None)
    return plan


def _leftover(
    earlier: list[dict[str, Any]], plan: list[dict | None], expanded: list[tuple[str, Any, str | None]]
) -> list[dict[str, Any]]:
    """Earlier records for paths not given now: kept after the inputs' records, so resuming never drops one.

    An unmatched earlier record for a path that *is* given again would be a second row for that input, so it is left
    out (each input has exactly one record).
    """
    used = {id(r) for r in plan if r is not None}
    given = {shown for shown, _, _ in expanded}
    return [r for r in earlier if id(r) not in used and r["path"] not in given]


def _run_pool(
    ray: Any,
    todo: list[tuple[int, Any]],
    address: str | None,
    actors: int | None,
    threads: int | None,
    rows_per_call: int,
    progress: bool,
    scorer_kwargs: dict[str, Any],
) -> Iterator[Any]:
    """Yield the pool size, then ``(input index, result row)`` as the actors finish them (completion order)."""
    import logging

    owns = not ray.is_initialized()
    if owns:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    # Ray Data's per-run INFO/WARNING lines (plans, "progress bars disabled", timings) would bury predict's own
    # summary; its errors still show.
    data_logger = logging.getLogger("ray.data")
    data_level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.print_on_execution_start = False
        cpus_per_actor = max(1, threads or 1)
        if actors is None:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            actors = max(1, cpus // cpus_per_actor)
        actors = max(1, min(actors, math.ceil(len(todo) / rows_per_call)))  # no actor without work to load for
        yield actors
        blocks = max(actors, math.ceil(len(todo) / rows_per_call))
        dataset = ray.data.from_items(
            [{"index": index, "item": str(item)} for index, item in todo], override_num_blocks=blocks
        ).map_batches(
            BundleScorer,
            fn_constructor_kwargs=scorer_kwargs,
            batch_size=rows_per_call,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
        )
        for row in dataset.iter_rows():
            yield int(row["index"]), row
    finally:
        data_logger.setLevel(data_level)
        if owns:
            ray.shutdown()


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Records of a journal; a torn last line (the run was killed while writing it) is ignored, as never written."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "path" in record:
            records.append({k: record.get(k) for k in FIELDS})
    return records


def read_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The records of a finished output (``jsonl``, ``csv`` or ``parquet``), as written by :func:`write_records`."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure: this is not an output of ours
            raise UsageError(f"cannot resume from {path}: unreadable parquet ({exc}); use --overwrite.") from exc
        return [{k: row.get(k) for k in FIELDS} for row in rows]
    if fmt == "csv":
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        numbers = ("p_roadwork", "gate")
        return [
            {k: (None if row.get(k) in ("", None) else float(row[k]) if k in numbers else row[k]) for k in FIELDS}
            for row in rows
        ]
    return read_journal(path)


def write_records(records: list[dict[str, Any]], out: Path, fmt: str) -> Path:
    """Write ``records`` to ``out`` atomically: JSONL and CSV exactly as ``predict`` writes them, or parquet."""
    with atomic_path(out) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema(
                [
                    ("path", pa.string()),
                    ("p_roadwork", pa.float64()),
                    ("gate", pa.float64()),
                    ("decision", pa.string()),
                    ("error", pa.string()),
                ]
            )
            pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as handle:
                writer = RecordWriter(fmt, stream=handle)
                for record in records:
                    writer.write(record)
    return out
