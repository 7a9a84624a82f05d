"""More bad input: odd headers and delimiters, odd JSON and parquet cells, odd paths, folders with system files,
and outputs that would overwrite earlier work. Each is a clear error, a reported row or is read as meant."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import read_csv, write_csv
from PIL import Image

from mmfuse.cli import main
from mmfuse.data.checks import load_checked
from mmfuse.errors import DataError, MmfuseError

FAST = ["--tune", "head", "--epochs", "1"]


@pytest.fixture
def images(tmp_path):
    """Two small images beside the manifests written by each test."""
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    return tmp_path


def test_header_spelling_is_forgiven_but_duplicates_and_delimiters_are_named(images):
    (images / "m.csv").write_text("\ufeff Image ,TEXT,Label\na.png,t,x\nb.png,u,y\n", encoding="utf-8")
    read = [(r.source, r.text, r.label) for r in load_checked(images / "m.csv")]
    assert read == [("a.png", "t", "x"), ("b.png", "u", "y")]
    pd.DataFrame({"Image": ["a.png"], "Text": ["t"], "Label": [1]}).to_parquet(images / "m.parquet")
    assert [r.label for r in load_checked(images / "m.parquet")] == ["1"]
    (images / "m.jsonl").write_text(json.dumps({"IMAGE": "a.png", " text": "t", "label": 3}) + "\n")
    assert [(r.text, r.label) for r in load_checked(images / "m.jsonl")] == [("t", "3")]

    (images / "dup.csv").write_text("image,text,text,label\na.png,t,u,x\n")
    with pytest.raises(MmfuseError, match=r"column\(s\) \['text'\] appear more than once"):
        load_checked(images / "dup.csv")
    (images / "semi.csv").write_text("image;text;label\na.png;t;x\n")
    with pytest.raises(MmfuseError, match="separated by semicolons"):
        load_checked(images / "semi.csv")
    (images / "tab.csv").write_text("image\ttext\tlabel\na.png\tt\tx\n")
    with pytest.raises(MmfuseError, match="separated by tabs"):
        load_checked(images / "tab.csv")
    (images / "nohead.csv").write_text("a.png,t,x\nb.png,u,y\n")
    with pytest.raises(MmfuseError, match="first line looks like a data row"):
        load_checked(images / "nohead.csv")
    (images / "open.csv").write_text('image,text,label\na.png,"never closed,x\nb.png,u,y\n')
    with pytest.raises(DataError, match="quote left open"):
        load_checked(images / "open.csv")
    for suffix, hint in ((".tsv", "comma-separated"), (".json", "JSON Lines")):
        (images / f"m{suffix}").write_text("x")
        with pytest.raises(MmfuseError, match=hint):
            load_checked(images / f"m{suffix}")


def test_json_that_is_not_json_lines_and_cells_that_are_not_values(images):
    rows = [{"image": "a.png", "text": "t", "label": "x"}, {"image": "b.png", "text": "u", "label": "y"}]
    (images / "array.jsonl").write_text(json.dumps(rows, indent=2))
    with pytest.raises(MmfuseError, match="one JSON array, not JSON Lines"):
        load_checked(images / "array.jsonl")
    # Every line unreadable: the lines are reported, not a "missing columns []" that hides them.
    (images / "broken.jsonl").write_text("{broken\n[1, 2]\n")
    msg = str(pytest.raises(DataError, load_checked, images / "broken.jsonl").value)
    assert "line 1 is not valid JSON" in msg and "line 2 is not a JSON object" in msg
    skipped = images / "skipped.csv"
    with pytest.raises(MmfuseError, match="every row was bad, listed with their reasons in"):
        load_checked(images / "broken.jsonl", skip_bad=True, skipped_csv=skipped)
    assert len(read_csv(skipped)) == 2

    lines = [{**rows[0], "text": ["a", "b"]}, {**rows[1], "label": {"name": "y"}}, rows[0]]
    (images / "odd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    msg = str(pytest.raises(DataError, load_checked, images / "odd.jsonl").value)
    assert "row 1: a.png: text is a list, not one value" in msg and "row 2: b.png: label is an object" in msg
    assert [r.row for r in load_checked(images / "odd.jsonl", skip_bad=True)] == [3]
    (images / "twice.jsonl").write_text(json.dumps({**rows[0], "Text": "other"}) + "\n" + json.dumps(rows[1]) + "\n")
    msg = str(pytest.raises(DataError, load_checked, images / "twice.jsonl").value)
    assert "gives key(s) ['text'] twice" in msg


def test_parquet_cells_embedded_images_bytes_and_pandas_nulls(images):
    png = (images / "a.png").read_bytes()
    pd.DataFrame({"image": [png, png], "text": ["t", "u"], "label": ["x", "y"]}).to_parquet(images / "bytes.parquet")
    with pytest.raises(MmfuseError, match="holds the images themselves"):
        load_checked(images / "bytes.parquet")
    hf = [{"bytes": png, "path": "a.png"}] * 2  # how datasets' Image feature is written to parquet
    pd.DataFrame({"image": hf, "text": ["t", "u"], "label": ["x", "y"]}).to_parquet(images / "hf.parquet")
    with pytest.raises(MmfuseError, match="holds the images themselves"):
        load_checked(images / "hf.parquet")

    # A binary text column with one Latin-1 cell is one bad row, not an unreadable file.
    df = pd.DataFrame({"image": ["a.png", "b.png"], "text": [b"caf\xe9", b"fine"], "label": ["x", "y"]})
    df.to_parquet(images / "binary.parquet")
    msg = str(pytest.raises(DataError, load_checked, images / "binary.parquet").value)
    assert "1 bad row(s)" in msg and "text is not valid UTF-8" in msg
    df = pd.DataFrame(
        {
            "image": ["a.png", "b.png", "a.png"],
            "text": pd.array([None, "u", "v"], dtype="string"),
            "label": pd.array([1, None, 2], dtype="Int64"),
        }
    )
    df.to_parquet(images / "nulls.parquet")
    msg = str(pytest.raises(DataError, load_checked, images / "nulls.parquet").value)
    assert "row 1: a.png: no text" in msg and "row 2: b.png: no label" in msg and "<NA>" not in msg
    pd.DataFrame({"image": ["a.png"], "text": [np.array(["a", "b"])], "label": ["x"]}).to_parquet(images / "l.parquet")
    with pytest.raises(DataError, match="text is a list"):
        load_checked(images / "l.parquet")


def test_odd_image_paths_are_rows_not_crashes(images):
    (images / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(images / "sub" / "c.png")
    rows = [
        {"image": "x" * 300 + ".png", "text": "t", "label": "x"},  # longer than a file name may be
        {"image": "https://example.com/a.png", "text": "t", "label": "x"},
        {"image": "sub\\c.png", "text": "t", "label": "x"},  # written on Windows
        {"image": "sub", "text": "t", "label": "x"},
        {"image": "C:\\data\\a.png", "text": "t", "label": "x"},
        {"image": "~/a.png", "text": "t", "label": "x"},
    ]
    write_csv(images / "m.csv", rows)
    msg = str(pytest.raises(DataError, load_checked, images / "m.csv").value)
    assert "5 bad row(s)" in msg
    assert "image path cannot be opened" in msg and "image is a URL" in msg and "image path is not a file" in msg
    assert "a Windows path" in msg and "~ is not expanded" in msg
    kept = load_checked(images / "m.csv", skip_bad=True)
    assert [(r.source, r.image) for r in kept] == [("sub\\c.png", images / "sub" / "c.png")]


def test_folders_ignore_system_files_and_match_captions_however_keyed(tmp_path):
    root = tmp_path / "d"
    for label in ("cat", "dog"):
        (root / label / "nested").mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(root / label / "1.png")
        Image.new("RGB", (8, 8), "blue").save(root / label / "nested" / "2.png")
        (root / label / "._1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
        (root / label / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / ".hidden.png")
    captions = [
        {"image": "./cat/1.png", "text": "one cat"},
        {"image": str((root / "cat" / "nested" / "2.png").resolve()), "text": "two cats"},
        {"image": "dog/1.png", "text": "one dog"},
    ]
    write_csv(tmp_path / "c.csv", captions, ("image", "text"))
    msg = str(pytest.raises(DataError, load_checked, root, captions=tmp_path / "c.csv").value)
    assert "1 bad row(s)" in msg and "dog/nested/2.png: no text: c.csv has no caption (or an empty one)" in msg
    kept = load_checked(root, captions=tmp_path / "c.csv", skip_bad=True)
    assert [(r.source, r.text) for r in kept] == [
        ("cat/1.png", "one cat"),
        ("cat/nested/2.png", "two cats"),
        ("dog/1.png", "one dog"),
    ]
    with pytest.raises(MmfuseError, match="folder of images with no text: give the texts with --captions"):
        load_checked(root)
    with pytest.raises(MmfuseError, match="Captions file not found"):
        load_checked(root, captions=tmp_path / "nope.csv")
    with pytest.raises(MmfuseError, match="is a folder; give the captions CSV"):
        load_checked(root, captions=tmp_path)
    write_csv(tmp_path / "bad.csv", [{"image": "cat/1.png"}], ("image",))
    with pytest.raises(MmfuseError, match="A captions file needs columns image and text"):
        load_checked(root, captions=tmp_path / "bad.csv")


def test_outputs_never_overwrite_a_finished_run_or_its_inputs(toy_manifest, tmp_path, capsys):
    data, run = str(toy_manifest / "train.csv"), tmp_path / "run"
    assert main(["train", data, "--out", str(run), *FAST]) == 0
    weights = (run / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", data, "--out", str(run), *FAST, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--overwrite" in err
    assert (run / "model.safetensors").read_bytes() == weights
    cases = [
        (["predict", str(run), data, "--out", str(run / "model.safetensors")], "one of the run's own files"),
        (["predict", str(run), data, "--out", str(run / "labels.json")], "one of the run's own files"),
        (["evaluate", str(run), data, "--out", str(run)], "the run directory itself"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        assert expected in capsys.readouterr().err, args
    assert (run / "model.safetensors").read_bytes() == weights
    assert main(["train", data, "--out", str(run), *FAST, "--seed", "1", "--overwrite"]) == 0


def test_damaged_run_files_and_configs_are_clear_errors(toy_manifest, tmp_path, capsys):
    data, run = str(toy_manifest / "train.csv"), tmp_path / "run"
    assert main(["train", data, "--out", str(run), *FAST]) == 0
    capsys.readouterr()
    # The Python API names unreadable inputs too, and finds missing files before predicting any batch.
    from mmfuse import load

    (tmp_path / "not-an-image.png").write_text("hello")
    predictor = load(run)
    with pytest.raises(MmfuseError, match=r"1 image file\(s\) not found: #1 .*missing.png"):
        predictor.predict([tmp_path / "not-an-image.png", tmp_path / "missing.png"], ["a", "b"])
    with pytest.raises(MmfuseError, match=r"image #0 .*not-an-image.png.* cannot be read"):
        predictor.predict([tmp_path / "not-an-image.png"], ["a"])
    towers = (run / "towers.json").read_text()
    (run / "towers.json").write_text('{"image": {"type": "packaged"}}')
    assert main(["predict", str(run), data, "--out", str(tmp_path / "p.csv")]) == 2
    assert "towers.json is damaged" in capsys.readouterr().err
    (run / "towers.json").write_text(towers)
    (run / "labels.json").write_text('{"a": 1}')
    assert main(["evaluate", str(run), data]) == 2
    assert "labels.json is damaged" in capsys.readouterr().err

    (tmp_path / "c.yaml").write_text("train:\n  epochs: ten\n  lr: 1e-3\n")
    assert main(["train", data, "--out", str(tmp_path / "r2"), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "a value has the wrong type" in capsys.readouterr().err


def test_files_that_are_not_utf8_text_are_named(images):
    text = "image,text,label\na.png,t,x\n"
    (images / "u16.csv").write_bytes(text.encode("utf-16-le"))  # no byte-order mark
    with pytest.raises(MmfuseError, match="UTF-16 text"):
        load_checked(images / "u16.csv")
    pd.DataFrame({"image": ["a.png"], "text": ["t"], "label": ["x"]}).to_parquet(images / "p.csv")
    with pytest.raises(MmfuseError, match="is a parquet file"):
        load_checked(images / "p.csv")
    (images / "x.csv").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(MmfuseError, match="zip archive"):
        load_checked(images / "x.csv")


def test_paths_relative_to_the_wrong_folder_and_labels_that_differ_in_case(images, monkeypatch, caplog):
    (images / "data").mkdir()
    write_csv(images / "data" / "m.csv", [{"image": "a.png", "text": "t", "label": "x"}])
    monkeypatch.chdir(images)  # a.png exists here, not beside the manifest
    msg = str(pytest.raises(DataError, load_checked, "data/m.csv").value)
    assert "paths are relative to the manifest's folder" in msg
    write_csv(
        images / "m.csv",
        [{"image": "a.png", "text": "t", "label": "Cat"}, {"image": "b.png", "text": "u", "label": "cat"}],
    )
    assert len(load_checked(images / "m.csv")) == 2
    assert "differ only in case" in caplog.text


def test_text_column_is_only_needed_where_text_is_used(toy_manifest, tmp_path, capsys):
    rows = [{**r, "image": str(toy_manifest / r["image"])} for r in read_csv(toy_manifest / "train.csv")]
    write_csv(tmp_path / "images_only.csv", rows, ("image", "label"))
    run = tmp_path / "run"
    argv = ["train", str(tmp_path / "images_only.csv"), "--out", str(run), *FAST, "--modalities", "image"]
    assert main(argv) == 0
    assert main(["predict", str(run), str(tmp_path / "images_only.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(read_csv(tmp_path / "p.csv")) == len(rows)
    capsys.readouterr()
    # A model that reads text still says which column is missing.
    text_run = tmp_path / "text_run"
    assert main(["train", str(toy_manifest / "train.csv"), "--out", str(text_run), *FAST]) == 0
    assert main(["predict", str(text_run), str(tmp_path / "images_only.csv"), "--out", str(tmp_path / "q.csv")]) == 2
    assert "missing column(s) ['text']" in capsys.readouterr().err


def test_outputs_that_cannot_be_written_stop_before_the_work(toy_manifest, tmp_path, capsys):
    data = toy_manifest / "train.csv"
    assert main(["caption", str(toy_manifest / "images"), "--out", str(tmp_path), "--model", "imagenet-tags"]) == 2
    assert "is a directory" in capsys.readouterr().err
    folder = tmp_path / "d"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / label / "1.png")
    write_csv(tmp_path / "c.csv", [{"image": f"{x}/1.png", "text": "t"} for x in "ab"], ("image", "text"))
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *FAST]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--out", str(data / "x" / "p.csv")]) == 2
    assert "is a file, so no folder can be made there" in capsys.readouterr().err
    argv = ["evaluate", str(run), str(folder), "--captions", str(tmp_path / "c.csv"), "--out", str(folder / "eval")]
    assert main(argv) == 2
    assert "inside the data folder" in capsys.readouterr().err and not (folder / "eval").exists()


def test_headers_that_do_not_fit_the_rows_and_other_writers_quirks(images):
    (images / "excel.csv").write_text("sep=,\nimage,text,label\na.png,t,x\n")  # Excel's delimiter line
    assert [r.label for r in load_checked(images / "excel.csv")] == ["x"]
    (images / "short.csv").write_text("image,text\na.png,t,x\nb.png,u,y\n")
    with pytest.raises(MmfuseError, match="header names 2 column.* but every row has 3 cells"):
        load_checked(images / "short.csv")
    df = pd.DataFrame({"image": ["a.png", "b.png"], "text": ["t", "u"], "label": ["x", "y"]})
    df.to_parquet(images / "parts.parquet", partition_cols=["label"])  # a folder of parquet parts
    assert sorted(r.label for r in load_checked(images / "parts.parquet")) == ["x", "y"]
    (images / "cls").mkdir()
    Image.new("RGB", (8, 8)).save(images / "cls" / "c.png")
    write_csv(images / "train.csv", [{"image": "a.png", "text": "t", "label": "x"}])
    with pytest.raises(MmfuseError, match="It holds excel.csv, .*: pass a manifest itself as DATA"):
        load_checked(images)


def test_ablate_reads_its_test_data_before_training(toy_manifest, tmp_path, capsys):
    argv = ["ablate", str(toy_manifest / "train.csv"), "--out", str(tmp_path / "a"), *FAST]
    assert main([*argv, "--test", str(tmp_path / "nope.csv")]) == 2
    assert "Data not found" in capsys.readouterr().err and not (tmp_path / "a" / "image").exists()


def test_columns_named_as_other_tools_name_them_and_folders_of_splits(images):
    (images / "alias.csv").write_text("file_name,caption,Class\na.png,t,x\n")
    with pytest.raises(MmfuseError, match="Rename file_name to image, caption to text, Class to label"):
        load_checked(images / "alias.csv")
    for split, label in (("train", "cat"), ("train", "dog"), ("val", "cat")):
        (images / "splits" / split / label).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(images / "splits" / split / label / "1.png")
    with pytest.raises(MmfuseError, match="holds the splits train, val"):
        load_checked(images / "splits", need_text=False)
    assert len(load_checked(images / "splits" / "train", need_text=False)) == 2
