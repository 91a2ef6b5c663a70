"""The console command's shell: help, version, import hygiene, exit codes and error rendering."""

import json
import subprocess
import sys

import pytest
from cli_helpers import make_tiny_run
from split_helpers import write_splits
from typer.testing import CliRunner

from roadwork_cli import __version__
from roadwork_cli.cli.app import app

runner = CliRunner()
SUBCOMMANDS = [
    "split",
    "cache-features",
    "train",
    "calibrate",
    "evaluate",
    "export",
    "predict",
    "demo",
    "info",
    "backbones",
]


def test_help_lists_every_subcommand():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from typer.testing import CliRunner; from roadwork_cli.cli.app import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'timm', 'transformers', 'peft') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "roadwork_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout


def test_bad_settings_file_exits_2_with_key_and_no_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("calibration:\n  fnr: 7\n")
    result = runner.invoke(app, ["calibrate", "--config", str(config), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "calibration.fnr" in result.output
    assert "Traceback" not in result.output


def test_unknown_env_key_exits_2(tmp_path):
    result = runner.invoke(app, ["export", "--run", str(tmp_path / "run")], env={"ROADWORK_EXPORT__NOPE": "1"})
    assert result.exit_code == 2
    assert "export.nope" in result.output


def test_shell_completion_options_exist_and_produce_a_script(monkeypatch):
    result = runner.invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output
    # Typer detects the shell from the process tree; under `make` that is sh, which it has no script for.
    monkeypatch.setattr("typer.completion._get_shell_name", lambda: "bash")
    script = runner.invoke(app, ["--show-completion"], prog_name="roadwork")
    assert script.exit_code == 0 and "_ROADWORK_COMPLETE=complete_bash" in script.output


def test_backbones_lists_the_registry_with_descriptions():
    from roadwork_cli.model.backbones import list_backbones

    result = runner.invoke(app, ["backbones", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert listed == list_backbones(with_descriptions=True)
    assert {"efficientnet_lite0", "tiny_vit", "dinov3_vits16"} <= set(listed) and all(listed.values())
    table = runner.invoke(app, ["backbones"])
    assert table.exit_code == 0 and "efficientnet_lite0" in table.output and "timm:" in table.output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two bundles of one tiny run: one whose calibration certified its targets, one that did not."""
    root = tmp_path_factory.mktemp("info")
    made = {}
    for feasible in (True, False):
        run = make_tiny_run(root / f"run_{feasible}")
        params = json.loads(run.scrc_params.read_text())
        params |= {"feasible": feasible, "targets": {"alpha": 0.02, "delta": 0.1, "xi": 0.8}, "n": 40, "n_pos": 17}
        run.scrc_params.write_text(json.dumps(params))
        ids = {"a" * 64: 1, "b" * 64: 0, "c" * 64: 0}
        samples = {
            i: {"path": f"{i[:3]}.jpg", "label": label, "source": "s", "group": None} for i, label in ids.items()
        }
        splits = {"train": ["a" * 64, "b" * 64], "val_select": [], "val_calib": ["c" * 64], "test": []}
        write_splits(run, splits, samples)
        result = runner.invoke(app, ["export", "--run", str(run.root), "--allow-uncertified"])
        assert result.exit_code == 0, result.output
        made[feasible] = run.bundle
    return made


def test_info_shows_model_thresholds_certification_data_and_versions(bundles):
    result = runner.invoke(app, ["info", str(bundles[True]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["model"]["backbone"] == "tiny_vit" and info["model"]["fingerprint"]
    assert info["model"]["precision"] in {"fp32", "bf16", "fp16"}
    assert info["calibration"]["thresholds"]["lambda"] == 0.3 and info["calibration"]["thresholds"]["tau"] == 0.5
    assert info["calibration"]["certified"] is True and info["calibration"]["targets"]["alpha"] == 0.02
    assert info["calibration"]["calibration_positives"] == 17
    assert info["data"] == {
        "images": 3,
        "labels": {"roadwork": 1, "no_roadwork": 2},
        "splits": {"train": 2, "val_select": 0, "val_calib": 1, "test": 0},
    }
    assert {"roadwork", "torch", "bundle_format"} <= set(info["versions"])

    table = " ".join(runner.invoke(app, ["info", str(bundles[True])]).output.split())
    assert "certified: FNR on exits <= 0.02" in table and "tiny_vit" in table


def test_info_of_an_uncertified_bundle_says_no_guarantee(bundles):
    info = json.loads(runner.invoke(app, ["info", str(bundles[False]), "--json"]).stdout)
    assert info["calibration"]["certified"] is False
    table = " ".join(runner.invoke(app, ["info", str(bundles[False])]).output.split())
    assert "no guarantee (targets not certified)" in table and "certified: FNR" not in table


def test_info_verifies_the_bundle_and_does_not_import_torch(bundles, tmp_path):
    code = (
        "import sys; from typer.testing import CliRunner; from roadwork_cli.cli.app import app; "
        f"r = CliRunner().invoke(app, ['info', {str(bundles[True])!r}]); assert r.exit_code == 0, r.output; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    tampered = tmp_path / "tampered.tar"
    data = bytearray(bundles[True].read_bytes())
    at = data.find(b'"tau"')
    assert at > 0
    data[at : at + 5] = b'"TAU"'
    tampered.write_bytes(bytes(data))
    result = runner.invoke(app, ["info", str(tampered)])
    assert result.exit_code == 2 and "Traceback" not in result.output
