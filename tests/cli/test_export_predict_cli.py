"""export + predict end to end on a tiny run built by hand (tiny_vit backbone, random head, fixed thresholds)."""

from __future__ import annotations

import csv
import io
import json

import pytest
from cli_helpers import export_tiny_bundle, jsonl_records, make_tiny_run, write_images
from split_helpers import write_splits
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.errors import BundleError

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return export_tiny_bundle(tmp_path_factory.mktemp("run"))


def test_export_writes_contract_members(bundle):
    from roadwork_cli.io.bundle import read_bundle

    contents = read_bundle(bundle)
    assert {"model.json", "model_best.safetensors", "scrc_params.json", "scaling.json", "splits.json"} <= set(
        contents.members
    )
    assert "metrics.csv" in contents.members
    model = contents.json("model.json")
    assert model["backbone"]["spec"]["name"] == "tiny_vit"
    assert model["backbone"]["fingerprint"]
    assert model["backbone"]["weights_member"] is None  # tiny_vit is recreated from its name
    assert "torch" in contents.manifest.versions and "python" in contents.manifest.versions


def test_good_inputs_exit_0_with_one_record_each(bundle, tmp_path):
    paths = write_images(tmp_path / "imgs")
    result = runner.invoke(app, ["predict", *map(str, paths), "--bundle", str(bundle), "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    records = jsonl_records(result.stdout)
    assert [r["path"] for r in records] == [str(p) for p in paths]
    for r in records:
        assert set(r) == {"path", "p_roadwork", "gate", "decision", "error"}
        assert r["error"] is None
        assert 0.0 <= r["p_roadwork"] <= 1.0 and 0.0 <= r["gate"] <= 1.0
        assert r["decision"] in {"roadwork", "no_roadwork", "defer"}


def test_decisions_follow_the_thresholds(tmp_path):
    """lambda above every gate -> all defer; lambda None-like low and tau 0 -> all roadwork."""
    paths = write_images(tmp_path / "imgs")
    for lam, tau, expected in ((1.1, 0.5, "defer"), (-1.0, 0.0, "roadwork"), (-1.0, 1.1, "no_roadwork")):
        run = make_tiny_run(tmp_path / f"run_{lam}_{tau}", lam=lam, tau=tau)
        assert runner.invoke(app, ["export", "--run", str(run.root)]).exit_code == 0
        result = runner.invoke(app, ["predict", *map(str, paths), "--bundle", str(run.bundle), "--format", "jsonl"])
        assert result.exit_code == 0, result.output
        assert {r["decision"] for r in jsonl_records(result.stdout)} == {expected}


def test_broken_and_missing_files_get_error_records_and_exit_1(bundle, tmp_path):
    good = write_images(tmp_path / "imgs", n=2)
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:200])
    missing = tmp_path / "nope.jpg"
    args = [str(good[0]), str(broken), str(missing), str(good[1])]
    result = runner.invoke(app, ["predict", *args, "--bundle", str(bundle), "--format", "jsonl"])
    assert result.exit_code == 1
    records = jsonl_records(result.stdout)
    assert [r["path"] for r in records] == args
    assert records[0]["error"] is None and records[3]["error"] is None
    for bad in records[1:3]:
        assert bad["error"] and bad["decision"] is None and bad["p_roadwork"] is None
    assert "not found" in records[2]["error"]


