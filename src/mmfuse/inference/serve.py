"""``mmfuse serve``: an HTTP server and a page over ``mmfuse.load(RUN).predict``, with micro-batching.

Run it (needs ``pip install 'mmfuse[serve]'``):

    mmfuse serve runs/quickstart                 # http://127.0.0.1:8000/ is the page; the API is under /v1
    curl -F image=@cat.png -F text="a grinning cat" http://127.0.0.1:8000/v1/predict

or mount the app in another ASGI server:

    from mmfuse.inference.serve import create_app
    app = create_app("runs/quickstart", max_batch=64, max_wait_ms=5)

The server holds no model logic of its own: a request is checked and its images decoded here, its rows wait in a
bounded queue, and a single model thread runs the queued rows in batches, each one ``Predictor.predict`` call.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import io
import json
import logging
import math
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmfuse import __version__
from mmfuse.data.images import MAX_PIXELS, check_size, to_rgb
from mmfuse.errors import MmfuseError
from mmfuse.inference.predictor import Predictor

log = logging.getLogger("mmfuse.inference.serve")

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_TEXT_CHARS = 10_000  # far past any text tower's max_length; only a bound on what a request may make us tokenize
MAX_ITEMS = 256
QUEUE_ROWS = 1024
INPUT_FIELDS = {"image", "text"}


class RequestError(Exception):
    """A request the server refuses: answered with ``status`` and a JSON body ``{"error": code, "message": ...}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    """Largest request body; refused (413) as soon as it is declared or read past, never buffered whole."""
    max_pixels: int = MAX_PIXELS
    """Largest image in pixels, the decompression-bomb limit training uses; checked before decoding."""
    max_text_chars: int = MAX_TEXT_CHARS
    """Longest text, in characters."""
    max_items: int = MAX_ITEMS
    """Most items in one JSON batch request."""


# ---------------------------------------------------------------------------------------------------------------------
# the model thread


@dataclass
class _Job:
    """One request's rows, waiting for the model thread; its rows may be spread over several batches."""

    images: list[Image.Image] | None
    texts: list[str]
    future: concurrent.futures.Future
    enqueued: float
    taken: int = 0
    parts: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


