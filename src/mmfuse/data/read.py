"""Reading user data into records: a folder, a manifest, or a Hugging Face imagefolder.

Three layouts:

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
import difflib
import io
import json
import logging
import os
import sys
from collections import Counter
from collections.abc import Collection
from pathlib import Path

import numpy as np

from mmfuse.data.columns import Columns
from mmfuse.data.images import IMAGE_SUFFIXES
from mmfuse.data.records import Problem, Record, data_error
from mmfuse.errors import MmfuseError

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
"""The manifest of a Hugging Face imagefolder, found in the folder given as data."""
COLUMNS = ("image", "text", "label")
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
# Names other tools give these columns: named in the error as renames to make, never read silently in their place.
_ALIASES = {
    "image": {"path", "file", "filename", "file_name", "filepath", "image_path", "img", "img_path", "image_file"},
    "text": {"caption", "captions", "description", "sentence", "prompt", "title", "txt"},
    "label": {"labels", "class", "category", "target", "y", "class_name", "label_name"},
}
# A long product description or scraped page is one valid cell; csv's default refuses any over 128 KB. Python's
# limit is a C long, which is 32 bits on Windows, so sys.maxsize would overflow there.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


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


def read_table(path: Path, extra: Collection[str] = ()) -> tuple[list[str], list[dict], list[Problem]]:
    """A manifest's columns, its rows (each with ``_row``: the data row, or the line of a .jsonl) and the rows that
    could not be read at all (a CSV row with more or fewer cells than the header, a line that is not JSON).

    pandas only for parquet: importing it costs half a second of every command. ``extra``: columns read besides
    image, text and label (a model's named columns), where a format reads only the columns it is asked for.
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
            # Lines end at \n only (a \r before it is JSON whitespace): splitlines() also broke a line at U+2028,
            # U+0085 and the like, which JSON writes raw inside strings, so a valid row read as two broken ones.
            for n, line in enumerate(text.split("\n"), start=1):
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
            wanted = [c for c in names if _column(c) in COLUMNS or c in extra] if names else None
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
            if str(found).strip().lower() in _ALIASES.get(want, ())
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
    path: Path, need_label: bool, need_text: bool = False, imagefolder: bool = False, named: Columns | None = None
) -> tuple[list[Record], list[Problem]]:
    """``need_text``: the text column must be there (captioning, an image-only model or one trained with modality
    dropout can do without it). ``imagefolder``: ``path`` is an imagefolder's ``metadata.csv``/``.jsonl``.
    ``named``: a model's named columns, read into each record's ``cells`` (``_read_columns``)."""
    columns, rows, problems = read_table(path, named.names if named else ())
    if not rows and not problems:
        raise MmfuseError(f"{path} has no data rows.")
    if named is not None:
        return _read_columns(path, named, need_label, columns, rows, problems)
    if imagefolder:
        columns, rows = _imagefolder_columns(path, columns, rows)
        folder_labels = "label" not in columns  # the class is each image's top folder, as in the folder layout
        need_label = need_label and not folder_labels
    if rows or not problems:  # a .jsonl with no readable line has no columns to check: its lines are the error
        _require_columns(columns, path, ["image"] + (["text"] if need_text else []) + (["label"] if need_label else []))
    if rows and all(_embedded(r.get("image")) for r in rows):
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
        if _embedded(row.get("image")):
            problems.append(Problem(n, "", "image holds embedded image data, not the path of an image file"))
            continue
        source = _cell(row.get("image")).strip()
        # A list or an object would otherwise be trained on as its Python repr, "['a', 'b']". (A CSV's cells are text.)
        odd = [] if text_cells else [c for c in COLUMNS if isinstance(row.get(c), (list, tuple, dict, set, np.ndarray))]
        if odd:
            kind = {dict: "an object"}
            problems += [Problem(n, source, f"{c} is {kind.get(type(row[c]), 'a list')}, not one value") for c in odd]
            continue
        if "\x00" in source:  # no file name holds one, and the OS refuses to even look such a path up
            problems.append(Problem(n, source.replace("\x00", "\\x00"), "image path holds a NUL character (\\x00)"))
            continue
        label = _cell(row.get("label")).strip() if has_label else None
        if imagefolder and folder_labels:
            parts = _caption_key(source).split("/")
            label = parts[0] if len(parts) > 1 else None
        label = labels.setdefault(label, label) if label else None  # one string per class, not one per row
        records.append(Record(_image_path(source, folder), _cell(row.get("text")), label, n, source))
    return records, problems


