"""Reading user data into records, and checking every row before any work starts.

Two layouts:

- a folder ``ROOT/<label>/<image files>`` (labels from sub-folder names; a flat folder of images is unlabeled),
  with text from a captions CSV (columns ``image``, ``text``) matched by relative path or unique file name;
- a manifest ``.csv``, ``.jsonl`` or ``.parquet`` with columns ``image``, ``text`` and (optionally) ``label``,
  image paths relative to the manifest's folder or absolute.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, MmfuseError
from .filestats import file_index
from .images import IMAGE_SUFFIXES, MAX_PIXELS, check_image

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
# Lone surrogates are what surrogateescape turns undecodable bytes into: their presence means "not UTF-8".
_SURROGATES = {chr(c) for c in range(0xDC80, 0xDD00)}


@dataclass
class Record:
    image: Path
    text: str
    label: str | None
    row: int
    """Where the row came from: the manifest's 1-based data row, or the file's position in a folder listing."""
    source: str
    """The image as the user wrote it (relative path), for reports and predictions."""


@dataclass
class Problem:
    row: int
    image: str
    reason: str


def data_error(problems: list[Problem], source) -> DataError:
    return DataError([(p.row, p.image, p.reason) for p in problems], str(source))


def _is_not_utf8(value: str) -> bool:
    return any(ch in _SURROGATES for ch in value)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MmfuseError(f"{path} is UTF-16 text; save it as UTF-8 (most editors and pandas' to_csv write UTF-8).")
    # Undecodable bytes survive as surrogates, so the rows holding them can be reported one by one.
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _read_table(path: Path) -> tuple[list[str], list[dict], list[Problem]]:
    """A manifest's columns, its rows (each with ``_row``: the data row, or the line of a .jsonl) and the rows that
    could not be read at all (a CSV row with more or fewer cells than the header, a line that is not JSON).

    pandas only for parquet: importing it costs half a second of every command.
    """
    rows, problems = [], []
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # The csv module, unlike pandas' C parser, keeps undecodable bytes as surrogates we can report per row.
            reader = csv.reader(io.StringIO(_decode(path), newline=""))
            header = next(reader, [])
            n = 0
            for row in reader:
                if not row:
                    continue
                n += 1
                if len(row) != len(header):
                    at = header.index("image") if "image" in header else len(row)
                    why = f"has {len(row)} cell(s) but the header names {len(header)} columns"
                    if len(row) > len(header):
                        why += " (a text with an unquoted comma?)"
                    problems.append(Problem(n, row[at] if at < len(row) else "", why))
                    continue
                rows.append({**dict(zip(header, row)), "_row": n})
            return header, rows, problems
        if suffix == ".jsonl":
            for n, line in enumerate(_decode(path).splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(Problem(n, "", f"line {n} is not valid JSON ({e.msg})"))
                    continue
                if not isinstance(row, dict):
                    problems.append(Problem(n, "", f"line {n} is not a JSON object with image, text and label keys"))
                    continue
                rows.append({**row, "_row": n})
            return list(dict.fromkeys(k for row in rows for k in row if k != "_row")), rows, problems
        if suffix == ".parquet":
            import pandas as pd

            df = pd.read_parquet(path)
            for col in df.columns:
                df[col] = df[col].map(
                    lambda v: v.decode("utf-8", errors="surrogateescape") if isinstance(v, bytes) else v
                )
            records = df.to_dict("records")
            return [str(c) for c in df.columns], [{**r, "_row": i} for i, r in enumerate(records, 1)], problems
    except (csv.Error, OSError, ValueError, ImportError) as e:
        raise MmfuseError(f"Could not read manifest {path}: {e}") from None
    raise MmfuseError(f"{path}: manifests must be {', '.join(MANIFEST_SUFFIXES)}")


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an integer column with a null in it comes back from parquet as floats: 1.0 is 1
    return str(value)


def _require_columns(columns: list[str], path: Path, needed: list[str]) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise MmfuseError(
            f"{path} is missing column(s) {missing}; it has {columns}. "
            "Manifests need columns image, text and label (label is optional for predict)."
        )


def read_manifest(path: Path, need_label: bool) -> tuple[list[Record], list[Problem]]:
    columns, rows, problems = _read_table(path)
    if not rows and not problems:
        raise MmfuseError(f"{path} has no data rows.")
    _require_columns(columns, path, ["image", "text"] + (["label"] if need_label else []))
    has_label = "label" in columns
    records = []
    for row in rows:
        source = _cell(row.get("image")).strip()
        image = Path(source) if Path(source).is_absolute() else path.parent / source
        label = _cell(row.get("label")).strip() if has_label else None
        records.append(Record(image, _cell(row.get("text")), label or None, row["_row"], source))
    return records, problems


def read_captions(path: Path) -> dict[str, str]:
    """A captions CSV as {relative path or file name: text}."""
    columns, rows, problems = _read_table(Path(path))
    if problems:
        raise data_error(problems, path)
    _require_columns(columns, Path(path), ["image", "text"])
    captions = {}
    for r in rows:
        key = _cell(r.get("image")).replace("\\", "/").lstrip("./")
        if key in captions and captions[key] != _cell(r.get("text")):
            raise MmfuseError(f"{path}: '{key}' has two different captions (rows {r['_row']} and an earlier one).")
        captions[key] = _cell(r.get("text"))
    return captions


def read_folder(root: Path, captions: dict[str, str] | None) -> tuple[list[Record], list[Problem]]:
    """ROOT/<label>/<images> (labelled) or ROOT/<images> (unlabeled)."""
    problems: list[Problem] = []
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    groups = [(d.name, sorted(p for p in d.rglob("*") if p.is_file())) for d in subdirs] or [
        (None, sorted(p for p in root.iterdir() if p.is_file()))
    ]
    files, ignored = [], []
    if subdirs:
        stray = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        problems += [Problem(0, p.name, "image outside every class folder, so it has no label") for p in stray]
    for label, paths in groups:
        images = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += [p for p in paths if p.suffix.lower() not in IMAGE_SUFFIXES and not p.name.startswith(".")]
        if label is not None and not images:
            problems.append(Problem(0, f"{label}/", f"class '{label}' has no images"))
        files += [(label, p) for p in images]
    if ignored:
        log.warning(
            "ignored %d file(s) that are not images (%s), e.g. %s",
            len(ignored),
            ", ".join(sorted(IMAGE_SUFFIXES)),
            ignored[0],
        )
    if not files and not problems:
        raise MmfuseError(f"No images found in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}).")
    by_name = Counter(p.name for _, p in files)
    records, used = [], set()
    for i, (label, p) in enumerate(files, start=1):
        rel = p.relative_to(root).as_posix()
        text = ""
        if captions is not None:
            key = rel if rel in captions else p.name
            if key == p.name and key in captions and by_name[p.name] > 1:
                problems.append(
                    Problem(
                        i,
                        rel,
                        f"its caption is keyed by the bare name '{p.name}', which {by_name[p.name]} "
                        "images share; key it by the path relative to the folder",
                    )
                )
            else:
                text = captions.get(key, "")
                used.add(key)
        records.append(Record(p, text, label, i, rel))
    unused = sorted(set(captions or ()) - used)
    if unused:
        log.warning("%d caption(s) match no image in %s, e.g. '%s'", len(unused), root, unused[0])
    return records, problems


def read_data(path: str | Path, captions: str | Path | None = None, need_label: bool = True):
    """Reads a folder or manifest into records, plus problems found while listing (empty classes)."""
    path = Path(path)
    if not path.exists():
        raise MmfuseError(f"Data not found: {path}")
    if path.is_dir():
        return read_folder(path, read_captions(Path(captions)) if captions else None)
    if captions:
        raise MmfuseError("--captions is for folder data; a manifest carries its own text column.")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise MmfuseError(f"{path}: expected a folder or a manifest ending in {', '.join(MANIFEST_SUFFIXES)}")
    return read_manifest(path, need_label)


def find_problems(
    records: list[Record],
    *,
    labels: list[str] | None = None,
    need_label: bool = True,
    need_text: bool = True,
    max_pixels: int = MAX_PIXELS,
    workers: int = 4,
    no_text_reason: str = "no text",
) -> list[Problem]:
    """Checks every row in one pass: image readable and sane in size, text present and UTF-8, label known."""
    known = set(labels) if labels is not None else None
    problems = []
    # Remembered per file across runs while its size and mtime hold: a warm run decodes nothing.
    image_reasons = file_index().values(
        f"check-v1:{max_pixels}", [str(r.image) for r in records], lambda p: check_image(p, max_pixels), workers
    )
    for rec, image_reason in zip(records, image_reasons):
        if not rec.source:
            problems.append(Problem(rec.row, rec.source, "no image path"))
            continue
        if image_reason:
            problems.append(Problem(rec.row, rec.source, image_reason))
        if _is_not_utf8(rec.text):
            problems.append(Problem(rec.row, rec.source, "text is not valid UTF-8"))
        elif need_text and not rec.text.strip():
            problems.append(Problem(rec.row, rec.source, no_text_reason))
        if need_label and not rec.label:
            problems.append(Problem(rec.row, rec.source, "no label"))
        elif rec.label and _is_not_utf8(rec.label):
            problems.append(Problem(rec.row, rec.source, "label is not valid UTF-8"))
        elif rec.label and known is not None and rec.label not in known:
            problems.append(
                Problem(
                    rec.row, rec.source, f"unknown label '{rec.label}' (the model knows: {', '.join(sorted(known))})"
                )
            )
    return problems


def load_checked(
    path: str | Path,
    *,
    captions=None,
    labels=None,
    need_label=True,
    need_text=True,
    skip_bad=False,
    skipped_csv: Path | None = None,
    no_text_reason: str = "no text",
) -> list[Record]:
    """Reads and checks data; raises one DataError listing every bad row, or skips and records them."""
    records, problems = read_data(path, captions, need_label)
    problems += find_problems(
        records, labels=labels, need_label=need_label, need_text=need_text, no_text_reason=no_text_reason
    )
    if problems and not skip_bad:
        raise data_error(problems, path)
    repeats = len(records) - len({r.image for r in records})
    if repeats:
        log.warning("%d row(s) of %s list an image that an earlier row lists too", repeats, path)
    if problems:
        bad_rows = {p.row for p in problems}
        records = [r for r in records if r.row not in bad_rows]
        if skipped_csv is not None:
            write_skipped(skipped_csv, problems, str(path))
        log.warning(
            "skipped %d bad row(s) of %s%s", len(bad_rows), path, f", listed in {skipped_csv}" if skipped_csv else ""
        )
    if not records:
        raise MmfuseError(f"No usable rows left in {path}.")
    return records


def write_skipped(path: Path, problems: list[Problem], source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["source", "row", "image", "reason"])
        w.writerows([source, p.row, p.image, p.reason] for p in problems)


def label_list(records: list[Record]) -> list[str]:
    return sorted({r.label for r in records if r.label})


def stratified_split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Holds out about ``fraction`` of each class; classes with a single row stay in train."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Record]] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_val = 0 if len(group) < 2 else max(1, int(round(len(group) * fraction)))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return sorted(train, key=lambda r: r.row), sorted(val, key=lambda r: r.row)
