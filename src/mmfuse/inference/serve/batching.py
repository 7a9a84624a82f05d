"""The model thread of ``mmfuse serve``: a bounded queue of rows, run in micro-batches, and the ``/metrics`` counters.

One thread loads the model, warms it up, then takes queued rows in batches of at most ``max_batch``; each batch is
one ``Predictor.predict`` call, and each request's future gets its own rows back.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mmfuse.data.columns import Columns
from mmfuse.errors import MmfuseError
from mmfuse.inference.predictor import Predictor
from mmfuse.inference.serve.requests import RequestError

log = logging.getLogger("mmfuse.inference.serve")

QUEUE_ROWS = 1024


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
        named = Columns.of(predictor.cfg.model) if hasattr(predictor, "cfg") else None  # stand-ins have no config
        if named is not None:  # every cell empty: each column's placeholder
            predictor.predict(rows=[dict.fromkeys(named.names)])
        elif "image" in predictor.model.modalities:
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
        if texts and isinstance(texts[0], dict):  # a model with named columns: its jobs' "texts" are row dicts
            return self.predictor.predict(rows=texts, batch_size=len(texts)).probs
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
