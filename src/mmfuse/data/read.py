"""Reading user data into records: a folder, a manifest, or a Hugging Face imagefolder.

Three layouts:

- a folder ``ROOT/<label>/<image files>`` (labels from sub-folder names; a flat folder of images is unlabeled),
  with text from a captions CSV (columns ``image``, ``text``) matched by relative path or unique file name;
- a manifest ``.csv``, ``.jsonl`` or ``.parquet`` with columns ``image``, ``text`` and (optionally) ``label``,
  image paths relative to the manifest's folder or absolute; a ``labels`` column instead (or ``label`` with
  ``--label-sep``, or ``--multi-label``) makes the data multi-label: each cell a set of labels joined by ``|`` (or a
  list, in JSONL and parquet), read into ``Record.labels``;
- a Hugging Face "imagefolder": a folder holding ``metadata.csv`` or ``metadata.jsonl``, a manifest whose image
  column is named ``file_name`` (as Hugging Face names it; ``image`` works too); without a ``label`` column, each
  image's class is its top folder, as in the folder layout.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

from mmfuse.data.columns import Columns
from mmfuse.data.images import IMAGE_SUFFIXES
from mmfuse.data.records import LABEL_SEP, Problem, Record, data_error
from mmfuse.data.table import COLUMNS, MANIFEST_SUFFIXES, cell_text, read_table
from mmfuse.errors import MmfuseError

log = logging.getLogger(__name__)
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
"""The manifest of a Hugging Face imagefolder, found in the folder given as data."""
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
# Names other tools give these columns: named in the error as renames to make, never read silently in their place.
_ALIASES = {
    "image": {"path", "file", "filename", "file_name", "filepath", "image_path", "img", "img_path", "image_file"},
    "text": {"caption", "captions", "description", "sentence", "prompt", "title", "txt"},
    "label": {"labels", "class", "category", "target", "y", "class_name", "label_name"},
}


def _require_columns(columns: list[str], path: Path, needed: list[str], what: str = "", multi: bool = False) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        what = what or (
            "Manifests need columns image, text and label (label is optional for predict; text for a model that "
            "uses no text, or was trained with --modality-dropout)."
        )
        if multi:
            what += " Multi-label data holds each row's labels in a labels column, joined by '|'."
        renames = [
            f"{found} to {want}"
            for want in missing
            for found in columns
            if str(found).strip().lower() in _ALIASES.get(want, _ALIASES["label"] if want == "labels" else ())
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
    path: Path,
    need_label: bool,
    need_text: bool = False,
    imagefolder: bool = False,
    multi_label: bool | None = None,
    label_sep: str | None = None,
    named: Columns | None = None,
) -> tuple[list[Record], list[Problem]]:
    """``need_text``: the text column must be there (captioning, an image-only model or one trained with modality
    dropout can do without it). ``imagefolder``: ``path`` is an imagefolder's ``metadata.csv``/``.jsonl``.
    ``multi_label``: True reads label sets (the ``labels`` column, else ``label``, split on ``label_sep`` or ``|``);
    None decides by the data (a ``labels`` column, or ``label_sep`` given); False reads one label a row, as a
    single-label run does (a ``labels`` column then is not read).
    ``named``: a model's named columns, read into each record's ``cells`` (``_read_columns``)."""
    columns, rows, problems = read_table(path, named.names if named else ())
    if not rows and not problems:
        raise MmfuseError(f"{path} has no data rows.")
    if named is not None:
        return _read_columns(path, named, need_label, columns, rows, problems, multi_label, label_sep)
    if imagefolder:
        columns, rows = _imagefolder_columns(path, columns, rows)
        folder_labels = "label" not in columns  # the class is each image's top folder, as in the folder layout
        need_label = need_label and not folder_labels
    if multi_label is None:
        multi_label = "labels" in columns or label_sep is not None
    label_col = "labels" if multi_label and "labels" in columns else "label"
    if rows or not problems:  # a .jsonl with no readable line has no columns to check: its lines are the error
        needed = ["image"] + (["text"] if need_text else []) + ([label_col] if need_label else [])
        _require_columns(columns, path, needed, multi=multi_label)
    if rows and all(_embedded(r.get("image")) for r in rows):
        raise MmfuseError(
            f"{path}: column image holds the images themselves (bytes), as Hugging Face datasets export them, not "
            "paths to image files. Save each image to a file and list its path (relative to the manifest's folder, "
            "or absolute) in the image column."
        )
    has_label = label_col in columns
    sep = label_sep or LABEL_SEP
    records = []
    folder, labels, text_cells = path.parent, {}, path.suffix.lower() == ".csv"
    for i, row in enumerate(rows):
        rows[i] = None  # each row's dict freed as its record is made: both lists are never whole at once
        n = row["_row"]
        if _embedded(row.get("image")):
            problems.append(Problem(n, "", "image holds embedded image data, not the path of an image file"))
            continue
        source = cell_text(row.get("image")).strip()
        # A list or an object would otherwise be trained on as its Python repr, "['a', 'b']". (A CSV's cells are text.)
        read = COLUMNS if multi_label else COLUMNS[:3]  # a single-label read leaves a labels column alone
        odd = [] if text_cells else [c for c in read if isinstance(row.get(c), (list, tuple, dict, set, np.ndarray))]
        if multi_label and label_col in odd and not isinstance(row[label_col], dict):
            odd.remove(label_col)  # a multi-label cell may hold its set as a list
        if odd:
            kind = {dict: "an object"}
            hint = {"label": " (a set of labels? pass --multi-label, or name the column labels)"}
            problems += [
                Problem(n, source, f"{c} is {kind.get(type(row[c]), 'a list')}, not one value{hint.get(c, '')}")
                for c in odd
            ]
            continue
        if "\x00" in source:  # no file name holds one, and the OS refuses to even look such a path up
            problems.append(Problem(n, source.replace("\x00", "\\x00"), "image path holds a NUL character (\\x00)"))
            continue
        names = None
        if multi_label and has_label:
            names, why = _label_set(row.get(label_col), sep)
            if why:
                problems.append(Problem(n, source, why))
                continue
            label = LABEL_SEP.join(names)
        else:
            label = cell_text(row.get("label")).strip() if has_label else None
        if imagefolder and folder_labels:
            parts = _caption_key(source).split("/")
            label = parts[0] if len(parts) > 1 else None
        if multi_label and names is None:
            names = (label,) if label else None  # no label: an unlabeled row, as a single-label read has
        if names is not None:
            names = tuple(labels.setdefault(x, x) for x in names)
        label = labels.setdefault(label, label) if label else None  # one string per class, not one per row
        records.append(Record(_image_path(source, folder), cell_text(row.get("text")), label, n, source, labels=names))
    return records, problems


def _read_columns(
    path: Path,
    named: Columns,
    need_label: bool,
    columns: list[str],
    rows: list[dict],
    problems: list[Problem],
    multi_label: bool | None = None,
    label_sep: str | None = None,
) -> tuple[list[Record], list[Problem]]:
    """Rows of a manifest read through a model's named columns: any cell may be empty (the model masks it).
    ``multi_label`` and ``label_sep``: as ``read_manifest`` reads a row's labels."""
    if multi_label is None:
        multi_label = "labels" in columns or label_sep is not None
    label_col = "labels" if multi_label and "labels" in columns else "label"
    if rows or not problems:
        _require_columns(
            columns,
            path,
            named.names + [label_col] * need_label,
            what="A model trained with --image-columns, --text-columns or --tabular-columns reads those columns "
            "(and label, to train or evaluate).",
            multi=multi_label,
        )
    has_label, text_cells = label_col in columns, path.suffix.lower() == ".csv"
    sep = label_sep or LABEL_SEP
    records, folder, labels = [], path.parent, {}
    for i, row in enumerate(rows):
        rows[i] = None
        n = row["_row"]
        read = [*named.names, label_col] if has_label else named.names
        odd = [] if text_cells else [c for c in read if isinstance(row.get(c), (list, tuple, dict, set, np.ndarray))]
        if multi_label and label_col in odd and not isinstance(row[label_col], dict):
            odd.remove(label_col)  # a multi-label cell may hold its set as a list
        embedded = [c for c in named.image if _embedded(row.get(c))]
        if odd or embedded:
            problems += [Problem(n, "", f"{c} is a list or an object, not one value") for c in odd]
            problems += [
                Problem(n, "", f"{c} holds embedded image data, not the path of an image file") for c in embedded
            ]
            continue
        names = None
        if multi_label and has_label:
            names, why = _label_set(row.get(label_col), sep)
            if why:
                problems.append(Problem(n, "", why))
                continue
            names = tuple(labels.setdefault(x, x) for x in names)
        cells, sources = {}, []
        for c in named.image:
            source = cell_text(row.get(c)).strip()
            if "\x00" in source:
                problems.append(Problem(n, source.replace("\x00", "\\x00"), f"{c}: image path holds a NUL character"))
                break
            cells[c] = _image_path(source, folder) if source else None
            sources.append(source)
        else:
            cells.update((c, cell_text(row.get(c))) for c in (*named.text, *named.tabular))
            if names is not None:
                label = LABEL_SEP.join(names)
            else:
                label = cell_text(row.get("label")).strip() if has_label else None
                names = ((label,) if label else None) if multi_label else None
            label = labels.setdefault(label, label) if label else None
            first = next((c for c in named.image if cells[c] is not None), None)
            image = cells[first] if first else Path()
            text = cells[named.text[0]] if named.text else ""
            source = next((s for s in sources if s), "")
            records.append(Record(image, text, label, n, source, cells=cells, labels=names))
    return records, problems