class Metrics:
    """Counters for ``/metrics`` (Prometheus text format), updated from the event loop and the model thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.in_flight = 0
        self.request_seconds = 0.0
        self.rows = self.batches = 0
        self.batch_seconds = 0.0

    def arrived(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request(self, status: int, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self.requests[status] = self.requests.get(status, 0) + 1
            self.request_seconds += seconds

    def batch(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.rows += rows
            self.batches += 1
            self.batch_seconds += seconds

    def render(self, queued_rows: int, ready: bool) -> str:
        with self._lock:
            lines = [
                "# HELP mmfuse_requests_total Prediction requests answered, by HTTP status.",
                "# TYPE mmfuse_requests_total counter",
                *(f'mmfuse_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())),
                "# HELP mmfuse_request_seconds Time from a prediction request's arrival to its answer.",
                "# TYPE mmfuse_request_seconds summary",
                f"mmfuse_request_seconds_sum {self.request_seconds:.6f}",
                f"mmfuse_request_seconds_count {sum(self.requests.values())}",
                "# HELP mmfuse_requests_in_flight Prediction requests being read, queued or run.",
                "# TYPE mmfuse_requests_in_flight gauge",
                f"mmfuse_requests_in_flight {self.in_flight}",
                "# HELP mmfuse_rows_total Rows (image+text pairs) run through the model.",
                "# TYPE mmfuse_rows_total counter",
                f"mmfuse_rows_total {self.rows}",
                "# HELP mmfuse_batch_seconds Model time per batch.",
                "# TYPE mmfuse_batch_seconds summary",
                f"mmfuse_batch_seconds_sum {self.batch_seconds:.6f}",
                f"mmfuse_batch_seconds_count {self.batches}",
                "# HELP mmfuse_queued_rows Rows waiting for the model thread.",
                "# TYPE mmfuse_queued_rows gauge",
                f"mmfuse_queued_rows {queued_rows}",
                "# HELP mmfuse_ready 1 once the model is loaded and warmed up.",
                "# TYPE mmfuse_ready gauge",
                f"mmfuse_ready {int(ready)}",
            ]
        return "\n".join(lines) + "\n"


class Batcher:
    """Loads the model, then runs queued rows in batches of at most ``max_batch`` on one thread.

    A batch closes when it holds ``max_batch`` rows or its oldest row has waited ``max_wait_s``. Rows waiting beyond
    ``queue_rows`` are refused at once (``submit`` raises a 503) rather than queued without bound.
    """

    def __init__(
        self, load: Callable[[], Predictor], max_batch: int, max_wait_s: float, queue_rows: int, metrics: Metrics
    ):
        self.max_batch, self.max_wait_s, self.queue_rows, self.metrics = max_batch, max_wait_s, queue_rows, metrics
        self.predictor: Predictor | None = None
        self.ready = threading.Event()
        self.error: str | None = None
        self.warmup_s: float | None = None
        self._load = load
        self._cond = threading.Condition()
        self._jobs: deque[_Job] = deque()
        self.queued_rows = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="mmfuse-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Runs what is queued, then ends the model thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(self, images: list[Image.Image] | None, texts: list[str]) -> concurrent.futures.Future:
        """Queues one request's rows; the future's result is their (rows, classes) probabilities."""
        job = _Job(images, texts, concurrent.futures.Future(), time.monotonic())
        with self._cond:
            if self._stopping:
                raise RequestError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"})
            if self.queued_rows + len(job) > self.queue_rows:
                raise RequestError(
                    503,
                    "queue_full",
                    f"the server is busy ({self.queued_rows} rows queued, room for {self.queue_rows}); retry shortly",
                    {"Retry-After": "1"},
                )
            self._jobs.append(job)
            self.queued_rows += len(job)
            self._cond.notify()
        return job.future

    def _run(self) -> None:
        try:
            self.predictor = self._load()
            start = time.perf_counter()
            self._warm_up(self.predictor)
            self.warmup_s = time.perf_counter() - start
        except Exception as e:  # the process stays up to say why on /readyz rather than vanish
            log.exception("the model failed to load")
            self.error = f"the model failed to load: {e}"
            with self._cond:
                self._stopping = True
                for job in self._jobs:
                    job.future.set_exception(RequestError(503, "not_ready", self.error))
                self._jobs.clear()
            return
        log.info("model ready (warm-up batch %.0f ms)", self.warmup_s * 1000)
        self.ready.set()
        while (batch := self._take()) is not None:
            self._predict(batch)

    @staticmethod
    def _warm_up(predictor: Predictor) -> None:
        # The first call pays one-off costs (allocator, kernel choice, lazy weights): not a user's request.
        text = ["warm-up"]
        if "image" in predictor.model.modalities:
            predictor.predict([Image.new("RGB", (64, 64), (128, 128, 128))], text)
        else:
            predictor.predict(None, text)

    def _take(self) -> list[tuple[_Job, int, int]] | None:
        """The next batch as (job, first row, end row) slices, or None once stopping with nothing queued."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._jobs[0].enqueued + self.max_wait_s
            while self.queued_rows < self.max_batch and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch, room = [], self.max_batch
            while self._jobs and room:
                job = self._jobs[0]
                n = min(len(job) - job.taken, room)
                batch.append((job, job.taken, job.taken + n))
                job.taken += n
                room -= n
                if job.taken == len(job):
                    self._jobs.popleft()
            self.queued_rows -= self.max_batch - room
            return batch

    def _predict(self, batch: list[tuple[_Job, int, int]]) -> None:
        start = time.perf_counter()
        rows = sum(end - first for _, first, end in batch)
        try:
            probs = self._call(batch)
        except Exception:
            # Rows are checked before they are queued, so this is rare: run each request alone, so that one
            # request's problem is not every other request's answer.
            for one in batch:
                try:
                    self._deliver([one], self._call([one]))
                except Exception as e:
                    self._fail(one[0], e)
        else:
            self._deliver(batch, probs)
        seconds = time.perf_counter() - start
        self.metrics.batch(rows, seconds)
        log.info("batch rows=%d requests=%d latency_ms=%.1f", rows, len(batch), seconds * 1000)

    def _call(self, batch: list[tuple[_Job, int, int]]) -> np.ndarray:
        texts = [t for job, first, end in batch for t in job.texts[first:end]]
        images = None
        if batch[0][0].images is not None:
            images = [im for job, first, end in batch for im in job.images[first:end]]
        return self.predictor.predict(images, texts, batch_size=len(texts)).probs

    @staticmethod
    def _deliver(batch: list[tuple[_Job, int, int]], probs: np.ndarray) -> None:
        at = 0
        for job, first, end in batch:
            job.parts.append(probs[at : at + end - first])
            at += end - first
            if end == len(job) and not job.future.done():
                job.future.set_result(np.concatenate(job.parts))

    @staticmethod
    def _fail(job: _Job, error: Exception) -> None:
        if job.future.done():
            return
        if isinstance(error, MmfuseError):
            job.future.set_exception(RequestError(422, "bad_input", str(error)))
        else:
            log.error("a batch failed", exc_info=error)
            job.future.set_exception(RequestError(500, "internal", "the model failed on this request; see the log"))


