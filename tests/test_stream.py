"""Streaming predict (chunks written as they finish, --resume after a kill) and predict/evaluate sharded over two
gloo processes under accelerate launch: every row exactly once, in input order, the single-process output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import LAUNCH_2, read_csv, write_csv, write_toy

from mmfuse.cli import main
from mmfuse.inference.predictor import Predictor
from mmfuse.inference.stream import shard_bounds

ROWS = 45  # odd: does not split evenly over 2 processes, nor into chunks of 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_vit_dir, tiny_roberta_dir):
    """One tiny run (random tiny towers, head trained) and a labelled manifest of ROWS rows, shared by this file."""
    root = tmp_path_factory.mktemp("stream")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(root / "home"))
        toy = write_toy(root / "toy", per_class=8, seed=2)
        towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir), "--max-length", "16"]
        args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(root / "run")]
        assert main([*args, *towers, "--tune", "head", "--epochs", "2", "--batch-size", "8"]) == 0
    rows = read_csv(toy / "all.csv")
    write_csv(toy / "big.csv", [rows[i % len(rows)] for i in range(ROWS)])
    return toy / "big.csv", root / "run"


def predict(run, data, out, *args: str) -> int:
    return main(["predict", str(run), str(data), "--out", str(out), *args])


def assert_same_predictions(got, want) -> None:
    """Row for row the same rows, images, labels and columns; probabilities to the last printed digit or one off
    it: a row's floats can differ in the last bit with the size of the batch it went through (BLAS kernels)."""
    got, want = read_csv(got), read_csv(want)
    assert [r["row"] for r in got] == [r["row"] for r in want]
    for a, b in zip(got, want):
        assert list(a) == list(b)
        assert {k: v for k, v in a.items() if k[:2] != "p_" and k != "confidence"} == {
            k: v for k, v in b.items() if k[:2] != "p_" and k != "confidence"
        }
        assert all(abs(float(a[k]) - float(b[k])) <= 2e-6 for k in a if k[:2] == "p_" or k == "confidence")