def _label_set(value, sep: str) -> tuple[tuple[str, ...], str | None]:
    """A multi-label cell's labels, sorted and each once: a list (JSONL, parquet) or text split on ``sep``; with the
    reason the row is bad, or None."""
    if isinstance(value, (list, tuple, set, np.ndarray)):
        items = [cell_text(v).strip() for v in value]
    else:
        items = [x.strip() for x in cell_text(value).split(sep)]
    names = tuple(sorted({x for x in items if x}))
    joined = [x for x in names if LABEL_SEP in x]
    if joined:  # the set is written joined by | in predictions and reports: a | inside a label would split it there
        return names, f"label '{joined[0]}' holds '{LABEL_SEP}', which separates the labels of a set"
    return names, None


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
        key = _caption_key(cell_text(r.get("image")))
        if key in captions and captions[key] != cell_text(r.get("text")):
            raise MmfuseError(f"{path}: '{key}' has two different captions (rows {r['_row']} and an earlier one).")
        captions[key] = cell_text(r.get("text"))
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
    multi_label: bool | None = None,
    label_sep: str | None = None,
    named: Columns | None = None,
):
    """Reads a folder or manifest into records, plus problems found while listing (empty classes).
    ``multi_label`` and ``label_sep``: how a manifest's labels are read (``read_manifest``); ``named``: a model's
    named columns (manifests only)."""
    path = Path(path)
    if not path.exists():
        raise MmfuseError(f"Data not found: {path}{missing_hint(path)}")
    ml = {"multi_label": multi_label, "label_sep": label_sep}
    if path.is_dir() and path.suffix.lower() == ".parquet":
        return read_manifest(path, need_label, need_text, **ml, named=named)  # a partitioned parquet dataset: a folder
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
        records, problems = read_manifest(meta, need_label, need_text, imagefolder=True, **ml)
        if need_label and records and not any(r.label for r in records):
            raise MmfuseError(
                f"{meta} has no label column and its images are not in class folders, so none has a label: add a "
                f"label column, or list each image under a folder named after its class (<label>/{records[0].source})."
            )
        return records, problems
    if path.is_dir():
        if (multi_label or label_sep is not None) and need_label:
            raise MmfuseError(
                f"{path} is a folder of class folders: one label an image. Multi-label data is a manifest "
                "(.csv, .jsonl or .parquet) with a labels column holding each row's labels joined by '|'."
            )
        records, problems = read_folder(path, read_captions(Path(captions)) if captions else None)
        for r in records if multi_label else ():  # a multi-label run predicting a folder: one label an image
            r.labels = (r.label,) if r.label else None
        return records, problems
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
    return read_manifest(path, need_label, need_text, **ml, named=named)