# ---------------------------------------------------------------------------------------------------------------------
# reading requests


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) once it is declared or read past ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "bad_content_length", f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise RequestError(413, "upload_too_large", _too_large(int(declared), limit))
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, "upload_too_large", _too_large(None, limit))
    if not body:
        raise RequestError(400, "empty_body", "the request body is empty")
    return bytes(body)


def _too_large(size: int | None, limit: int) -> str:
    what = f"{size:,} bytes" if size is not None else "over the limit"
    return f"the upload is {what}; the limit is {limit:,} bytes ({limit / 2**20:.0f} MB, set by --max-upload-mb)"


def parse_json(body: bytes, limits: Limits) -> tuple[list[dict], bool]:
    """Items of a JSON body ``{"image": base64, "text": str}`` or ``{"items": [...]}``, and whether it was one item."""
    try:
        doc = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "bad_json", "the body is not UTF-8 text") from None
    except ValueError as e:
        raise RequestError(400, "bad_json", f"the body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RequestError(422, "bad_json", f"the body must be a JSON object, not {_json_type(doc)}")
    if "items" not in doc:
        return [_item(doc, None)], True
    if set(doc) != {"items"}:
        raise RequestError(
            422, "bad_json", f"a batch body holds only 'items'; also found {sorted(set(doc) - {'items'})}"
        )
    items = doc["items"]
    if not isinstance(items, list):
        raise RequestError(422, "bad_json", f"'items' must be a list of objects, not {_json_type(items)}")
    if not items:
        raise RequestError(422, "bad_json", "'items' is empty")
    if len(items) > limits.max_items:
        raise RequestError(413, "too_many_items", f"{len(items)} items; one request may hold {limits.max_items}")
    return [_item(item, i) for i, item in enumerate(items)], False


def _item(item, i: int | None) -> dict:
    where = "" if i is None else f"item #{i}: "
    if not isinstance(item, dict):
        raise RequestError(422, "bad_json", f"{where}must be an object with 'image' and 'text', not {_json_type(item)}")
    unknown = set(item) - INPUT_FIELDS
    if unknown:
        raise RequestError(422, "bad_json", f"{where}unknown field(s) {sorted(unknown)}; an item has image and text")
    image, text = item.get("image"), item.get("text")
    if image is not None:
        if not isinstance(image, str):
            raise RequestError(422, "bad_json", f"{where}'image' must be a base64 string, not {_json_type(image)}")
        if image.startswith("data:") and "," in image:  # a data URL, as a browser's FileReader gives
            image = image.split(",", 1)[1]
        try:
            image = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "bad_image", f"{where}'image' is not valid base64") from None
    if text is not None and not isinstance(text, str):
        raise RequestError(422, "bad_json", f"{where}'text' must be a string, not {_json_type(text)}")
    return {"image": image, "text": text, "index": i}


