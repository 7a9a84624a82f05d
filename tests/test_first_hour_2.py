"""The first hour, second pass (issue 25): a failed verb leaves no empty --out folder, what --out holds is replaced
only with --overwrite, Ctrl-C names the command that continues, train.log in the run, whole-number epoch ticks, and
repeated bad-input problems reported once with their counts."""

import json
import logging
import shlex
from pathlib import Path

import pytest
from conftest import read_csv, write_csv

import mmfuse.training.loop
from mmfuse import metrics
from mmfuse.cli import main
from mmfuse.errors import GROUP_AT, DataError

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]


def argv_of(command: str) -> list[str]:
    """The argv of a printed ``mmfuse ...`` command line, to run in-process."""
    words = shlex.split(command)
    assert words[0] == "mmfuse"
    return words[1:]


# --- item 3: no folder left behind by a verb that fails ------------------------------------------------------------


def test_a_failed_verb_leaves_no_empty_out_folder(head_run, toy_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "bad.csv", [{"image": "gone.png", "text": "a text", "label": "red-apple"}] * 3)
    failing = [
        ["train", "nope.csv", "--out", "runs/x", *FAST],
        ["train", "bad.csv", "--out", "runs/x", *FAST],  # the data exists; its rows do not pass the check
        ["ablate", "nope.csv", "--out", "runs/a", *FAST],
        ["ablate", "bad.csv", "--out", "runs/a", *FAST],
        ["search", "nope.csv", "--out", "runs/s", "--trials", "2", *FAST],
        ["search", "bad.csv", "--out", "runs/s", "--trials", "2", *FAST],
        ["evaluate", str(head_run), "nope.csv", "--out", "runs/e"],
        ["evaluate", str(head_run), "bad.csv", "--out", "runs/e"],
        ["predict", str(head_run), "bad.csv", "--out", "runs/p/preds.csv"],
        ["export", "nope", "--out", "runs/o"],
        ["caption", "nope", "--out", "runs/c/captions.csv", "--model", "imagenet-tags"],
    ]
    for argv in failing:
        assert main(argv) == 2, argv
        assert "Traceback" not in capsys.readouterr().err
        assert not (tmp_path / "runs").exists(), f"{argv} left {sorted(p.name for p in (tmp_path / 'runs').rglob('*'))}"
    # A folder that was there before is kept, empty or not.
    (tmp_path / "runs" / "x").mkdir(parents=True)
    assert main(["train", "nope.csv", "--out", "runs/x", *FAST]) == 2
    assert (tmp_path / "runs" / "x").is_dir()


def test_a_failure_after_work_was_written_keeps_it(tmp_path):
    from mmfuse.cli.checks import no_empty_folders

    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), no_empty_folders(out):
        (out / "empty" / "deeper").mkdir(parents=True)
        (out / "kept").mkdir()
        (out / "kept" / "checkpoint.pt").write_text("x")
        raise RuntimeError
    assert (out / "kept" / "checkpoint.pt").exists() and not (out / "empty").exists()
    with no_empty_folders(tmp_path / "c"):  # success: whatever was made stays
        (tmp_path / "c").mkdir()
    assert (tmp_path / "c").is_dir()


# --- item 6: one rule for what --out already holds -----------------------------------------------------------------


def test_predict_and_evaluate_replace_earlier_output_only_with_overwrite(head_run, toy_data, tmp_path, capsys):
    test = str(toy_data / "test.csv")
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(head_run), test, "--out", str(preds)]) == 0
    first = preds.read_bytes()
    preds.write_bytes(first + b"# a note the user added\n")
    capsys.readouterr()
    assert main(["predict", str(head_run), test, "--out", str(preds)]) == 2
    err = capsys.readouterr().err
    assert f"--out {preds} already exists (predictions of" in err and "another --out" in err and "--overwrite" in err
    assert preds.read_bytes().endswith(b"# a note the user added\n")  # untouched
    assert main(["predict", str(head_run), test, "--out", str(preds), "--resume"]) == 2  # finished: nothing to resume
    assert "--resume has nothing to continue" in capsys.readouterr().err
    assert main(["predict", str(head_run), test, "--out", str(preds), "--overwrite"]) == 0
    assert preds.read_bytes() == first

    reports = tmp_path / "ev"
    assert main(["evaluate", str(head_run), test, "--out", str(reports)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(head_run), test, "--out", str(reports)]) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier evaluation" in err and "--overwrite" in err
    assert main(["evaluate", str(head_run), test, "--out", str(reports), "--overwrite"]) == 0


