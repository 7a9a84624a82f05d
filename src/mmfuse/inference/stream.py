"""Predictions written a chunk at a time, resumable, and rows split across processes under ``accelerate launch``.

    mmfuse predict RUN DATA --out preds.csv                          # chunks of 4096 rows, appended as they finish
    mmfuse predict RUN DATA --out preds.csv --resume                 # after a kill: on from the last whole chunk
    accelerate launch --num_processes 4 -m mmfuse predict RUN DATA --out preds.csv   # 4 GPUs, a shard each
    accelerate launch --multi_gpu --num_processes 2 -m mmfuse evaluate RUN DATA      # 2 CPU processes (gloo)

Each process takes one contiguous shard of whole chunks of the checked rows (as accelerate's
``split_between_processes``, in chunks, with no padding), so the output is byte for byte the single-process one
with the same chunk size: each row once, in input order. A shard is predicted ``chunk_size`` rows at a time:
features and pixels exist for one chunk only, each chunk's rows are appended to the shard's part file and synced,
then a small progress file beside it records the rows and bytes that are complete.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse import multilabel
from mmfuse.binary import THRESHOLD_FILE, Decision, predicted
from mmfuse.config import PREDICT_CHUNK as DEFAULT_CHUNK
from mmfuse.data.records import Record
from mmfuse.distributed import gather_lists, launch_state, shard_bounds
from mmfuse.errors import MmfuseError
from mmfuse.inference.report import input_row
from mmfuse.multilabel import THRESHOLDS_FILE, Thresholds
from mmfuse.progress import Progress
from mmfuse.rundir.layout import CALIBRATION_FILE

log = logging.getLogger(__name__)
PROGRESS_FORMAT = 1


@dataclass
class Processes:
    """This process's place among those ``accelerate launch`` started: one process, and no process group, when it
    was not launched."""

    rank: int = 0
    world: int = 1
    device: str | None = None
    """Each launched process's own device (cuda:RANK, or cpu under gloo); None: the Predictor's default."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def gather(self, item) -> list:
        """``item`` of every process, in rank order, on every process."""
        return [item] if self.world == 1 else gather_lists(item)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (filling the check index and writing the skipped rows), then the
        others, which find that work done."""
        if self.world == 1:
            yield
            return
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield


def processes() -> Processes:
    """The launch this process is part of, from the launcher's WORLD_SIZE: a plain run sets up nothing."""
    state = launch_state()
    if state is None:
        return Processes()
    return Processes(state.process_index, state.num_processes, str(state.device))


def my_shard(n: int, chunk_size: int, procs: Processes) -> tuple[int, int]:
    """This process's [start, end) of ``n`` rows (all of them for one process); the main process says the split."""
    bounds = shard_bounds(n, procs.world, chunk_size)
    if procs.world > 1 and procs.is_main:
        log.info("%d rows split over %d processes: %s", n, procs.world, ", ".join(f"{b - a}" for a, b in bounds))
    return bounds[procs.rank]


def check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise MmfuseError(f"--chunk-size must be an integer >= 1 (rows per chunk), got {chunk_size!r}")


def predict_chunks(
    predictor, records: list[Record], chunk_size: int, show: bool = True, options: dict | None = None
) -> Iterator[np.ndarray]:
    """Probabilities for ``records``, ``chunk_size`` rows at a time: only one chunk's features are ever held.
    ``options`` go to each ``predict_records`` call (e.g. ``cache``)."""
    with Progress(len(records), "predicting", show=show) as bar:
        for start in range(0, len(records), chunk_size):
            probs = predictor.predict_records(records[start : start + chunk_size], show=False, **(options or {}))
            bar.update(len(probs))
            yield probs


def predict_all(
    predictor, records: list[Record], chunk_size: int, procs: Processes, options: dict | None = None
) -> np.ndarray:
    """Probabilities (N, classes) for every record, in order: each process predicts its shard, chunk by chunk, and
    every process gets all of them."""
    start, end = my_shard(len(records), chunk_size, procs)
    mine = list(predict_chunks(predictor, records[start:end], chunk_size, procs.is_main, options))
    mine = np.concatenate(mine) if mine else np.zeros((0, len(predictor.classes)), dtype=np.float32)
    return np.concatenate(procs.gather(mine))