def _json_type(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def parse_multipart(body: bytes, content_type: str) -> dict:
    """The ``image`` and ``text`` parts of a multipart/form-data body, as raw bytes.

    Parsed here rather than by Starlette's form reader, which decodes a field that is not UTF-8 as Latin-1 (so the
    model would read mojibake) and spools uploads to disk with no size limit.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "bad_multipart", "multipart/form-data without a boundary")
    parts: list[dict] = []
    header = [bytearray(), bytearray()]
    ended = []

    def header_end():
        parts[-1]["headers"][bytes(header[0]).lower().strip()] = bytes(header[1])
        header[0].clear()
        header[1].clear()

    callbacks = {
        "on_part_begin": lambda: parts.append({"headers": {}, "data": bytearray()}),
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
        "on_header_field": lambda data, start, end: header[0].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header[1].extend(data[start:end]),
        "on_header_end": header_end,
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart's parse errors; any of them means a malformed body
        raise RequestError(400, "bad_multipart", f"the multipart body is malformed: {e}") from None
    if not ended:
        raise RequestError(400, "bad_multipart", "the multipart body ends before its closing boundary")
    fields: dict[str, bytes] = {}
    for part in parts:
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name not in INPUT_FIELDS:
            raise RequestError(422, "bad_form", f"unknown form field {name!r}; send 'image' (a file) and 'text'")
        if name in fields:
            raise RequestError(422, "bad_form", f"form field {name!r} given twice; send one item per request")
        fields[name] = bytes(part["data"])
    text = fields.get("text")
    if text is not None:
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(422, "bad_text", f"'text' is not UTF-8 (byte {e.start})") from None
    return {"image": fields.get("image"), "text": text, "index": None}


def decode_image(data: bytes | None, max_pixels: int, where: str = "") -> Image.Image:
    """An uploaded image as RGB, as training reads one: the size checked from the header before any decoding."""
    if data is None:
        raise RequestError(422, "missing_image", f"{where}no 'image'; this model needs one")
    if not data:
        raise RequestError(422, "empty_image", f"{where}the image upload is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            try:
                check_size(img, max_pixels)
            except ValueError as e:
                raise RequestError(413, "image_too_large", f"{where}{e}") from None
            img.load()
            rgb = to_rgb(img)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(
            422, "bad_image", f"{where}the upload is not an image in a format Pillow reads (JPEG, PNG, WebP, ...)"
        ) from None
    except Exception as e:  # PIL raises many types for a corrupt file; all mean the same to the client
        raise RequestError(422, "bad_image", f"{where}the image cannot be decoded ({type(e).__name__}: {e})") from None
    if 0 in rgb.size:
        raise RequestError(422, "bad_image", f"{where}the image is empty ({rgb.size[0]}x{rgb.size[1]} pixels)")
    return rgb


def check_text(text: str | None, predictor: Predictor, limits: Limits, where: str = "") -> str:
    text = text or ""
    if len(text) > limits.max_text_chars:
        raise RequestError(
            422, "text_too_long", f"{where}'text' is {len(text):,} characters; the limit is {limits.max_text_chars:,}"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape such as "\ud800"
        raise RequestError(422, "bad_text", f"{where}'text' is not valid Unicode (a lone surrogate)") from None
    if not text.strip() and "text" in predictor.model.modalities and not predictor.accepts_missing_text:
        raise RequestError(
            422,
            "missing_text",
            f"{where}no 'text'; this model was trained without --modality-dropout and needs text with every image",
        )
    return text


def prepare(items: list[dict], predictor: Predictor, limits: Limits) -> tuple[list[Image.Image] | None, list[str]]:
    """Checks every item and decodes its image: a bad item is refused before any row is queued."""
    uses_images = "image" in predictor.model.modalities
    images, texts = [], []
    for item in items:
        where = "" if item["index"] is None else f"item #{item['index']}: "
        texts.append(check_text(item["text"], predictor, limits, where))
        if uses_images:  # a text-only model reads no image, as predict(None, texts) reads none
            images.append(decode_image(item["image"], limits.max_pixels, where))
    return (images if uses_images else None), texts


def answer(probs: np.ndarray, classes: list[str]) -> dict:
    top = int(probs.argmax())
    return {
        "label": classes[top],
        "confidence": float(probs[top]),
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
    }


# ---------------------------------------------------------------------------------------------------------------------
# the app


def create_app(
    run_dir: str | Path,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    queue_size: int = QUEUE_ROWS,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_text_chars: int = MAX_TEXT_CHARS,
    max_items: int = MAX_ITEMS,
    max_pixels: int = MAX_PIXELS,
    device: str | None = None,
) -> FastAPI:
    """The serving app for one run directory; the model loads in the background once the app starts.

    Args:
        run_dir: what ``mmfuse train`` wrote.
        max_batch: most rows (not requests) in one model batch.
        max_wait_ms: how long a batch waits for more rows after its first.
        queue_size: most rows waiting for the model; more are answered 503 with Retry-After.
        max_upload_bytes: largest request body (413 past it).
        max_text_chars: longest text accepted.
        max_items: most items in one JSON batch request.
        max_pixels: largest image in pixels (the training limit by default).
        device: torch device for the model (default: CUDA where available, else CPU).
    """
    for name, value in (("max_batch", max_batch), ("queue_size", queue_size), ("max_items", max_items)):
        if value < 1:
            raise MmfuseError(f"{name} must be >= 1, got {value}")
    if not (max_wait_ms >= 0 and math.isfinite(max_wait_ms)):
        raise MmfuseError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    if max_upload_bytes < 1:
        raise MmfuseError(f"max_upload_bytes must be >= 1, got {max_upload_bytes}")
    # A request bigger than the whole queue would be refused as "busy" forever.
    max_items = min(max_items, queue_size)
    run_dir = Path(run_dir)
    limits = Limits(max_upload_bytes, max_pixels, max_text_chars, max_items)
    metrics = Metrics()
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(lambda: Predictor(run_dir, device=device), max_batch, max_wait_ms / 1000, queue_size, metrics)
        state["batcher"] = batcher
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)  # uvicorn has let in-flight requests finish; now their rows

    app = FastAPI(title="mmfuse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def ready_predictor() -> Predictor:
        batcher = state.get("batcher")
        if batcher is None or not batcher.ready.is_set():
            reason = batcher.error if batcher is not None and batcher.error else "the model is still loading"
            raise RequestError(503, "not_ready", reason, {"Retry-After": "1"})
        return batcher.predictor

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse({"error": e.code, "message": e.message}, e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse({"error": code, "message": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        log.error("unhandled error on %s", request.url.path, exc_info=e)
        return JSONResponse({"error": "internal", "message": "internal error; see the server log"}, 500)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "up"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        batcher = state.get("batcher")
        if batcher is None or not batcher.ready.is_set():
            error = batcher.error if batcher is not None else None
            body = {"status": "failed" if error else "loading", **({"message": error} if error else {})}
            return JSONResponse(body, 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "warmup_ms": round(batcher.warmup_s * 1000, 1)})

    @app.get("/v1/info")
    async def info() -> dict:
        predictor = ready_predictor()
        modalities = list(predictor.model.modalities)
        return {
            "run": run_dir.name,
            "classes": list(predictor.classes),
            "modalities": modalities,
            "towers": _read_json(run_dir / "towers.json"),
            "fusion": predictor.cfg.model.fusion,
            "modality_dropout": predictor.cfg.model.modality_dropout,
            "metrics": _read_json(run_dir / "metrics.json"),
            "inputs": {
                "image": {"required": "image" in modalities, "max_pixels": limits.max_pixels},
                "text": {
                    "required": "text" in modalities and not predictor.accepts_missing_text,
                    "used": "text" in modalities,
                    "max_chars": limits.max_text_chars,
                },
                "max_upload_bytes": limits.max_upload_bytes,
                "max_items": limits.max_items,
                "content_types": ["multipart/form-data", "application/json"],
            },
            "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "queue_size": queue_size},
            "version": __version__,
        }

    @app.post("/v1/predict")
    async def predict(request: Request) -> JSONResponse:
        start, status = time.perf_counter(), 500
        metrics.arrived()
        try:
            response = await _predict(request)
            status = 200
            return response
        except RequestError as e:
            status = e.status
            raise
        finally:
            metrics.request(status, time.perf_counter() - start)

    async def _predict(request: Request) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            raise RequestError(
                415,
                "unsupported_media_type",
                f"Content-Type {kind or '(none)'} is not accepted; send multipart/form-data (image, text) or "
                "application/json",
            )
        predictor = ready_predictor()
        body = await read_body(request, limits.max_upload_bytes)
        if kind == "application/json":
            items, single = await run_in_threadpool(parse_json, body, limits)
        else:
            items, single = [await run_in_threadpool(parse_multipart, body, request.headers["content-type"])], True
        images, texts = await run_in_threadpool(prepare, items, predictor, limits)
        probs = await asyncio.wrap_future(state["batcher"].submit(images, texts))
        rows = [answer(p, predictor.classes) for p in probs]
        return JSONResponse(rows[0] if single else {"items": rows})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        batcher = state.get("batcher")
        ready = batcher is not None and batcher.ready.is_set()
        text = metrics.render(batcher.queued_rows if batcher else 0, ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse((files("mmfuse.inference") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    return app


def _read_json(path: Path):
    """A run's JSON file for /v1/info, with NaN as null (JSON has no NaN); None when the run has none."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=lambda _: None)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# the command


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, **options) -> int:
    """Serves a run until SIGTERM or Ctrl-C, letting requests in flight finish; ``options`` as ``create_app``."""
    import uvicorn  # deferred with the optional extra: mmfuse[serve]

    app = create_app(run_dir, **options)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MmfuseError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --host or --port"
        ) from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,  # mmfuse's logging, already set up by the CLI
        access_log=False,  # one line per batch instead (see Batcher)
        timeout_graceful_shutdown=30,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    log.info("serving %s on http://%s:%d/ (the page; API under /v1)", run_dir, shown, bound)
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again so the default action would end the
    # process with it; a handler of our own makes that a clean exit 0 instead.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    return 0 if server.started else 1
