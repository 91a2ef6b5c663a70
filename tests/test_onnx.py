"""ONNX bundles: export verified against PyTorch, predict with onnxruntime and no torch, same pixels, same scores."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cli.cli_helpers import make_tiny_run
from PIL import Image
from split_helpers import write_splits

from roadwork_cli.data.pixels import DecodeRecipe, eval_pixels, iter_pixel_batches, normalize_pixels
from roadwork_cli.data.preprocessing import Preprocessing
from roadwork_cli.data.transforms import eval_transform, normalize_batch
from roadwork_cli.errors import BundleError, UsageError

pytest.importorskip("onnxruntime")

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming", "not-a-filter")


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random picture (upsampled noise), so JPEG and resizing behave as on a photo."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def write_photos(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(folder / f"photo_{i}.jpg")
        photo(*size, seed=i).save(paths[-1], quality=90)
    return paths


@pytest.fixture(scope="module")
def onnx_run(tmp_path_factory):
    """A tiny_vit run whose test split holds real photos, exported with and without model.onnx."""
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle

    root = tmp_path_factory.mktemp("onnx")
    run = make_tiny_run(root / "run", lam=0.2, tau=0.5)
    photos = write_photos(root / "photos", [(160, 120), (90, 200), (64, 64), (300, 170), (75, 75)])
    ids = [f"id{i}" for i in range(len(photos))]
    samples = {
        image_id: {"path": str(path), "label": n % 2, "source": "photos", "group": image_id}
        for n, (image_id, path) in enumerate(zip(ids, photos, strict=True))
    }
    write_splits(run, {"test": ids}, samples)
    onnx_bundle = export_bundle(run, root / "onnx.tar", Settings())  # the default writes model.onnx
    torch_bundle = export_bundle(run, root / "torch.tar", Settings(export={"onnx": False}))
    return run, onnx_bundle, torch_bundle, photos


# ---------------------------------------------------------------------------------------------- the same pixels
@pytest.mark.parametrize("seed", range(6))
def test_eval_pixels_equal_the_torchvision_transform_and_normalisation(seed):
    """PIL + numpy give the torch path's network input exactly: resize rounding, crop offsets, padding, filters."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        prep = Preprocessing(
            size=int(rng.integers(8, 72)),
            crop_pct=float(rng.choice([1.0, 0.875, 0.9, 0.95, 1.15])),  # > 1 pads with zeros
            interpolation=str(rng.choice(INTERPOLATIONS)),
            mean=tuple(rng.uniform(0.3, 0.6, 3)),
            std=tuple(rng.uniform(0.1, 0.4, 3)),
        )
        width, height = (int(v) for v in rng.integers(5, 180, 2))
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        ours = eval_pixels(image, prep)
        theirs = eval_transform(prep, output="uint8")(image).numpy()
        assert ours.shape == theirs.shape == (prep.size, prep.size, 3)
        assert np.array_equal(ours, theirs), (prep, width, height)
        batch = normalize_pixels(ours[None], prep)  # (1, 3, S, S)
        assert batch.flags.c_contiguous and batch.dtype == np.float32
        assert np.array_equal(batch, normalize_batch(torch.from_numpy(theirs[None]), prep).numpy())


def test_thread_batches_keep_input_order_and_report_bad_inputs(tmp_path):
    paths = [str(p) for p in write_photos(tmp_path, [(40 + 7 * i, 50) for i in range(7)])]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    items = paths[:3] + [str(tmp_path / "bad.jpg")] + paths[3:]
    recipe = DecodeRecipe(Preprocessing(size=32))
    serial = list(iter_pixel_batches(items, recipe, batch_size=3))
    threaded = list(iter_pixel_batches(items, recipe, batch_size=3, workers=3))
    assert [b[0] for b in serial] == [b[0] for b in threaded] == [[0, 1, 2], [4, 5], [6, 7]]
    assert serial[1][2] == threaded[1][2] and serial[1][2][0][0] == 3 and "image" in serial[1][2][0][1]
    for (_, a, _), (_, b, _) in zip(serial, threaded, strict=True):
        assert np.array_equal(a, b)


