"""The manifest readers (CSV, JSONL, parquet) under generated manifests: random unicode (control characters, RTL marks,
lone surrogates where the format can carry them), quoting, BOMs, CRLF, empty cells, odd, missing and duplicate
headers, rows with cells too many or too few, images that exist or not.

Properties: reading raises nothing but mmfuse's own errors, each with a message; every data row is accounted for,
read or reported bad with its row number; a row read holds the cells written; with skip_bad, rows read plus rows
skipped are the rows in the file.

    pytest tests/test_fuzz_readers.py            # the fast tier: 50 manifests per format, and the fixes
    pytest -m slow tests/test_fuzz_readers.py    # the bigger run
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmfuse.data.checks import load_checked
from mmfuse.data.read import read_data
from mmfuse.errors import DataError, MmfuseError

IMAGES = ["a.png", "b c.png", "sub/ü.png", "d.jpg"]
ODD = "\u200f\u202e\u202c\u200b\ufeff\x00\x1b\x85\u2028\u2029\x0b\x0c\x1c\r\n\t\"',;"
SURROGATES = "\ud800\udbff\udc00\udc80\udcff"


def cell_text(surrogates: bool) -> st.SearchStrategy[str]:
    """A cell: anything, with the characters readers trip on made common."""
    alphabet = st.characters(exclude_categories=["Cs"]) | st.sampled_from(ODD)
    if surrogates:
        alphabet |= st.sampled_from(SURROGATES)
    return st.text(alphabet, max_size=12)


def image_cell() -> st.SearchStrategy[str]:
    names = st.sampled_from(IMAGES)
    return st.one_of(
        names,
        names.map(lambda n: f" ./{n} "),
        names.map(lambda n: n.replace("/", "\\")),
        st.sampled_from(["missing.png", "", "sub", "sub/", "http://x/y.png", "~/a.png", "C:\\a.png", "a.png\x00"]),
        cell_text(False),
    )


HEADER_NAMES = {
    "image": ["image", "image", " Image", "IMAGE ", "file_name"],
    "text": ["text", "Text", " text\t", "caption"],
    "label": ["label", "LABEL", " label "],
}


@st.composite
def headers(draw) -> list[str]:
    """Usually the three columns (in any order and spelling), at times one missing, doubled or an odd extra."""
    names = [draw(st.sampled_from(HEADER_NAMES[c])) for c in ("image", "text", "label")]
    if draw(st.integers(0, 3)) == 0:
        del names[draw(st.integers(0, 2))]
    if draw(st.integers(0, 9)) == 0:
        names.append(draw(st.sampled_from(names)))  # a column twice
    if draw(st.booleans()):
        names.append(draw(st.text(max_size=6) | st.sampled_from(["", "extra", "Label2", "id"])))
    return draw(st.permutations(names))


@dataclass
class Manifest:
    path: Path
    rows: dict[int, dict | None]
    """Each data row by the number mmfuse gives it (a CSV's data row, a JSONL's line, a parquet's row, from 1): the
    cells written, by column name, or None for a row written broken (cells too many or too few, not an object)."""


@st.composite
def manifests(draw, fmt: str, root: Path) -> Manifest:
    header = draw(headers())
    surrogates = fmt != "parquet"  # Arrow strings are UTF-8, which has no lone surrogates
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        cells = {}
        for name in header:
            key = name.strip().lower()
            if key in ("image", "file_name"):
                cells[name] = draw(image_cell())
            elif key == "label":
                cells[name] = draw(st.sampled_from(["cat", "dog", "", " cat "]) | cell_text(surrogates))
            else:
                cells[name] = draw(cell_text(surrogates))
        rows.append(cells)
    path = root / f"m.{fmt}"
    write = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}[fmt]
    return Manifest(path, write(draw, path, header, rows))


def write_csv(draw, path: Path, header: list[str], rows: list[dict]) -> dict[int, dict | None]:
    end = draw(st.sampled_from(["\n", "\r\n"]))
    # csv.writer leaves a bare \r unquoted unless the line ends hold one, and a bare \r ends a line.
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL] * (end == "\r\n") + [csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    out = io.StringIO()
    w = csv.writer(out, quoting=quoting, lineterminator=end)
    w.writerow(header)
    written: dict[int, dict | None] = {}
    for cells in rows:
        values = [cells[h] for h in header]
        change = draw(st.sampled_from(["none"] * 6 + ["extra", "short"]))
        if change == "extra":
            values.append(draw(cell_text(False)))
        elif change == "short":
            values = values[: draw(st.integers(0, len(values) - 1))]
        if not values:
            continue  # written as an empty line, which is no row
        w.writerow(values)
        written[len(written) + 1] = cells if change == "none" else None
    bom = "\ufeff" if draw(st.booleans()) else ""
    # Lone surrogates as the bytes a broken encoder writes: not UTF-8, so the reader must report those rows.
    path.write_bytes((bom + out.getvalue()).encode("utf-8", "surrogatepass"))
    return written


def write_jsonl(draw, path: Path, header: list[str], rows: list[dict]) -> dict[int, dict | None]:
    lines: list[str] = []
    written: dict[int, dict | None] = {}
    for cells in rows:
        kind = draw(st.sampled_from(["object"] * 8 + ["broken", "array", "blank"]))
        if kind == "blank":
            lines.append(draw(st.sampled_from(["", "  ", "\t"])))  # no row
            continue
        if kind == "broken":
            lines.append(draw(st.sampled_from(['{"image": ', "{'image': 'a.png'}", "nope", "{}}"])))
            cells = None
        elif kind == "array":
            lines.append(json.dumps(list(cells.values())))
            cells = None
        else:
            cells = {k: v for k, v in cells.items() if draw(st.integers(0, 5))}  # at times a key left out
            # ensure_ascii writes a lone surrogate as its \ud800 escape; without it, raw characters (U+2028 too)
            lines.append(json.dumps(cells, ensure_ascii=draw(st.booleans()) or any(map(_lone, cells.values()))))
        written[len(lines)] = cells
    end = draw(st.sampled_from(["\n", "\r\n"]))
    bom = "\ufeff" if draw(st.booleans()) else ""
    path.write_text(bom + end.join(lines) + end, encoding="utf-8", newline="")
    return written


def write_parquet(draw, path: Path, header: list[str], rows: list[dict]) -> dict[int, dict | None]:
    names = list(dict.fromkeys(header))  # a parquet table's columns are unique
    written = {i: {} for i in range(1, len(rows) + 1)}
    columns = {}
    for name in names:
        values = [cells[name] if draw(st.integers(0, 5)) else None for cells in rows]
        for i, v in enumerate(values, 1):
            written[i][name] = "" if v is None else v
        if draw(st.integers(0, 3)) == 0:  # a binary column, as some writers store strings
            columns[name] = pa.array([v.encode() if v is not None else None for v in values], pa.binary())
        else:
            columns[name] = pa.array(values, pa.string())
    pq.write_table(pa.table(columns), path)
    return written


def _lone(value) -> bool:
    return isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value)


def canonical(name: str) -> str:
    return name.strip().lower() if name.strip().lower() in ("image", "text", "label") else name


def check_read(m: Manifest, need_label: bool) -> None:
    """The properties of read_data on one manifest."""
    try:
        records, problems = read_data(m.path, need_label=need_label)
    except MmfuseError as e:
        assert str(e).strip(), "an error with no message"
        return
    rows = set(m.rows)
    read = [r.row for r in records]
    bad = {p.row for p in problems}
    assert len(read) == len(set(read)), "a row read twice"
    assert not set(read) & bad, "a row both read and reported bad"
    assert set(read) | bad == rows, f"rows lost: {sorted(rows - set(read) - bad)}, made up: {(set(read) | bad) - rows}"
    assert all(p.reason for p in problems)
    for r in records:
        cells = m.rows[r.row]
        assert cells is not None, f"row {r.row} was written broken, but read"
        by_col = {canonical(k): v for k, v in cells.items()}
        text = by_col.get("text")
        if isinstance(text, str) and not _lone(text):
            assert r.text == text, f"row {r.row}: {r.text!r} != {text!r}"


def check_skip_bad(m: Manifest) -> None:
    """load_checked with skip_bad: rows read + rows skipped == the rows in the file."""
    skipped = m.path.parent / "skipped.csv"
    skipped.unlink(missing_ok=True)
    try:
        records = load_checked(m.path, need_label=False, need_text=False, skip_bad=True, skipped_csv=skipped)
    except DataError as e:
        pytest.fail(f"skip_bad raised a DataError: {e}")
    except MmfuseError as e:
        assert str(e).strip()
        return
    listed = set()
    if skipped.exists():
        with open(skipped, newline="", encoding="utf-8") as f:
            listed = {int(r["row"]) for r in csv.DictReader(f)}
    assert len(records) + len(listed) == len(m.rows), (len(records), sorted(listed), sorted(m.rows))
    assert not {r.row for r in records} & listed


def run_property(fmt: str, examples: int) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"fuzz-{fmt}-"))
    try:
        for name in IMAGES:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (200, 30, 30)).save(root / name)

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            derandomize=examples <= 50,  # the fast tier reruns the same manifests; the slow tier explores
        )
        @given(m=manifests(fmt, root), need_label=st.booleans())
        def prop(m, need_label):
            check_read(m, need_label)
            check_skip_bad(m)

        prop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_readers_account_for_every_row(fmt):
    run_property(fmt, 50)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_readers_account_for_every_row_many(fmt):
    run_property(fmt, 400)


# ---------------------------------------------------------------------------------------------------------------------
# what the properties found


def test_an_image_path_with_a_nul_is_a_bad_row_not_a_crash(tmp_path):
    """os.stat raises ValueError, not OSError, for a path holding NUL: that escaped as a traceback."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text('image,text,label\na.png,x,cat\n"a.png\x00",y,dog\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2: a.png\\x00: image path holds a NUL character"):
        load_checked(tmp_path / "m.csv")
    records = load_checked(tmp_path / "m.csv", skip_bad=True)
    assert [r.row for r in records] == [1]


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1e"])
def test_a_jsonl_line_ends_only_at_a_newline(tmp_path, sep):
    """JSON writes these inside strings as they are (ensure_ascii=False); splitlines() broke the line at them, so one
    good row was reported as two lines that are not JSON, and every later line number was off by one."""
    rows = [{"image": "a.png", "text": f"one{sep}two", "label": "cat"}, {"image": "b.png", "text": "x", "label": "dog"}]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    records, problems = read_data(path)
    assert not problems and [(r.row, r.text) for r in records] == [(1, f"one{sep}two"), (2, "x")]


def test_a_parquet_binary_column_of_paths_is_read_as_paths(tmp_path):
    """Some writers store strings as binary: UTF-8 paths are paths, not embedded images (which start with an image
    file's signature)."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    table = {"image": pa.array([b"a.png", b"./a.png"], pa.binary()), "text": ["x", "y"], "label": ["cat", "dog"]}
    pq.write_table(pa.table(table), tmp_path / "m.parquet")
    assert [(r.source, r.label) for r in load_checked(tmp_path / "m.parquet")] == [("a.png", "cat"), ("./a.png", "dog")]
