"""The console command's shell: help, version, import hygiene, exit codes and error rendering."""

import subprocess
import sys

from typer.testing import CliRunner

from roadwork_cli import __version__
from roadwork_cli.cli.app import app

runner = CliRunner()
SUBCOMMANDS = ["split", "cache-features", "train", "calibrate", "evaluate", "export", "predict", "demo"]


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
