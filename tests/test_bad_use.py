"""Bad use of a trained run: the Python API, predict, evaluate, caption and datasets given the wrong things.

Each is a clear error (exit 2 on the CLI, MmfuseError in the API), never a traceback, a silent misalignment or a file
of the user's written over.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import read_csv, write_csv, write_toy
from PIL import Image

import mmfuse
from mmfuse.cli import main
from mmfuse.errors import MmfuseError

FAST = ["--tune", "head", "--epochs", "1", "--batch-size", "8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One toy dataset, a fusion run and a text-only run, shared by the tests of this file (training is the cost)."""
    root = tmp_path_factory.mktemp("bad-use")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(root / "home"))
        toy = write_toy(root / "toy", per_class=6, seed=0)
        for name, extra in (("run", []), ("text", ["--modalities", "text"])):
            args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(root / name)]
            assert main([*args, *FAST, *extra]) == 0
        yield toy, root / "run", root / "text"


@pytest.fixture(scope="module")
def predictor(trained):
    return mmfuse.load(trained[1])


def test_api_refuses_a_lone_path_or_text(trained, predictor):
    toy = trained[0]
    image = str(toy / read_csv(toy / "test.csv")[0]["image"])
    with pytest.raises(MmfuseError, match="images must be a list"):
        predictor.predict(image, ["a red apple"])  # was read as one image per character
    with pytest.raises(MmfuseError, match="texts must be a list"):
        predictor.predict([image, image, image], "abc")  # was three texts: "a", "b", "c"


def test_api_inputs_of_other_types(trained, predictor):
    toy = trained[0]
    rows = read_csv(toy / "test.csv")[:3]
    paths, texts = [str(toy / r["image"]) for r in rows], [r["text"] for r in rows]
    # One row per input, in input order, whatever the batching; a generator is read once like a list.
    together = predictor.predict((p for p in paths), texts, batch_size=2)
    alone = np.stack([predictor.predict([p], [t]).probs[0] for p, t in zip(paths, texts)])
    assert together.probs.shape == (3, len(predictor.classes))
    np.testing.assert_allclose(together.probs, alone, atol=1e-5)
    np.testing.assert_allclose(predictor.predict(np.array(paths), np.array(texts)).probs, alone, atol=1e-5)
    # An HxWx3 uint8 array is an image, as its PIL image would be.
    pil = Image.open(paths[0]).convert("RGB")
    np.testing.assert_allclose(
        predictor.predict([np.asarray(pil)], texts[:1]).probs, predictor.predict([pil], texts[:1]).probs, atol=1e-5
    )
    with pytest.raises(MmfuseError, match="to_pil_image"):
        predictor.predict([torch.zeros(3, 32, 32)], texts[:1])
    with pytest.raises(MmfuseError, match=r"image #0 is empty \(0x0 pixels\)"):
        predictor.predict([Image.new("RGB", (0, 0))], texts[:1])
    with pytest.raises(MmfuseError, match="image #1 is of type NoneType"):
        predictor.predict([paths[0], None], texts[:2])
    with pytest.raises(MmfuseError, match="text #0 is 5"):
        predictor.predict(paths[:1], [5])
    with pytest.raises(MmfuseError, match="no text"):  # NaN: pandas' missing value, not the text "nan"
        predictor.predict(paths[:1], [float("nan")])
    for bad in (0, -1, 1.5):  # -1 returned an empty result for a non-empty input
        with pytest.raises(MmfuseError, match="batch_size"):
            predictor.predict(paths[:1], texts[:1], batch_size=bad)


def test_api_text_only_model_needs_no_images(trained):
    text_model = mmfuse.load(trained[2])
    result = text_model.predict(None, ["a shiny apple", "an old train"])
    assert result.probs.shape == (2, len(result.classes))
    with pytest.raises(MmfuseError, match="images is None"):
        mmfuse.load(trained[1]).predict(None, ["a shiny apple"])