def test_onnx_and_torch_models_feed_the_network_equal_arrays(onnx_run, tmp_path):
    """Network inputs of both runtimes on the same bundle, small images and a drafted 4032x3024 JPEG included."""
    from roadwork_cli.data.decode import to_model_input
    from roadwork_cli.stage1 import load_bundle

    _, bundle, _, photos = onnx_run
    big = tmp_path / "big.jpg"
    photo(4032, 3024, seed=9).save(big, quality=85)
    items = [str(p) for p in photos] + [str(big)]
    onnx_model = load_bundle(bundle, runtime="onnx")
    torch_model = load_bundle(bundle, runtime="torch")
    assert onnx_model.recipe == torch_model.recipe and onnx_model.recipe.draft_side is not None
    [(indices, ours, failed)] = list(onnx_model.model_inputs(items, batch_size=len(items)))
    [(_, pixels, _)] = list(torch_model.loader(items, batch_size=len(items)))
    theirs = to_model_input(pixels, torch_model.preprocessing, torch.device("cpu"), channels_last=False).numpy()
    assert indices == list(range(len(items))) and failed == []
    assert np.array_equal(ours, theirs)


# ------------------------------------------------------------------------------------------------------- export
def test_export_writes_a_verified_graph_and_records_the_check(onnx_run):
    from roadwork_cli.export import ONNX_TOLERANCE
    from roadwork_cli.io.bundle import read_bundle

    _, bundle, torch_bundle, _ = onnx_run
    contents = read_bundle(bundle)
    record = contents.json("model.json")["onnx"]
    assert contents.manifest.extras["onnx"] == record  # the manifest carries the check; model.json is checksummed
    check = record["verification"]
    assert check["samples"] == 4 and check["test_split_images"] == 4 and check["seeded_random_inputs"] == 0
    assert 0.0 <= check["max_abs_diff"] <= check["tolerance"] == ONNX_TOLERANCE
    assert record["input"]["shape"] == ["batch", 3, 64, 64] and record["member"] == "model.onnx"
    assert "onnxruntime" in contents.manifest.versions
    plain = read_bundle(torch_bundle)
    assert "model.onnx" not in plain.members and "onnx" not in plain.json("model.json")


def test_the_default_export_writes_the_graph_and_reports_its_check(tmp_path):
    from typer.testing import CliRunner

    from roadwork_cli.cli.app import app
    from roadwork_cli.io.bundle import read_bundle

    run = make_tiny_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["export", "--run", str(run.root), "--out", str(tmp_path / "b.tar")])
    assert result.exit_code == 0, result.output
    assert "model.onnx: verified against PyTorch on 4 inputs" in " ".join(result.output.split())
    assert "model.onnx" in read_bundle(tmp_path / "b.tar").members


def test_export_verifies_on_random_inputs_without_a_test_split(tmp_path):
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle
    from roadwork_cli.io.bundle import read_bundle

    run = make_tiny_run(tmp_path / "run")  # splits.json with no images
    bundle = export_bundle(run, tmp_path / "b.tar", Settings(export={"onnx": True}))
    check = read_bundle(bundle).manifest.extras["onnx"]["verification"]
    assert check["test_split_images"] == 0 and check["seeded_random_inputs"] == check["samples"] == 4


def test_a_graph_that_does_not_reproduce_pytorch_is_left_out_and_the_bundle_runs_with_torch(tmp_path, monkeypatch):
    """The default export does not fail on a graph that does not verify: the bundle records why it has none."""
    from roadwork_cli.cli.info import bundle_info
    from roadwork_cli.config import Settings
    from roadwork_cli.export import OnnxSkippedWarning, export_bundle
    from roadwork_cli.io.bundle import read_bundle
    from roadwork_cli.model import onnx_graph
    from roadwork_cli.stage1 import Stage1Model, load_bundle

    run = make_tiny_run(tmp_path / "run")
    original = onnx_graph.OnnxGraph.__call__
    monkeypatch.setattr(onnx_graph.OnnxGraph, "__call__", lambda self, b: tuple(x + 1e-3 for x in original(self, b)))
    with pytest.warns(OnnxSkippedWarning, match="without model.onnx.*does not reproduce PyTorch"):
        bundle = export_bundle(run, tmp_path / "b.tar", Settings())
    contents = read_bundle(bundle)
    record = contents.manifest.extras["onnx"]
    assert "model.onnx" not in contents.members and record["member"] is None
    assert "differ by up to 0.001 (tolerance 0.0001)" in record["skipped"]
    assert contents.json("model.json")["onnx"] == record
    assert "onnxruntime" not in contents.manifest.versions  # no graph: its runtime is not part of the bundle
    monkeypatch.undo()
    assert isinstance(load_bundle(bundle), Stage1Model)
    chosen = bundle_info(bundle)["predict_runtime"]
    assert chosen["runtime"] == "torch" and chosen["reason"] == f"export left model.onnx out: {record['skipped']}"
    with pytest.raises(UsageError, match="export left it out.*does not reproduce"):
        load_bundle(bundle, runtime="onnx")


