"""Data at scale: imagefolder metadata as input, the threaded check with its remembered results, lean records, and
bench/scale.py's data generator."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_csv
from PIL import Image

from mmfuse import progress
from mmfuse.data import filestats
from mmfuse.data.checks import find_problems, load_checked
from mmfuse.data.filestats import FileIndex
from mmfuse.data.read import read_data, read_manifest
from mmfuse.data.records import Record
from mmfuse.errors import DataError, MmfuseError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def _old(path: Path) -> None:
    past = time.time() - 60  # older than filestats.RACY_SECONDS, so its check is remembered
    os.utime(path, (past, past))


def _imagefolder(root: Path, with_label: bool) -> Path:
    for label, colour in (("cat", "red"), ("dog", "blue")):
        (root / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), colour).save(root / label / f"{i}.png")
    rows = [{"file_name": f"{lab}/{i}.png", "text": f"a {lab} {i}"} for lab in ("cat", "dog") for i in range(2)]
    if with_label:
        for r in rows:
            r["label"] = "pet-" + r["file_name"].split("/")[0]
    return rows


def test_an_imagefolder_with_metadata_is_data_wherever_a_folder_is(tmp_path):
    rows = _imagefolder(tmp_path / "a", with_label=False)
    write_csv(tmp_path / "a" / "metadata.csv", rows, fields=("file_name", "text"))
    records = load_checked(tmp_path / "a")  # texts from the metadata, classes from the top folders
    assert [(r.source, r.text, r.label) for r in records] == [
        (r["file_name"], r["text"], r["file_name"].split("/")[0]) for r in rows
    ]
    assert records[0].image == tmp_path / "a" / "cat" / "0.png" and records[0].row == 1

    rows = _imagefolder(tmp_path / "b", with_label=True)  # a label column wins over the folders
    (tmp_path / "b" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.label for r in load_checked(tmp_path / "b")] == ["pet-cat", "pet-cat", "pet-dog", "pet-dog"]
    assert len(load_checked(tmp_path / "b", need_label=False)) == 4


def test_imagefolder_metadata_mistakes_are_clear_errors(tmp_path):
    rows = _imagefolder(tmp_path / "a", with_label=False)
    write_csv(tmp_path / "a" / "metadata.csv", rows, fields=("file_name", "text"))
    (tmp_path / "a" / "metadata.jsonl").write_text("")
    with pytest.raises(MmfuseError, match="both metadata.csv and metadata.jsonl"):
        read_data(tmp_path / "a")
    (tmp_path / "a" / "metadata.jsonl").unlink()
    write_csv(tmp_path / "c.csv", [{"image": "cat/0.png", "text": "t"}], fields=("image", "text"))
    with pytest.raises(MmfuseError, match="has its texts in metadata.csv"):
        read_data(tmp_path / "a", captions=tmp_path / "c.csv")

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "x.png")
    write_csv(flat / "metadata.csv", [{"file_name": "x.png", "text": "t"}], fields=("file_name", "text"))
    with pytest.raises(MmfuseError, match="no label column and its images are not in class folders"):
        load_checked(flat)
    assert [r.label for r in load_checked(flat, need_label=False)] == [None]  # predict needs no label

    write_csv(flat / "metadata.csv", [{"file_name": "x.png", "image": "x.png", "text": "t"}], ("file_name", "image"))
    with pytest.raises(MmfuseError, match="both a file_name and an image column"):
        load_checked(flat, need_label=False)
    write_csv(flat / "metadata.csv", [{"file_name": "x.png", "caption": "t"}], fields=("file_name", "caption"))
    with pytest.raises(MmfuseError, match=r"missing column\(s\) \['text'\].*Rename caption to text"):
        load_checked(flat, need_label=False)  # the text column is chosen as in any manifest
    write_csv(flat / "metadata.csv", [{"file_name": "gone.png", "text": "t"}], fields=("file_name", "text"))
    with pytest.raises(DataError, match="gone.png: image file not found"):
        load_checked(flat, need_label=False)


def test_a_manifest_elsewhere_still_names_file_name_as_a_rename(tmp_path):
    write_csv(tmp_path / "m.csv", [{"file_name": "x.png", "text": "t", "label": "a"}], fields=("file_name", "text"))
    with pytest.raises(MmfuseError, match="Rename file_name to image"):
        read_data(tmp_path / "m.csv")


def test_the_threaded_check_finds_every_problem_and_a_rerun_decodes_nothing(tmp_path, monkeypatch):
    records = []
    for i in range(40):
        path = tmp_path / f"{i}.jpg"
        if i % 7 == 3:
            path.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
        elif i % 7 != 5:  # the fives are missing
            Image.new("RGB", (16, 16), (i, 0, 0)).save(path)
        if path.exists():
            _old(path)
        records.append(Record(path, "t", "a", i + 1, path.name))
    one = find_problems(records, workers=1)
    many = find_problems(records, workers=4)
    assert [(p.row, p.reason) for p in many] == [(p.row, p.reason) for p in one]
    assert {p.row for p in many} == {i + 1 for i in range(40) if i % 7 in (3, 5)}

    filestats._INDEXES.clear()  # a new process: only files.sqlite remembers
    # Missing files are looked for again every time (they may appear); nothing else is decoded again.
    fail = lambda path, _: "image file not found" if not os.path.exists(path) else pytest.fail("decoded again")  # noqa: E731
    monkeypatch.setattr("mmfuse.data.checks._check_image", fail)
    assert [(p.row, p.reason) for p in find_problems(records, workers=4)] == [(p.row, p.reason) for p in one]


def test_results_are_stored_in_blocks_and_progress_is_logged_where_there_is_no_terminal(tmp_path, monkeypatch, caplog):
    files = []
    for i in range(10):
        (tmp_path / f"{i}.bin").write_bytes(b"x" * i)
        _old(tmp_path / f"{i}.bin")
        files.append(str(tmp_path / f"{i}.bin"))
    monkeypatch.setattr(filestats, "STORE_EVERY", 3)
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    done = []

    def size(path):
        if len(done) == 7:
            raise KeyboardInterrupt  # an interrupted pass keeps the blocks it had finished
        done.append(path)
        return str(os.path.getsize(path))

    with caplog.at_level(logging.INFO, logger="mmfuse.progress"), pytest.raises(KeyboardInterrupt):
        FileIndex(tmp_path / "f.sqlite").values("size", files, size, workers=1, desc="sizing")
    assert "sizing: 1/10 rows" in caplog.text and "rows/s" in caplog.text
    again = []
    out = FileIndex(tmp_path / "f.sqlite").values(
        "size", files, lambda p: again.append(p) or str(os.path.getsize(p)), workers=2
    )
    assert out == [str(i) for i in range(10)] and again == files[6:]


def test_records_are_lean_and_labels_are_shared(tmp_path):
    write_csv(tmp_path / "m.csv", [{"image": f"{i}.png", "text": "t", "label": "cat"} for i in range(3)])
    records, _ = read_manifest(tmp_path / "m.csv", need_label=True)
    assert not hasattr(records[0], "__dict__")
    assert records[0].label is records[2].label
    wide = pd.DataFrame({"image": ["a.png"], "Text": ["t"], "label": ["x"], "embedding": [[0.5] * 64]})
    wide.to_parquet(tmp_path / "w.parquet")  # a column mmfuse does not read is not read
    records, problems = read_manifest(tmp_path / "w.parquet", need_label=True)
    assert [(r.text, r.label) for r in records] == [("t", "x")] and not problems


def test_the_bench_generator_is_deterministic(tmp_path):
    from scale import generate

    a, b = generate(tmp_path / "a", 6, seed=1), generate(tmp_path / "b", 6, seed=1)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "images/000/0000005.jpg").read_bytes() == (
        tmp_path / "b/images/000/0000005.jpg"
    ).read_bytes()
    records = load_checked(a)
    assert len(records) == 6 and all(r.label in r.text for r in records)