def _read_columns(
    path: Path, named: Columns, need_label: bool, columns: list[str], rows: list[dict], problems: list[Problem]
) -> tuple[list[Record], list[Problem]]:
    """Rows of a manifest read through a model's named columns: any cell may be empty (the model masks it)."""
    if rows or not problems:
        _require_columns(
            columns,
            path,
            named.names + ["label"] * need_label,
            what="A model trained with --image-columns, --text-columns or --tabular-columns reads those columns "
            "(and label, to train or evaluate).",
        )
    has_label, text_cells = "label" in columns, path.suffix.lower() == ".csv"
    records, folder, labels = [], path.parent, {}
    for i, row in enumerate(rows):
        rows[i] = None
        n = row["_row"]
        odd = (
            []
            if text_cells
            else [c for c in named.names if isinstance(row.get(c), (list, tuple, dict, set, np.ndarray))]
        )
        embedded = [c for c in named.image if _embedded(row.get(c))]
        if odd or embedded:
            problems += [Problem(n, "", f"{c} is a list or an object, not one value") for c in odd]
            problems += [
                Problem(n, "", f"{c} holds embedded image data, not the path of an image file") for c in embedded
            ]
            continue
        cells, sources = {}, []
        for c in named.image:
            source = _cell(row.get(c)).strip()
            if "\x00" in source:
                problems.append(Problem(n, source.replace("\x00", "\\x00"), f"{c}: image path holds a NUL character"))
                break
            cells[c] = _image_path(source, folder) if source else None
            sources.append(source)
        else:
            cells.update((c, _cell(row.get(c))) for c in (*named.text, *named.tabular))
            label = _cell(row.get("label")).strip() if has_label else None
            label = labels.setdefault(label, label) if label else None
            first = next((c for c in named.image if cells[c] is not None), None)
            image = cells[first] if first else Path()
            text = cells[named.text[0]] if named.text else ""
            records.append(Record(image, text, label, n, next((s for s in sources if s), ""), cells))
    return records, problems


def _embedded(value) -> bool:
    """Whether an image cell holds the image itself (Hugging Face's {"bytes": ...}, or a file's bytes) rather than
    its path: a parquet binary column of paths is UTF-8 text with no image file's signature."""
    if isinstance(value, dict):
        return True
    if not isinstance(value, bytes):
        return False
    if value.startswith(_IMAGE_SIGNATURES):
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return len(value) > 4096  # no path is this long


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
        raise MmfuseError(f"Captions file not found: {path}{missing_hint(path)}")
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


def missing_hint(path: Path) -> str:
    """What to say after "not found: PATH": up to 3 close names in its folder ("; did you mean data/icons/train.csv?"),
    or, where the folder itself is missing, which part of the path is the first one that does not exist (with close
    names for that part)."""
    parts = path.parts
    for i in range(len(parts)):
        here = Path(*parts[: i + 1])
        if os.path.lexists(here):
            continue
        parent, rest = here.parent, parts[i + 1 :]
        if not parent.is_dir():
            return f" ({parent} is a file, not a folder)"
        try:
            names = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
        except OSError:  # an unreadable folder: nothing to suggest from
            names = []
        guesses = [(parent / name).joinpath(*rest) for name in _close_names(here.name, names)]
        # For a missing folder, the guesses that hold the rest of the path first.
        guesses.sort(key=lambda g: not os.path.exists(g))
        if not rest:
            return f"; did you mean {_either(guesses)}?" if guesses else ""
        return f" ({here} does not exist{f'; did you mean {_either(guesses)}?' if guesses else ''})"
    return ""


def _close_names(name: str, names: list[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``names`` that look like ``name``, closest first. Names with the same suffix are compared by
    their stems: otherwise ".csv" alone makes x.csv look like val.csv."""

    def stem(s: str) -> str:
        return s.rsplit(".", 1)[0] if Path(s).suffix.lower() == Path(name).suffix.lower() else s

    scores = [(difflib.SequenceMatcher(None, stem(name).lower(), stem(c).lower()).ratio(), c) for c in names]
    return [c for score, c in sorted(scores, key=lambda x: -x[0]) if score >= cutoff][:n]


def _either(paths: list[Path]) -> str:
    names = [str(p) for p in paths]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def read_data(
    path: str | Path,
    captions: str | Path | None = None,
    need_label: bool = True,
    need_text: bool = False,
    named: Columns | None = None,
):
    """Reads a folder or manifest into records, plus problems found while listing (empty classes); ``named``: a
    model's named columns (manifests only)."""
    path = Path(path)
    if not path.exists():
        raise MmfuseError(f"Data not found: {path}{missing_hint(path)}")
    if path.is_dir() and path.suffix.lower() == ".parquet":
        return read_manifest(path, need_label, need_text, named=named)  # a partitioned parquet dataset: a folder
    if named is not None and (path.is_dir() or captions):
        raise MmfuseError(
            f"{path}: --image-columns, --text-columns and --tabular-columns name the columns of a manifest (.csv, "
            ".jsonl or .parquet); a folder of images (or --captions) has no such columns yet. List the rows in a "
            "manifest instead."
        )
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
    return read_manifest(path, need_label, need_text, named=named)