def rows_digest(records: list[Record]) -> str:
    """What identifies the checked input: each row's number, image, text and label, in order."""
    h = hashlib.sha256()
    for r in records:
        line = f"{input_row(r)}\0{r.source}\0{r.text}\0{r.label}\n"
        h.update(line.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def run_identity(run_dir: str | Path) -> dict:
    """The run directory and its weights (and temperatures, ``--calibrate``, and a binary run's threshold) as they are
    now: retraining into the same directory changes them."""
    run = Path(run_dir).resolve()
    weights = sorted(
        [str(p.relative_to(run)), p.stat().st_size, p.stat().st_mtime_ns]
        for p in (
            *run.rglob("*.safetensors"),
            *run.rglob(CALIBRATION_FILE),
            *run.rglob(THRESHOLD_FILE),
            *run.rglob(THRESHOLDS_FILE),
        )
        if "checkpoints" not in p.relative_to(run).parts
    )
    return {"path": str(run), "weights": weights}


@dataclass
class ShardFiles:
    part: Path
    progress: Path


def shard_files(out_csv: Path, rank: int, world: int) -> ShardFiles:
    """OUT.part and OUT.progress.json for one process; OUT.RANK-of-WORLD.part (and .progress.json) for a shard."""
    tag = "" if world == 1 else f".{rank}-of-{world}"
    return ShardFiles(
        out_csv.with_name(f"{out_csv.name}{tag}.part"), out_csv.with_name(f"{out_csv.name}{tag}.progress.json")
    )


def leftovers(out_csv: Path) -> list[Path]:
    """Progress files of interrupted predictions into ``out_csv``, under any number of processes."""
    folder = out_csv.parent
    if not folder.is_dir():
        return []
    return sorted(
        [
            *folder.glob(f"{glob.escape(out_csv.name)}.progress.json"),
            *folder.glob(f"{glob.escape(out_csv.name)}.*-of-*.progress.json"),
        ]
    )


def read_progress(path: Path) -> dict:
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        int(progress["rows_done"]), int(progress["bytes"])
        return progress
    except (OSError, ValueError, KeyError, TypeError):
        raise MmfuseError(f"{path} is damaged; delete it and the .part file beside it to start over.") from None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _mismatch(saved: dict, identity: dict) -> str | None:
    """What differs between an interrupted prediction and this one, in words; None if it may be continued."""
    if saved.get("format") != PROGRESS_FORMAT:
        return "it was written by another version of mmfuse"
    if saved.get("input", {}).get("path") != identity["input"]["path"]:
        return f"it predicted {saved.get('input', {}).get('path')}, not {identity['input']['path']}"
    if saved.get("input", {}).get("rows_sha256") != identity["input"]["rows_sha256"]:
        return "the input's rows (images, texts, labels or rows skipped) changed since"
    if saved.get("run", {}).get("path") != identity["run"]["path"]:
        return f"it used the run {saved.get('run', {}).get('path')}, not {identity['run']['path']}"
    if saved.get("run") != identity["run"]:
        return "the run's weights changed since (retrained?)"
    if saved.get("options") != identity["options"]:
        return f"it ran with {saved.get('options')}, this one with {identity['options']}"
    return None


def check_out(out_csv: Path, overwrite: bool, resume: bool, continue_with: str = "") -> None:
    """The CLI's rule for ``predict --out``, checked before any work: predictions already there are replaced only
    with ``overwrite``; an interrupted prediction is continued with ``resume`` (``continue_with``: the command that
    does), or started over with ``overwrite`` (its part and progress files go now); otherwise both are refused.

    ``check_resume`` later checks that what ``resume`` continues is this prediction.
    """
    found = leftovers(out_csv)
    if found and overwrite:
        for path in found:
            path.unlink(missing_ok=True)  # every process may do this: whoever comes second finds nothing
            path.with_name(path.name.removesuffix(".progress.json") + ".part").unlink(missing_ok=True)
        return
    if found and not resume:
        done = sum(read_progress(p)["rows_done"] for p in found)
        raise MmfuseError(
            f"--out {out_csv}: an interrupted prediction left {done} row(s) written "
            f"({', '.join(str(p) for p in found)}, beside the .part files). Continue it after its last whole chunk "
            f"with --resume{f' ({continue_with})' if continue_with else ''}, or pass --overwrite to start over."
        )
    if not found and out_csv.is_file() and not overwrite:
        with open(out_csv, "rb") as f:
            ours = f.readline().startswith(b"row,image,")
            rows = sum(1 for _ in f)
        held = f"predictions of {rows} row(s)" if ours else f"a file of {rows + 1} line(s)"
        finished = ", finished: --resume has nothing to continue" if resume and ours else ""
        raise MmfuseError(
            f"--out {out_csv} already exists ({held}{finished}): choose another --out, or pass --overwrite to "
            "replace it."
        )


def check_resume(out_csv: Path, identity: dict, bounds: list[tuple[int, int]], resume: bool) -> None:
    """Refuses to start over an interrupted prediction unasked, and to continue one that is not this prediction.

    Every process runs the same check on the same files, so all refuse together or none does.
    """
    found = leftovers(out_csv)
    if not found:
        return
    names = ", ".join(str(p) for p in found)
    if not resume:
        done = sum(read_progress(p)["rows_done"] for p in found)
        raise MmfuseError(
            f"--out {out_csv}: an interrupted prediction left {done} row(s) written ({names}, beside the .part "
            "files). Rerun with --resume to continue after its last whole chunk, or delete those files to start "
            "over."
        )
    world = len(bounds)
    ours = {shard_files(out_csv, k, world).progress: k for k in range(world)}
    others = [p for p in found if p not in ours]
    if others:
        procs = (
            "one process" if others[0].name.endswith(f"{out_csv.name}.progress.json") else "another number of processes"
        )
        raise MmfuseError(
            f"--resume: the interrupted prediction into {out_csv} ran as {procs} ({others[0]}), this one as {world}: "
            "resume it with the same number of processes (accelerate launch --num_processes), or delete "
            f"{names} and the .part files beside them to start over."
        )
    for path in found:
        saved = read_progress(path)
        why = _mismatch(saved, identity)
        if why:
            raise MmfuseError(
                f"--resume: {path} is not this prediction's: {why}. Give the same input, run and options, or delete "
                f"{names} and the .part files beside them to start over."
            )
        if world > 1 and saved.get("shard") != list(bounds[ours[path]]):
            raise MmfuseError(
                f"--resume: {path} holds rows {saved.get('shard')} of a split into chunks of {saved.get('chunk_size')} "
                f"rows; resume with --chunk-size {saved.get('chunk_size')}, or delete {names} and the .part files "
                "beside them to start over."
            )
        part = path.with_name(path.name.removesuffix(".progress.json") + ".part")
        if not part.is_file() or part.stat().st_size < saved["bytes"]:
            raise MmfuseError(
                f"--resume: {part} is missing or shorter than {path} records; delete {names} to start over."
            )


def csv_bytes(rows: list[list]) -> bytes:
    """Rows as the predictions CSV holds them: a file name that is not UTF-8 (kept as surrogates) written escaped."""
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8", "backslashreplace")


def prediction_rows(
    records: list[Record],
    probs: np.ndarray,
    classes: list[str],
    labelled: bool,
    decision: Decision | None = None,
    thresholds: Thresholds | None = None,
) -> list[list]:
    """One CSV row per record: row, image, (true_label, correct,) label, confidence (the label's probability),
    p_<class>...; the label is the argmax, or a binary run's ``decision``. With a multi-label run's ``thresholds``:
    row, image, (true_labels, correct,) labels (the set joined by |), p_<label>..."""
    rows = []
    if thresholds is not None:  # a multi-label run: the set joined by |, then every label's probability
        for rec, p, names in zip(records, probs, multilabel.label_sets(probs, classes, thresholds)):
            guess = multilabel.joined(names)
            truth = ([rec.label, rec.label == guess] if rec.label is not None else ["", ""]) if labelled else []
            rows.append([input_row(rec), rec.source, *truth, guess, *(f"{x:.6f}" for x in p)])
        return rows
    for rec, p, k in zip(records, probs, predicted(probs, classes, decision)):
        label = classes[int(k)]
        truth = ([rec.label, rec.label == label] if rec.label is not None else ["", ""]) if labelled else []
        rows.append([input_row(rec), rec.source, *truth, label, f"{p[k]:.6f}", *(f"{x:.6f}" for x in p)])
    return rows


def stream_predictions(
    predictor,
    records: list[Record],
    out_csv: Path,
    identity: dict,
    chunk_size: int = DEFAULT_CHUNK,
    resume: bool = False,
    procs: Processes | None = None,
    options: dict | None = None,
) -> Path:
    """Predicts this process's shard of ``records`` chunk by chunk into its part file, then (main process) joins
    the parts, in rank order, into ``out_csv``.

    ``identity`` (input, run and options, from ``predict_file``) is kept in each progress file, so that
    ``resume`` continues only the same prediction. A chunk is on disk before its progress names it: a kill
    between the two only makes that chunk be predicted again, over the bytes the resumed run cuts off.
    """
    procs = procs or Processes()
    check_chunk_size(chunk_size)
    check_resume(out_csv, identity, shard_bounds(len(records), procs.world, chunk_size), resume)
    procs.barrier()  # no process writes a progress file before every process has checked the old ones
    # true_label and correct make a labelled input's predictions their own error list; decided over all rows.
    labelled = any(r.label is not None for r in records)
    thresholds = getattr(predictor, "thresholds", None)  # a multi-label run's (the ONNX backend's too)
    start, end = my_shard(len(records), chunk_size, procs)
    shard = records[start:end]
    files = shard_files(out_csv, procs.rank, procs.world)
    state = {**identity, "format": PROGRESS_FORMAT, "shard": [start, end], "chunk_size": chunk_size}
    if resume and files.progress.exists():
        saved = read_progress(files.progress)
        done, offset = int(saved["rows_done"]), int(saved["bytes"])
        log.info("resuming %s after row %d of %d (this process's shard)", files.part, done, len(shard))
    else:
        probs_header = [f"p_{c}" for c in predictor.classes]
        if thresholds is not None:
            truth = ["true_labels", "correct"] if labelled else []
            header = [["row", "image", *truth, "labels", *probs_header]]
        else:
            truth = ["true_label", "correct"] if labelled else []
            header = [["row", "image", *truth, "label", "confidence", *probs_header]]
        with open(files.part, "wb") as f:
            f.write(csv_bytes(header) if procs.is_main else b"")  # the first shard carries the one header
        done, offset = 0, files.part.stat().st_size
        write_atomic(files.progress, json.dumps({**state, "rows_done": 0, "bytes": offset}))
    with open(files.part, "r+b") as f:
        f.truncate(offset)  # whatever a killed run wrote after its last recorded chunk
        f.seek(offset)
        for probs in predict_chunks(predictor, shard[done:], chunk_size, procs.is_main, options):
            rows = shard[done : done + len(probs)]
            decided = prediction_rows(rows, probs, predictor.classes, labelled, predictor.decision, thresholds)
            f.write(csv_bytes(decided))
            f.flush()
            os.fsync(f.fileno())
            done, offset = done + len(rows), f.tell()
            write_atomic(files.progress, json.dumps({**state, "rows_done": done, "bytes": offset}))
    procs.barrier()
    if procs.is_main:
        join_parts(out_csv, procs.world)
    procs.barrier()
    return out_csv


def join_parts(out_csv: Path, world: int) -> None:
    """The shards' parts, in rank order, become ``out_csv``; progress files go only once it is whole, so a kill
    here leaves a resumable state (the first part is cut back to its recorded length on resume)."""
    first = shard_files(out_csv, 0, world)
    with open(first.part, "ab") as f:
        for k in range(1, world):
            with open(shard_files(out_csv, k, world).part, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)
        f.flush()
        os.fsync(f.fileno())
    first.part.replace(out_csv)
    for k in range(world):
        files = shard_files(out_csv, k, world)
        files.part.unlink(missing_ok=True)
        files.progress.unlink(missing_ok=True)
