"""``roadwork serve`` as a library: one verified bundle behind HTTP, with LitServe's dynamic batching.

The process layout is LitServe's: this process binds the port and supervises; one forked API server (FastAPI on
uvicorn) parses requests, answers health, info and metrics, and logs; ``workers`` spawned inference processes each
load the bundle once with :func:`roadwork_cli.stage1.load_bundle` (the same ``ScoringModel`` that ``predict`` runs,
ONNX when the bundle has a graph) and gather up to ``max_batch_size`` requests into one forward pass.

What a request may hold, and what it never does:

- ``POST /predict`` takes multipart files (any field name), JSON ``{"images": [{"name": ..., "data": BASE64}, ...]}``
  (a bare base64 string per image works too) or one raw ``image/*`` body. Only the bytes sent are decoded: a request
  naming a path or URL is refused, so the server never opens a file a client names.
- Each image's record is exactly ``predict --format jsonl``'s (``records`` builds it with ``predict``'s own function,
  passed in by the command), with ``path`` = the upload's name. 200 when every image was read; 422 when any was not,
  with every record (good ones too) and ``errors`` giving each failure's reason and its kind (``reason_kind``, the
  words ``predict``'s summary counts).
- Too large a body is 413 before it is read whole; too many images 413; a request not answered within
  ``request_timeout_s`` 504; while draining 503.

SIGTERM and SIGINT drain: new requests get 503 and ``/readyz`` turns 503, requests already accepted are answered, then
the workers stop and :meth:`Server.run` returns (the command exits 0).

LitServe moves work between its processes through multiprocessing queues, which pickle; only this server's own
processes are on either end, and what crosses is ``(name, bytes)`` tuples and record dicts built here: nothing a
client sends is ever unpickled.

Batch sizes are observed in the API server from the batch record each worker attaches to its answers (worker pid +
sequence number, counted once per batch), so every metric lives in that one process and ``/metrics`` needs no
multiprocess collector.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from roadwork_cli.data.pixels import reason_kind
from roadwork_cli.errors import UsageError

if TYPE_CHECKING:
    from roadwork_cli.config import Settings

LOG = logging.getLogger("roadwork_cli.serving")

PREDICT_PATH = "/predict"
HEALTHZ_PATH = "/healthz"
READYZ_PATH = "/readyz"
INFO_PATH = "/info"
METRICS_PATH = "/metrics"
LITSERVE_INFO_PATH = "/server-info"
"""LitServe's own description of its workers and limits (``/info`` is the bundle's)."""
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
"""Addresses LitServe binds: loopback, or every interface (IPv4 / IPv6)."""

Entry = tuple[str, "bytes | None", "str | None"]
"""``(name, encoded image bytes | None, error | None)`` per image, as ``predict``'s ``expand_inputs`` gives them."""
RecordStream = Callable[[list[Entry], Iterator[Any]], Iterable[dict[str, Any]]]
"""``predict``'s record builder: entries + the model's predictions for the good ones -> one record per entry."""

_PATH_KEYS = ("path", "file", "filename", "url", "uri")


def configure_log(quiet: bool) -> None:
    """One line per event on stderr (``time LEVEL roadwork.serve message``); INFO unless ``quiet``.

    Called by the command and again in each spawned worker, which starts with a fresh interpreter.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s roadwork.serve %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(logging.WARNING if quiet else logging.INFO)
    LOG.propagate = False


class RequestRejected(Exception):
    """A request the server answers with a 4xx before any image reaches a worker.

    Attributes:
        status: The HTTP status.
        kind: Short reason for the rejections metric.
        message: What the client is told.
    """

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


# ----------------------------------------------------------------------------------------------- request parsing
def decode_base64(data: Any) -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` of one base64 image (a ``data:...;base64,`` prefix is allowed) or ``(None, reason)``."""
    if not isinstance(data, str):
        return None, f"unreadable: image data must be a base64 string, got {type(data).__name__}"
    text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    try:
        return base64.b64decode(text, validate=True), None
    except (binascii.Error, ValueError) as exc:
        return None, f"unreadable: not base64 ({exc})"


