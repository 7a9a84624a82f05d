"""Checking every row before any work starts: one pass over images, texts and labels; bad rows listed or skipped.

``load_checked`` reads data (``data.read``), cuts over-long texts, checks every row (``find_problems``) and either
raises one ``DataError`` listing every bad row or skips them, listed in a ``skipped.csv``.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import unicodedata
from pathlib import Path

from mmfuse.data.columns import Columns
from mmfuse.data.filestats import default_workers, file_index
from mmfuse.data.images import MAX_PIXELS, check_image
from mmfuse.data.read import MANIFEST_SUFFIXES, metadata_file, read_data
from mmfuse.data.records import Problem, Record, data_error, label_names
from mmfuse.errors import MmfuseError

log = logging.getLogger(__name__)
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
        for c, v in (r.cells or {}).items():
            if isinstance(v, str) and len(v) > max_chars:
                r.cells[c] = clip_text(v, max_chars)
                cut += 1
    if cut:
        log.warning(
            "cut %d text(s) of %s to their first %d characters before tokenizing (the text tower reads far fewer)",
            cut,
            source,
            max_chars,
        )


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
    if records and records[0].cells is not None:
        return _cell_problems(records, max_pixels, workers) + _label_problems(records, need_label, known)
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
        problems += _label_problems([rec], need_label, known)
    return problems


def _label_problems(records: list[Record], need_label: bool, known: set[str] | None) -> list[Problem]:
    problems = []
    for rec in records:
        if need_label and not rec.label:
            problems.append(Problem(rec.row, rec.source, "no label"))
        elif rec.label and (_is_not_utf8(rec.label) or _ANY_SURROGATE.search(rec.label)):
            problems.append(Problem(rec.row, rec.source, "label is not valid UTF-8 (or holds a lone surrogate)"))
        elif rec.label and known is not None and (unknown := [x for x in label_names(rec) if x not in known]):
            # The label is the reason's one quoted value: many rows of unknown labels are reported as one line that
            # counts each label (errors.bad_rows_report).
            problems.append(
                Problem(
                    rec.row, rec.source, f"unknown label '{unknown[0]}'; the model knows: {', '.join(sorted(known))}"
                )
            )
    return problems


def _cell_problems(records: list[Record], max_pixels: int, workers: int | None) -> list[Problem]:
    """The checks of rows with named columns: every image given readable, every text cell UTF-8. Empty cells are no
    problem (the model masks them)."""
    images = [(r, c, v) for r in records for c, v in r.cells.items() if isinstance(v, Path)]
    reasons = file_index().values(
        f"check-v1:{max_pixels}",
        [str(v) for _, _, v in images],
        lambda p: _check_image(p, max_pixels),
        workers or default_workers(),
        desc="checking images",
    )
    problems = [Problem(r.row, str(v), f"{c}: {why}") for (r, c, v), why in zip(images, reasons) if why]
    for r in records:
        for c, v in r.cells.items():
            bad = text_problem(v) if isinstance(v, str) else None
            if bad:
                problems.append(Problem(r.row, r.source, f"{c}: {bad}"))
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
    multi_label: bool | None = None,
    label_sep: str | None = None,
    named: Columns | None = None,
) -> list[Record]:
    """Reads and checks data; raises one DataError listing every bad row, or skips and records them.

    Texts longer than ``max_chars`` characters are cut (``clip_text``), with one warning. ``multi_label`` and
    ``label_sep``: how labels are read (``read.read_manifest``). ``named``: a model's named columns
    (``records.Columns``), whose cells may be empty.
    """
    records, problems = read_data(path, captions, need_label, need_text, multi_label, label_sep, named=named)
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
        for name in label_names(r):
            folded.setdefault(name.casefold(), set()).add(name)
    clashes = [sorted(v) for v in folded.values() if len(v) > 1]
    if clashes:  # almost always a typo, and each spelling would become a class of its own
        log.warning("labels that differ only in case are separate classes in %s: %s", path, clashes[:5])
    repeats = len(records) - len({r.image for r in records}) if named is None else 0
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


def write_skipped(path: Path, problems: list[Problem], source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="", encoding="utf-8", errors="backslashreplace") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["source", "row", "image", "reason"])
        w.writerows([source, p.row, p.image, p.reason] for p in problems)
