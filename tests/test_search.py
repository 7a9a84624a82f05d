"""mmfuse search: trials, the leaderboard and best.yaml, continuing after a kill, and bad spaces."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmfuse.cli import main

pytest.importorskip("optuna")

SRC = str(Path(__file__).resolve().parents[1] / "src")
# Three epochs keep each trial under a second; the toy data's features come from the warm home (toy_manifest).
FAST = ["--tune", "head", "--image-size", "32", "--epochs", "3"]


def search_args(toy, out, trials=6, *extra):
    data = [str(toy / "train.csv"), "--val", str(toy / "val.csv")]
    return ["search", *data, "--out", str(out), "--trials", str(trials), *FAST, *extra]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def study_trials(out):
    import optuna

    return optuna.load_study(study_name="mmfuse", storage=f"sqlite:///{out / 'study.sqlite'}").trials


def test_search_writes_a_leaderboard_and_a_best_config_that_trains_the_same(
    toy_manifest, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "search"
    assert main(search_args(toy_manifest, out)) == 0
    rows = read_rows(out / "leaderboard.csv")
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"complete", "pruned"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"{i:03d}" for i in range(6)]
    # Trial 0 is the default config: the head's defaults, the epochs the flag fixed.
    default = next(r for r in rows if r["default"] == "True")
    assert default["trial"] == "0" and float(default["lr"]) == 2e-3 and default["fusion"] == "concat"
    assert "epochs" not in rows[0]  # fixed by --epochs, so not searched
    f1s = [float(r["val_weighted_f1"]) for r in rows if r["state"] == "complete"]
    assert f1s == sorted(f1s, reverse=True) and rows[0]["state"] == "complete"
    assert "top 5 of 6 trials" in capsys.readouterr().out
    best = out / "trials" / f"{int(rows[0]['trial']):03d}"

    # best.yaml trains directly (its data paths are absolute) and reproduces the trial: every epoch's validation.
    run = tmp_path / "again"
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(run)]) == 0

    def epochs(run_dir):
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_rows(run_dir / "history.csv")]

    assert epochs(run) == epochs(best)
    again = json.loads((run / "metrics.json").read_text())["val"]
    assert again["weighted_f1"] == float(rows[0]["val_weighted_f1"])


@pytest.mark.slow  # a search in a subprocess, killed and continued
def test_a_killed_search_continues_without_redoing_finished_trials(toy_manifest, tmp_path):
    out = tmp_path / "search"
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmfuse", *search_args(toy_manifest, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (out / "trials" / "002").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the search never reached trial 2"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {
        p.name: (p / "metrics.json").stat().st_mtime_ns
        for p in (out / "trials").iterdir()
        if (p / "metrics.json").exists()
    }
    assert {"000", "001"} <= set(finished)

    assert main(search_args(toy_manifest, out)) == 2  # the study is continued only when asked
    assert main(search_args(toy_manifest, out, 6, "--resume")) == 0
    trials = study_trials(out)
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6
    assert states.count("FAIL") <= 1 and "RUNNING" not in states and "WAITING" not in states
    for dead in (t for t in trials if t.state.name == "FAIL"):  # the trial killed mid-run ran again, first
        assert trials[dead.number + 1].params == dead.params and trials[dead.number + 1].state.name != "FAIL"
    # The trials that had finished were kept as they were; the one killed ran again under a new number.
    for name, mtime in finished.items():
        assert (out / "trials" / name / "metrics.json").stat().st_mtime_ns == mtime
    dirs = sorted(p.name for p in (out / "trials").iterdir())
    assert len(dirs) == 6 and len(read_rows(out / "leaderboard.csv")) == 6
    assert (out / "best.yaml").exists()


@pytest.mark.parametrize(
    "space, message",
    [
        ("learning_rate: {low: 0.001, high: 0.01}", "'learning_rate' is not a setting a search can vary"),
        ("lr: {low: 0.01, high: 0.001}", "low (0.01) must be below high (0.001)"),
        ("dropout: {low: 0.0, high: 1.5}", "dropout = 1.5 is not a valid setting"),
        ("fusion: {low: 1, high: 2}", "give it a list of choices"),
        ("fusion: [concat, mlp]", "--fusion must be one of"),
        ("epochs: [3, 5]", "--epochs fixes epochs"),
        ("- lr", "must map config keys to a range or choices"),
    ],
)
def test_a_bad_space_file_is_named(toy_manifest, tmp_path, capsys, space, message):
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    assert main(search_args(toy_manifest, tmp_path / "search", 6, "--space", str(path))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    if "learning_rate" in space:
        assert "lr, " in err and "weight_decay" in err  # the valid keys, named
    assert not (tmp_path / "search" / "study.sqlite").exists()


def test_a_space_file_replaces_the_default(toy_manifest, tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: {low: 1e-3, high: 1e-2, log: true}\nhidden: [32, 64]\n")  # YAML reads 1e-3 as text
    out = tmp_path / "search"
    assert main(search_args(toy_manifest, out, 2, "--space", str(path))) == 0
    rows = read_rows(out / "leaderboard.csv")
    assert [k for k in rows[0] if k in ("lr", "hidden", "dropout")] == ["lr", "hidden"]
    # The default (hidden 256) is outside this space: trial 0 keeps the default lr and samples hidden.
    assert rows[0]["hidden"] in ("32", "64") and rows[1]["hidden"] in ("32", "64")


def test_search_without_optuna_names_the_extra(toy_manifest, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # makes `import optuna` fail
    assert main(search_args(toy_manifest, tmp_path / "search")) == 2
    assert "pip install 'mmfuse[search]'" in capsys.readouterr().err


def test_import_and_help_do_not_import_optuna():
    code = (
        "import sys, contextlib, io, mmfuse, mmfuse.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    mmfuse.cli.main(['--help'])\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    mmfuse.cli.main(['search', '--help'])\n"
        "print('optuna' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "False"


def test_search_refuses_a_bag_and_says_how_to_bag_the_best(toy_manifest, tmp_path, capsys):
    assert main(search_args(toy_manifest, tmp_path / "search", 6, "--bag", "3")) == 2
    assert "mmfuse train --config OUT/best.yaml --bag K" in capsys.readouterr().err


def test_tracked_trials_are_runs_side_by_side_under_one_folder(toy_manifest, tmp_path):
    out = tmp_path / "search"
    assert main(search_args(toy_manifest, out, 2, "--track", "tensorboard")) == 0
    runs = sorted(p.name for p in (out / "tracking").iterdir())
    assert runs == ["trial-000", "trial-001"]
    assert all(list((out / "tracking" / r).glob("events.out.tfevents.*")) for r in runs)
