"""Stage1Model: batch robustness, input kinds, workers, streaming, run vs bundle, scoring a source."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from roadwork_cli.io.run import RunDir


def make_run(root, lam: float = 0.2, tau: float = 0.5) -> RunDir:
    import torch

    from roadwork_cli.io.atomic import atomic_write_json
    from roadwork_cli.io.records import BestRecord
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.training.artifacts import write_best

    run = RunDir(root).ensure()
    backbone = create_backbone("tiny_vit")
    torch.manual_seed(2)
    head = SelectiveHead(backbone.feature_dim, hidden=0, dropout=0.0)
    record = BestRecord(
        head=head.config, backbone=backbone.spec, fingerprint=backbone.fingerprint, epoch=1, select_metric="mcc",
        metric=None, val_select={}, ema=False,
    )  # fmt: skip
    write_best(run, head, record)
    params = {"method": "scrc", "thresholds": {"lambda": lam, "tau": tau}}
    atomic_write_json(run.scrc_params, params)
    return run


def jpeg(path, size=(80, 60), colour=(200, 120, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=92)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from roadwork_cli.stage1 import Stage1Model

    return Stage1Model.from_run(make_run(tmp_path_factory.mktemp("run")), device="cpu")


def test_bad_inputs_never_crash_the_batch(model, tmp_path):
    good = jpeg(tmp_path / "good.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "page.jpg"
    text.write_text("<html>not an image</html>")
    items = [good, empty, tmp_path / "missing.png", text, good]
    preds = model.predict(items, batch_size=2)
    assert [p.path for p in preds] == [str(i) for i in items]
    assert preds[0].error is None and preds[4].error is None
    assert preds[0].p_roadwork == pytest.approx(preds[4].p_roadwork)
    for bad in preds[1:4]:
        assert bad.error and bad.decision is None and bad.p_roadwork is None and bad.gate is None
    assert "zero bytes" in preds[1].error and "not found" in preds[2].error


def test_all_bad_batch_and_empty_list(model, tmp_path):
    assert model.predict([]) == []
    preds = model.predict([tmp_path / "a.jpg", tmp_path / "b.jpg"], batch_size=1)
    assert all(p.error for p in preds)


def test_pil_images_and_paths_agree_and_workers_agree(model, tmp_path):
    from PIL import Image

    paths = [jpeg(tmp_path / f"{i}.jpg", colour=(30 * i, 90, 250 - 40 * i)) for i in range(5)]
    by_path = model.predict(paths, batch_size=2)
    by_image = model.predict([Image.open(p) for p in paths], batch_size=3)
    by_bytes = model.predict([p.read_bytes() for p in paths], batch_size=2)
    assert [b.p_roadwork for b in by_bytes] == pytest.approx([a.p_roadwork for a in by_path], abs=1e-6)
    assert by_bytes[1].path == "<bytes 1>"
    with_workers = model.predict(paths, batch_size=2, workers=2)
    for a, b, c in zip(by_path, by_image, with_workers, strict=True):
        assert a.p_roadwork == pytest.approx(b.p_roadwork, abs=1e-6) == pytest.approx(c.p_roadwork, abs=1e-6)
        assert a.decision == b.decision == c.decision
    assert by_image[0].path == "<image 0>"


def test_decision_matches_the_rule_on_calibrated_scores(model, tmp_path):
    paths = [jpeg(tmp_path / f"{i}.jpg", colour=(60 * i, 20 * i, 100)) for i in range(4)]
    p_raw, g_raw, errors = model.raw_scores(paths)
    assert errors == [None] * 4
    expected = model.rule.predict(p_raw, g_raw)
    assert [p.decision for p in model.predict(paths)] == list(expected)


def test_bundle_reproduces_the_run(model, tmp_path):
    from roadwork_cli import load_bundle
    from roadwork_cli.export import export_bundle
    from roadwork_cli.stage1 import Stage1Model

    run = make_run(tmp_path / "run")
    path = export_bundle(run)
    assert path == run.bundle
    paths = [jpeg(tmp_path / f"{i}.jpg", colour=(10 + 50 * i, 200, 30)) for i in range(3)]
    from_run = Stage1Model.from_run(run, device="cpu").predict(paths)
    from_bundle = load_bundle(path, device="cpu", runtime="torch").predict(paths)
    assert [p.to_dict() for p in from_run] == [p.to_dict() for p in from_bundle]
    from_graph = load_bundle(path, device="cpu").predict(paths)  # the default export's model.onnx
    assert [p.decision for p in from_graph] == [p.decision for p in from_run]
    assert max(abs(a.p_roadwork - b.p_roadwork) for a, b in zip(from_graph, from_run, strict=True)) <= 1e-4


def test_run_without_calibration(tmp_path):
    from roadwork_cli.errors import UsageError
    from roadwork_cli.stage1 import Stage1Model

    run = make_run(tmp_path / "run")
    run.scrc_params.unlink()
    with pytest.raises(UsageError, match="calibrate"):
        Stage1Model.from_run(run)
    raw_only = Stage1Model.from_run(run, calibrated=False)
    with pytest.raises(UsageError, match="calibrat"):
        raw_only.predict([tmp_path / "x.jpg"])


def test_score_source_writes_raw_scores_and_rejections(tmp_path):
    from roadwork_cli.config import Settings
    from roadwork_cli.scoring import score_source
    from roadwork_cli.stage1 import Stage1Model

    run = make_run(tmp_path / "run")
    src = tmp_path / "src"
    for i in range(3):
        jpeg(src / "roadwork" / f"r{i}.jpg", colour=(250, 100 + 40 * i, 0))
        jpeg(src / "no_roadwork" / f"n{i}.jpg", colour=(0, 100 + 40 * i, 250))
    (src / "roadwork" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    settings = Settings()
    settings.predict.workers = 0
    out = score_source(run, str(src), settings, tmp_path / "scores.csv")
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    assert {"id", "label", "p_roadwork", "gate"} <= set(rows[0])
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 0, 1, 1, 1]
    model = Stage1Model.from_run(run, calibrated=False)
    p_raw, g_raw, _ = model.raw_scores([r["path"] for r in rows])
    assert np.allclose([float(r["p_roadwork"]) for r in rows], p_raw, atol=1e-6)  # raw, not calibrated
    assert np.allclose([float(r["gate"]) for r in rows], g_raw, atol=1e-6)
    rejected = (tmp_path / "scores.rejected.jsonl").read_text()
    assert "broken.jpg" in rejected


def test_iter_predict_streams_in_input_order_before_reading_later_inputs(model, tmp_path):
    """The first batch's predictions come out before the last batch's inputs are even read."""
    paths = [jpeg(tmp_path / f"{i}.jpg", colour=(40 * i, 90, 200 - 30 * i)) for i in range(6)]
    paths[3] = tmp_path / "missing.jpg"
    read: list[int] = []

    class Recording(list):
        def __getitem__(self, index):
            read.append(index)
            return list.__getitem__(self, index)

    stream = model.iter_predict(Recording(paths), batch_size=2)
    first, second = next(stream), next(stream)
    assert max(read) < 4  # batches 2 and 3 not decoded yet
    rest = list(stream)
    preds = [first, second, *rest]
    assert [p.path for p in preds] == [str(p) for p in paths]
    assert preds[3].error and all(p.error is None for i, p in enumerate(preds) if i != 3)
    whole = model.predict(paths, batch_size=4)  # other batch boundaries, same answers
    for a, b in zip(whole, preds, strict=True):
        assert a.decision == b.decision and a.error == b.error
        assert (a.p_roadwork is None) == (b.p_roadwork is None)
        if a.p_roadwork is not None:
            assert a.p_roadwork == pytest.approx(b.p_roadwork, abs=1e-6)


def test_recorded_recipe_is_followed_and_overrides_are_warned_about():
    import warnings

    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.stage1 import Stage1Model

    backbone = create_backbone("tiny_vit")
    head = SelectiveHead(backbone.feature_dim, hidden=0, dropout=0.0)
    recipe = {"decode": {"jpeg_draft": False, "draft_side": None}, "compute_precision": "fp32"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # following the recipe is silent
        followed = Stage1Model(backbone, head, None, info={"recipe": recipe}, device="cpu")
    assert followed.jpeg_draft is False and followed.compute_dtype is None
    assert followed.recipe_record()["decode"] == {"jpeg_draft": False, "draft_side": None}
    with pytest.warns(UserWarning, match="JPEG draft decoding: calibration used False"):
        Stage1Model(backbone, head, None, info={"recipe": recipe}, device="cpu", jpeg_draft=True)
    with pytest.warns(UserWarning, match="compute precision: calibration used 'fp32'"):
        Stage1Model(backbone, head, None, info={"recipe": recipe}, device="cpu", precision="bf16")
    assert Stage1Model(backbone, head, None, device="cpu").jpeg_draft is True  # nothing recorded: the default


def test_unset_batch_size_is_small_on_the_cpu(model, tmp_path):
    """predict.batch_size unset: batches of 8 on the CPU (a small model's activations stay in cache), 32 on a GPU."""
    from roadwork_cli.config import Settings

    assert Settings().predict.batch_size is None
    paths = [jpeg(tmp_path / f"{i}.jpg", colour=(10 * i, 90, 40)) for i in range(19)]
    assert model.default_batch_size == 8
    assert [len(indices) for indices, *_ in model.iter_raw_scores(paths)] == [8, 8, 3]
    whole = [p.p_roadwork for p in model.predict(paths, batch_size=19)]
    assert [p.p_roadwork for p in model.predict(paths)] == pytest.approx(whole, abs=1e-6)
    gpu = type(model).__new__(type(model))  # a model on a GPU, as far as the batch size goes
    gpu.device = type(model.device)("cuda")
    assert gpu.default_batch_size == 32


def _bad_and_good_inputs(tmp_path):
    """Nine inputs, three of them unreadable (empty, missing, not an image), spread over several batches."""
    good = [jpeg(tmp_path / f"g{i}.jpg", size=(70 + 9 * i, 60), colour=(25 * i, 200 - 20 * i, 90)) for i in range(6)]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "page.jpg"
    text.write_text("<html>not an image</html>")
    return [good[0], empty, good[1], good[2], tmp_path / "missing.png", good[3], text, good[4], good[5]]


@pytest.mark.parametrize("streams", [2, 3])
def test_cpu_streams_keep_input_order_and_equal_one_stream(model, tmp_path, streams):
    items = _bad_and_good_inputs(tmp_path)
    model.threads = 1  # the same intra-op threads per stream: results must not depend on the stream count
    try:
        one = model.predict(items, batch_size=2, streams=1)
        many = model.predict(items, batch_size=2, streams=streams)
    finally:
        model.threads = None
    assert [p.path for p in many] == [str(i) for i in items]
    assert [p.to_dict() for p in many] == [p.to_dict() for p in one]
    bad = [i for i, p in enumerate(many) if p.error]
    assert bad == [1, 4, 6] and all(many[i].decision is None for i in bad)
    # ... and they agree with decode workers beside one forward (another thread count: equal up to rounding).
    legacy = model.predict(items, batch_size=2, workers=2)
    assert [p.error is None for p in legacy] == [p.error is None for p in many]
    for a, b in zip(legacy, many, strict=True):
        assert a.decision == b.decision
        assert (a.p_roadwork is None and b.p_roadwork is None) or a.p_roadwork == pytest.approx(b.p_roadwork, abs=1e-5)


def test_streams_restore_the_callers_torch_threads(model, tmp_path):
    import torch

    before = torch.get_num_threads()
    model.predict([jpeg(tmp_path / "a.jpg")] * 3, batch_size=1, streams=2)
    assert torch.get_num_threads() == before
