"""bench/caption.py --small runs on CPU, checks its decoder against generate, and prints its table."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a benchmark, run as a test in a subprocess

BENCH = Path(__file__).resolve().parents[1] / "bench" / "caption.py"


def test_bench_caption_small_prints_the_table():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(BENCH), "--small", "--iters", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "100% of 8 images token-identical to generate" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].split("|")[1].strip() == "variant"
    rows = {(cells[1].strip(), cells[2].strip()): cells for cells in (line.split("|") for line in table[1:])}
    assert {("HF generate", "16"), ("HF generate", "128"), ("mmfuse greedy, eager", "128")} <= set(rows)
    for cells in rows.values():
        assert float(cells[3].replace(",", "")) > 0 and cells[4].strip().endswith("x")
