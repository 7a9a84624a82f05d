"""Reading user data into records, and checking every row before any work starts.

Two layouts:

- a folder ``ROOT/<label>/<image files>`` (labels from sub-folder names; a flat folder of images is unlabeled),
  with text from a captions CSV (columns ``image``, ``text``) matched by relative path or unique file name;
- a manifest ``.csv``, ``.jsonl`` or ``.parquet`` with columns ``image``, ``text`` and (optionally) ``label``,
  image paths relative to the manifest's folder or absolute;
- a Hugging Face "imagefolder": a folder holding ``metadata.csv`` or ``metadata.jsonl``, a manifest whose image
  column is named ``file_name`` (as Hugging Face names it; ``image`` works too); without a ``label`` column, each
  image's class is its top folder, as in the folder layout.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmfuse.data.filestats import default_workers, file_index
from mmfuse.data.images import IMAGE_SUFFIXES, MAX_PIXELS, check_image
from mmfuse.errors import DataError, MmfuseError

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
"""The manifest of a Hugging Face imagefolder, found in the folder given as data."""
COLUMNS = ("image", "text", "label")
# Names other tools give these columns: named in the error as renames to make, never read silently in their place.
_ALIASES = {
    "image": {"path", "file", "filename", "file_name", "filepath", "image_path", "img", "img_path", "image_file"},
    "text": {"caption", "captions", "description", "sentence", "prompt", "title", "txt"},
    "label": {"labels", "class", "category", "target", "y", "class_name", "label_name"},
}
# Lone surrogates are what surrogateescape turns undecodable bytes into: their presence means "not UTF-8".
_SURROGATES = re.compile("[\udc80-\udcff]")
# Any other lone surrogate comes from a JSON escape such as "\ud83d" whose pair was cut off (scraped text): no
# tokenizer can encode it, so it must be a bad row, not a TypeError deep in the tokenizer.
_ANY_SURROGATE = re.compile("[\ud800-\udfff]")
# Characters every BERT-style tokenizer drops (controls, NUL, format characters, private use, lone combining marks):
# a text made only of them is no text, though str.strip() keeps it.
_INVISIBLE = {"Cc", "Cf", "Co", "Cs", "Mn", "Me", "Zs", "Zl", "Zp"}
CHARS_PER_TOKEN = 16
"""Texts are cut at ``max_length * CHARS_PER_TOKEN`` characters before tokenizing: a token averages about 4
characters, so the cut lies far past what the tokenizer keeps, and a 50 MB cell never reaches it."""
MAX_TEXT_CHARS = 8192 * CHARS_PER_TOKEN
"""The cut made where records are loaded, before the model's max_length is known: enough for the longest text
towers (8,192 positions)."""
# A long product description or scraped page is one valid cell; csv's default refuses any over 128 KB. Python's
# limit is a C long, which is 32 bits on Windows, so sys.maxsize would overflow there.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(slots=True)  # no per-row __dict__: a million rows are held at once
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
    return _SURROGATES.search(value) is not None


def text_problem(text: str) -> str | None:
    """Why a text cannot be given to a tokenizer as it is (the bad-row reason), or None for a usable one."""
    if _is_not_utf8(text):
        return "text is not valid UTF-8"
    found = _ANY_SURROGATE.search(text)
    if found:
        return (
            f"text holds a lone surrogate (\\u{ord(found.group()):04x} at character {found.start()}): half of a "
            "UTF-16 pair, e.g. a JSON escape cut off from its partner; no tokenizer can encode it"
        )
    return None


def has_visible_text(text: str) -> bool:
    """Whether a text holds anything a tokenizer reads: NUL, control and format characters or lone combining marks
    alone are dropped by it, leaving an empty input the model was never trained on."""
    return any(unicodedata.category(ch) not in _INVISIBLE for ch in text)


def clip_text(text: str, max_chars: int) -> str:
    """The text cut to ``max_chars`` characters: a tokenizer that truncates to N tokens still reads, and holds in
    memory, all of its input first (a 50 MB text took 24 s and 3 GB for 128 tokens)."""
    return text if len(text) <= max_chars else text[:max_chars]


def clip_texts(records: list[Record], max_chars: int, source) -> None:
    """Cuts over-long texts in place, with one warning for the file."""
    cut = 0
    for r in records:
        if len(r.text) > max_chars:
            r.text = clip_text(r.text, max_chars)
            cut += 1
    if cut:
        log.warning(
            "cut %d text(s) of %s to their first %d characters before tokenizing (the text tower reads far fewer)",
            cut,
            source,
            max_chars,
        )


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MmfuseError(f"{path} is UTF-16 text; save it as UTF-8 (most editors and pandas' to_csv write UTF-8).")
    # Files that are not text at all would otherwise be parsed into a header of garbage.
    head = raw[:400]
    if len(head) >= 8 and head[1::2].count(0) > len(head) // 4 and head[::2].count(0) == 0:
        raise MmfuseError(f"{path} is UTF-16 text (without a byte-order mark); save it as UTF-8.")
    if raw.startswith(b"PAR1"):
        raise MmfuseError(f"{path} is a parquet file; name it with the .parquet suffix.")
    if raw.startswith(b"PK\x03\x04"):
        raise MmfuseError(f"{path} is a zip archive (an Excel workbook?), not text; export it as CSV (UTF-8).")
    # Undecodable bytes survive as surrogates, so the rows holding them can be reported one by one.
    return raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def read_table(path: Path) -> tuple[list[str], list[dict], list[Problem]]:
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
            if header and header[0].startswith("sep=") and not any(c.strip() for c in header[1:]):
                header = next(reader, [])  # Excel's "sep=," delimiter hint, not the header
            header = _columns(header, path)
            n, widths = 0, set()
            for row in reader:
                if not row:
                    continue
                n += 1
                if len(row) != len(header):
                    widths.add(len(row))
                    at = header.index("image") if "image" in header else len(row)
                    why = f"has {len(row)} cell(s) but the header names {len(header)} columns"
                    if any("\n" in cell for cell in row):
                        why += " (a quote left open, running on over the following lines?)"
                    elif len(row) > len(header):
                        why += " (a text with an unquoted comma?)"
                    problems.append(Problem(n, row[at] if at < len(row) else "", why))
                    continue
                cells = dict(zip(header, row))
                cells["_row"] = n
                rows.append(cells)
            if not rows and n > 1 and len(widths) == 1:
                # Every row disagrees with the header the same way: the header is what is wrong, not the rows.
                raise MmfuseError(
                    f"{path}: its header names {len(header)} column(s) {header} but every row has {widths.pop()} "
                    "cells; fix the header line (image,text,label)."
                )
            return header, rows, problems
        if suffix == ".jsonl":
            text = _decode(path)
            if text.lstrip().startswith("["):
                # One JSON array of objects (pandas' to_json default, or a .json renamed) is not JSON Lines: every
                # line would be reported as broken, which hides what is wrong with the file as a whole.
                try:
                    whole = json.loads(text)
                except json.JSONDecodeError:
                    whole = None
                if isinstance(whole, list):
                    raise MmfuseError(
                        f"{path} is one JSON array, not JSON Lines: write one JSON object per line "
                        "(pandas: df.to_json(path, orient='records', lines=True))."
                    )
            for n, line in enumerate(text.splitlines(), start=1):
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
                keys = [_column(k) for k in row]
                if len(set(keys)) < len(keys):
                    twice = sorted({k for k in keys if keys.count(k) > 1})
                    problems.append(Problem(n, "", f"line {n} gives key(s) {twice} twice, in different spellings"))
                    continue
                rows.append({**dict(zip(keys, row.values())), "_row": n})
            return list(dict.fromkeys(k for row in rows for k in row if k != "_row")), rows, problems
        if suffix == ".parquet":
            import pandas as pd  # deferred: half a second of every command otherwise (see above)

            # Only the columns mmfuse reads: a wide table's other columns would cost memory for every row.
            names = _parquet_columns(path)
            wanted = [c for c in names if _column(c) in COLUMNS] if names else None
            df = pd.read_parquet(path, columns=wanted) if wanted else pd.read_parquet(path)
            columns = _columns([str(c) for c in (names if names and not wanted else df.columns)], path)
            # Bytes are decoded per cell, not written back into the frame: pandas' Arrow-backed strings refuse the
            # surrogates that mark undecodable bytes, which made one bad cell fail the whole file.
            for i, values in enumerate(df.itertuples(index=False, name=None), 1):
                rows.append({**dict(zip(columns, values)), "_row": i})
            return columns, rows, problems
    except (csv.Error, OSError, ValueError, ImportError) as e:
        raise MmfuseError(f"Could not read manifest {path}: {e}") from None
    raise MmfuseError(f"{path}: manifests must be {', '.join(MANIFEST_SUFFIXES)}")


def _parquet_columns(path: Path) -> list[str] | None:
    """A parquet file's (or partitioned folder's) column names from its schema, without reading its rows; None if
    the schema cannot be read this way (the full read then says what is wrong)."""
    try:
        import pyarrow.parquet as pq

        return [str(c) for c in pq.ParquetDataset(path).schema.names]
    except Exception:  # pyarrow's errors for damaged files vary; the read that follows reports them
        return None


def _columns(header: list[str], path: Path) -> list[str]:
    """The header with the columns mmfuse reads spelled its way (' Image' is image); a column named twice is an
    error rather than one of the two being read and the other silently ignored."""
    columns = [_column(c) for c in header]
    twice = sorted({c for c in columns if c and columns.count(c) > 1})
    if twice:
        raise MmfuseError(
            f"{path}: column(s) {twice} appear more than once in the header {header}; keep one of each "
            "(mmfuse would not know which to read)."
        )
    return columns


def _column(name) -> str:
    name = str(name)
    return name.strip().lower() if name.strip().lower() in COLUMNS else name


def _cell(value) -> str:
    if type(value) is str:
        return value  # every CSV cell: the common case first
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")  # parquet binary columns
    if value is None or (isinstance(value, float) and np.isnan(value)) or type(value).__name__ in ("NAType", "NaTType"):
        return ""  # pandas' own missing values (nullable Int64, string columns) read as "<NA>" otherwise
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an integer column with a null in it comes back from parquet as floats: 1.0 is 1
    return str(value)


def _require_columns(columns: list[str], path: Path, needed: list[str], what: str = "") -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        what = what or (
            "Manifests need columns image, text and label (label is optional for predict; text for a model that "
            "uses no text, or was trained with --modality-dropout)."
        )
        renames = [
            f"{found} to {want}"
            for want in missing
            for found in columns
            if str(found).strip().lower() in _ALIASES[want]
        ]
        hint = f" Rename {', '.join(renames)}?" if renames else _header_hint(columns)
        raise MmfuseError(f"{path} is missing column(s) {missing}; it has {columns}.{hint} {what}")


def _header_hint(columns: list[str]) -> str:
    """Why a header may lack the columns it seems to have: another delimiter, or no header line at all."""
    if len(columns) == 1:
        for sep, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "'|'")):
            if sep in columns[0]:
                return f" The file looks separated by {name}: save it comma-separated (pandas: df.to_csv(path))."
    if any(Path(c.strip()).suffix.lower() in IMAGE_SUFFIXES for c in columns):
        return " Its first line looks like a data row: add a header line naming the columns."
    return ""


def read_manifest(
    path: Path, need_label: bool, need_text: bool = False, imagefolder: bool = False
) -> tuple[list[Record], list[Problem]]:
    """``need_text``: the text column must be there (captioning, an image-only model or one trained with modality
    dropout can do without it). ``imagefolder``: ``path`` is an imagefolder's ``metadata.csv``/``.jsonl``."""
    columns, rows, problems = read_table(path)
    if not rows and not problems:
        raise MmfuseError(f"{path} has no data rows.")
    if imagefolder:
        columns, rows = _imagefolder_columns(path, columns, rows)
        folder_labels = "label" not in columns  # the class is each image's top folder, as in the folder layout
        need_label = need_label and not folder_labels
    if rows or not problems:  # a .jsonl with no readable line has no columns to check: its lines are the error
        _require_columns(columns, path, ["image"] + (["text"] if need_text else []) + (["label"] if need_label else []))
    if rows and all(isinstance(r.get("image"), (bytes, dict)) for r in rows):
        raise MmfuseError(
            f"{path}: column image holds the images themselves (bytes), as Hugging Face datasets export them, not "
            "paths to image files. Save each image to a file and list its path (relative to the manifest's folder, "
            "or absolute) in the image column."
        )
    has_label = "label" in columns
    records = []
    folder, labels, text_cells = path.parent, {}, path.suffix.lower() == ".csv"
    for i, row in enumerate(rows):
        rows[i] = None  # each row's dict freed as its record is made: both lists are never whole at once
        n = row["_row"]
        if isinstance(row.get("image"), (bytes, dict)):
            problems.append(Problem(n, "", "image holds embedded image data, not the path of an image file"))
            continue
        source = _cell(row.get("image")).strip()
        # A list or an object would otherwise be trained on as its Python repr, "['a', 'b']". (A CSV's cells are text.)
        odd = [] if text_cells else [c for c in COLUMNS if isinstance(row.get(c), (list, tuple, dict, set, np.ndarray))]
        if odd:
            kind = {dict: "an object"}
            problems += [Problem(n, source, f"{c} is {kind.get(type(row[c]), 'a list')}, not one value") for c in odd]
            continue
        label = _cell(row.get("label")).strip() if has_label else None
        if imagefolder and folder_labels:
            parts = _caption_key(source).split("/")
            label = parts[0] if len(parts) > 1 else None
        label = labels.setdefault(label, label) if label else None  # one string per class, not one per row
        records.append(Record(_image_path(source, folder), _cell(row.get("text")), label, n, source))
    return records, problems


