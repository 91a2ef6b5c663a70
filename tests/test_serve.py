"""``roadwork serve``: a real server in a subprocess on a free loopback port, checked against ``roadwork predict``.

Every loop here is bounded in count and by a deadline; the only address ever contacted is 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from roadwork_cli.cli.app import app
from roadwork_cli.serving import (
    RequestRejected,
    ServeMetrics,
    answer,
    decode_base64,
    json_entries,
    multipart_body,
)
from tests.cli.cli_helpers import export_tiny_bundle, jsonl_records, make_tiny_run

pytestmark = pytest.mark.slow

READY_DEADLINE_S = 240.0
"""A worker imports torch and loads the bundle; the test machine is shared, so readiness gets a generous bound."""

SERVER_ENV = {
    # small limits so that the refusals are reached with tiny files
    "ROADWORK_DATA__MAX_IMAGE_PIXELS": "100000",
    "ROADWORK_SERVE__MAX_BODY_BYTES": "300000",
    "ROADWORK_SERVE__MAX_IMAGES_PER_REQUEST": "8",
    "HF_HUB_OFFLINE": "1",
}


# ----------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(port: int, method: str, path: str, body: bytes | None = None, content_type: str | None = None, timeout=60):
    """``(status, headers, body bytes)``; raises only on connection-level failures."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def post_files(port: int, files: list[tuple[str, bytes]]):
    body, content_type = multipart_body(files)
    status, headers, data = http(port, "POST", "/predict", body, content_type)
    return status, headers, json.loads(data)


