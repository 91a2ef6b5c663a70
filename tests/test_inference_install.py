"""The inference-only install: `roadwork-cli` without extras runs an ONNX bundle with no torch anywhere.

The environment is built the way pip would fill it, without the network: a fresh venv whose site dir links to exactly
the distributions that pyproject.toml's core ``dependencies`` pull in (resolved through the installed distributions'
metadata, extras of requirements such as ``uvicorn[standard]`` included), taken from this interpreter's environment.
So a core dependency added to pyproject follows here by itself, and a module that the ONNX path imports but the core
does not list fails this test. ``predict``, ``info``, the NATIX detector and ``serve`` then run a bundle exported by
default; ``import torch`` must fail there, and commands that need PyTorch must say which extra to install.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cli.cli_helpers import make_tiny_run, write_images

import roadwork_cli

pytestmark = pytest.mark.slow  # a venv, a bundle export and a server start: about 20 s
pytest.importorskip("onnxruntime")
packaging_requirements = pytest.importorskip("packaging.requirements")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(roadwork_cli.__file__).resolve().parent.parent
LEFT_OUT = ("torch", "torchvision", "timm", "transformers", "peft", "sklearn", "scipy", "onnx", "matplotlib")
"""What an inference container must not carry (the `train` extra brings them)."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def core_distributions(pyproject: Path) -> set[str]:
    """The distributions ``pip install roadwork-cli`` (no extras) installs: pyproject's core deps, transitively."""
    Requirement = packaging_requirements.Requirement
    queue = [Requirement(spec) for spec in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    seen: dict[str, set[str]] = {}  # distribution -> extras already followed
    while queue:
        requirement = queue.pop()
        name = _canonical(requirement.name)
        extras = set(requirement.extras)
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        for spec in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(spec)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in ("", *seen[name])):
                queue.append(child)
    return set(seen)


def link_site(site: Path, distributions: set[str]) -> None:
    """Symlinks in ``site`` to every top-level file and folder (dist-info included) of ``distributions``."""
    site.mkdir(parents=True)
    for dist in importlib.metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        if name not in distributions or name == "roadwork-cli":  # roadwork_cli itself comes from this checkout
            continue
        root = Path(dist.locate_file(""))
        tops = {Path(str(file)).parts[0] for file in dist.files or []}
        for top in sorted(tops - {"..", "__pycache__"}):
            if (root / top).exists() and not (site / top).exists():
                (site / top).symlink_to(root / top)


@pytest.fixture(scope="module")
def core_env(tmp_path_factory):
    """``(python, env, bundle, image)``: the inference-only venv, and a default-exported bundle made beside it."""
    root = tmp_path_factory.mktemp("core_install")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    link_site(root / "site", core_distributions(REPO / "pyproject.toml"))
    # The site dir of links, then this checkout's roadwork_cli (the tree under test, not an installed copy).
    (Path(purelib) / "roadwork_core.pth").write_text(f"{root / 'site'}\n{REPO}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}

    run = make_tiny_run(root / "run")
    from roadwork_cli.config import Settings
    from roadwork_cli.export import export_bundle

    bundle = export_bundle(run, root / "bundle.tar", Settings())  # the default: with model.onnx
    export_bundle(run, root / "torch.tar", Settings(export={"onnx": False}))
    image = write_images(root / "images", 1)[0]
    return python, env, bundle, image


def run_in(core_env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    python, env, _, _ = core_env
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_the_core_install_has_no_torch_and_a_default_bundle_predicts_in_it(core_env):
    _, _, bundle, image = core_env
    probe = "import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in %r}))"
    found = json.loads(run_in(core_env, "-c", probe % (LEFT_OUT + ("onnxruntime", "litserve"),)).stdout)
    assert found == {**dict.fromkeys(LEFT_OUT, False), "onnxruntime": True, "litserve": True}

    done = run_in(core_env, "-m", "roadwork_cli", "predict", str(image), "--bundle", str(bundle), "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    [record] = [json.loads(line) for line in done.stdout.splitlines()]
    from roadwork_cli.stage1 import load_bundle

    [expected] = load_bundle(bundle).predict([str(image)])  # the same graph in the full install
    assert record["error"] is None and record["decision"] == expected.decision
    assert abs(record["p_roadwork"] - expected.p_roadwork) <= 1e-6

    info = run_in(core_env, "-m", "roadwork_cli", "info", str(bundle), "--json")
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["predict_runtime"]["runtime"] == "onnx"


def test_the_natix_detector_runs_the_bundle_in_the_core_install(core_env, tmp_path):
    _, _, bundle, image = core_env
    remap = tmp_path / "remap.json"
    remap.write_text(json.dumps({"threshold": 0.3, "epsilon": 0.01}))
    script = (
        "from PIL import Image; from roadwork_cli.natix import NatixPredictor; "
        f"detector = NatixPredictor.from_files({str(bundle)!r}, {str(remap)!r}, device='cpu'); "
        f"print(detector.model.runtime, detector(Image.open({str(image)!r})))"
    )
    done = run_in(core_env, "-c", script)
    assert done.returncode == 0, done.stderr
    runtime, value = done.stdout.split()
    from roadwork_cli.natix import NatixPredictor

    expected = NatixPredictor.from_files(bundle, remap)(__import__("PIL.Image").Image.open(image))
    assert runtime == "onnx" and abs(float(value) - expected) <= 1e-6


def test_commands_that_need_pytorch_name_the_extra_in_the_core_install(core_env, tmp_path):
    _, _, bundle, image = core_env
    for args in (
        ["predict", str(image), "--bundle", str(bundle), "--runtime", "torch"],
        ["predict", str(image), "--bundle", str(bundle.with_name("torch.tar"))],  # no model.onnx
        ["serve", "--bundle", str(bundle.with_name("torch.tar")), "--port", str(_free_port())],
        ["train", "--run", str(tmp_path / "run")],
        ["cache-features", "--run", str(tmp_path / "run")],
    ):
        done = run_in(core_env, "-m", "roadwork_cli", *args)
        said = " ".join(done.stderr.split())
        assert done.returncode == 2, (args, done.stderr)
        assert "pip install 'roadwork-cli[train]'" in said and "Traceback" not in said, (args, said)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_answers_from_the_bundle_in_the_core_install(core_env):
    python, env, bundle, image = core_env
    port = _free_port()
    server = subprocess.Popen(
        [str(python), "-m", "roadwork_cli", "serve", "--bundle", str(bundle), "--port", str(port), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "not ready within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.2)  # poll interval only: not listening yet, or 503 until the worker is warm
        body = json.dumps({"images": [{"name": "a.jpg", "data": base64.b64encode(image.read_bytes()).decode()}]})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/predict", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as response:
            info = json.loads(response.read())
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    records = answer["records"]
    assert records[0]["path"] == "a.jpg" and records[0]["error"] is None and 0 <= records[0]["p_roadwork"] <= 1
    assert info["predict_runtime"]["runtime"] == "onnx" and code == 0