def test_folder_glob_stdin_and_csv(bundle, tmp_path):
    paths = write_images(tmp_path / "imgs" / "nested", n=2)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    result = runner.invoke(app, ["predict", str(tmp_path / "imgs"), "--bundle", str(bundle), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # the .txt file is not an image input
    assert set(rows[0]) == {"path", "p_roadwork", "gate", "decision", "error"}

    pattern = str(tmp_path / "imgs" / "**" / "*.jpg")
    result = runner.invoke(app, ["predict", pattern, "--bundle", str(bundle), "--format", "jsonl"])
    assert [r["path"] for r in jsonl_records(result.stdout)] == [str(p) for p in paths]

    stdin = "\n".join(str(p) for p in paths) + "\n"
    result = runner.invoke(app, ["predict", "-", "--bundle", str(bundle), "--format", "jsonl"], input=stdin)
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in jsonl_records(result.stdout)] == [str(p) for p in paths]

    result = runner.invoke(app, ["predict", str(tmp_path / "none_*.jpg"), "--bundle", str(bundle)])
    assert result.exit_code == 1


def test_image_bytes_on_stdin(bundle, tmp_path):
    """`cat img.jpg | roadwork predict - --probability-only`: the validator-style one-image call."""
    image = write_images(tmp_path / "imgs", n=1)[0]
    by_path = runner.invoke(app, ["predict", str(image), "--bundle", str(bundle), "--format", "jsonl"])
    piped = runner.invoke(app, ["predict", "-", "--bundle", str(bundle), "--format", "jsonl"], input=image.read_bytes())
    assert piped.exit_code == 0, piped.output
    (record,) = jsonl_records(piped.stdout)
    assert record["path"] == "<stdin>"
    assert record["p_roadwork"] == pytest.approx(jsonl_records(by_path.stdout)[0]["p_roadwork"], abs=1e-6)
    broken = runner.invoke(app, ["predict", "-", "--bundle", str(bundle)], input=image.read_bytes()[:100])
    assert broken.exit_code == 1


def test_out_file_and_probability_only(bundle, tmp_path):
    paths = write_images(tmp_path / "imgs", n=2)
    out = tmp_path / "preds.jsonl"
    result = runner.invoke(app, ["predict", *map(str, paths), "--bundle", str(bundle), "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = jsonl_records(out.read_text())
    assert len(records) == 2
    result = runner.invoke(app, ["predict", *map(str, paths), "--bundle", str(bundle), "--probability-only"])
    assert result.exit_code == 0
    values = [float(line) for line in result.stdout.split()]
    assert values == pytest.approx([r["p_roadwork"] for r in records], abs=1e-6)


def test_tampered_bundle_exits_2_naming_the_member(bundle, tmp_path):
    raw = bytearray(bundle.read_bytes())
    offset = bytes(raw).index(b'"thresholds"')
    raw[offset + 2] ^= 0x20
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(raw))
    image = write_images(tmp_path / "imgs", n=1)[0]
    result = runner.invoke(app, ["predict", str(image), "--bundle", str(bad)])
    assert result.exit_code == 2
    assert "scrc_params.json" in result.output


def test_library_five_liner(bundle, tmp_path):
    image = write_images(tmp_path / "imgs", n=1)[0]
    from roadwork_cli import load_bundle

    m = load_bundle(str(bundle))
    preds = m.predict([str(image)])
    assert preds[0].decision in {"roadwork", "no_roadwork", "defer"} and preds[0].error is None
    from PIL import Image

    same = m.predict([Image.open(image)])[0]
    assert same.p_roadwork == pytest.approx(preds[0].p_roadwork, abs=1e-6)
    proba = m.predict_proba([str(image), str(tmp_path / "missing.jpg")])
    assert proba[0] == pytest.approx(preds[0].p_roadwork) and proba[1] != proba[1]  # NaN for the missing file


def test_embedded_backbone_weights_and_fingerprint_check(tmp_path):
    """A backbone from a local weights file is embedded; a bundle whose weights differ is refused on load."""
    import torch
    from safetensors.torch import save_file

    from roadwork_cli import load_bundle
    from roadwork_cli.model.backbones import create_backbone

    state = {k: v.clone() + 0.01 for k, v in create_backbone("tiny_vit").model.state_dict().items()}
    weights = tmp_path / "tiny.safetensors"
    save_file(state, str(weights))
    run = make_tiny_run(tmp_path / "run", weights_file=weights)
    result = runner.invoke(app, ["export", "--run", str(run.root), "--out", str(tmp_path / "b.tar")])
    assert result.exit_code == 0, result.output
    # Exported without the weights: rebuilding tiny_vit from its name gives other weights -> refused on load.
    result = runner.invoke(
        app,
        ["export", "--run", str(run.root), "--out", str(tmp_path / "c.tar")],
        env={"ROADWORK_EXPORT__INCLUDE_BACKBONE_WEIGHTS": "never"},
    )
    assert result.exit_code == 0, result.output
    with pytest.raises(BundleError, match="fingerprint"):
        load_bundle(tmp_path / "c.tar", runtime="torch")
    assert load_bundle(tmp_path / "c.tar", backbone_weights=weights).info["backbone"]["weights_member"] is None
    assert load_bundle(tmp_path / "c.tar").runtime == "onnx"  # model.onnx carries the weights it was exported with

    weights.unlink()  # the bundle with embedded weights must not need the original file
    model = load_bundle(tmp_path / "b.tar", runtime="torch")
    assert model.info["backbone"]["weights_member"] == "backbone.safetensors"
    assert torch.equal(model.backbone.model.state_dict()["cls_token"], state["cls_token"])


def test_model_json_records_the_decode_recipe_and_precision(bundle):
    from roadwork_cli.io.bundle import read_bundle

    recipe = read_bundle(bundle).json("model.json")["recipe"]
    assert recipe["decode"]["jpeg_draft"] is True and recipe["decode"]["draft_side"] > 0
    assert recipe["compute_precision"] == "fp32"  # CPU, precision auto
    assert recipe["preprocessing"]["size"] > 0 and len(recipe["preprocessing"]["mean"]) == 3


def test_export_of_an_uncertified_run_needs_the_flag_and_warns(tmp_path):
    from roadwork_cli.io.atomic import atomic_write_json, read_json

    run = make_tiny_run(tmp_path / "run")
    atomic_write_json(run.scrc_params, read_json(run.scrc_params) | {"feasible": False})
    refused = runner.invoke(app, ["export", "--run", str(run.root)])
    assert refused.exit_code == 2
    assert "--allow-uncertified" in refused.output and not run.bundle.exists()
    allowed = runner.invoke(app, ["export", "--run", str(run.root), "--allow-uncertified"])
    assert allowed.exit_code == 0, allowed.output
    assert "warning" in allowed.output and "no guarantee" in allowed.output and run.bundle.is_file()


def test_bundle_splits_hold_no_absolute_machine_paths(tmp_path):
    from roadwork_cli.io.bundle import read_bundle

    run = make_tiny_run(tmp_path / "run")
    source = tmp_path / "photos"
    samples = {
        "a" * 64: {"path": str(run.root / "synthetic" / "x.jpg"), "label": 1, "source": "synthetic:4", "group": None},
        "b" * 64: {"path": str(source / "roadwork" / "y.jpg"), "label": 1, "source": str(source), "group": None},
        "c" * 64: {"path": str(source / "t.parquet") + "#row=3", "label": 0, "source": str(source), "group": "g"},
        "d" * 64: {"path": "/elsewhere/z.jpg", "label": 0, "source": str(tmp_path / "list.csv"), "group": None},
    }
    table = write_splits(run, {"train": sorted(samples)}, samples)
    result = runner.invoke(app, ["export", "--run", str(run.root)])
    assert result.exit_code == 0, result.output
    member = read_bundle(run.bundle).members["splits.json"].decode()
    assert str(tmp_path) not in member and '"/' not in member
    exported = json.loads(member)
    assert exported["splits"] == table["splits"]
    paths = {k: v["path"] for k, v in exported["samples"].items()}
    assert paths == {
        "a" * 64: "synthetic/x.jpg",
        "b" * 64: "roadwork/y.jpg",
        "c" * 64: "t.parquet#row=3",
        "d" * 64: None,  # under neither the run nor its source: dropped, the id still names the image
    }
    assert exported["samples"]["b" * 64]["source"] == "photos"


def test_export_refuses_a_calibration_made_from_changed_inputs(tmp_path):
    from roadwork_cli.io.provenance import record

    run = make_tiny_run(tmp_path / "run")
    record(run, "calibrate", [run.splits])
    write_splits(run, {}, {}, seed=1)  # another split than make_tiny_run's
    result = runner.invoke(app, ["export", "--run", str(run.root)])
    assert result.exit_code == 2 and "calibrate" in result.output


def test_no_onnx_overrides_a_settings_file_that_asks_for_the_graph(tmp_path):
    import tarfile

    run = make_tiny_run(tmp_path / "run")
    config = tmp_path / "onnx.yaml"
    config.write_text("export:\n  onnx: true\n")
    result = runner.invoke(app, ["export", "--run", str(run.root), "--config", str(config), "--no-onnx"])
    assert result.exit_code == 0, result.output
    with tarfile.open(run.bundle) as tar:
        assert "model.onnx" not in tar.getnames()
    assert "onnx: false" in (run.root / "config.yaml").read_text()  # the stage records what it used