def _imagefolder_columns(path: Path, columns: list[str], rows: list[dict]) -> tuple[list[str], list[dict]]:
    """An imagefolder's metadata with Hugging Face's ``file_name`` column read as mmfuse's ``image``."""
    named = [c for c in columns if str(c).strip().lower() == "file_name"]
    if named and "image" in columns:
        raise MmfuseError(f"{path} has both a file_name and an image column; keep one (the image file's path).")
    if not named:
        return columns, rows
    for row in rows:
        if named[0] in row:
            row["image"] = row.pop(named[0])
    return ["image" if c == named[0] else c for c in columns], rows


def metadata_file(folder: Path) -> Path | None:
    """The ``metadata.csv`` or ``metadata.jsonl`` that makes ``folder`` a Hugging Face imagefolder, if any."""
    found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise MmfuseError(f"{folder} holds both {METADATA_FILES[0]} and {METADATA_FILES[1]}; keep one of them.")
    return found[0] if found else None


def _image_path(source: str, folder: Path) -> Path:
    """Where a manifest's image lies: relative to the manifest's folder, or absolute. A manifest written on Windows
    separates folders with backslashes, which name no folder here; they are read as slashes when that finds the file.
    """
    image = Path(source) if os.path.isabs(source) else folder / source
    if "\\" in source and not os.path.exists(image):
        posix = source.replace("\\", "/")
        alt = Path(posix) if Path(posix).is_absolute() else folder / posix
        if os.path.exists(alt):
            return alt
    return image


