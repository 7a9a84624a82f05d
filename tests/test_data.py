"""Reading folders and manifests, image modes, and bad input: one error listing every bad row, or skip-and-record."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pandas as pd
import pytest
from conftest import make_image, read_csv, write_csv
from PIL import Image

from mmfuse.cli import main
from mmfuse.data.checks import load_checked
from mmfuse.data.images import load_image
from mmfuse.data.read import read_data
from mmfuse.data.splits import stratified_split
from mmfuse.errors import DataError, MmfuseError


def test_image_modes_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red: must come out white
    rgba.save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    assert load_image(tmp_path / "c.jpg").mode == "RGB"

    arr = np.full((8, 8), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "i16.png")  # 16-bit white must stay white, not clip to garbage
    assert load_image(tmp_path / "i16.png").getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.gif")
    assert load_image(tmp_path / "p.gif").getpixel((0, 0)) == (10, 200, 30)

    Image.new("L", (8, 8), 100).save(tmp_path / "g.webp", lossless=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.bmp")
    assert load_image(tmp_path / "g.webp").mode == load_image(tmp_path / "b.bmp").mode == "RGB"


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_folder_pairs_captions_by_path_not_row_order(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "data"
    rows = []
    for label, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (root / label).mkdir(parents=True)
        for i in range(3):
            make_image(color, rng).save(root / label / f"{i}.png")
            rows.append({"image": f"{label}/{i}.png", "text": f"text for {label} {i}"})
    rows.reverse()
    write_csv(tmp_path / "captions.csv", rows, fields=("image", "text"))
    records, problems = read_data(root, tmp_path / "captions.csv")
    assert not problems
    assert {(r.source, r.label, r.text) for r in records} == {
        (f"{lab}/{i}.png", lab, f"text for {lab} {i}") for lab in ("cat", "dog") for i in range(3)
    }


def test_bare_file_names_match_when_unique(tmp_path):
    (tmp_path / "data" / "a").mkdir(parents=True)
    (tmp_path / "data" / "b").mkdir(parents=True)
    make_image((1, 2, 3), random.Random(0)).save(tmp_path / "data" / "a" / "x.png")
    make_image((1, 2, 3), random.Random(0)).save(tmp_path / "data" / "b" / "y.png")
    write_csv(
        tmp_path / "c.csv",
        [{"image": "x.png", "text": "ex"}, {"image": "b/y.png", "text": "why"}],
        fields=("image", "text"),
    )
    records, _ = read_data(tmp_path / "data", tmp_path / "c.csv")
    assert {r.source: r.text for r in records} == {"a/x.png": "ex", "b/y.png": "why"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_manifests(toy_manifest, fmt):
    df = pd.read_csv(toy_manifest / "train.csv")
    path = toy_manifest / f"train.{fmt}"
    if fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    records = load_checked(path)
    assert [r.text for r in records] == list(df.text) and [r.label for r in records] == list(df.label)


def _bad_dataset(tmp_path):
    """A manifest with one row of each kind of problem, plus two good rows per class."""
    rng = random.Random(0)
    d = tmp_path / "bad"
    d.mkdir()
    rows = []
    for i in range(4):
        make_image((200, 0, 0) if i % 2 else (0, 0, 200), rng).save(d / f"ok{i}.png")
        rows.append({"image": f"ok{i}.png", "text": f"good row {i}", "label": "red" if i % 2 else "blue"})
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    Image.new("1", (20_000, 10_000)).save(d / "bomb.png")  # 200 Mpx in a few kB: a decompression bomb
    make_image((0, 0, 200), rng).save(d / "notext.png")
    rows += [
        {"image": "missing.png", "text": "no such file", "label": "red"},
        {"image": "corrupt.jpg", "text": "broken bytes", "label": "red"},
        {"image": "bomb.png", "text": "too many pixels", "label": "blue"},
        {"image": "notext.png", "text": "", "label": "blue"},
    ]
    write_csv(d / "m.csv", rows)
    # Text that is not UTF-8 (Latin-1 bytes), appended as raw bytes.
    (d / "m.csv").open("ab").write(b"ok0.png,caf\xe9 latin-1,red\n")
    return d / "m.csv"


def test_bad_rows_are_all_reported_in_one_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_checked(_bad_dataset(tmp_path))
    msg = str(e.value)
    assert "5 bad row(s)" in msg
    for reason in (
        "image file not found",
        "unreadable image",
        "decompression bomb",
        "no text",
        "not valid UTF-8",
        "--skip-bad",
    ):
        assert reason in msg, reason


def test_error_lists_are_capped(tmp_path):
    write_csv(tmp_path / "m.csv", [{"image": f"nope{i}.png", "text": "t", "label": "a"} for i in range(50)])
    msg = str(pytest.raises(DataError, load_checked, tmp_path / "m.csv").value)
    assert "50 bad row(s)" in msg and "and 30 more" in msg


def test_cli_skip_bad_writes_skipped_csv(tmp_path, toy_manifest, capsys):
    bad = _bad_dataset(tmp_path)
    # Mix the bad rows into real training data so a model can still be trained.
    rows = read_csv(toy_manifest / "train.csv")
    rows = [{**r, "image": str(toy_manifest / r["image"])} for r in rows]
    merged = tmp_path / "bad" / "merged.csv"
    merged.write_bytes(bad.read_bytes() + "".join(f"{r['image']},{r['text']},{r['label']}\n" for r in rows).encode())
    run = tmp_path / "run"
    assert main(["train", str(merged), "--out", str(run), "--tune", "head", "--epochs", "2"]) == 2
    assert "bad row(s)" in capsys.readouterr().err
    assert not (run / "model.safetensors").exists()  # nothing trained on bad input

    assert main(["train", str(merged), "--out", str(run), "--tune", "head", "--epochs", "2", "--skip-bad"]) == 0
    skipped = read_csv(run / "skipped.csv")
    assert len(skipped) == 5 and {"source", "row", "image", "reason"} <= set(skipped[0])
    assert (
        json.loads((run / "metrics.json").read_text())["n_train"]
        + json.loads((run / "metrics.json").read_text())["n_val"]
        == len(rows) + 4
    )


def test_missing_column_and_unknown_label(tmp_path, toy_manifest):
    write_csv(tmp_path / "nolabel.csv", [{"image": "a.png", "text": "t"}], fields=("image", "text"))
    with pytest.raises(MmfuseError, match=r"missing column\(s\) \['label'\]"):
        load_checked(tmp_path / "nolabel.csv")
    assert load_checked(toy_manifest / "train.csv", need_label=False)  # label is optional for predict

    rows = read_csv(toy_manifest / "test.csv")
    rows[0]["label"] = "green-banana"
    write_csv(toy_manifest / "unknown.csv", rows)
    with pytest.raises(DataError, match="unknown label 'green-banana'"):
        load_checked(toy_manifest / "unknown.csv", labels=["blue-apple", "blue-train", "red-apple", "red-train"])


def test_evaluate_reports_unknown_labels(tmp_path, toy_manifest, capsys):
    run = tmp_path / "run"
    assert main(["train", str(toy_manifest / "train.csv"), "--out", str(run), "--tune", "head", "--epochs", "2"]) == 0
    rows = read_csv(toy_manifest / "test.csv")
    rows[1]["label"] = "purple-boat"
    write_csv(toy_manifest / "unknown.csv", rows)
    assert main(["evaluate", str(run), str(toy_manifest / "unknown.csv")]) == 2
    assert "unknown label 'purple-boat'" in capsys.readouterr().err


def test_empty_class_folder_is_reported(tmp_path):
    root = tmp_path / "data"
    (root / "full").mkdir(parents=True)
    (root / "empty").mkdir()
    make_image((1, 2, 3), random.Random(0)).save(root / "full" / "a.png")
    (root / "full" / "notes.txt").write_text("not an image")
    write_csv(tmp_path / "c.csv", [{"image": "full/a.png", "text": "t"}], fields=("image", "text"))
    with pytest.raises(DataError, match="class 'empty' has no images"):
        load_checked(root, captions=tmp_path / "c.csv")


def test_stratified_split_keeps_every_class(toy_manifest):
    records = load_checked(toy_manifest / "all.csv")
    train, val = stratified_split(records, 0.25, seed=0)
    assert {r.label for r in val} == {r.label for r in train}
    assert len(train) + len(val) == len(records) and not {r.row for r in train} & {r.row for r in val}
    assert [r.row for r in stratified_split(records, 0.25, seed=0)[1]] == [r.row for r in val]


def test_unreadable_rows_are_all_listed_and_skippable(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    good = '{"image": "a.png", "text": "t", "label": "x"}'
    (tmp_path / "m.jsonl").write_text(f"\ufeff{good}\n{{broken\n\n[1, 2]\n{good}\n")  # a BOM, a blank line
    msg = str(pytest.raises(DataError, load_checked, tmp_path / "m.jsonl").value)
    assert "2 bad row(s)" in msg and "line 2 is not valid JSON" in msg and "line 4 is not a JSON object" in msg
    assert [r.row for r in load_checked(tmp_path / "m.jsonl", skip_bad=True)] == [1, 5]  # rows are file lines
    (tmp_path / "m.csv").write_text("image,text,label\na.png,t,x\na.png,one, two,x\na.png\na.png,t,x\n")
    msg = str(pytest.raises(DataError, load_checked, tmp_path / "m.csv").value)
    assert "row 2: a.png: has 4 cell(s) but the header names 3 columns" in msg and "row 3: a.png: has 1 cell" in msg
    skipped = tmp_path / "skipped.csv"
    assert [r.row for r in load_checked(tmp_path / "m.csv", skip_bad=True, skipped_csv=skipped)] == [1, 4]
    assert len(read_csv(skipped)) == 2


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("image,text,label\n", encoding="utf-8")
    with pytest.raises(MmfuseError, match="has no data rows"):
        load_checked(tmp_path / "m.csv")
    (tmp_path / "u.csv").write_text("image,text,label\na.png,t,x\n", encoding="utf-16")
    with pytest.raises(MmfuseError, match="UTF-16"):
        load_checked(tmp_path / "u.csv")
    with pytest.raises(MmfuseError, match="Data not found"):
        load_checked(tmp_path / "nothing.csv")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG")
    (tmp_path / "m.txt").write_bytes(buf.getvalue())
    with pytest.raises(MmfuseError, match="manifest"):
        load_checked(tmp_path / "m.txt")


def test_labels_and_paths_that_are_not_utf8(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), "blue").save(tmp_path.joinpath(b"caf\xe9.png".decode("utf-8", "surrogateescape")))
    (tmp_path / "m.csv").write_bytes(b"image,text,label\na.png,t,bleu caf\xe9\ncaf\xe9.png,t,x\n")
    msg = str(pytest.raises(DataError, load_checked, tmp_path / "m.csv").value)
    assert "1 bad row(s)" in msg and "label is not valid UTF-8" in msg  # the file with a Latin-1 name is fine
    assert [r.row for r in load_checked(tmp_path / "m.csv", skip_bad=True)] == [2]


def test_folder_stray_images_and_ambiguous_caption_names_are_reported(tmp_path):
    for label in ("red", "blue"):
        (tmp_path / "d" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8), label).save(tmp_path / "d" / label / "x.png")
        Image.new("RGB", (8, 8), label).save(tmp_path / "d" / label / f"{label}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "stray.png")
    write_csv(
        tmp_path / "c.csv", [{"image": n, "text": "t"} for n in ("x.png", "red.png", "blue.png")], ("image", "text")
    )
    msg = str(pytest.raises(DataError, load_checked, tmp_path / "d", captions=tmp_path / "c.csv").value)
    assert "stray.png: image outside every class folder" in msg
    assert "blue/x.png: its caption is keyed by the bare name 'x.png', which 2 images share" in msg
    kept = load_checked(tmp_path / "d", captions=tmp_path / "c.csv", skip_bad=True)
    assert sorted(r.source for r in kept) == ["blue/blue.png", "red/red.png"]


def test_parquet_integer_labels_with_a_null_stay_integers(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    pd.DataFrame({"image": ["a.png"] * 3, "text": ["t"] * 3, "label": [1, None, 3]}).to_parquet(tmp_path / "m.parquet")
    assert [r.label for r in load_checked(tmp_path / "m.parquet", skip_bad=True)] == ["1", "3"]
