"""Captioning files: ``mmfuse caption`` into a captions CSV, and ``fill_missing_captions`` for rows without text.

A captions CSV has columns ``image``, ``text``, ``hash`` (of the file's bytes) and ``model``; it works as
``--captions`` for folder data. Rows are appended and flushed after every batch, so a killed run resumes where it
stopped.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from filelock import FileLock
from PIL import Image

from mmfuse.captioning.captioners import DEFAULT_CAPTIONER, Captioner, build_captioner, check_captioner_name
from mmfuse.data.checks import find_problems, write_skipped
from mmfuse.data.images import IMAGE_SUFFIXES, load_image
from mmfuse.data.read import MANIFEST_SUFFIXES, read_data
from mmfuse.data.records import Problem, Record, data_error
from mmfuse.distributed import gather_lists, launch_state, share
from mmfuse.errors import MmfuseError
from mmfuse.progress import Progress

log = logging.getLogger(__name__)

COLUMNS = ["image", "text", "hash", "model"]
# PIL releases the GIL while decoding and resizing, so threads overlap file reads with the model.
LOAD_WORKERS = max(1, min(32, os.cpu_count() or 1))


def _open(path: Path, load: Callable = load_image) -> tuple[Image.Image | None, str | None]:
    try:
        return load(path), None
    except ValueError as e:
        return None, str(e)
    except Exception as e:  # PIL raises a zoo of types for corrupt files; all mean the same thing here
        return None, f"unreadable image ({type(e).__name__}: {e})"


def _loaded_batches(
    items: list, paths: list[Path], batch_size: int, load: Callable, ahead: int = 2
) -> Iterator[list[tuple]]:
    """Batches of (item, prepared image or None, error), decoded by threads; ``ahead`` batches are decoded while the
    model runs one."""
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        pending: deque = deque()
        for i in range(0, len(items), batch_size):
            futures = [pool.submit(_open, p, load) for p in paths[i : i + batch_size]]
            pending.append((items[i : i + batch_size], futures))
            if len(pending) > ahead:
                chunk, futures = pending.popleft()
                yield [(it, *f.result()) for it, f in zip(chunk, futures)]
        while pending:
            chunk, futures = pending.popleft()
            yield [(it, *f.result()) for it, f in zip(chunk, futures)]


def file_hash(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:32]


def _hashes(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(LOAD_WORKERS) as pool:
        return list(pool.map(file_hash, paths))


def list_images(data: str | Path) -> list[Record]:
    """Every image under a folder (recursively, relative paths as sources), or every distinct image of a manifest."""
    data = Path(data)
    if data.is_dir():
        files = sorted(
            p
            for p in data.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(data).parts)
        )
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise MmfuseError(f"No images found under {data} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
        # Captions and manifests often sit beside the images; anything else is worth a word.
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES | set(MANIFEST_SUFFIXES)]
        if others:
            log.warning("ignored %d file(s) under %s that are not images, e.g. %s", len(others), data, others[0])
        return [Record(p, "", None, i, p.relative_to(data).as_posix()) for i, p in enumerate(images, start=1)]
    records, _ = read_data(data, need_label=False)
    seen, unique = set(), []
    for r in records:  # a manifest may list an image under several texts; it needs one caption
        if r.source not in seen:
            seen.add(r.source)
            unique.append(r)
    return unique


def _read_captions_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a captions CSV this module wrote, after cutting a last line that a kill left half-written."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    raw = path.read_bytes()
    # The header is checked before anything is cut: an --out that names someone's image or other file was
    # truncated at its last newline byte, as if it were a captions file a kill had left half-written.
    try:
        header = next(csv.reader([raw.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")]), [])
    except UnicodeDecodeError:
        header = None
    if header != COLUMNS:
        found = f"columns {header}" if header is not None else "not UTF-8 text"
        raise MmfuseError(
            f"{path} exists but is not a captions file written by mmfuse ({found}, expected columns {COLUMNS}). "
            "Pass another --out, or move it away."
        )
    if not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("%s: dropping a half-written last row (the previous run was killed mid-write)", path)
        with open(path, "r+b") as f:
            f.truncate(keep)
        raw = raw[:keep]
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise MmfuseError(f"{path} is a captions file with bytes that are not UTF-8 ({e}); move it away.") from None
    if not lines:
        return []
    reader = csv.DictReader(lines)
    return [row for row in reader if None not in row.values()]


def _rewrite(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _append_rows(
    path: Path, captioner: Captioner, model: str, items: list[tuple[Record, str]], batch_size: int, show: bool
) -> tuple[dict[str, str], list[Problem]]:
    """Captions ``(record, hash)`` pairs and appends one row per image, flushed per batch.

    Returns:
        {hash: caption} for what was written, and the images that failed to load or got no caption.
    """
    new = not path.exists() or path.stat().st_size == 0
    written: dict[str, str] = {}
    problems: list[Problem] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    # Progress, not a bare tqdm: a caption log redirected to a file gets plain lines, not carriage returns.
    bar = Progress(len(items), f"captioning ({model})", unit="img", show=show)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        # On a GPU, batches are decoded and captioned by turns, not side by side: every torch call gives up the GIL
        # and then waits to get it back behind the decoding threads. The seed job's first batch of 1,024 took 5-6 s
        # beside 16 decoding threads on an H200 machine, 2-4 s by turns (bench/RESULTS.md).
        on_gpu = getattr(captioner, "device", torch.device("cpu")).type == "cuda"
        paths = [r.image for r, _ in items]
        for batch in _loaded_batches(items, paths, batch_size, captioner.load, ahead=0 if on_gpu else 2):
            good = [(it, im) for it, im, err in batch if err is None]
            problems += [Problem(r.row, r.source, err) for (r, _), _, err in batch if err is not None]
            texts = captioner([im for _, im in good]) if good else []
            rows = []
            for ((rec, digest), _), text in zip(good, texts):
                if not text.strip():
                    problems.append(Problem(rec.row, rec.source, f"the captioner {model} returned no text"))
                    continue
                rows.append([rec.source, text, digest, model])
                written[digest] = text
            w.writerows(rows)
            f.flush()  # a row on disk survives kill -9: a rerun only redoes the batch in flight
            bar.update(len(batch))
    bar.close()
    return written, problems


def part_files(out_csv: Path) -> list[Path]:
    """The files the processes of a launch write their captions to, beside ``out_csv`` until they are merged."""
    return sorted(out_csv.parent.glob(glob.escape(out_csv.name) + ".rank*.part"))


def _merge_parts(out_csv: Path, model: str, order: dict[str, int]) -> None:
    """Folds the part files into ``out_csv``: every row in input order (rows of other images first), each (image, hash)
    once. The parts go only once ``out_csv`` holds their rows: a kill in between leaves rows twice, kept once
    by the next run."""
    parts = part_files(out_csv)
    if not parts:
        return
    extra = [row for part in parts for row in _read_captions_csv(part)]
    if other := sorted({r["model"] for r in extra} - {model}):
        raise MmfuseError(
            f"{parts[0]} (left by a launch that was stopped) holds captions by {', '.join(other)}, not {model}. "
            "Pass the same --model to resume, or remove the .part files."
        )
    merged, seen = [], set()
    for row in _read_captions_csv(out_csv) + extra:
        if (row["image"], row["hash"]) not in seen:
            seen.add((row["image"], row["hash"]))
            merged.append(row)
    # In input order, as one process writes them, whichever launch (a killed one, its rerun) captioned a row; rows of
    # images not in this input keep their places, first. Stable: a file's own order breaks ties.
    merged.sort(key=lambda r: order.get(r["image"], -1))
    _rewrite(out_csv, merged)
    for part in parts:
        part.unlink()


def caption_file(
    data: str | Path,
    out_csv: str | Path,
    model: str = DEFAULT_CAPTIONER,
    batch_size: int = 64,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    skip_bad: bool = False,
    device: str | torch.device | None = None,
    show: bool = True,
) -> Path:
    """Captions every image of a folder (recursively) or manifest into ``out_csv``; a rerun resumes.

    Images already in ``out_csv`` under the same path and content hash are skipped; a changed file is captioned
    again and its old row dropped. Bad images (missing, corrupt, oversized) stop the run before any captioning,
    unless ``skip_bad``, which lists them in ``<out>.skipped.csv``, as it does images the model gives no text.

    Under ``accelerate launch`` each process captions a contiguous share of the images still to caption into its own
    ``<out>.rank<N>.part``, and the main process then merges the parts into ``out_csv``: the same rows in the same
    order as one process writes. A rerun after a killed launch skips what any part file holds.

    Raises:
        DataError: bad images, without ``skip_bad``.
        MmfuseError: the model returned no text for some images (the others are written).
    """
    out_csv = Path(out_csv)
    if out_csv.is_dir():
        raise MmfuseError(f"--out {out_csv} is a directory; give the CSV to write, e.g. {out_csv}/captions.csv")
    if out_csv.suffix.lower() in IMAGE_SUFFIXES | {".parquet", ".jsonl", ".json"}:
        # Captions are written as CSV (the format --captions reads), never into an image or another format.
        raise MmfuseError(f"--out {out_csv}: captions are written as CSV; give a path ending in .csv")
    check_captioner_name(model)
    state = launch_state()
    main = state is None or state.is_main_process
    skipped_csv = out_csv.with_name(out_csv.stem + ".skipped.csv")
    if main:
        skipped_csv.unlink(missing_ok=True)
    records = list_images(data)
    problems = find_problems(records, need_label=False, need_text=False)
    if problems and not skip_bad:
        raise data_error(problems, data)
    if problems:
        bad = {p.row for p in problems}
        records = [r for r in records if r.row not in bad]
        if main:
            write_skipped(skipped_csv, problems, str(data))
            log.warning("skipping %d bad image(s), listed in %s", len(bad), skipped_csv)
        if not records:  # it said "wrote OUT" and wrote nothing
            raise MmfuseError(
                f"No usable images left in {data}: every image was bad, listed with their reasons in {skipped_csv}."
            )

    hashes = dict(zip((r.source for r in records), _hashes([r.image for r in records])))
    order = {r.source: i for i, r in enumerate(records)}
    if main:  # what a killed launch left in its parts counts as done; a half-written last row is cut here, once
        _merge_parts(out_csv, model, order)
        _read_captions_csv(out_csv)
    if state is not None:
        state.wait_for_everyone()
    rows = _read_captions_csv(out_csv)
    if other := sorted({r["model"] for r in rows} - {model}):
        raise MmfuseError(
            f"{out_csv} holds captions by {', '.join(other)}, not {model}. Pass another --out, "
            "or the same --model to resume."
        )
    # Keep one row per (image, hash): a changed image's stale row goes, a duplicated row is kept once.
    kept, seen = [], set()
    for row in rows:
        key = (row["image"], row["hash"])
        if key in seen or (row["image"] in hashes and hashes[row["image"]] != row["hash"]):
            continue
        seen.add(key)
        kept.append(row)
    if len(kept) != len(rows) and main:
        _rewrite(out_csv, kept)
    todo = [(r, hashes[r.source]) for r in records if (r.source, hashes[r.source]) not in seen]
    if len(todo) < len(records) and main:
        log.info("%d of %d image(s) already captioned in %s", len(records) - len(todo), len(records), out_csv)
    if not todo:
        return out_csv

    if state is None:
        captioner = build_captioner(model, device, max_new_tokens, num_beams)
        _, failed = _append_rows(out_csv, captioner, model, todo, batch_size, show)
    else:
        mine = [todo[i] for i in share(len(todo), state.process_index, state.num_processes)]
        failed = []
        if mine:
            captioner = build_captioner(model, device or state.device, max_new_tokens, num_beams)
            part = out_csv.with_name(f"{out_csv.name}.rank{state.process_index}.part")
            _, failed = _append_rows(part, captioner, model, mine, batch_size, show and main)
        failed = [p for ours in gather_lists(failed) for p in ours]  # every share is written once this returns
        if main:
            _merge_parts(out_csv, model, order)
        state.wait_for_everyone()
    if failed:
        if main:
            write_skipped(skipped_csv, failed, str(data))
        if not skip_bad:
            raise MmfuseError(
                f"{len(failed)} image(s) got no caption (listed in {skipped_csv}), e.g. "
                f"{failed[0].image}: {failed[0].reason}. The other captions are in {out_csv}."
            )
        if main:
            log.warning("%d image(s) got no caption, listed in %s", len(failed), skipped_csv)
    return out_csv


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``path`` itself (created empty if absent, removed again if left empty), so the
    run directory gets no ``captions.csv.lock`` beside it. A lock file cannot be removed safely once released (a
    waiting process would lock a file that no longer has a name), but the locked file is the cache, which stays.
    """
    if os.name != "posix":  # msvcrt's locks are mandatory and would stop the reads under the lock
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        with FileLock(Path(tempfile.gettempdir()) / f"mmfuse-captions-{key}.lock"):
            yield
        return
    import fcntl  # here, not at the top: POSIX only

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                here = os.stat(path)
            except FileNotFoundError:
                here = None
            held = os.fstat(fd)
            if here is None or (here.st_dev, here.st_ino) != (held.st_dev, held.st_ino):
                continue  # the holder before us removed the file it left empty: lock the one now at the path
            try:
                yield
            finally:
                if os.fstat(fd).st_size == 0:  # nothing was captioned (the captioner failed to load)
                    path.unlink(missing_ok=True)
            return
        finally:
            os.close(fd)  # releases the lock