def test_export_datasets_search_and_caption_refuse_to_replace_unasked(head_run, tmp_path, capsys):
    from mmfuse.data.datasets.emoji import DATASET_NAME

    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text("{}")
    assert main(["export", str(head_run), "--out", str(export)]) == 2
    assert "already holds an earlier export" in capsys.readouterr().err

    dataset = tmp_path / "emoji"
    dataset.mkdir()
    (dataset / "info.json").write_text(json.dumps({"name": DATASET_NAME}))
    assert main(["datasets", "emoji", "--out", str(dataset)]) == 2
    assert "already holds an earlier export of emoji" in capsys.readouterr().err

    study = tmp_path / "search"
    study.mkdir()
    (study / "study.sqlite").write_bytes(b"")
    args = ["search", "data.csv", "--out", str(study), "--trials", "3", *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a search" in err and f"continue it with: mmfuse {shlex.join(args)} --resume" in err
    assert main(["search", "data.csv", "--out", str(tmp_path / "new"), "--trials", "3", "--resume", *FAST]) == 2
    assert "holds no search to continue" in capsys.readouterr().err

    captions = tmp_path / "captions.csv"
    captions.write_text("image,text,model,hash\na.png,a red apple,imagenet-tags,0\n")
    args = ["caption", str(tmp_path), "--out", str(captions), "--model", "imagenet-tags"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds 1 caption(s)" in err and "--resume" in err and "--overwrite" in err
    assert captions.read_text().endswith("a red apple,imagenet-tags,0\n")


def test_a_finished_ablation_run_is_kept_unless_asked(tmp_path, toy_manifest, capsys):
    (tmp_path / "abl" / "image").mkdir(parents=True)
    (tmp_path / "abl" / "image" / "metrics.json").write_text("{}")  # what an interrupted ablation finished
    assert main(["ablate", str(toy_manifest / "train.csv"), "--out", str(tmp_path / "abl"), *FAST]) == 2
    assert "already holds a finished run (image/metrics.json)" in capsys.readouterr().err


# --- item 7: Ctrl-C says how to continue ---------------------------------------------------------------------------


def test_ctrl_c_in_training_names_the_command_that_continues_it(toy_manifest, tmp_path, monkeypatch, capsys):
    real, calls = mmfuse.training.loop.train_epoch, []

    def stopped_in_epoch_2(tr, epoch):
        calls.append(epoch)
        if epoch == 2:
            raise KeyboardInterrupt
        return real(tr, epoch)

    args = ["train", str(toy_manifest / "train.csv"), "--out", str(tmp_path / "run"), *FAST, "--epochs", "3"]
    with monkeypatch.context() as mp:
        mp.setattr(mmfuse.training.loop, "train_epoch", stopped_in_epoch_2)
        assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted after 1 epoch(s); saved epoch 1" in err
    command = err.split("Continue training it with: ")[1].splitlines()[0]
    assert argv_of(command) == [*args, "--resume"]
    assert main(argv_of(command)) == 0  # the command given goes on from epoch 2
    assert [r["epoch"] for r in read_csv(tmp_path / "run" / "history.csv")] == ["1", "2", "3"]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "interrupted: saving the best epoch so far (1)" in log and "epoch 3:" in log  # both runs' lines


def test_ctrl_c_in_predict_names_the_command_that_continues_it(head_run, toy_data, tmp_path, monkeypatch, capsys):
    from mmfuse.inference.predictor import Predictor

    real, calls = Predictor.predict_records, []

    def dies_in_chunk_2(self, records, *a, **k):
        calls.append(len(records))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, records, *a, **k)

    out = tmp_path / "preds.csv"
    args = ["predict", str(head_run), str(toy_data / "test.csv"), "--out", str(out), "--chunk-size", "4"]
    with monkeypatch.context() as mp:
        mp.setattr(Predictor, "predict_records", dies_in_chunk_2)
        assert main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted; 4 row(s) are written" in err
    command = err.split("Continue after the last whole chunk with: ")[1].splitlines()[0]
    assert argv_of(command) == [*args, "--resume"]
    assert main(argv_of(command)) == 0
    assert len(read_csv(out)) == len(read_csv(toy_data / "test.csv"))


def test_ctrl_c_in_caption_names_the_command_that_continues_it(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    from mmfuse.captioning import pipeline
    from mmfuse.captioning.captioners import Captioner

    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    calls = []

    class Fake(Captioner):
        def __call__(self, images):
            calls.append(len(images))
            if len(calls) == 2:
                raise KeyboardInterrupt
            return [f"grey {int(np.asarray(im).mean())}" for im in images]

    monkeypatch.setattr(pipeline, "build_captioner", lambda *a, **k: Fake())
    out = tmp_path / "captions.csv"
    args = ["caption", str(tmp_path / "imgs"), "--out", str(out), "--model", "imagenet-tags", "--batch-size", "2"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"interrupted; 2 image(s) are captioned in {out}" in err
    command = err.split("Continue with: ")[1].splitlines()[0]
    assert argv_of(command) == [*args, "--resume"]
    assert main(args) == 2  # not continued unasked
    assert main(argv_of(command)) == 0
    assert sorted(r["image"] for r in read_csv(out)) == [f"{i}.png" for i in range(5)]
    assert sum(calls[2:]) == 3  # the two captioned before were not captioned again


# --- item 9: train.log, epoch ticks --------------------------------------------------------------------------------


def test_train_keeps_its_console_log_in_the_run(toy_manifest, tmp_path):
    before = list(logging.getLogger("mmfuse").handlers)
    for name, extra in (("single", []), ("bagged", ["--bag", "2"])):
        run = tmp_path / name
        assert main(["train", str(toy_manifest / "train.csv"), "--out", str(run), *FAST, *extra]) == 0
        log = (run / "train.log").read_text(encoding="utf-8")
        assert "\r" not in log
        assert "epoch 1:" in log and "epoch 2:" in log and "training rows" in log
        val = json.loads((run / "metrics.json").read_text())["val"]
        assert f"validation accuracy {val['accuracy']:.4f}, weighted F1 {val['weighted_f1']:.4f}" in log
        assert all(line[:4].isdigit() for line in log.splitlines())  # one record a line, each with its time
        assert logging.getLogger("mmfuse").handlers == before  # the handler was for the run only
    assert "bag member 2" in (tmp_path / "bagged" / "train.log").read_text()


def test_the_training_curves_have_whole_epoch_ticks(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(metrics, "_save", lambda fig, path: figures.append(fig))
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "val_weighted_f1": 0.5, "val_accuracy": 0.5}
        for e in (1, 2, 3)
    ]
    metrics.plot_history(history, tmp_path / "curves.png")
    for ax in figures[0].axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


# --- item 10: repeated problems said once --------------------------------------------------------------------------


def test_rows_of_unknown_labels_are_one_line_with_the_counts():
    problems = [
        (i + 1, f"img{i}.png", f"unknown label '{'x' if i < 150 else 'y'}'; the model knows: a, b, c")
        for i in range(303)
    ]
    message = str(DataError(problems, "test.csv"))
    lines = message.splitlines()
    assert lines[0] == "303 bad row(s) in test.csv:"
    assert lines[1] == "  303 rows: unknown label 'y' (153), 'x' (150); the model knows: a, b, c"
    assert len(lines) == 3 and "more" not in message
    same = str(DataError([(i + 1, "a.png", "unknown label 'x'; the model knows: a") for i in range(40)], "t.csv"))
    assert same.splitlines()[1:3] == [
        "  40 rows: unknown label 'x' (40); the model knows: a",
        "Fix these rows, or pass --skip-bad to skip them (each skipped row is listed in a skipped.csv).",
    ]
    # Below GROUP_AT, each row keeps its own line.
    few = str(DataError(problems[: GROUP_AT - 1], "t.csv")).splitlines()
    assert few[1] == "  row 1: img0.png: unknown label 'x'; the model knows: a, b, c" and len(few) == GROUP_AT + 1


def test_a_reason_many_rows_share_is_said_once_with_the_rows_under_it():
    problems = [(i + 2, f"nope{i}.png", "image file not found") for i in range(30)]
    problems += [(40, "odd.png", "no text"), (40, "odd.png", "image file not found")]
    lines = str(DataError(problems, "m.csv", limit=5)).splitlines()
    assert lines[:3] == ["31 bad row(s) in m.csv:", "  31 rows: image file not found:", "    row 2: nope0.png"]
    assert "    ... and 26 more row(s)" in lines
    assert "  row 40: odd.png: no text" in lines  # its other reason, on its own line
    assert sum("image file not found" in line for line in lines) == 1


def test_evaluate_where_every_label_is_unknown(head_run, toy_data, tmp_path, capsys):
    rows = read_csv(toy_data / "test.csv")
    images = Path(toy_data / "images")
    write_csv(
        tmp_path / "other.csv",
        [
            {**r, "image": str(images / Path(r["image"]).name), "label": "cat" if i % 3 else "dog"}
            for i, r in enumerate(rows)
        ],
    )
    assert main(["evaluate", str(head_run), str(tmp_path / "other.csv"), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    dogs = len(range(0, len(rows), 3))
    assert f"{len(rows)} rows: unknown label 'cat' ({len(rows) - dogs}), 'dog' ({dogs}); the model knows: " in err
    assert "row 1:" not in err and "more row(s)" not in err
    assert not (tmp_path / "ev").exists()
