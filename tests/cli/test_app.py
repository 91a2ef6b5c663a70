"""The console command's shell: help, version, import hygiene, exit codes and error rendering."""

import json
import re
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
    "serve",
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
        result = runner.invoke(app, ["export", "--run", str(run.root), "--allow-uncertified", "--no-onnx"])
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


def _commands():
    """``(name, click command)`` of every subcommand, and the root group's context."""
    import typer

    group = typer.main.get_command(app)
    ctx = group.make_context("roadwork", [], resilient_parsing=True)
    return [(name, group.get_command(ctx, name)) for name in group.list_commands(ctx)], ctx


def test_every_subcommand_takes_config_as_the_readme_says():
    commands, ctx = _commands()
    assert sorted(name for name, _ in commands) == sorted(SUBCOMMANDS)
    for flag in ("--config", "--debug"):
        lacking = [
            name for name, command in commands if flag not in {o for p in command.get_params(ctx) for o in p.opts}
        ]
        assert lacking == [], flag


@pytest.mark.parametrize("argv", [["info", "missing.tar"], ["backbones"]])
def test_config_is_read_by_info_and_backbones(tmp_path, argv):
    config = tmp_path / "bad.yaml"
    config.write_text("runtime:\n  devise: cpu\n")
    result = runner.invoke(app, [*argv, "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert "runtime.devise" in result.output and "Traceback" not in result.output


def test_help_shows_the_settings_defaults_and_no_placeholder_on_switches():
    for argv, expected in [
        (["calibrate"], ["calibration.fnr = 0.02", "calibration.coverage = 0.8", "calibration.delta = 0.1"]),
        (["train"], ["train.mode = train_cached", "train.epochs = 30"]),
    ]:
        result = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
        for text in expected:
            assert text in result.output, (argv, text)
    for argv in (["export"], ["train"], []):
        result = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "200"})
        switches = [
            line for line in result.output.splitlines() if re.search(r"--(json|debug|help|onnx|version)\b", line)
        ]
        assert switches and not any("<bool>" in line for line in switches), switches


def test_every_default_shown_in_help_is_the_settings_default():
    """``setting_default`` writes values down to keep --help fast; each one must equal ``Settings``' default."""
    from roadwork_cli.config import Settings

    settings, shown = Settings(), 0
    commands, ctx = _commands()
    for name, command in commands:
        for param in command.get_params(ctx):
            match = re.fullmatch(r"(\w+)\.(\w+) = (.+)", str(param.show_default)) if param.show_default else None
            if match is None:
                continue
            section, key, text = match.groups()
            value = getattr(getattr(settings, section), key)
            expected = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)
            assert text == (expected.lower() if isinstance(value, bool) else expected), (name, param.opts, value)
            shown += 1
    assert shown >= 10


def _help_text(argv: list[str]) -> str:
    """``--help`` of ``argv`` as one line of words, the panel's borders removed (wrapped cells join up again)."""
    output = runner.invoke(app, [*argv, "--help"], env={"COLUMNS": "200"}).output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


def test_backbone_and_onnx_help_say_where_to_look_and_what_happens():
    backbone = _help_text(["cache-features"])
    assert "`roadwork backbones` lists them" in backbone or "roadwork backbones lists them" in backbone
    onnx = _help_text(["export"])
    assert "--no-onnx leaves it out" in onnx and "export.onnx = true" in onnx
    assert "roadwork info BUNDLE" in onnx
    runtime = _help_text(["predict"])
    assert "--runtime" in runtime and "predict.runtime = auto" in runtime


def test_completion_offers_mode_format_backbone_and_device_values():
    from roadwork_cli.cli.common import complete_backbone, complete_setting_choices
    from roadwork_cli.model.backbones import list_backbones

    assert complete_setting_choices("train.mode")("train") == ["train_cached", "train", "train_crc"]
    assert complete_setting_choices("predict.format")("") == ["auto", "table", "jsonl", "csv"]
    names = [name for name, _ in complete_backbone("")]
    assert set(list_backbones()) <= set(names) and {"timm:", "hf:"} <= set(names)
    assert [name for name, _ in complete_backbone("tiny_")] == [n for n in list_backbones() if n.startswith("tiny_")]


