"""Two CPU processes under accelerate launch (gloo): data sharded, every validation row scored exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import LAUNCH_2, read_csv, write_csv, write_toy

pytestmark = pytest.mark.slow  # each test launches two processes under accelerate


@pytest.mark.parametrize("tune", ["head", "text"])
def test_two_process_training_gathers_each_row_once(tmp_path, tune):
    """The head on cached features, and MiniLM fine-tuned beside cached image features (DDP over the tuned tower)."""
    # 35 validation rows do not split evenly over 2 processes: the last batch is padded, and gather_for_metrics
    # must drop the padding. (Three classes of 21 rows give 9 validation rows each at 0.45, one of 18 gives 8.)
    data = write_toy(tmp_path / "toy", per_class=21, seed=1)
    rows = read_csv(data / "all.csv")
    drop = [i for i, r in enumerate(rows) if r["label"] == "red-apple"][:3]
    write_csv(data / "all.csv", [r for i, r in enumerate(rows) if i not in drop])
    run = tmp_path / "run"
    proc = launch(data / "all.csv", run, "--tune", tune, "--epochs", "15", "--val-split", "0.45")
    err = proc.communicate(timeout=600)[1]  # read while it runs: a full pipe would stall the launch
    assert proc.returncode == 0, err[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["n_val"] == 35 and metrics["n_train"] == 46
    support = sum(c["support"] for c in metrics["val"]["per_class"].values())
    assert support == metrics["val"]["n"] == 35
    assert metrics["val"]["accuracy"] > 0.6  # 4 classes, chance 0.25
    # Accelerate steps the scheduler once per process per optimizer step: the schedule must still span all epochs.
    lrs = [float(r["lr"]) for r in read_csv(run / "history.csv")]
    assert lrs[len(lrs) // 2] > 0.15 * max(lrs) and lrs[-1] < 1e-3 * max(lrs)


def launch(data, out, *args: str) -> subprocess.Popen:
    """``mmfuse train DATA --out OUT ARGS`` under a 2-process gloo launch (--multi_gpu picks accelerate's torchrun
    launcher; without CUDA the processes join over gloo on the CPU), in a process group of its own."""
    cmd = [
        sys.executable,
        *LAUNCH_2,
        "train",
        str(data),
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


RESUMABLE = ["--tune", "text", "--image-size", "32", "--epochs", "3", "--batch-size", "4", "--checkpoint-every", "1"]


def test_two_processes_killed_in_epoch_2_resume_to_the_same_weights(tmp_path):
    """Each process's random states are in the checkpoint: a resumed 2-process run ends where an unbroken one does."""
    import signal
    import time

    import torch
    from safetensors.torch import load_file

    data = write_toy(tmp_path / "toy", per_class=16, seed=4) / "all.csv"
    whole = launch(data, tmp_path / "whole", *RESUMABLE)
    err = whole.communicate(timeout=600)[1]
    assert whole.returncode == 0, err[-3000:]
    run = tmp_path / "run"
    proc = launch(data, run, *RESUMABLE)
    end = time.monotonic() + 600
    while not (run / "checkpoints" / "e0002-s0000002").is_dir():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < end
        time.sleep(0.05)
    # The launcher and both workers, as a lost node would (the launcher starts its workers in sessions of their own,
    # so they are found by their command line).
    os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", "--", f"--out {run}( |$)"], check=False)
    proc.wait(60)
    time.sleep(1)
    resumed = launch(data, run, *RESUMABLE, "--resume")
    err = resumed.communicate(timeout=600)[1]
    assert resumed.returncode == 0, err[-3000:]
    a, b = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert [r["epoch"] for r in read_csv(run / "history.csv")] == ["1", "2", "3"]
