"""What predict and evaluate write for a person to read: predictions that keep their inputs' row, the misclassified
rows as errors.csv and errors.html, the warning when evaluating on the training data, and bad text (lone
surrogates) skipped rather than crashing the tokenizer."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY, read_csv, write_csv, write_toy
from PIL import Image

from mmfuse.cli import main
from mmfuse.data.records import Record
from mmfuse.inference.report import errors_html, misclassified

FAST = ["--tune", "head", "--epochs", "2", "--batch-size", "8"]

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' features, embedded once a session


@pytest.fixture(scope="module")
def trained(shared_home, tmp_path_factory):
    """One toy dataset and one briefly trained run (it still gets some rows wrong), shared by this file's tests."""
    root = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        toy = write_toy(root / "toy", **TOY)
        args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(root / "run")]
        assert main([*args, *FAST]) == 0
        yield toy, root / "run"


def test_predict_keeps_each_rows_identity_and_scores_labelled_input(trained, tmp_path):
    toy, run = trained
    rows = read_csv(toy / "test.csv")
    rows[2] = {**rows[2], "image": "images/missing.png"}  # skipped: its number is the one missing from row
    write_csv(tmp_path / "test.csv", rows)
    shutil.copytree(toy / "images", tmp_path / "images")
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(tmp_path / "test.csv"), "--out", str(preds), "--skip-bad"]) == 0
    out = read_csv(preds)
    labels = json.loads((run / "labels.json").read_text())
    assert list(out[0]) == ["row", "image", "true_label", "correct", "label", "confidence", *(f"p_{c}" for c in labels)]
    assert [int(r["row"]) for r in out] == [i for i in range(len(rows)) if i != 2]
    assert [r["image"] for r in out] == [r["image"] for i, r in enumerate(rows) if i != 2]
    assert [r["true_label"] for r in out] == [r["label"] for i, r in enumerate(rows) if i != 2]
    assert [r["correct"] for r in out] == [str(r["true_label"] == r["label"]) for r in out]
    assert read_csv(tmp_path / "preds.skipped.csv")[0]["row"] == "3"  # 1-based there, as in error messages

    # Unlabelled input: no columns of truth to fill.
    write_csv(tmp_path / "unlabelled.csv", rows[:2], fields=("image", "text"))
    assert main(["predict", str(run), str(tmp_path / "unlabelled.csv"), "--out", str(preds), "--overwrite"]) == 0
    assert list(read_csv(preds)[0])[:4] == ["row", "image", "label", "confidence"]


def test_lone_surrogates_are_skipped_by_predict_and_named_by_train(trained, tmp_path, capsys):
    toy, run = trained
    rows = read_csv(toy / "test.csv")[:4]
    rows[1]["text"] = "scraped \ud83d text"
    data = toy / "odd.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes the escape \ud83d
    assert "\\ud83d" in data.read_text()
    preds = tmp_path / "p.csv"
    assert main(["predict", str(run), str(data), "--out", str(preds), "--skip-bad"]) == 0
    assert [r["row"] for r in read_csv(preds)] == ["0", "2", "3"]
    assert "lone surrogate" in read_csv(tmp_path / "p.skipped.csv")[0]["reason"]
    capsys.readouterr()
    assert main(["predict", str(run), str(data), "--out", str(preds), "--overwrite"]) == 2
    assert "row 2: " in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "row 2: " in err and "text holds a lone surrogate (\\ud83d" in err and "Traceback" not in err