def _caption_key(image: str) -> str:
    key = image.strip().replace("\\", "/")
    while key.startswith("./"):  # not lstrip("./"), which also ate the dot of ".hidden/x.png" and the / of /abs
        key = key[2:]
    return key


def read_captions(path: Path) -> dict[str, str]:
    """A captions CSV as {relative path, absolute path or file name: text}."""
    path = Path(path)
    if not path.exists():
        raise MmfuseError(f"Captions file not found: {path}")
    if path.is_dir():
        raise MmfuseError(f"--captions {path} is a folder; give the captions CSV (columns image, text).")
    columns, rows, problems = read_table(path)
    if problems:
        raise data_error(problems, path)
    _require_columns(columns, path, ["image", "text"], what="A captions file needs columns image and text.")
    captions = {}
    for r in rows:
        key = _caption_key(_cell(r.get("image")))
        if key in captions and captions[key] != _cell(r.get("text")):
            raise MmfuseError(f"{path}: '{key}' has two different captions (rows {r['_row']} and an earlier one).")
        captions[key] = _cell(r.get("text"))
    return captions


def read_folder(root: Path, captions: dict[str, str] | None) -> tuple[list[Record], list[Problem]]:
    """ROOT/<label>/<images> (labelled) or ROOT/<images> (unlabeled)."""
    problems: list[Problem] = []
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    splits = {"train", "training", "val", "valid", "validation", "test", "testing", "eval"}
    if (
        subdirs
        and {d.name.lower() for d in subdirs} <= splits
        and all(any(c.is_dir() for c in d.iterdir()) for d in subdirs)
    ):
        # ROOT/train/<label>/..., ROOT/val/<label>/...: the split names would become the classes.
        names = ", ".join(d.name for d in subdirs)
        raise MmfuseError(
            f"{root} holds the splits {names}, each with its own class folders; pass one split as DATA "
            f"(e.g. {root / subdirs[0].name}) and the validation split with --val."
        )
    # Hidden files and folders are the system's, not data: macOS's ._x.jpg beside x.jpg is not an image at all.
    groups = [(d.name, sorted(p for p in d.rglob("*") if p.is_file() and not _hidden(p, d))) for d in subdirs] or [
        (None, sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")))
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
            absolute = Path(os.path.abspath(p)).as_posix()
            key = rel if rel in captions else absolute if absolute in captions else p.name
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


def _hidden(path: Path, top: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(top).parts)


def read_data(path: str | Path, captions: str | Path | None = None, need_label: bool = True, need_text: bool = False):
    """Reads a folder or manifest into records, plus problems found while listing (empty classes)."""
    path = Path(path)
    if not path.exists():
        raise MmfuseError(f"Data not found: {path}")
    if path.is_dir() and path.suffix.lower() == ".parquet":
        return read_manifest(path, need_label, need_text)  # a partitioned parquet dataset is a folder of parts
    meta = metadata_file(path) if path.is_dir() else None
    if meta is not None:
        if captions:
            raise MmfuseError(f"--captions is for folders without text; {path} has its texts in {meta.name}.")
        records, problems = read_manifest(meta, need_label, need_text, imagefolder=True)
        if need_label and records and not any(r.label for r in records):
            raise MmfuseError(
                f"{meta} has no label column and its images are not in class folders, so none has a label: add a "
                f"label column, or list each image under a folder named after its class (<label>/{records[0].source})."
            )
        return records, problems
    if path.is_dir():
        return read_folder(path, read_captions(Path(captions)) if captions else None)
    if captions:
        raise MmfuseError("--captions is for folder data; a manifest carries its own text column.")
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        hint = {
            ".tsv": " Save it comma-separated as .csv.",
            ".txt": " A comma-separated file with a header image,text,label can be renamed to .csv.",
            ".json": " Write JSON Lines (.jsonl), one object per line: df.to_json(path, orient='records', lines=True).",
            ".xlsx": " Save the sheet as CSV.",
        }.get(path.suffix.lower(), "")
        raise MmfuseError(f"{path}: expected a folder or a manifest ending in {', '.join(MANIFEST_SUFFIXES)}.{hint}")
    return read_manifest(path, need_label, need_text)


def _check_image(path: str, max_pixels: int) -> str | None:
    # A path the OS refuses to even look up (over 255 bytes a name, e.g. an embedded image's bytes written out as
    # its "path") makes exists() raise rather than answer: that is one bad row, not a crash.
    try:
        return check_image(path, max_pixels)
    except OSError as e:
        return f"image path cannot be opened ({e.strerror or e})"


def find_problems(
    records: list[Record],
    *,
    labels: list[str] | None = None,
    need_label: bool = True,
    need_text: bool = True,
    max_pixels: int = MAX_PIXELS,
    workers: int | None = None,
    no_text_reason: str = "no text",
) -> list[Problem]:
    """Checks every row in one pass: image readable and sane in size, text present and UTF-8, label known.

    Images are decoded by ``workers`` threads (default: one per core, at most 8), with a progress bar; each file's
    result is remembered across runs while its size and mtime hold, so a warm run decodes nothing.
    """
    known = set(labels) if labels is not None else None
    problems = []
    image_reasons = file_index().values(
        f"check-v1:{max_pixels}",
        [str(r.image) for r in records],
        lambda p: _check_image(p, max_pixels),
        workers or default_workers(),
        desc="checking images",
    )
    for rec, image_reason in zip(records, image_reasons):
        if not rec.source:
            problems.append(Problem(rec.row, rec.source, "no image path"))
            continue
        if image_reason and rec.source.lower().startswith(("http://", "https://", "s3://", "gs://")):
            image_reason = "image is a URL; mmfuse reads local files: download the images and list their paths"
        elif image_reason == "image file not found" and rec.source[1:3] in (":\\", ":/") and rec.source[0].isalpha():
            image_reason += " (a Windows path: list where the image is on this machine, relative to the manifest)"
        elif image_reason == "image file not found" and rec.source.startswith("~"):
            image_reason += " (~ is not expanded here: write the path in full, or relative to the manifest)"
        elif image_reason == "image file not found" and os.path.isfile(rec.source):
            image_reason += (
                f" at {rec.image}: paths are relative to the manifest's folder, and this one is relative to the "
                "current directory instead"
            )
        if image_reason:
            problems.append(Problem(rec.row, rec.source, image_reason))
        bad_text = text_problem(rec.text)
        if bad_text:
            problems.append(Problem(rec.row, rec.source, bad_text))
        elif need_text and not rec.text.strip():
            problems.append(Problem(rec.row, rec.source, no_text_reason))
        elif rec.text.strip() and not has_visible_text(rec.text):
            # Not read as empty: a row that seems to have text but gives the model none is worth a look.
            dropped = "holds only control, format or combining characters, which the tokenizer drops"
            why = f"{no_text_reason} (its text {dropped})" if need_text else f"text {dropped}; leave it empty instead"
            problems.append(Problem(rec.row, rec.source, why))
        if need_label and not rec.label:
            problems.append(Problem(rec.row, rec.source, "no label"))
        elif rec.label and (_is_not_utf8(rec.label) or _ANY_SURROGATE.search(rec.label)):
            problems.append(Problem(rec.row, rec.source, "label is not valid UTF-8 (or holds a lone surrogate)"))
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
    max_chars: int = MAX_TEXT_CHARS,
) -> list[Record]:
    """Reads and checks data; raises one DataError listing every bad row, or skips and records them.

    Texts longer than ``max_chars`` characters are cut (``clip_text``), with one warning.
    """
    records, problems = read_data(path, captions, need_label, need_text)
    clip_texts(records, max_chars, path)
    folder = Path(path).is_dir() and Path(path).suffix.lower() != ".parquet" and metadata_file(Path(path)) is None
    if folder and need_label and records and not any(r.label for r in records):
        raise MmfuseError(
            f"{path} is a flat folder of images, so none has a label: put each class's images in a sub-folder "
            f"named after the class ({Path(path) / '<label>'}/...), or give a manifest with a label column."
        )
    if folder and need_text:
        if not captions and records:
            # Every row would be listed as "no text", and --skip-bad would skip them all: say what is missing once.
            advice = (
                ", caption the images (--caption-missing imagenet-tags, or mmfuse caption), or train on images "
                "alone (--modalities image)."
                if no_text_reason == "no text"
                else f". Every image has {no_text_reason}."
            )
            tables = sorted(p.name for p in Path(path).iterdir() if p.suffix.lower() in MANIFEST_SUFFIXES)
            if tables:  # e.g. data/emoji given for data/emoji/train.csv
                advice += f" It holds {', '.join(tables[:3])}: pass a manifest itself as DATA, or as --captions."
            raise MmfuseError(
                f"{path} is a folder of images with no text: give the texts with --captions FILE (a CSV with "
                f"columns image, text; --val-captions for a --val folder){advice}"
            )
        if captions and no_text_reason == "no text":
            no_text_reason = f"no text: {Path(captions).name} has no caption (or an empty one) for this image"
    problems += find_problems(
        records, labels=labels, need_label=need_label, need_text=need_text, no_text_reason=no_text_reason
    )
    if problems and not skip_bad:
        raise data_error(problems, path)
    folded: dict[str, set[str]] = {}
    for r in records:
        if r.label:
            folded.setdefault(r.label.casefold(), set()).add(r.label)
    clashes = [sorted(v) for v in folded.values() if len(v) > 1]
    if clashes:  # almost always a typo, and each spelling would become a class of its own
        log.warning("labels that differ only in case are separate classes in %s: %s", path, clashes[:5])
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
        where = f", listed with their reasons in {skipped_csv}" if problems and skipped_csv else ""
        raise MmfuseError(f"No usable rows left in {path}: every row was bad{where}.")
    return records


def _sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, ValueError):
        return None


def image_hashes(records: list[Record], workers: int | None = None) -> list[str | None]:
    """The SHA-256 of each record's image file (None where it cannot be read), remembered across runs under the
    same key as the feature cache's, so images a run embedded are not read again."""
    return file_index().values("sha256", [str(r.image) for r in records], _sha256, workers or default_workers())


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