def json_entries(payload: Any, max_images: int) -> list[Entry]:
    """The images of a JSON body: ``{"images": [{"name": str, "data": base64} | base64, ...]}``.

    Raises:
        RequestRejected: Not that shape, no images, too many, or an image given as a path or URL (never opened).
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
        raise RequestRejected(400, "bad request", 'JSON body must be {"images": [{"name": ..., "data": BASE64}, ...]}')
    unknown = sorted(set(payload) - {"images"})
    if unknown:
        raise RequestRejected(400, "bad request", f"unknown JSON keys {unknown}; only 'images' is read")
    images = payload["images"]
    _check_count(len(images), max_images)
    entries: list[Entry] = []
    for index, item in enumerate(images):
        name = f"<image {index}>"
        if isinstance(item, dict):
            named = [key for key in _PATH_KEYS if key in item]
            if named:
                raise RequestRejected(
                    400,
                    "path given",
                    f"image {index} names a {named[0]}; this server never opens paths or URLs: send the bytes as "
                    "base64 in 'data'",
                )
            extra = sorted(set(item) - {"name", "data"})
            if extra:
                raise RequestRejected(400, "bad request", f"image {index}: unknown keys {extra} (use name, data)")
            name = str(item.get("name") or name)
            item = item.get("data")
        data, error = decode_base64(item)
        entries.append((name, data, error))
    return entries


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise RequestRejected(400, "no images", "the request holds no images")
    if count > max_images:
        raise RequestRejected(413, "too many images", f"{count} images in one request > {max_images}")


async def request_entries(request: Any, max_images: int) -> list[Entry]:
    """The images of a ``POST /predict`` request (multipart files, JSON with base64, or one raw ``image/*`` body).

    Raises:
        RequestRejected: An unsupported content type or a malformed body.
    """
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images + 1, max_fields=max_images + 16)
        except RequestRejected:
            raise
        except Exception as exc:  # noqa: BLE001 - starlette/python-multipart report malformed bodies variously
            if getattr(exc, "status_code", None) == 413:
                raise
            raise RequestRejected(400, "bad request", f"malformed multipart body: {exc}") from None
        uploads = [(key, value) for key, value in form.multi_items() if hasattr(value, "read")]
        fields = [key for key, value in form.multi_items() if not hasattr(value, "read")]
        if fields:
            raise RequestRejected(
                400, "path given", f"form fields {fields} are not files; send images as file parts (never paths)"
            )
        _check_count(len(uploads), max_images)
        entries: list[Entry] = []
        for index, (_, upload) in enumerate(uploads):
            entries.append((upload.filename or f"<image {index}>", await upload.read(), None))
        return entries
    if content_type in ("application/json", ""):
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise RequestRejected(400, "bad request", f"body is not JSON: {exc}") from None
        return json_entries(payload, max_images)
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        body = await request.body()
        _check_count(1 if body else 0, max_images)
        return [("<body>", body, None)]
    raise RequestRejected(
        415, "bad request", f"content type {content_type!r}: send multipart/form-data, application/json or image/*"
    )


def answer(records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for one request's records: 200, or 422 with ``errors`` when any image failed."""
    errors = [
        {"index": i, "path": r["path"], "kind": reason_kind(r["error"]), "reason": r["error"]}
        for i, r in enumerate(records)
        if r["error"] is not None
    ]
    body: dict[str, Any] = {"records": records}
    if errors:
        body["errors"] = errors
    return (422 if errors else 200), body


# ----------------------------------------------------------------------------------------------- inference worker
def _warmup_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (256, 192), (120, 120, 120)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class BundleAPI(ls.LitAPI):
    """The inference side: one loaded bundle per worker process, a batch of requests per forward pass.

    Args:
        bundle: bundle.tar (verified again by ``load_bundle`` in each worker).
        settings: Resolved settings (runtime, data limits, predict's decode workers).
        records: ``predict``'s record builder (``roadwork_cli.cli.predict.stream_records``).
        max_batch_size: Most requests per forward.
        batch_timeout: Seconds to wait for a batch to fill.
    """

    def __init__(
        self, bundle: Path, settings: Settings, records: RecordStream, max_batch_size: int, batch_timeout: float
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=PREDICT_PATH)
        self.bundle = Path(bundle)
        self.settings = settings
        self.records = records
        self.model: Any = None
        self.decode_workers = 0
        self._sequence = 0

    def setup(self, device: str) -> None:
        """Load, verify and warm up the bundle (LitServe marks the worker ready when this returns)."""
        # Ctrl+C and group-wide SIGTERM reach workers too; the supervisor drains and then sends each worker a
        # sentinel, so a worker must not die mid-batch (or with accepted requests still queued).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        configure_log(self.settings.serve.quiet)
        from roadwork_cli.stage1 import load_bundle

        runtime = self.settings.runtime
        self.model = load_bundle(
            self.bundle,
            device=runtime.device,
            precision=runtime.precision,
            jpeg_draft=self.settings.data.jpeg_draft,
            threads=runtime.threads,
            runtime=self.settings.predict.runtime,
        )
        if self.model.runtime == "torch" and runtime.threads:
            import torch

            torch.set_num_threads(runtime.threads)
        self.model.max_pixels = self.settings.data.max_image_pixels
        self.model.max_file_bytes = self.settings.data.max_file_bytes
        # Decode threads in the ONNX path as predict uses them; the PyTorch path's DataLoader would start processes
        # per batch, so it decodes in this thread.
        self.decode_workers = self.settings.predict.workers if self.model.runtime == "onnx" else 0
        warm = self.model.predict([_warmup_image()])
        if warm[0].error is not None:
            raise RuntimeError(f"warm-up image failed: {warm[0].error}")
        LOG.info("worker %d ready: %s runtime, %s", os.getpid(), self.model.runtime, self.bundle)

    def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request  # parsed in the API server; a worker only sees image bytes

    def batch(self, inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return inputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return output

    def predict(self, x: Any) -> Any:
        """Records for every image of every request in the batch (one forward pass), split back per request."""
        single = not isinstance(x, list)  # max_batch_size 1: LitServe's single loop passes one request
        requests = [x] if single else x
        entries = [entry for request in requests for entry in request["images"]]
        good = [item for _, item, error in entries if error is None]
        # predict's own chunking: its default batch size, so that decode threads overlap the forward passes
        predictions = self.model.iter_predict(good, workers=self.decode_workers)
        records = list(self.records(entries, predictions))
        self._sequence += 1
        batch = {"id": f"{os.getpid()}-{self._sequence}", "images": len(good), "requests": len(requests)}
        outputs, start = [], 0
        for request in requests:
            count = len(request["images"])
            outputs.append({"records": records[start : start + count], "batch": batch})
            start += count
        return outputs[0] if single else outputs

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


# ----------------------------------------------------------------------------------------------- metrics
class ServeMetrics:
    """Prometheus metrics of the API server (its own registry, so several servers in one test process never clash)."""

    PATHS = (PREDICT_PATH, HEALTHZ_PATH, READYZ_PATH, INFO_PATH, METRICS_PATH)

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "roadwork_serve_requests", "HTTP requests by path and status.", ["path", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "roadwork_serve_request_seconds",
            "Latency of POST /predict, from the first byte read to the answer.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "roadwork_serve_batch_images",
            "Images handed to the model per forward pass (one observation per batch a worker formed).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "roadwork_serve_batch_requests",
            "Requests gathered into one forward pass (one observation per batch).",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.images = Counter("roadwork_serve_images", "Images received by POST /predict.", registry=self.registry)
        self.decisions = Counter(
            "roadwork_serve_decisions", "Stage-1 decisions by kind.", ["decision"], registry=self.registry
        )
        self.rejections = Counter(
            "roadwork_serve_rejections",
            "Images and requests refused, by reason kind (predict's kinds for images).",
            ["reason"],
            registry=self.registry,
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def path_label(self, path: str) -> str:
        return path if path in self.PATHS else "other"

    def observe_answer(self, output: dict[str, Any]) -> None:
        """Count one worker answer: its decisions, image rejections, and its batch once."""
        records = output["records"]
        self.images.inc(len(records))
        for decision, count in Counter(r["decision"] for r in records if r["decision"]).items():
            self.decisions.labels(decision).inc(count)
        for kind, count in Counter(reason_kind(r["error"]) for r in records if r["error"]).items():
            self.rejections.labels(kind).inc(count)
        batch = output.get("batch") or {}
        with self._lock:
            if batch.get("id") in self._seen:
                return
            self._seen[batch.get("id")] = None
            while len(self._seen) > 4096:
                self._seen.popitem(last=False)
        if batch.get("images"):
            self.batch_images.observe(batch["images"])
        self.batch_requests.observe(batch.get("requests", 1))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ----------------------------------------------------------------------------------------------- ASGI gatekeeper
class Gatekeeper:
    """Outermost ASGI middleware: drain refusals, the body-size limit, in-flight counting, metrics, one log line.

    Args:
        app: The wrapped ASGI app.
        state: The server's shared state (draining flag, in-flight counter, limits, metrics).
    """

    def __init__(self, app: Any, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path = scope.get("path", "")
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        predict = path == PREDICT_PATH
        if predict:
            with state.inflight.get_lock():
                state.inflight.value += 1  # before the draining check: the drain waits on this counter
        try:
            if state.draining.value and path in (PREDICT_PATH, READYZ_PATH):
                if predict:
                    state.metrics.rejections.labels("draining").inc()
                await _json(send_status, 503, {"error": "draining", "detail": "the server is shutting down"})
            elif predict and _declared_length(scope) > state.max_body_bytes:
                await self._too_large(send_status)
            elif predict:
                await self.app(scope, self._limited(receive), send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            if predict:
                with state.inflight.get_lock():
                    state.inflight.value -= 1
            seconds = time.perf_counter() - started
            state.metrics.requests.labels(state.metrics.path_label(path), str(status["code"])).inc()
            if predict:
                state.metrics.latency.observe(seconds)
            client = scope.get("client") or ("-", 0)
            LOG.info("%s %s %s %d %.1f ms", client[0], scope.get("method", "-"), path, status["code"], seconds * 1000.0)

    async def _too_large(self, send: Callable) -> None:
        self.state.metrics.rejections.labels("body too large").inc()
        await _json(send, 413, {"error": "body too large", "detail": f"limit {self.state.max_body_bytes} bytes"})

    def _limited(self, receive: Callable) -> Callable:
        limit, total = self.state.max_body_bytes, {"n": 0}
        metrics = self.state.metrics

        async def limited() -> dict:
            message = await receive()
            total["n"] += len(message.get("body", b""))
            if total["n"] > limit:
                metrics.rejections.labels("body too large").inc()
                raise HTTPException(413, {"error": "body too large", "detail": f"limit {limit} bytes"})
            return message

        return limited


def _declared_length(scope: dict) -> int:
    for key, value in scope.get("headers") or []:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _json(send: Callable, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class ServerState:
    """What the supervisor shares with the forked API server: the draining flag, the in-flight count, limits."""

    def __init__(self, settings: Settings):
        context = multiprocessing.get_context("fork")  # inherited by the forked API server, never pickled
        self.draining = context.Value("b", 0)
        self.inflight = context.Value("i", 0)
        self.max_body_bytes = settings.serve.max_body_bytes
        self.max_images = settings.serve.max_images_per_request
        self.request_timeout = settings.serve.request_timeout_s
        self.metrics = ServeMetrics()


# ----------------------------------------------------------------------------------------------- the server
class Server:
    """``roadwork serve``: LitServe over :class:`BundleAPI`, with our routes, limits, metrics and drain.

    Args:
        bundle: A bundle.tar the caller has verified (``roadwork info``'s ``bundle_info`` does).
        settings: Resolved settings (``serve`` section, runtime, data limits).
        info: What ``GET /info`` answers (``bundle_info(bundle)``, as ``roadwork info --json`` prints it).
        records: ``predict``'s record builder.
    """

    def __init__(self, bundle: Path, settings: Settings, info: dict[str, Any], records: RecordStream):
        serve = settings.serve
        if serve.host not in HOSTS:
            raise UsageError(f"--host must be one of {', '.join(HOSTS)} (got {serve.host!r}).")
        batch_timeout = serve.batch_timeout_ms / 1000.0
        if batch_timeout >= serve.request_timeout_s:
            raise UsageError("serve.batch_timeout_ms must be shorter than the request timeout.")
        self.settings = settings
        self.state = ServerState(settings)
        self.info = info
        self.api = BundleAPI(bundle, settings, records, serve.max_batch_size, batch_timeout)
        self.server = ls.LitServer(
            self.api,
            accelerator="cpu",  # LitServe's device list only sets the worker count; the bundle picks its device
            workers_per_device=serve.workers,
            timeout=serve.request_timeout_s,
            healthcheck_path=READYZ_PATH,
            info_path=LITSERVE_INFO_PATH,
        )
        self._main_pid = os.getpid()
        self._drain_started = False
        self.unanswered = 0
        """Requests still in flight when the drain timed out (0 after a complete drain)."""
        self._install_routes()

    # -- routes (run in the API server process)
    def _install_routes(self) -> None:
        from litserve.server import RegularRequestHandler

        app = self.server.app
        # LitServe's own /predict would hand the raw form to a worker; ours parses it here and sends bytes only.
        app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != PREDICT_PATH]
        handler = RegularRequestHandler(self.api, self.server)
        state, info = self.state, self.info

        async def predict(request: Request) -> Response:
            """Stage 1 on one or more images: one ``predict --format jsonl`` record per image."""
            try:
                entries = await request_entries(request, state.max_images)
            except RequestRejected as exc:
                state.metrics.rejections.labels(exc.kind).inc()
                return JSONResponse({"error": exc.kind, "detail": exc.message}, status_code=exc.status)
            try:
                output = await asyncio.wait_for(
                    handler.handle_request({"images": entries}, dict), state.request_timeout
                )
            except asyncio.TimeoutError:
                state.metrics.rejections.labels("timeout").inc()
                return JSONResponse(
                    {"error": "timeout", "detail": f"no answer within {state.request_timeout:g} s"}, status_code=504
                )
            except HTTPException as exc:  # LitServe's own: 504 after waiting in the queue too long, 500 on a crash
                state.metrics.rejections.labels("timeout" if exc.status_code == 504 else "server error").inc()
                raise
            status, body = answer(output["records"])
            state.metrics.observe_answer(output)
            return JSONResponse(
                body, status_code=status, headers={"X-Roadwork-Batch-Images": str(output["batch"]["images"])}
            )

        async def healthz() -> dict[str, str]:
            """Liveness: the API server answers."""
            return {"status": "alive"}

        async def bundle_info() -> dict[str, Any]:
            """What ``roadwork info --json`` prints for the served bundle."""
            return info

        async def metrics() -> Response:
            """Prometheus text format."""
            data, content_type = state.metrics.render()
            return Response(data, media_type=content_type)

        app.add_api_route(PREDICT_PATH, predict, methods=["POST"], openapi_extra=_PREDICT_OPENAPI)
        app.add_api_route(HEALTHZ_PATH, healthz, methods=["GET"])
        app.add_api_route(INFO_PATH, bundle_info, methods=["GET"])
        app.add_api_route(METRICS_PATH, metrics, methods=["GET"])
        app.add_middleware(Gatekeeper, state=state)

    # -- supervision (this process)
    def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""
        import functools
        import sys

        import litserve.server
        from litserve.utils import configure_logging

        serve = self.settings.serve
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        # LitServe logs to stdout; messages go to stderr in this project (stdout stays for machine-readable output).
        litserve.server.configure_logging = functools.partial(configure_logging, stream=sys.stderr)
        self.server.run(
            host=serve.host,
            port=serve.port,
            num_api_servers=1,  # one API server: every metric in one process, one in-flight count
            log_level="warning" if serve.quiet else "info",
            generate_client_file=False,
            access_log=False,  # Gatekeeper logs one line per request
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._main_pid:
            # A forked helper that inherited this handler (LitServe's queue manager): a signal to the whole process
            # group (systemd, `timeout`, Ctrl+C) must not take it down before the drain is over; the supervisor
            # stops it.
            return
        if self._drain_started:
            return
        self._drain_started = True
        self.state.draining.value = 1
        LOG.warning("%s: draining %d in-flight requests", signal.Signals(signum).name, self.state.inflight.value)
        threading.Thread(target=self._drain, name="roadwork-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.serve.drain_timeout_s
        # Poll the shared counters (set by the API server process) until the accepted requests are answered.
        while time.monotonic() < deadline and (
            self.state.inflight.value > 0 or getattr(self.server, "_shutdown_event", None) is None
        ):
            time.sleep(0.01)
        self.unanswered = self.state.inflight.value
        if self.unanswered > 0:
            LOG.warning("drain timeout: %d requests still in flight", self.unanswered)
        event = getattr(self.server, "_shutdown_event", None)
        if event is None:
            return
        event.set()  # first, so that LitServe's monitor takes the workers' exit below for the shutdown it is
        from litserve.loops.base import _SENTINEL_VALUE

        # Workers ignore SIGTERM (a group signal must not kill them mid-batch); the sentinel, queued behind every
        # accepted request, ends each worker's loop so that they exit on their own.
        queue = self.server._get_request_queue(PREDICT_PATH)
        for _ in range(self.settings.serve.workers):
            queue.put(_SENTINEL_VALUE)


_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["data"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "data": {"type": "string", "format": "byte", "description": "base64 image"},
                                },
                            },
                        }
                    },
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "422": {"description": "Some images could not be read: every record, and the failures with reason kinds."},
        "413": {"description": "Body or image count over the limit."},
        "503": {"description": "Draining (shutting down)."},
        "504": {"description": "No answer within the request timeout."},
    },
}


# ----------------------------------------------------------------------------------------------- client side
def multipart_body(files: Iterable[tuple[str, bytes]], field: str = "files") -> tuple[bytes, str]:
    """A ``multipart/form-data`` body of image files for ``POST /predict``, and its content type (stdlib only).

    Args:
        files: ``(file name, encoded image bytes)`` per image.
        field: The form field name (any name is read).
    """
    boundary = "roadwork-" + os.urandom(12).hex()
    parts = []
    for name, data in files:
        safe = name.replace('"', "%22").replace("\r", " ").replace("\n", " ")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{safe}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
