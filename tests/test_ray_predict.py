"""``predict --engine ray``: the same records as plain ``predict`` from a Ray Data actor pool, bad files as records,
resume or refuse over an existing output, and one clear line when Ray is missing.

One local Ray instance (2 CPUs) serves the whole module; the bundle is a tiny random-head ``tiny_vit`` exported with
its ONNX graph when onnxruntime is installed (as ``export`` does by default), so each actor loads it in well under a
second.
"""

from __future__ import annotations

import builtins
import importlib.util
import json

import pytest
from cli.cli_helpers import jsonl_records, make_tiny_run, write_images
from typer.testing import CliRunner

from roadwork_cli.cli.app import app

pytestmark = pytest.mark.slow


def _ray_importable() -> bool:
    try:
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


RAY = _ray_importable()
needs_ray = pytest.mark.skipif(not RAY, reason="Ray Data is not installed (pip install 'roadwork-cli[ray]')")
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (the library uses the one already initialised)."""
    if not RAY:
        pytest.skip("Ray Data is not installed (pip install 'roadwork-cli[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle

    root = tmp_path_factory.mktemp("ray_bundle")
    run = make_tiny_run(root / "run", lam=0.2, tau=0.5)
    onnx = importlib.util.find_spec("onnxruntime") is not None
    return export_bundle(run, root / "bundle.tar", Settings(export={"onnx": onnx}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A mixed folder (good JPEGs; zero-byte, truncated and non-image files; a skipped .txt), a manifest and a
    parquet file: the INPUT arguments, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("ray_inputs")
    folder = root / "mixed"
    good = write_images(folder, n=9, size=(80, 60))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[0].read_bytes()[:200])
    (folder / "not_an_image.png").write_text("hello, not pixels")
    (folder / "notes.txt").write_text("not an image file: skipped")
    (root / "list.csv").write_text("path,label\nmixed/img_3.jpg,1\nmixed/missing.jpg,0\n")
    table = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in good[:3]], "label": [1, 0, 1]})
    pq.write_table(table, root / "set.parquet")
    return [str(folder), str(root / "list.csv"), str(root / "set.parquet")]


def _predict(args: list[str]):
    return runner.invoke(app, ["predict", *args])


def _assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """Same inputs in the same order, same decisions and errors; scores equal to float rounding."""
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert set(a) == {"path", "p_roadwork", "gate", "decision", "error"}
        assert (a["decision"], a["error"]) == (b["decision"], b["error"]), a["path"]
        for key in ("p_roadwork", "gate"):
            assert (a[key] is None) == (b[key] is None)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], abs=2e-6)


@pytest.fixture(scope="module")
def plain_records(bundle, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "plain.jsonl"
    result = _predict([*inputs, "--bundle", str(bundle), "--out", str(out)])
    assert result.exit_code == 1, result.output  # the bad files fail, and only they
    return jsonl_records(out.read_text())


@needs_ray
def test_ray_gives_plain_predicts_records_in_input_order(local_ray, bundle, inputs, plain_records, tmp_path):
    out = tmp_path / "ray.jsonl"
    result = _predict([*inputs, "--bundle", str(bundle), "--out", str(out), "--engine", "ray", "--ray-actors", "2"])
    assert result.exit_code == 1, result.output  # like plain predict: done, but some inputs failed
    records = jsonl_records(out.read_text())
    _assert_same_records(records, plain_records)
    errors = {r["path"].rsplit("/", 1)[-1]: r["error"] for r in records if r["error"]}
    assert set(errors) == {"zero.jpg", "truncated.jpg", "not_an_image.png", "missing.jpg"}
    assert sum(r["error"] is None for r in records) == 9 + 1 + 3  # the folder, the manifest's image, parquet rows
    assert not (tmp_path / "ray.jsonl.partial.jsonl").exists()
    assert "skipped non-image files: 1" in result.output


@needs_ray
def test_parquet_output_holds_the_same_records(local_ray, bundle, inputs, plain_records, tmp_path):
    import pyarrow.parquet as pq

    from roadwork_cli.batch_ray import score_with_ray

    out = tmp_path / "scores.parquet"
    result = score_with_ray(inputs, bundle, out, actors=2, rows_per_call=4)
    table = pq.read_table(out)
    assert table.column_names == ["path", "p_roadwork", "gate", "decision", "error"]
    _assert_same_records(table.to_pylist(), plain_records)
    assert result.scored == len(plain_records)  # every input reached an actor: the missing path fails there, too
    assert result.actors == 2


@needs_ray
def test_a_second_run_refuses_resumes_or_overwrites_without_duplicate_rows(local_ray, bundle, inputs, tmp_path):
    from roadwork_cli.batch_ray import score_with_ray

    out = tmp_path / "scores.jsonl"
    base = [*inputs, "--bundle", str(bundle), "--out", str(out), "--engine", "ray"]
    assert _predict(base).exit_code == 1
    first = out.read_text()

    refused = _predict(base)
    assert refused.exit_code == 2
    assert "--resume" in refused.output and "--overwrite" in refused.output
    assert out.read_text() == first  # untouched

    again = score_with_ray(inputs, bundle, out, resume=True)
    assert again.scored == 0 and again.resumed == len(jsonl_records(first))
    assert out.read_text() == first  # every input already had its record: nothing added, nothing repeated

    # An interrupted run: no output yet, a journal holding some records in completion order (the last line torn).
    records = jsonl_records(first)
    out.unlink()
    journal = tmp_path / "scores.jsonl.partial.jsonl"
    kept = [records[5], records[0], records[11]]
    journal.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"path": "torn')
    resumed = _predict([*base, "--resume"])
    assert resumed.exit_code == 1, resumed.output
    final = jsonl_records(out.read_text())
    _assert_same_records(final, records)  # one row per input: no duplicates (img_3.jpg is given twice, so twice)
    assert f"resumed: {len(kept)} records kept" in resumed.output
    assert not journal.exists()

    overwritten = _predict([*base, "--overwrite"])
    assert overwritten.exit_code == 1
    _assert_same_records(jsonl_records(out.read_text()), records)


def test_a_batch_the_model_cannot_score_becomes_error_records():
    """A failure that is not one input's is recorded on each input of the batch; the task returns normally."""
    import pyarrow as pa

    from roadwork_cli.batch_ray import BundleScorer

    class Broken:
        def predict(self, items, batch_size, workers):
            raise RuntimeError("onnxruntime fell over")

    scorer = BundleScorer.__new__(BundleScorer)
    scorer.model, scorer.batch_size, scorer.workers = Broken(), None, 0
    table = scorer(pa.table({"index": [4, 7], "item": ["a.jpg", "b.jpg"]}))
    assert table.column("index").to_pylist() == [4, 7]
    assert table.column("error").to_pylist() == ["scoring failed: RuntimeError: onnxruntime fell over"] * 2
    assert table.column("p_roadwork").to_pylist() == [None, None]


