"""The ``mmfuse serve`` app: ``create_app`` (the routes, over a ``Batcher``) and ``serve``, the command that runs it.

from mmfuse.inference.serve import create_app
app = create_app("runs/quickstart", max_batch=64, max_wait_ms=5)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import signal
import socket
import time
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmfuse import __version__
from mmfuse.data.columns import Columns
from mmfuse.data.images import MAX_PIXELS
from mmfuse.errors import MmfuseError
from mmfuse.inference.backends import run_towers
from mmfuse.inference.predictor import Predictor
from mmfuse.inference.serve.batching import QUEUE_ROWS, Batcher, Metrics
from mmfuse.inference.serve.requests import (
    ANSWERS,
    MAX_ITEMS,
    MAX_TEXT_CHARS,
    MAX_UPLOAD_BYTES,
    NOT_READY,
    PREDICT_ERRORS,
    Fields,
    Limits,
    RequestError,
    answer,
    parse_json,
    parse_multipart,
    predict_openapi,
    prepare,
    read_body,
)

log = logging.getLogger("mmfuse.inference.serve")


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
    backend: str = "auto",
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
        backend: what runs the run's frozen towers (``backends.run_towers``): auto (on a CPU, their ONNX
            exports where already made, e.g. by training on this machine), torch, or onnx.
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
        load = lambda: run_towers(Predictor(run_dir, device=device), backend)  # noqa: E731 (loaded in the model thread)
        batcher = Batcher(load, max_batch, max_wait_ms / 1000, queue_size, metrics)
        state["batcher"] = batcher
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)  # uvicorn has let in-flight requests finish; now their rows

    # /openapi.json describes every route, the form and JSON bodies of /v1/predict included, for clients and for
    # the fuzzing test (tests/test_fuzz_serve.py); the interactive docs pages would load scripts from a CDN.
    app = FastAPI(title="mmfuse", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)

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

    @app.get("/healthz", responses=ANSWERS)
    async def healthz() -> dict:
        return {"status": "up"}

    @app.get("/readyz", responses=ANSWERS | NOT_READY)
    async def readyz() -> JSONResponse:
        batcher = state.get("batcher")
        if batcher is None or not batcher.ready.is_set():
            error = batcher.error if batcher is not None else None
            body = {"status": "failed" if error else "loading", **({"message": error} if error else {})}
            return JSONResponse(body, 503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "warmup_ms": round(batcher.warmup_s * 1000, 1)})

    @app.get("/v1/info", responses=ANSWERS | NOT_READY)
    async def info() -> dict:
        predictor = ready_predictor()
        modalities = list(predictor.model.modalities)
        thresholds = predictor.thresholds  # a multi-label run's
        return {
            "run": run_dir.name,
            "classes": list(predictor.classes),
            "multi_label": predictor.multi_label,
            **({"thresholds": dict(zip(predictor.classes, thresholds.values))} if thresholds is not None else {}),
            "modalities": modalities,
            "towers": _read_json(run_dir / "towers.json"),
            "fusion": predictor.cfg.model.fusion,
            "modality_dropout": predictor.cfg.model.modality_dropout,
            "metrics": _read_json(run_dir / "metrics.json"),
            # A model with named columns: each is a field of its own (an image column's a file, or base64 in JSON).
            "columns": vars(Columns.of(predictor.cfg.model)) if predictor.cfg.model.columns else None,
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

    @app.post("/v1/predict", responses=ANSWERS | NOT_READY | PREDICT_ERRORS, openapi_extra=predict_openapi(limits))
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
        fields = Fields.of(predictor)
        if kind == "application/json":
            items, single = await run_in_threadpool(parse_json, body, limits, fields)
        else:
            content_type = request.headers["content-type"]
            items, single = [await run_in_threadpool(parse_multipart, body, content_type, fields)], True
        images, texts = await run_in_threadpool(prepare, items, predictor, limits)
        probs = await asyncio.wrap_future(state["batcher"].submit(images, texts))
        rows = [answer(p, predictor.classes, predictor.decision, predictor.thresholds) for p in probs]
        return JSONResponse(rows[0] if single else {"items": rows})

    @app.get("/metrics", response_class=PlainTextResponse, responses=ANSWERS)
    async def prometheus() -> PlainTextResponse:
        batcher = state.get("batcher")
        ready = batcher is not None and batcher.ready.is_set()
        text = metrics.render(batcher.queued_rows if batcher else 0, ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, responses=ANSWERS)
    async def page() -> HTMLResponse:
        return HTMLResponse((files("mmfuse.inference.serve") / "static" / "index.html").read_text(encoding="utf-8"))

    @app.get("/favicon.ico", status_code=204, response_class=Response, responses=ANSWERS)
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