def test_evaluate_writes_the_misclassified_rows_as_csv_and_html(trained, tmp_path):
    toy, run = trained
    rows = read_csv(toy / "test.csv")
    rows[0] = {**rows[0], "text": "<script>alert('x')</script> & " + rows[0]["text"]}
    write_csv(tmp_path / "test.csv", rows)
    shutil.copytree(toy / "images", tmp_path / "images")
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(tmp_path / "test.csv"), "--out", str(out)]) == 0
    assert main(["predict", str(run), str(tmp_path / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    preds = read_csv(tmp_path / "p.csv")
    wrong = [p for p in preds if p["correct"] == "False"]
    assert 0 < len(wrong) < len(preds)  # the test means little if the run got all or none right
    errors = read_csv(out / "errors.csv")
    assert list(errors[0]) == ["row", "image", "text", "true_label", "predicted_label", "confidence"]
    assert sorted(e["row"] for e in errors) == sorted(p["row"] for p in wrong)
    by_row = {p["row"]: p for p in wrong}
    for e in errors:
        p = by_row[e["row"]]
        assert (e["image"], e["true_label"], e["predicted_label"]) == (p["image"], p["true_label"], p["label"])
        assert e["text"] == rows[int(e["row"])]["text"]
        assert float(e["confidence"]) == pytest.approx(float(p["confidence"]), abs=1e-4)
    confidences = [float(e["confidence"]) for e in errors]
    assert confidences == sorted(confidences, reverse=True)

    page = (out / "errors.html").read_text(encoding="utf-8")
    assert page.count("<tr class='error'>") == len(errors)
    assert page.count("data:image/jpeg;base64,") == len(errors)  # every thumbnail embedded: one file to mail
    assert "data:image/png;base64," in page  # the confusion matrix
    assert "<script>" not in page and "src='images/" not in page
    if "0" in by_row:
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; " in page


def test_errors_page_escapes_everything_and_caps_its_rows(tmp_path):
    Image.new("RGB", (300, 200), "red").save(tmp_path / "a.png")
    classes = ["<b>cat</b>", "dog & co"]
    records = [Record(tmp_path / "a.png", f"text <i>{i}</i>", classes[0], i + 1, f"a.png?<{i}>") for i in range(5)] + [
        Record(tmp_path / "gone.png", "right", classes[1], 6, "gone.png")
    ]
    probs = np.array([[0.1 + 0.05 * i, 0.9 - 0.05 * i] for i in range(5)] + [[0.2, 0.8]])
    assert misclassified(records, probs, classes) == [0, 1, 2, 3, 4]  # most confident mistake first
    page = errors_html(records, probs, classes, limit=3)
    assert page.count("<tr class='error'>") == 3
    assert "This page shows the first 3; errors.csv lists all 5." in page
    assert "<i>" not in page and "<b>cat" not in page and "&lt;i&gt;0&lt;/i&gt;" in page
    assert "dog &amp; co: 0.900" in page and "a.png?&lt;0&gt;" in page


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "flatter" in r.getMessage()]


def test_evaluate_warns_on_the_training_data_by_path_or_by_content(trained, tmp_path, caplog):
    toy, run = trained
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", str(run), str(toy / "test.csv"), "--out", str(tmp_path / "a")]) == 0
    assert _warnings(caplog) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", str(run), str(toy / "train.csv"), "--out", str(tmp_path / "b")]) == 0
    assert len(_warnings(caplog)) == 1 and "is the data this run was trained on" in _warnings(caplog)[0]

    # The same images copied elsewhere (another export of the same data): found by content.
    copy = tmp_path / "copy"
    shutil.copytree(toy / "images", copy / "images")
    rows = read_csv(toy / "train.csv")
    write_csv(copy / "mostly-train.csv", rows[: len(rows) * 2 // 3] + read_csv(toy / "test.csv")[:2])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["evaluate", str(run), str(copy / "mostly-train.csv"), "--out", str(tmp_path / "c")]) == 0
    assert len(_warnings(caplog)) == 1 and "are images this run was trained on" in _warnings(caplog)[0]
    assert Path(toy / "train.csv").exists()


@pytest.mark.slow  # the browser
def test_the_errors_page_opens_in_a_real_browser(trained, tmp_path):
    from conftest import chrome
    from selenium.webdriver.common.by import By

    toy, run = trained
    # The training rows with a shuffled label: many confident mistakes to list.
    rows = read_csv(toy / "test.csv")
    labels = [r["label"] for r in rows]
    for r, label in zip(rows, labels[1:] + labels[:1]):
        r["label"] = label
    write_csv(toy / "swapped.csv", rows)
    assert main(["evaluate", str(run), str(toy / "swapped.csv"), "--out", str(tmp_path / "e")]) == 0
    errors = read_csv(tmp_path / "e" / "errors.csv")
    assert errors
    driver = chrome(1000, 800)
    try:
        driver.get((tmp_path / "e" / "errors.html").as_uri())
        shown = driver.find_elements(By.CSS_SELECTOR, "tr.error")
        assert len(shown) == len(errors)
        thumbs = driver.find_elements(By.CSS_SELECTOR, "tr.error img")
        assert thumbs and all(driver.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
        driver.save_screenshot(str(tmp_path / "errors.png"))
    finally:
        driver.quit()