def fill_missing_captions(
    records: list[Record], model: str, cache_csv: Path, batch_size: int = 32, device: str | torch.device | None = None
) -> list[Record]:
    """The same records in the same order, with empty text replaced by a caption from ``model``.

    Captions are cached in ``cache_csv`` by image content and model, so a rerun (or another split holding the
    same image) does not caption again. A lock on the file lets several training processes share the cache.

    Raises:
        MmfuseError: the model gave no caption for some rows (those captioned are cached).
    """
    need = [i for i, r in enumerate(records) if not r.text.strip()]
    if not need:
        return records
    cache_csv = Path(cache_csv)
    cache_csv.parent.mkdir(parents=True, exist_ok=True)
    digests = _hashes([records[i].image for i in need])
    with locked(cache_csv):
        cached = {r["hash"]: r["text"] for r in _read_captions_csv(cache_csv) if r["model"] == model}
        todo, queued = [], set()
        for i, digest in zip(need, digests):
            if digest not in cached and digest not in queued:
                queued.add(digest)
                todo.append((records[i], digest))
        failed: list[Problem] = []
        if todo:
            log.info("captioning %d row(s) without text with %s (cached in %s)", len(todo), model, cache_csv)
            captioner = build_captioner(model, device)
            written, failed = _append_rows(cache_csv, captioner, model, todo, batch_size, show=True)
            cached.update(written)
            del captioner
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the captioner is done; training wants the memory
    if failed:
        lines = "\n".join(f"  row {p.row}: {p.image}: {p.reason}" for p in failed[:20])
        more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
        raise MmfuseError(
            f"--caption-missing {model} gave no caption for {len(failed)} row(s):\n{lines}{more}\n"
            "Give these rows text, pass another --caption-missing model, or remove them."
        )
    out = list(records)
    for i, digest in zip(need, digests):
        out[i] = replace(records[i], text=cached[digest])
    return out