def test_predict_out_in_another_format_or_another_run(trained, tmp_path):
    toy, run, text_run = trained
    for name in ("preds.parquet", "preds.jsonl"):  # a CSV was written under these names
        assert main(["predict", str(run), str(toy / "test.csv"), "--out", str(tmp_path / name)]) == 2
        assert not (tmp_path / name).exists()
    history = (text_run / "history.csv").read_bytes()
    assert main(["predict", str(run), str(toy / "test.csv"), "--out", str(text_run / "history.csv")]) == 2
    assert (text_run / "history.csv").read_bytes() == history


def test_predict_duplicate_rows_keep_input_order(trained, tmp_path):
    toy, run, _ = trained
    rows = read_csv(toy / "test.csv")
    dup = [rows[0], rows[1], rows[0], rows[2], rows[0]]
    write_csv(toy / "dup.csv", dup)
    assert main(["predict", str(run), str(toy / "dup.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    out = read_csv(tmp_path / "p.csv")
    assert [r["image"] for r in out] == [r["image"] for r in dup]
    assert out[0]["confidence"] == out[2]["confidence"] == out[4]["confidence"]
    # Written whole, then renamed: no partial file is left beside it.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("p.")] == ["p.csv"]


def test_evaluate_subset_of_classes_and_not_into_another_run(trained, tmp_path):
    toy, run, text_run = trained
    rows = [r for r in read_csv(toy / "all.csv") if r["label"].startswith("red")]
    write_csv(toy / "red.csv", rows)
    assert main(["evaluate", str(run), str(toy / "red.csv"), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    labels = json.loads((run / "labels.json").read_text())
    assert report["n"] == len(rows) and list(report["per_class"]) == labels
    assert {c: r["support"] for c, r in report["per_class"].items() if r["support"]} == {
        "red-apple": 6,
        "red-train": 6,
    }
    # Another run's metrics.json is its record of training: evaluate must not replace it.
    before = (text_run / "metrics.json").read_bytes()
    assert main(["evaluate", str(run), str(toy / "red.csv"), "--out", str(text_run)]) == 2
    assert (text_run / "metrics.json").read_bytes() == before


def test_caption_typo_and_out_that_is_not_a_captions_file(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "a.png")
    assert main(["caption", str(folder), "--out", str(tmp_path / "c.csv"), "--model", "imagenet-tag"]) == 2
    assert "did you mean imagenet-tags" in capsys.readouterr().err
    # A file that is no captions CSV was cut at its last newline byte, as if a kill had left it half-written.
    other = tmp_path / "notes.dat"
    png = (folder / "a.png").read_bytes()
    other.write_bytes(png)
    assert main(["caption", str(folder), "--out", str(other), "--model", "imagenet-tags"]) == 2
    assert other.read_bytes() == png
    assert main(["caption", str(folder), "--out", str(tmp_path / "c.png"), "--model", "imagenet-tags"]) == 2
    assert not (tmp_path / "c.png").exists()


def test_datasets_out_never_replaces_other_files(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["datasets", "emoji", "--out", str(folder)]) == 2
    assert (folder / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "data.csv"
    a_file.write_text("image,text,label\n")
    assert main(["datasets", "emoji", "--out", str(a_file)]) == 2
    assert a_file.read_text() == "image,text,label\n"


def test_ablate_test_labels_checked_before_training(trained, tmp_path):
    toy = trained[0]
    rows = read_csv(toy / "test.csv")
    write_csv(toy / "unseen.csv", [*rows[:3], {**rows[3], "label": "green-apple"}])
    args = ["ablate", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(tmp_path / "abl")]
    assert main([*args, "--test", str(toy / "unseen.csv"), *FAST]) == 2  # was: after all three models were trained
    assert not (tmp_path / "abl").exists()


def test_caption_every_image_bad_is_an_error(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    out = tmp_path / "c.csv"
    assert main(["caption", str(folder), "--out", str(out), "--model", "imagenet-tags", "--skip-bad"]) == 2
    assert read_csv(tmp_path / "c.skipped.csv")[0]["image"] == "a.png"  # it said "wrote c.csv" and wrote nothing