class ServeProcess:
    """``roadwork serve`` in a subprocess, its stderr collected by a thread."""

    def __init__(self, bundle: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        command = [sys.executable, "-m", "roadwork_cli", "serve", "--bundle", str(bundle), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [*command, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_line(self, pattern: str, deadline_s: float = 30.0) -> str:
        """The first output line matching ``pattern``, polled until the deadline (the reader thread lags a little)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no line matches {pattern!r}:\n{self.output}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}:\n{self.output}"
            try:
                if http(self.port, "GET", "/readyz", timeout=5)[0] == 200:
                    return
            except OSError:
                pass  # not listening yet: LitServe opens the port once a worker is ready
            time.sleep(0.2)  # poll interval only; the deadline bounds the wait
        raise AssertionError(f"not ready within {READY_DEADLINE_S} s:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"server did not stop within {timeout} s:\n{self.output}") from None


def jpeg(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_inputs(folder: Path) -> tuple[list[Path], list[Path]]:
    """Good JPEGs/PNGs of several sizes, and bad files of each reason kind predict reports."""
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for i, size in enumerate([(96, 72), (64, 64), (224, 224), (120, 90), (80, 160), (200, 150)]):
        path = folder / f"good_{i}.jpg"
        path.write_bytes(jpeg(size, (30 * i, 200 - 25 * i, 90 + 10 * i)))
        good.append(path)
    png = folder / "good_png.png"
    Image.new("RGB", (100, 70), (10, 200, 30)).save(png)
    good.append(png)
    bad = {
        "truncated.jpg": jpeg((200, 150), (200, 10, 10))[:400],
        "text.jpg": b"these bytes are not an image\n" * 5,
        "zero.jpg": b"",
        "too_many_pixels.jpg": jpeg((400, 300), (1, 2, 3)),  # 120,000 pixels > the server's 100,000
    }
    paths = []
    for name, data in bad.items():
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    return good, paths


def predict_records(bundle: Path, paths: list[Path]) -> dict[str, dict]:
    """``roadwork predict --format jsonl`` on ``paths`` (same limits as the server), keyed by file name."""
    env = {"ROADWORK_DATA__MAX_IMAGE_PIXELS": SERVER_ENV["ROADWORK_DATA__MAX_IMAGE_PIXELS"]}
    result = CliRunner().invoke(
        app, ["predict", *map(str, paths), "--bundle", str(bundle), "--format", "jsonl"], env=env
    )
    assert result.exit_code in (0, 1), result.output
    records = [r for r in jsonl_records(result.stdout) if "path" in r]
    return {Path(r["path"]).name: r for r in records}


def same_record(served: dict, expected: dict) -> bool:
    """Every field equal; the path is the upload's name, predict's the file's path."""
    return {**served, "path": Path(served["path"]).name} == {**expected, "path": Path(expected["path"]).name}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return export_tiny_bundle(tmp_path_factory.mktemp("serve_bundle"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[list[Path], list[Path]]:
    return make_inputs(tmp_path_factory.mktemp("serve_inputs"))


@pytest.fixture(scope="module")
def server(bundle):
    proc = ServeProcess(bundle, "--max-batch-size", "4", "--batch-timeout-ms", "20", "--workers", "1")
    try:
        proc.wait_ready()
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.output


# ----------------------------------------------------------------------------------------------- unit
def test_json_entries_decode_bytes_only_and_refuse_paths():
    data = jpeg((32, 32), (1, 2, 3))
    entries = json_entries(
        {"images": [{"name": "a.jpg", "data": base64.b64encode(data).decode()}, "%%%", {"data": 5}]}, max_images=8
    )
    assert entries[0] == ("a.jpg", data, None)
    assert entries[1][1] is None and entries[1][2].startswith("unreadable: not base64")
    assert entries[2][1] is None and entries[2][2].startswith("unreadable")
    for bad in ({"images": [{"path": "/etc/hostname"}]}, {"images": [{"url": "http://127.0.0.1/x.jpg"}]}):
        with pytest.raises(RequestRejected) as caught:
            json_entries(bad, max_images=8)
        assert caught.value.status == 400 and caught.value.kind == "path given"
    with pytest.raises(RequestRejected) as caught:
        json_entries({"images": ["x"] * 9}, max_images=8)
    assert caught.value.status == 413
    with pytest.raises(RequestRejected):
        json_entries({"images": []}, max_images=8)
    with pytest.raises(RequestRejected):
        json_entries({"images": [], "paths": ["/etc"]}, max_images=8)


def test_decode_base64_accepts_data_uri():
    data = jpeg((8, 8), (9, 9, 9))
    assert decode_base64("data:image/jpeg;base64," + base64.b64encode(data).decode()) == (data, None)


def test_answer_status_and_reason_kinds():
    good = {"path": "a", "p_roadwork": 0.9, "gate": 0.8, "decision": "roadwork", "error": None}
    bad = {"path": "b", "p_roadwork": None, "gate": None, "decision": None, "error": "unreadable: broken"}
    assert answer([good]) == (200, {"records": [good]})
    status, body = answer([good, bad])
    assert status == 422 and body["records"] == [good, bad]
    assert body["errors"] == [{"index": 1, "path": "b", "kind": "unreadable", "reason": "unreadable: broken"}]


def test_metrics_count_each_batch_once():
    metrics = ServeMetrics()
    record = {"path": "a", "p_roadwork": 0.9, "gate": 0.8, "decision": "defer", "error": None}
    batch = {"id": "7-1", "images": 3, "requests": 2}
    metrics.observe_answer({"records": [record], "batch": batch})
    metrics.observe_answer({"records": [record, record], "batch": batch})
    text = metrics.render()[0].decode()
    assert metric(text, "roadwork_serve_batch_images_count") == 1
    assert metric(text, "roadwork_serve_batch_images_sum") == 3
    assert metric(text, "roadwork_serve_decisions_total", decision="defer") == 3


def test_bad_bundle_exits_2_before_binding(tmp_path, bundle):
    broken = tmp_path / "broken.tar"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    port = free_port()
    result = CliRunner().invoke(app, ["serve", "--bundle", str(broken), "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output
    with socket.socket() as sock:  # nothing listens there
        assert sock.connect_ex(("127.0.0.1", port)) != 0


# ----------------------------------------------------------------------------------------------- end to end
def test_records_equal_predict_under_concurrent_load(server, bundle, inputs):
    good, bad = inputs
    expected = predict_records(bundle, good + bad)
    assert all(expected[p.name]["error"] is None for p in good)
    assert all(expected[p.name]["error"] is not None for p in bad)
    requests = [[p] for p in good + bad] * 3 + [good[:3], [good[3], bad[0], good[4]], bad[1:], good[2:]]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(
                lambda paths: (paths, post_files(server.port, [(p.name, p.read_bytes()) for p in paths])), requests
            )
        )
    for paths, (status, headers, body) in answers:
        failed = [p for p in paths if expected[p.name]["error"] is not None]
        assert status == (422 if failed else 200), body
        assert len(body["records"]) == len(paths)
        for path, record in zip(paths, body["records"], strict=True):
            assert record["path"] == path.name
            assert same_record(record, expected[path.name]), (record, expected[path.name])
        if failed:
            assert [e["path"] for e in body["errors"]] == [p.name for p in failed]
            assert all(e["reason"].startswith(e["kind"]) for e in body["errors"])
        assert int(headers["X-Roadwork-Batch-Images"]) >= len(paths) - len(failed)
    assert http(server.port, "GET", "/readyz")[0] == 200  # bad images did not take it down


def test_json_base64_equals_multipart(server, bundle, inputs):
    good, _ = inputs
    expected = predict_records(bundle, good[:2])
    payload = {"images": [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in good[:2]]}
    status, _, data = http(server.port, "POST", "/predict", json.dumps(payload).encode(), "application/json")
    assert status == 200
    for path, record in zip(good[:2], json.loads(data)["records"], strict=True):
        assert same_record(record, expected[path.name])
    status, _, data = http(server.port, "POST", "/predict", good[0].read_bytes(), "image/jpeg")
    assert status == 200 and same_record(
        {**json.loads(data)["records"][0], "path": good[0].name}, expected[good[0].name]
    )


def test_refusals_never_open_paths_and_keep_serving(server, inputs):
    good, _ = inputs
    port = server.port
    named = json.dumps({"images": [{"path": str(good[0])}]}).encode()
    assert http(port, "POST", "/predict", named, "application/json")[0] == 400
    _, content_type = multipart_body([])
    # a form field (not a file) holding an existing image's path is refused, never opened
    boundary = content_type.split("boundary=")[1]
    field = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="path"\r\n\r\n{good[0]}\r\n--{boundary}--\r\n'
    ).encode()
    status, _, data = http(port, "POST", "/predict", field, content_type)
    assert status == 400 and json.loads(data)["error"] == "path given"
    assert http(port, "POST", "/predict", b"hello", "text/plain")[0] == 415
    assert http(port, "POST", "/predict", b"{not json", "application/json")[0] == 400
    too_many = [(p.name, p.read_bytes()) for p in good[:1]] * 9
    assert post_files(port, too_many)[0] == 413
    big = [("big.jpg", os.urandom(400_000))]
    assert post_files(port, big)[0] == 413  # body over 300,000 bytes, refused before it is read whole
    assert http(port, "GET", "/readyz")[0] == 200


def test_info_health_docs_and_metrics(server, bundle):
    from roadwork_cli.cli.info import bundle_info
    from roadwork_cli.io.atomic import json_safe

    status, _, data = http(server.port, "GET", "/info")
    assert status == 200
    assert json.loads(data) == json.loads(json.dumps(json_safe(bundle_info(bundle), printable=True)))
    assert http(server.port, "GET", "/healthz")[0] == 200
    spec = json.loads(http(server.port, "GET", "/openapi.json")[2])
    assert {"/predict", "/healthz", "/info", "/metrics"} <= set(spec["paths"])
    assert http(server.port, "GET", "/docs")[0] == 200

    before = http(server.port, "GET", "/metrics")[2].decode()
    good = [("m.jpg", jpeg((90, 90), (5, 5, 5)))] * 3
    bad = [("t.jpg", b"not an image at all")]
    assert post_files(server.port, good)[0] == 200
    assert post_files(server.port, good + bad)[0] == 422
    status, headers, data = http(server.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    after = data.decode()

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("roadwork_serve_requests_total", path="/predict", status="200") == 1
    assert grew("roadwork_serve_requests_total", path="/predict", status="422") == 1
    assert grew("roadwork_serve_images_total") == 7
    decided = sum(grew("roadwork_serve_decisions_total", decision=d) for d in ("roadwork", "no_roadwork", "defer"))
    assert decided == 6
    assert grew("roadwork_serve_rejections_total", reason="not an image") == 1
    assert grew("roadwork_serve_request_seconds_count") == 2
    # every request that reached a worker is in exactly one batch
    assert grew("roadwork_serve_batch_requests_sum") == 2
    assert grew("roadwork_serve_batch_images_sum") == 7  # images handed to the model, the unreadable one included
    # one log line per request at INFO: client, method, path, status, milliseconds
    line = server.wait_for_line(r"INFO roadwork\.serve 127\.0\.0\.1 POST /predict 422 [0-9.]+ ms")
    assert "roadwork.serve" in line


@pytest.mark.parametrize(
    ("sig", "workers"), [(signal.SIGTERM, 2), (signal.SIGINT, 1)], ids=["SIGTERM-2-workers", "SIGINT-1-worker"]
)
def test_a_signal_drains_accepted_requests(bundle, inputs, sig, workers):
    good, _ = inputs
    files = [(p.name, p.read_bytes()) for p in good] + [(good[0].name, good[0].read_bytes())]  # 8 images a request
    proc = ServeProcess(
        bundle, "--max-batch-size", "2", "--batch-timeout-ms", "5", "--quiet", "--workers", str(workers)
    )
    proc.wait_ready()
    expected = post_files(proc.port, files)[2]["records"]
    signalled = threading.Event()
    results: list[tuple[bool, bool, str]] = []  # (started before the signal, finished after it, outcome)
    lock = threading.Lock()

    def client() -> None:
        for _ in range(200):  # bounded; stops at the first refusal after the signal
            before = not signalled.is_set()
            try:
                status, _, body = post_files(proc.port, files)
                outcome = "ok" if status == 200 and body["records"] == expected else f"status {status}"
            except OSError as exc:
                outcome = f"connection: {type(getattr(exc, 'reason', exc)).__name__}"
            with lock:
                results.append((before, signalled.is_set(), outcome))
            if outcome != "ok" and signalled.is_set():
                return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(1 for r in results if r[2] == "ok") < 12:
        time.sleep(0.05)  # wait until the load is under way (bounded)
    signalled.set()
    proc.proc.send_signal(sig)
    for thread in threads:
        thread.join(timeout=180)
    code = proc.stop(timeout=120)
    assert code == 0, proc.output
    assert not any(thread.is_alive() for thread in threads)
    match = re.search(rf"{signal.Signals(sig).name}: draining (\d+) in-flight requests", proc.output)
    assert match, proc.output
    in_flight = int(match.group(1))
    started_before = [r for r in results if r[0]]
    assert sum(1 for r in started_before if r[2] == "ok") >= 12
    # a request sent before the signal was either answered in full or refused cleanly (it reached the server after
    # the drain began, or found the port closed); none was cut off once accepted
    refused = ("ok", "status 503", "connection: ConnectionRefusedError")
    assert all(outcome in refused for _, _, outcome in started_before), started_before
    # those the server counted in flight when the signal came were all answered after it, in full
    assert sum(1 for before, after, outcome in started_before if after and outcome == "ok") >= in_flight
    assert "POST /predict" not in proc.output  # --quiet: no line per request
    # after the signal: answered, refused with 503 while draining, or refused at the socket once it closed
    assert all(
        outcome == "ok" or outcome == "status 503" or outcome.startswith("connection") for *_, outcome in results
    )


def test_a_request_not_answered_in_time_gets_504(bundle, monkeypatch):
    """The route's own deadline, driven through the ASGI app in-process with a worker that never answers."""
    import asyncio

    from litserve.server import RegularRequestHandler

    from roadwork_cli.cli.predict import stream_records
    from roadwork_cli.config import load_settings
    from roadwork_cli.serving import Server

    async def never(self, payload, request_type):
        await asyncio.sleep(60)

    monkeypatch.setattr(RegularRequestHandler, "handle_request", never)
    settings = load_settings(None, {"serve": {"request_timeout_s": 0.05, "batch_timeout_ms": 0}})
    server = Server(bundle, settings, {}, stream_records)
    body, content_type = multipart_body([("a.jpg", jpeg((32, 32), (1, 2, 3)))])
    sent: list[dict] = []

    async def call() -> None:
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/predict",
            "raw_path": b"/predict",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000),
        }
        await asyncio.wait_for(server.server.app(scope, receive, send), timeout=30)

    asyncio.run(call())
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert start["status"] == 504 and answer["error"] == "timeout"
    text = server.state.metrics.render()[0].decode()
    assert metric(text, "roadwork_serve_rejections_total", reason="timeout") == 1
    assert server.state.inflight.value == 0


def test_an_onnx_bundle_is_served_by_onnxruntime_with_predicts_records(tmp_path, inputs):
    pytest.importorskip("onnxruntime")
    run = make_tiny_run(tmp_path / "run")
    onnx_bundle = tmp_path / "onnx.tar"
    result = CliRunner().invoke(app, ["export", "--run", str(run.root), "--onnx", "--out", str(onnx_bundle)])
    assert result.exit_code == 0, result.output
    good, bad = inputs
    expected = predict_records(onnx_bundle, good[:3] + bad[:1])
    proc = ServeProcess(onnx_bundle)
    try:
        proc.wait_ready()
        status, _, body = post_files(proc.port, [(p.name, p.read_bytes()) for p in good[:3] + bad[:1]])
        assert status == 422
        for path, record in zip(good[:3] + bad[:1], body["records"], strict=True):
            assert same_record(record, expected[path.name]), (record, expected[path.name])
        assert "onnx runtime" in proc.wait_for_line(r"worker \d+ ready: ")  # the bundle's graph, as predict runs it
    finally:
        assert proc.stop() == 0, proc.output
