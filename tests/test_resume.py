"""Runs that survive: SIGKILL or SIGTERM in the middle of epoch 2, then --resume, gives the weights of a run that was
never stopped; a changed config or data is refused; a half-written checkpoint is never read."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_csv, write_csv
from safetensors.torch import load_file

from mmfuse.cli import main
from mmfuse.training.checkpoint import checkpoints

# MiniLM fine-tuned: steps slow enough (a few tenths of a second) to stop in the middle of an epoch.
ARGS = ["--tune", "text", "--image-size", "32", "--epochs", "3", "--batch-size", "8", "--checkpoint-every", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def train(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    """``mmfuse train`` in a subprocess, sharing the feature cache of the test's home (MMFUSE_HOME)."""
    cmd = [sys.executable, "-m", "mmfuse", "train", str(data), "--out", str(out), *ARGS, *extra]
    env = {**ENV, "MMFUSE_HOME": os.environ["MMFUSE_HOME"]}
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def stop_in_epoch_2(proc: subprocess.Popen, out: Path, sig: int) -> None:
    """Sends ``sig`` once the second step of epoch 2 has been checkpointed (the run is in the middle of it)."""
    end = time.monotonic() + 240
    while not (out / "checkpoints" / "e0002-s0000002").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < end, "no checkpoint in epoch 2"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(120)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that was never stopped, and its data."""
    from conftest import write_toy

    root = tmp_path_factory.mktemp("resume")
    data = write_toy(root / "toy", per_class=10, seed=3) / "train.csv"
    home = root / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(home))  # the runs share one feature cache
        proc = train(data, root / "whole")
        assert proc.wait(300) == 0, proc.stderr.read()[-3000:]
    assert not (root / "whole" / "checkpoints").exists()  # a finished run deletes its checkpoints
    return data, root / "whole", home


def same_weights(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-6)


@pytest.mark.slow  # MiniLM fine-tuned in subprocesses, killed and resumed
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stopped_in_epoch_2_then_resumed_gives_the_same_weights(uninterrupted, tmp_path, monkeypatch, sig):
    data, whole, home = uninterrupted
    monkeypatch.setenv("MMFUSE_HOME", str(home))
    out = tmp_path / "run"
    proc = train(data, out)
    stop_in_epoch_2(proc, out, sig)
    if sig == signal.SIGTERM:  # checkpoints at the next step, then says how to go on
        assert proc.returncode == 143
        assert "--resume" in proc.stderr.read()
    assert not (out / "metrics.json").exists() and checkpoints(out)
    rerun = train(data, out)
    assert rerun.wait(120) == 2 and "interrupted run" in rerun.stderr.read()  # says --resume, not --overwrite
    resumed = train(data, out, "--resume")
    assert resumed.wait(300) == 0, resumed.stderr.read()[-3000:]
    same_weights(whole, out)
    assert [r["epoch"] for r in read_csv(out / "history.csv")] == ["1", "2", "3"]
    assert [r["train_loss"] for r in read_csv(out / "history.csv")] == [
        r["train_loss"] for r in read_csv(whole / "history.csv")
    ]


@pytest.mark.slow  # MiniLM fine-tuned in subprocesses, killed
def test_resume_refuses_other_settings_or_data_and_needs_a_checkpoint(uninterrupted, tmp_path, monkeypatch, capsys):
    data, _, home = uninterrupted
    monkeypatch.setenv("MMFUSE_HOME", str(home))
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(tmp_path / "none"), *ARGS, "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    proc = train(data, out)
    stop_in_epoch_2(proc, out, signal.SIGKILL)
    assert main(["train", str(data), "--out", str(out), *ARGS, "--resume", "--lr", "1e-4"]) == 2
    assert "settings differ" in capsys.readouterr().err
    rows = read_csv(data)
    rows[0]["text"] = "a changed text"
    changed = data.with_name("changed.csv")
    write_csv(changed, rows)
    assert main(["train", str(changed), "--out", str(out), *ARGS, "--resume"]) == 2
    assert "data differs" in capsys.readouterr().err


@pytest.mark.slow  # MiniLM fine-tuned in subprocesses, killed
def test_a_half_written_checkpoint_is_never_read(uninterrupted, tmp_path, monkeypatch):
    data, whole, home = uninterrupted
    monkeypatch.setenv("MMFUSE_HOME", str(home))
    out = tmp_path / "run"
    proc = train(data, out)
    stop_in_epoch_2(proc, out, signal.SIGKILL)
    latest = checkpoints(out)[-1]
    # A kill while a later checkpoint was being written: its temporary folder, without meta.json, and garbage.
    torn = out / "checkpoints" / ".tmp-e0003-s0000001"
    torn.mkdir(exist_ok=True)
    (torn / "model.safetensors").write_bytes(b"garbage")
    assert checkpoints(out)[-1] == latest
    assert main(["train", str(data), "--out", str(out), *ARGS, "--resume"]) == 0
    same_weights(whole, out)


@pytest.mark.slow  # MiniLM fine-tuned in subprocesses, killed
def test_a_second_training_into_the_same_out_is_refused(uninterrupted, tmp_path, monkeypatch, capsys):
    data, _, home = uninterrupted
    monkeypatch.setenv("MMFUSE_HOME", str(home))
    out = tmp_path / "run"
    proc = train(data, out, "--epochs", "50")  # long enough to be still training when the second starts
    end = time.monotonic() + 240
    while not checkpoints(out):  # the first is training
        assert proc.poll() is None and time.monotonic() < end
        time.sleep(0.05)
    try:
        assert main(["train", str(data), "--out", str(out), *ARGS, "--overwrite"]) == 2
        assert "another mmfuse train is writing" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)


def test_a_kill_while_the_run_is_written_leaves_the_earlier_run_whole(tmp_path, toy_manifest, monkeypatch):
    """The files are written to a staging folder first: stopped there, the earlier finished run is untouched."""
    import mmfuse.rundir.weights

    data = str(toy_manifest / "train.csv")
    fast = ["--tune", "head", "--image-size", "32", "--epochs", "1"]
    run = tmp_path / "r"
    assert main(["train", data, "--out", str(run), *fast]) == 0
    # metrics.jsonl and train.log are logs of the run in progress, written as it goes; the rest is the finished run's.
    logs = ("metrics.jsonl", "train.log")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name not in logs}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill in the middle of writing model.safetensors

    monkeypatch.setattr(mmfuse.rundir.weights, "save_model", killed)
    assert main(["train", data, "--out", str(run), *fast, "--overwrite", "--seed", "1"]) == 130
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name not in logs} == before
    monkeypatch.undo()
    assert main(["predict", str(run), data, "--out", str(tmp_path / "p.csv")]) == 0