@pytest.mark.parametrize(
    "words,expected",
    [
        ("roadwork train --mode train_c", {"train_cached", "train_crc"}),
        ("roadwork predict x.jpg --format j", {"jsonl"}),
        ("roadwork cache-features --backbone tiny_", {"tiny_vit", "tiny_dinov3"}),
        ("roadwork demo --device cu", {"cuda"}),
    ],
)
def test_shell_completion_through_clicks_protocol(words, expected):
    """What bash gets back when it asks (``_ROADWORK_COMPLETE=complete_bash``), as --install-completion sets up."""
    env = {"_ROADWORK_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
    result = runner.invoke(app, [], prog_name="roadwork", env=env)
    assert set(result.output.split()) == expected, result.output


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    run = make_tiny_run(tmp_path_factory.mktemp("info_onnx") / "run")
    result = runner.invoke(app, ["export", "--run", str(run.root)])  # with model.onnx by default
    assert result.exit_code == 0, result.output
    return run.bundle


def test_info_shows_the_onnx_difference_and_the_runtime_predict_will_use(onnx_bundle, bundles, tmp_path):
    import tarfile

    from roadwork_cli.stage1 import load_bundle

    with tarfile.open(onnx_bundle) as tar:
        recorded = json.loads(tar.extractfile("model.json").read())["onnx"]["verification"]["max_abs_diff"]
    info = json.loads(runner.invoke(app, ["info", str(onnx_bundle), "--json"]).stdout)
    assert info["onnx"]["max_abs_diff"] == recorded and info["onnx"]["tolerance"] == 1e-4
    assert info["predict_runtime"]["runtime"] == "onnx" == load_bundle(onnx_bundle).runtime
    table = " ".join(runner.invoke(app, ["info", str(onnx_bundle)], env={"COLUMNS": "200"}).output.split())
    assert f"onnx (model.onnx verified at export, max |Δp| {recorded:.2g}" in table

    # The settings decide as they do for predict: a GPU device means PyTorch, and info says why.
    config = tmp_path / "gpu.yaml"
    config.write_text("runtime:\n  device: cuda\n")
    on_gpu = json.loads(runner.invoke(app, ["info", str(onnx_bundle), "--json", "--config", str(config)]).stdout)
    assert on_gpu["predict_runtime"]["runtime"] == "torch" and "cuda" in on_gpu["predict_runtime"]["reason"]

    plain = json.loads(runner.invoke(app, ["info", str(bundles[True]), "--json"]).stdout)
    assert plain["onnx"] is None and plain["predict_runtime"]["runtime"] == "torch"
    assert load_bundle(bundles[True]).runtime == "torch"
    table = " ".join(runner.invoke(app, ["info", str(bundles[True])], env={"COLUMNS": "200"}).output.split())
    assert "torch (no model.onnx in the bundle)" in table


def test_python_warnings_are_rendered_as_one_line_without_a_source_path(bundles):
    """A raw `warnings.warn` inside a command prints `warning: …`, never Python's `file.py:N: UserWarning: …`."""
    import warnings

    from roadwork_cli.cli import info as info_module

    def noisy(*args, **kwargs):
        warnings.warn("something worth knowing", UserWarning, stacklevel=1)
        warnings.warn("a library's deprecation", FutureWarning, stacklevel=1)
        return original(*args, **kwargs)

    original = info_module.bundle_info
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(info_module, "bundle_info", noisy)
        result = runner.invoke(app, ["info", str(bundles[True])])
        debugged = runner.invoke(app, ["info", str(bundles[True]), "--debug"])
    assert result.exit_code == 0, result.output
    assert "warning: something worth knowing" in result.output
    assert "warning (FutureWarning): a library's deprecation" in result.output
    assert ".py:" not in result.output and "UserWarning" not in result.output
    assert "test_app.py:" in debugged.output  # --debug says where it came from
    assert warnings.showwarning.__module__ == "warnings"  # Python's renderer is back after the command


def test_bracketed_text_in_errors_and_info_is_printed_not_taken_as_markup(onnx_bundle, monkeypatch):
    """`pip install 'roadwork-cli[onnx]'` used to print as `'roadwork-cli'`: rich read `[onnx]` as a style."""
    from roadwork_cli.model import onnx_graph

    monkeypatch.setattr(onnx_graph, "onnxruntime_available", lambda: False)
    table = " ".join(runner.invoke(app, ["info", str(onnx_bundle)], env={"COLUMNS": "200"}).output.split())
    assert "torch (onnxruntime is not installed: pip install onnxruntime;" in table

    from roadwork_cli.cli import info as info_module
    from roadwork_cli.errors import UsageError

    def refuse(*args, **kwargs):
        raise UsageError("needs the extra: pip install 'roadwork-cli[onnx]'")

    monkeypatch.setattr(info_module, "bundle_info", refuse)
    result = runner.invoke(app, ["info", str(onnx_bundle)])
    assert result.exit_code == 2 and "pip install 'roadwork-cli[onnx]'" in result.output


@pytest.mark.parametrize(
    "has_graph,recorded,device,precision,weights,expected,why",
    [
        (False, "fp32", "auto", "auto", None, "torch", "no model.onnx"),
        (True, "fp32", "cuda:0", "auto", None, "torch", "runtime.device is cuda:0"),
        (True, "bf16", "cpu", "auto", None, "torch", "computed in bf16"),
        (True, "fp32", "cpu", "fp16", None, "torch", "computed in fp16"),
        (True, "fp32", "auto", "auto", "w.safetensors", "torch", "backbone weights"),
        (True, None, "cpu", "fp32", None, "onnx", "without torch"),
    ],
)
def test_choose_runtime_names_the_reason_info_prints(has_graph, recorded, device, precision, weights, expected, why):
    pytest.importorskip("onnxruntime")
    from roadwork_cli.stage1 import choose_runtime

    runtime, reason = choose_runtime(has_graph, recorded, device, precision, weights)
    assert runtime == expected and why in reason