def test_a_backbone_the_exporter_cannot_express_is_warned_about_and_predict_uses_torch(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from roadwork_cli.cli.app import app
    from roadwork_cli.io.bundle import read_bundle

    run = make_tiny_run(tmp_path / "run")
    image = write_photos(tmp_path / "photos", [(80, 60)])[0]

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "warning: The bundle is written without model.onnx, so predict and serve run it with PyTorch" in said
    assert "'tiny_vit' cannot be exported to ONNX" in said and "aten::fancy" in said
    assert "model.onnx: verified" not in said
    assert "aten::fancy" in read_bundle(run.bundle).manifest.extras["onnx"]["skipped"]
    monkeypatch.undo()
    predicted = runner.invoke(app, ["predict", str(image), "--bundle", str(run.bundle), "--format", "jsonl"])
    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.stdout.splitlines()[0])["error"] is None
    forced = runner.invoke(app, ["predict", str(image), "--bundle", str(run.bundle), "--runtime", "onnx"])
    assert forced.exit_code == 2 and "export left it out" in forced.output


@pytest.mark.slow
def test_efficientnet_lite0_exports_and_matches_pytorch():
    from roadwork_cli.export import ONNX_TOLERANCE, export_onnx
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.stage1 import Stage1Model

    backbone = create_backbone("efficientnet_lite0")
    torch.manual_seed(0)
    model = Stage1Model(backbone, SelectiveHead(backbone.feature_dim, hidden=16), rule=None, device="cpu")
    data, record = export_onnx(model)
    assert len(data) > 1_000_000 and record["input"]["shape"] == ["batch", 3, 224, 224]
    assert record["verification"]["max_abs_diff"] <= ONNX_TOLERANCE


# ------------------------------------------------------------------------------------------------------ predict
def test_onnx_predictions_equal_pytorch_ones_on_the_same_bundle(onnx_run, tmp_path):
    from roadwork_cli.stage1 import OnnxStage1Model, Stage1Model, load_bundle

    _, bundle, _, photos = onnx_run
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    items = [str(p) for p in photos] + [str(tmp_path / "broken.jpg"), photos[0].read_bytes()]
    onnx_model = load_bundle(bundle)  # auto: the graph, on the CPU, in fp32
    torch_model = load_bundle(bundle, runtime="torch")
    assert isinstance(onnx_model, OnnxStage1Model) and isinstance(torch_model, Stage1Model)
    ours = onnx_model.predict(items, batch_size=3, workers=2)
    theirs = torch_model.predict(items, batch_size=3)
    assert [p.path for p in ours] == [p.path for p in theirs]
    assert [p.error is None for p in ours] == [p.error is None for p in theirs] == [True] * 5 + [False, True]
    good = [i for i, p in enumerate(theirs) if p.error is None]
    p_diff = max(abs(ours[i].p_roadwork - theirs[i].p_roadwork) for i in good)
    g_diff = max(abs(ours[i].gate - theirs[i].gate) for i in good)
    assert p_diff <= 1e-4 and g_diff <= 1e-4
    assert [p.decision for p in ours] == [p.decision for p in theirs]
    proba = onnx_model.predict_proba(items)
    assert np.isnan(proba[5]) and np.allclose(proba[good], [theirs[i].p_roadwork for i in good], atol=1e-4)


BLOCK_TORCH = """
import sys
class BlockTorch:  # what an install without torch does on `import torch`
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, BlockTorch())
"""


