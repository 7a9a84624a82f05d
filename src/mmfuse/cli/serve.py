"""``mmfuse serve``: a run served over HTTP, with a page to try it (the mmfuse[serve] extra)."""

from __future__ import annotations

import argparse
import importlib.util
import os

from mmfuse.cli.flags import HelpFormatter
from mmfuse.config import TOWER_BACKENDS
from mmfuse.errors import MmfuseError
from mmfuse.rundir.layout import check_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a run over HTTP, with a page to try it (needs mmfuse[serve])",
        formatter_class=HelpFormatter,
        description="POST /v1/predict (multipart image + text, or JSON), GET /v1/info, /healthz, /readyz, /metrics, "
        "and a page at /. Concurrent requests are run in batches on one model thread.",
    )
    p.add_argument("run", help="run directory made by mmfuse train")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, logged)")
    p.add_argument("--max-batch", type=int, default=64, help="most rows in one model batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more rows")
    p.add_argument("--queue-size", type=int, default=1024, help="most rows waiting; more are answered 503")
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body (413 past it)")
    p.add_argument("--device", help="torch device, e.g. cuda:1 or cpu (None: cuda when available)")
    p.add_argument(
        "--backend",
        choices=TOWER_BACKENDS,
        default="auto",
        help="what runs the run's frozen towers: auto (on a CPU, their ONNX exports where already made, e.g. by "
        "training here; torch on a GPU), torch, or onnx (each exported once, or an error)",
    )
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args) -> int:
    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise MmfuseError(f"mmfuse serve needs {', '.join(missing)}: pip install 'mmfuse[serve]'")
    # torch's OpenMP threads otherwise spin after each batch, taking the cores from request parsing and decoding: at
    # 32 clients on 2 cores the torch server used 27 instead of 19 ms of CPU per request (bench/RESULTS.md). Read
    # when torch loads, so set before the import below; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mmfuse.inference.serve.app import serve  # deferred: imports torch

    if args.max_upload_mb <= 0:
        raise MmfuseError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    check_run(args.run)  # found now, not by a server that starts and is never ready
    return serve(
        args.run,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        device=args.device,
        backend=args.backend,
    )
