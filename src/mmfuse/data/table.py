"""A manifest's table as rows of cells: CSV (the csv module, keeping undecodable bytes per row), JSON Lines and
parquet (pandas, imported only for it), each row a dict by column name. ``data.read`` makes records of them."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Collection
from pathlib import Path

import numpy as np

from mmfuse.data.records import Problem
from mmfuse.errors import MmfuseError

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
COLUMNS = ("image", "text", "label", "labels")
# A long product description or scraped page is one valid cell; csv's default refuses any over 128 KB. Python's
# limit is a C long, which is 32 bits on Windows, so sys.maxsize would overflow there.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def decode(path: Path) -> str:
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
            reader = csv.reader(io.StringIO(decode(path), newline=""))
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
            text = decode(path)
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


def cell_text(value) -> str:
    if type(value) is str:
        return value  # every CSV cell: the common case first
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")  # parquet binary columns
    if value is None or (isinstance(value, float) and np.isnan(value)) or type(value).__name__ in ("NAType", "NaTType"):
        return ""  # pandas' own missing values (nullable Int64, string columns) read as "<NA>" otherwise
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # an integer column with a null in it comes back from parquet as floats: 1.0 is 1
    return str(value)
