"""bench/train_throughput.py --small and bench/seed_pipeline.py --small run on CPU and print their tables."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # benchmarks, each run as a test in a subprocess

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, tmp_path: Path, *args: str) -> list[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMFUSE_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, str(BENCH / script), "--small", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout.splitlines()


def table(lines: list[str]) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("| ")]
    return {cells[0]: cells for cells in rows[1:]}


def test_train_throughput_small_checks_and_prints_the_table(tmp_path):
    lines = run_bench("train_throughput.py", tmp_path, "--steps", "3", "--warmup", "1")
    checks = [line for line in lines if line.startswith("check ")]
    assert len(checks) == 3 and not any("FAILED" in c for c in checks), checks
    assert any(line.startswith("ratio files: uint8 cache") for line in lines)
    rows = table(lines)
    assert "naive: fp32, eager, Adam" in rows and rows["naive: fp32, eager, Adam"][3] == "1.00x"
    expected = {
        "tuned: fp32, SDPA, AdamW",
        "files: uint8 cache (sources)",
        "inference: predict path, fp32",
        "inference: bf16 autocast",
        "inference: bf16 weights",
    }
    assert expected <= set(rows), rows
    for cells in rows.values():
        assert float(cells[2].replace(",", "")) > 0, cells


def test_train_throughput_small_times_the_compiled_variants(tmp_path):
    """What the one GPU run times after the eager rows, traced on CPU (aot_eager: no C++ builds)."""
    args = ["--no-files", "--steps", "2", "--compile", "regional,model", "--infer-compile", "regional"]
    lines = run_bench("train_throughput.py", tmp_path, *args)
    checks = [line for line in lines if line.startswith("check ")]
    assert len(checks) == 4 and not any("FAILED" in c for c in checks), checks
    rows = table(lines)
    for name in (
        "tuned: fp32, SDPA, AdamW, regional compile",
        "tuned: fp32, SDPA, AdamW, whole-model compile",
        "inference: bf16 weights, regional compile",
    ):
        assert float(rows[name][2].replace(",", "")) > 0, rows


def test_seed_pipeline_small_runs_every_stage(tmp_path):
    lines = run_bench("seed_pipeline.py", tmp_path)
    rows = table(lines)
    for stage in ("caption", "train", "predict", "job: caption + train + predict"):
        assert float(rows[stage][2]) > 0, rows
    assert rows["caption"][1] == "60" and rows["predict"][1] == "20"


def test_checkpoint_small_times_an_epoch_and_a_checkpoint(tmp_path):
    rows = table(run_bench("checkpoint.py", tmp_path, "--rows", "48", "--repeats", "1"))
    (cells,) = rows.values()
    assert float(cells[2]) > 0 and float(cells[3]) > 0 and float(cells[4]) > 0
