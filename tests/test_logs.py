"""Redirected logs hold no carriage returns (issues 23 and 25): a progress bar's \\r belongs on a terminal, while a
log file, a CI job or a cluster's output file gets whole lines. Each command runs in a subprocess with stdout and
stderr redirected to files, as a batch job's would be."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["--tune", "head", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]


@pytest.mark.slow
def test_redirected_logs_hold_no_carriage_returns(toy_manifest, tmp_path):
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    commands = {
        "train": ["train", *data, "--out", str(tmp_path / "run"), *FAST],
        "caption": ["caption", str(toy_manifest / "images"), "--out", str(tmp_path / "caps.csv")]
        + ["--model", "imagenet-tags", "--batch-size", "16"],
        "search": ["search", *data, "--out", str(tmp_path / "search"), "--trials", "2", *FAST],
        "cache info": ["cache", "info"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    with_cr = {}
    for name, argv in commands.items():
        logs = {stream: tmp_path / f"{name.replace(' ', '-')}.{stream}" for stream in ("out", "err")}
        with open(logs["out"], "wb") as out, open(logs["err"], "wb") as err:
            code = subprocess.run(
                [sys.executable, "-m", "mmfuse", *argv], stdout=out, stderr=err, env=env, timeout=600
            ).returncode
        text = {stream: path.read_bytes().decode("utf-8", "replace") for stream, path in logs.items()}
        assert code == 0, f"mmfuse {name} failed:\n{text['err'][-2000:]}"
        for stream, log in text.items():
            if "\r" in log:
                i = log.index("\r")
                with_cr[f"{name} (std{stream})"] = log[max(0, i - 120) : i + 40]
    assert not with_cr, "carriage returns in redirected logs:\n" + "\n".join(f"{k}: {v!r}" for k, v in with_cr.items())
