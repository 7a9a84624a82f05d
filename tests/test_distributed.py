"""Two CPU processes under accelerate launch (gloo): data sharded, every validation row scored exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import read_csv, write_csv, write_toy


@pytest.mark.parametrize("tune", ["head", "text"])
def test_two_process_training_gathers_each_row_once(tmp_path, tune):
    """The head on cached features, and MiniLM fine-tuned beside cached image features (DDP over the tuned tower)."""
    # --multi_gpu picks accelerate's torchrun launcher; without CUDA the processes join over gloo on the CPU.
    # 35 validation rows do not split evenly over 2 processes: the last batch is padded, and gather_for_metrics
    # must drop the padding. (Three classes of 21 rows give 9 validation rows each at 0.45, one of 18 gives 8.)
    data = write_toy(tmp_path / "toy", per_class=21, seed=1)
    rows = read_csv(data / "all.csv")
    drop = [i for i, r in enumerate(rows) if r["label"] == "red-apple"][:3]
    write_csv(data / "all.csv", [r for i, r in enumerate(rows) if i not in drop])
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "mmfuse",
        "train",
        str(data / "all.csv"),
        "--out",
        str(run),
        "--tune",
        tune,
        "--epochs",
        "15",
        "--val-split",
        "0.45",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["n_val"] == 35 and metrics["n_train"] == 46
    support = sum(c["support"] for c in metrics["val"]["per_class"].values())
    assert support == metrics["val"]["n"] == 35
    assert metrics["val"]["accuracy"] > 0.6  # 4 classes, chance 0.25
    # Accelerate steps the scheduler once per process per optimizer step: the schedule must still span all epochs.
    lrs = [float(r["lr"]) for r in read_csv(run / "history.csv")]
    assert lrs[len(lrs) // 2] > 0.15 * max(lrs) and lrs[-1] < 1e-3 * max(lrs)