def test_chunks_are_written_as_they_finish_and_match_one_chunk(trained, tmp_path, monkeypatch):
    data, run = trained
    whole = tmp_path / "whole.csv"
    assert predict(run, data, whole, "--chunk-size", "1000") == 0
    out = tmp_path / "chunked.csv"
    seen = []
    real = Predictor.predict_records

    def spy(self, records, *args, **kwargs):
        # What is on disk when each chunk starts: the header and every earlier chunk, synced, with its progress.
        lines = (tmp_path / "chunked.csv.part").read_bytes().count(b"\n")
        progress = json.loads((tmp_path / "chunked.csv.progress.json").read_text())
        seen.append((len(records), lines, progress["rows_done"], progress["bytes"]))
        return real(self, records, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_records", spy)
    assert predict(run, data, out, "--chunk-size", "4") == 0
    assert [s[0] for s in seen] == [4] * 11 + [1]
    assert [s[1] for s in seen] == [1 + 4 * k for k in range(12)]
    assert [s[2] for s in seen] == [4 * k for k in range(12)]
    assert_same_predictions(out, whole)
    assert [int(r["row"]) for r in read_csv(out)] == list(range(ROWS))
    assert not list(tmp_path.glob("chunked.csv.*"))  # neither .part nor progress left behind


def test_interrupted_predict_must_be_resumed_and_only_by_the_same_prediction(trained, tmp_path, monkeypatch, capsys):
    data, run = trained
    whole = tmp_path / "whole.csv"
    assert predict(run, data, whole) == 0
    out = tmp_path / "preds.csv"
    real = Predictor.predict_records
    calls = []

    def dies_in_chunk_3(self, records, *args, **kwargs):
        calls.append(len(records))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, records, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(Predictor, "predict_records", dies_in_chunk_3)
        assert predict(run, data, out, "--chunk-size", "5") == 130
    assert not out.exists()
    assert json.loads((tmp_path / "preds.csv.progress.json").read_text())["rows_done"] == 10
    # Without --resume: the work is neither lost nor silently redone.
    capsys.readouterr()
    assert predict(run, data, out, "--chunk-size", "5") == 2
    err = capsys.readouterr().err
    assert "interrupted prediction left 10 row(s)" in err and "--resume" in err
    # Another input is not continued.
    rows = read_csv(data)
    write_csv(data.parent / "other.csv", rows[1:])
    assert predict(run, data.parent / "other.csv", out, "--resume") == 2
    assert "not this prediction's" in capsys.readouterr().err
    # Nor the same input under another dtype (its probabilities would differ mid-file).
    assert predict(run, data, out, "--resume", "--dtype", "bf16") == 2
    assert "not this prediction's" in capsys.readouterr().err
    # The same one is, with any chunk size; rows 0-9 are not predicted again.
    calls.clear()
    monkeypatch.setattr(Predictor, "predict_records", lambda self, r, *a, **k: calls.append(len(r)) or real(self, r))
    assert predict(run, data, out, "--resume", "--chunk-size", "7") == 0
    assert sum(calls) == ROWS - 10
    assert_same_predictions(out, whole)
    assert not list(tmp_path.glob("preds.csv.*"))


@pytest.mark.slow  # two subprocesses
def test_resume_after_sigkill_writes_every_row_once_in_order(trained, tmp_path):
    data, run = trained
    rows = read_csv(data)
    write_csv(tmp_path / "many.csv", [rows[i % len(rows)] for i in range(200)])
    (tmp_path / "images").symlink_to(data.parent / "images")
    whole = tmp_path / "whole.csv"
    assert predict(run, tmp_path / "many.csv", whole, "--chunk-size", "1000") == 0
    out = tmp_path / "preds.csv"
    cmd = [sys.executable, "-m", "mmfuse", "predict", str(run), str(tmp_path / "many.csv"), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, "--chunk-size", "1"], env=env, stderr=subprocess.PIPE, text=True)
    progress = tmp_path / "preds.csv.progress.json"
    end = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text())["rows_done"] >= 20):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < end
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    proc.stderr.close()
    done = json.loads(progress.read_text())["rows_done"]
    assert 20 <= done < 200 and not out.exists(), "the kill came too late to test resuming"
    resumed = subprocess.run([*cmd, "--chunk-size", "50", "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_predictions(out, whole)
    assert [int(r["row"]) for r in read_csv(out)] == list(range(200))


def test_shards_are_contiguous_whole_chunks_covering_every_row_once():
    for n in (0, 1, 2, 45, 46, 1000):
        for world in (1, 2, 3, 8):
            for chunk in (1, 4, 64):
                bounds = shard_bounds(n, world, chunk)
                assert [i for a, b in bounds for i in range(a, b)] == list(range(n))
                assert all(a % chunk == 0 or a == n for a, _ in bounds)
                sizes = [-(-(b - a) // chunk) for a, b in bounds]  # chunks per shard
                assert max(sizes) - min(sizes) <= 1
    assert shard_bounds(45, 2, 4) == [(0, 24), (24, 45)]


def launch(*args: str) -> subprocess.CompletedProcess:
    """``mmfuse ARGS`` under a 2-process gloo launch, as tests/test_distributed.py launches train."""
    cmd = [sys.executable, *LAUNCH_2, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # two launches of two processes: about two minutes on a shared 2-core machine
def test_two_processes_predict_and_evaluate_as_one(trained, tmp_path):
    data, run = trained
    one, two = tmp_path / "one", tmp_path / "two"
    assert predict(run, data, one / "preds.csv", "--chunk-size", "4") == 0
    assert main(["evaluate", str(run), str(data), "--out", str(one / "eval"), "--chunk-size", "4"]) == 0
    proc = launch("predict", str(run), str(data), "--out", str(two / "preds.csv"), "--chunk-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "45 rows split over 2 processes: 24, 21" in proc.stderr
    assert proc.stdout.count("wrote") == 1  # the main process reports, once
    # Whole chunks per process: each row goes through the batch it goes through in one process, to the last bit.
    assert (two / "preds.csv").read_bytes() == (one / "preds.csv").read_bytes()
    assert [int(r["row"]) for r in read_csv(two / "preds.csv")] == list(range(ROWS))
    assert sorted(p.name for p in two.iterdir()) == ["preds.csv"]  # no shard's part or progress left
    proc = launch("evaluate", str(run), str(data), "--out", str(two / "eval"), "--chunk-size", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "45 rows split over 2 processes: 24, 21" in proc.stderr
    metrics = json.loads((two / "eval" / "metrics.json").read_text())
    assert metrics["n"] == ROWS
    assert metrics == json.loads((one / "eval" / "metrics.json").read_text())
    assert (two / "eval" / "errors.csv").read_bytes() == (one / "eval" / "errors.csv").read_bytes()