def test_predict_with_the_onnx_bundle_never_imports_torch(onnx_run, tmp_path):
    """Library and CLI (with --threads) on a default export, in a fresh interpreter where `import torch` fails."""
    _, bundle, _, photos = onnx_run
    script = (
        BLOCK_TORCH
        + f"""
import json
from roadwork_cli import load_bundle
model = load_bundle({str(bundle)!r})
prediction = model.predict([{str(photos[0])!r}])[0]
from roadwork_cli.cli.app import main
codes = []
for runtime in ([], ["--runtime", "onnx"], ["--runtime", "torch"]):
    sys.argv = ["roadwork", "predict", {str(photos[1])!r}, "--bundle", {str(bundle)!r}, "--format", "jsonl",
                "--threads", "1", *runtime]
    try:
        main()
    except SystemExit as exit:
        codes.append(exit.code)
print(json.dumps({{"runtime": model.runtime, "p": prediction.p_roadwork, "codes": codes,
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))}}))
"""
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    first, second, summary = lines[0], lines[1], lines[-1]
    assert first["path"] == second["path"] == str(photos[1]) and first["error"] is None and first == second
    assert summary["runtime"] == "onnx" and 0.0 <= summary["p"] <= 1.0 and summary["torch"] == []
    # --runtime torch needs PyTorch: without it, one line naming the extra and exit 2 (no traceback)
    assert summary["codes"][:2] in ([0, 0], [None, None]) and summary["codes"][2] == 2
    assert "pip install 'roadwork-cli[train]'" in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


def _rewrite(bundle: Path, out: Path, change) -> Path:
    """A copy of ``bundle`` whose members pass through ``change(name, bytes) -> bytes``, manifest kept as it was."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for info in src.getmembers():
            data = change(info.name, src.extractfile(info).read())
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out


def test_a_tampered_graph_is_refused_before_use(onnx_run, tmp_path):
    from roadwork_cli.stage1 import load_bundle

    _, bundle, _, _ = onnx_run

    def flip(name, data):
        return data if name != "model.onnx" else data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]

    tampered = _rewrite(bundle, tmp_path / "tampered.tar", flip)
    for runtime in ("auto", "onnx", "torch"):
        with pytest.raises(BundleError, match="model.onnx"):
            load_bundle(tampered, runtime=runtime)


def test_runtime_choice_follows_precision_device_and_availability(onnx_run, tmp_path, monkeypatch):
    """A bundle calibrated on bf16 features runs with PyTorch unless ONNX is forced, which warns."""
    from roadwork_cli.io.bundle import read_bundle, write_bundle
    from roadwork_cli.model import onnx_graph
    from roadwork_cli.stage1 import OnnxStage1Model, Stage1Model, load_bundle

    _, bundle, torch_bundle, _ = onnx_run
    contents = read_bundle(bundle)
    record = contents.json("model.json")
    record["recipe"]["compute_precision"] = "bf16"
    members = dict(contents.members) | {"model.json": json.dumps(record).encode()}
    bf16 = write_bundle(tmp_path / "bf16.tar", members, versions=contents.manifest.versions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(load_bundle(bf16, device="cpu"), Stage1Model)
    with pytest.warns(UserWarning, match="compute precision"):
        assert isinstance(load_bundle(bf16, runtime="onnx"), OnnxStage1Model)
    assert isinstance(load_bundle(bundle, device="cpu"), OnnxStage1Model)
    assert isinstance(load_bundle(bundle, precision="fp32"), OnnxStage1Model)
    assert isinstance(load_bundle(torch_bundle), Stage1Model)  # no graph in it
    with pytest.raises(UsageError, match="--runtime torch"):
        load_bundle(torch_bundle, runtime="onnx")
    with pytest.raises(UsageError, match="runtime"):
        load_bundle(bundle, runtime="tensorrt")
    monkeypatch.setattr(onnx_graph, "onnxruntime_available", lambda: False)
    assert isinstance(load_bundle(bundle), Stage1Model)  # without the extra: the PyTorch fallback


def test_onnx_streams_keep_input_order_and_equal_one_stream(onnx_run, tmp_path):
    """Each stream runs a session of its own with the same intra-op threads: equal scores, order, bad inputs kept."""
    from roadwork_cli.stage1 import load_bundle

    _, bundle, _, photos = onnx_run
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    items = [str(photos[0]), str(tmp_path / "broken.jpg"), *map(str, photos[1:]), str(tmp_path / "missing.jpg")]
    model = load_bundle(bundle, threads=1)
    one = model.predict(items, batch_size=2, streams=1)
    two = model.predict(items, batch_size=2, streams=2)
    again = model.predict(items, batch_size=2, streams=2)  # the sessions of the first call are reused
    assert [p.to_dict() for p in two] == [p.to_dict() for p in one] == [p.to_dict() for p in again]
    assert [p.path for p in two] == items
    assert [i for i, p in enumerate(two) if p.error] == [1, 6]
    assert model._sessions[1].qsize() == 2  # the two streams' sessions, kept for the next call