def test_without_ray_the_engine_is_one_clear_line_and_exit_2(monkeypatch, bundle, tmp_path):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    images = write_images(tmp_path / "imgs", n=1)
    result = _predict([str(images[0]), "--bundle", str(bundle), "--engine", "ray", "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2
    assert "pip install 'roadwork-cli[ray]'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_written_outputs_read_back_as_the_same_records(tmp_path, suffix):
    """--resume reads an earlier output in its own format; None, floats and text survive the round trip."""
    from roadwork_cli.batch_ray import output_format, read_records, write_records

    records = [
        {"path": "a, b.jpg", "p_roadwork": 0.123456, "gate": 0.9, "decision": "defer", "error": None},
        {"path": "c.parquet#row=2", "p_roadwork": None, "gate": None, "decision": None, "error": "zero bytes"},
    ]
    out = tmp_path / f"scores{suffix}"
    fmt = output_format(out)
    assert fmt == suffix[1:]
    write_records(records, out, fmt)
    assert read_records(out, fmt) == records


def test_a_run_that_ray_stops_keeps_its_records_and_resumes_with_the_rest(monkeypatch, bundle, tmp_path):
    """Ray failing mid-run (simulated pool, no Ray needed): the records done stay in the journal, the error says
    --resume, and the resumed run scores only the other inputs and writes all of them in input order."""
    from roadwork_cli import batch_ray
    from roadwork_cli.errors import RoadworkError

    images = write_images(tmp_path / "imgs", n=4)
    seen: list[list[int]] = []

    def pool(fail_after):
        def run(ray, todo, *args):
            seen.append([index for index, _ in todo])
            yield 1
            for n, (index, _) in enumerate(todo):
                if n == fail_after:
                    raise RuntimeError("node lost")
                yield index, {"p_roadwork": 0.1 * index, "gate": 0.5, "decision": "no_roadwork", "error": None}

        return run

    monkeypatch.setattr(batch_ray, "import_ray", lambda: None)
    monkeypatch.setattr(batch_ray, "_run_pool", pool(fail_after=2))
    out = tmp_path / "scores.jsonl"
    with pytest.raises(RoadworkError, match="after 2 of 4 inputs.*--resume"):
        batch_ray.score_with_ray([str(tmp_path / "imgs")], bundle, out)
    assert not out.exists()
    assert len(batch_ray.read_journal(tmp_path / "scores.jsonl.partial.jsonl")) == 2

    monkeypatch.setattr(batch_ray, "_run_pool", pool(fail_after=None))
    result = batch_ray.score_with_ray([str(tmp_path / "imgs")], bundle, out, resume=True)
    assert seen[-1] == [2, 3]  # only the inputs without a record
    assert (result.scored, result.resumed) == (2, 2)
    assert [r["path"] for r in jsonl_records(out.read_text())] == [str(p) for p in images]
    assert [r["p_roadwork"] for r in jsonl_records(out.read_text())] == pytest.approx([0.0, 0.1, 0.2, 0.3])
