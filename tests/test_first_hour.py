"""What a new user meets in the first hour: budgets the ablation gives, files others can read, a portable config,
progress in a log file, a quiet API."""

import os
import re
import stat
import subprocess
import sys

import yaml

from mmfuse.cli import main
from mmfuse.config import RunConfig, resolve
from mmfuse.recipes.ablate import variant_configs

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]


def test_the_ablation_gives_every_variant_the_same_tune_mode_and_budget():
    """train's default --tune text has no text tower to tune in the image-only run: the ablation trains every variant
    as a head on frozen features (it used to fine-tune two of them beside a frozen image head, issue 24), and a budget
    the user set holds for every variant."""
    runs = {name: resolve(c) for name, c in variant_configs(RunConfig()).items()}
    for run in runs.values():
        assert (run.train.tune, run.train.epochs, run.train.lr) == ("head", 15, 2e-3)
    asked = RunConfig().updated({"train": {"epochs": 3}})
    assert {name: resolve(c).train.epochs for name, c in variant_configs(asked).items()} == {
        "image": 3,
        "text": 3,
        "fusion": 3,
    }


def test_run_files_follow_the_umask(toy_manifest, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["train", str(toy_manifest / "train.csv"), "--out", str(tmp_path / "r"), *FAST]) == 0
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "r" / "model.safetensors").stat().st_mode)
    assert mode == 0o644, oct(mode)


def test_config_yaml_is_resolved_and_reproduces_the_run_from_another_folder(toy_manifest, tmp_path, monkeypatch):
    monkeypatch.chdir(toy_manifest)
    assert main(["train", "train.csv", "--val", "val.csv", "--out", str(tmp_path / "a"), *FAST]) == 0
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["data"]["train"] == str(toy_manifest / "train.csv")  # absolute
    assert saved["model"]["text_pooling"] == "attention" and saved["model"]["text_layer_mean"] == 2
    assert saved["model"]["image_size"] == 32 and saved["train"]["head_lr"] == 2e-3
    assert "epochs" in saved["asked"]["train"] and "lr" not in saved["asked"]["train"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = str(tmp_path / "a" / "config.yaml")
    assert main(["train", str(toy_manifest / "train.csv"), "--config", config, "--out", "b"]) == 0
    first = yaml.safe_load((tmp_path / "a" / "metrics.json").read_text())
    again = yaml.safe_load((elsewhere / "b" / "metrics.json").read_text())
    assert again["val"]["weighted_f1"] == first["val"]["weighted_f1"]
    # --tune changed on top of a run's config re-derives what the run did not set (its learning rate), keeps the rest
    args = ["train", str(toy_manifest / "train.csv"), "--config", str(tmp_path / "a" / "config.yaml"), "--tune", "text"]
    from mmfuse.cli import build_parser, run_config

    cfg = resolve(run_config(build_parser().parse_args([*args, "--out", "c"])))
    assert (cfg.train.epochs, cfg.train.lr, cfg.train.batch_size) == (2, 5e-5, 8)


def test_a_log_file_gets_a_banner_and_plain_progress_lines(toy_manifest, tmp_path):
    """Not a terminal: no bar's carriage returns, but a start banner and a progress line (here every step)."""
    code = (
        "import mmfuse.progress as p, sys; p.PLAIN_EVERY = 0.0; from mmfuse.cli import main; "
        f"sys.exit(main(['train', {str(toy_manifest / 'train.csv')!r}, '--out', {str(tmp_path / 'r')!r}, "
        "'--tune', 'head', '--image-size', '32', '--epochs', '1', '--batch-size', '8']))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    assert re.search(r"r: \d+ training rows, 6 validation rows, 4 classes", out.stderr)
    assert "--tune head, 1 epochs" in out.stderr
    assert "r epoch 1/1: step 1/" in out.stderr and "rows/s" in out.stderr


def test_the_python_api_loads_towers_quietly(capfd):
    from transformers.utils import logging as hf_logging

    from mmfuse.models.towers import build_text

    hf_logging.enable_progress_bar()
    build_text("minilm")
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is given back


def test_every_run_writes_metrics_jsonl_and_track_tensorboard_writes_readable_events(toy_manifest, tmp_path):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    assert main(["train", str(toy_manifest / "train.csv"), "--out", str(run), *FAST, "--track", "tensorboard"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and all("val_weighted_f1" in x for x in lines)
    events = list((run / "tracking").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_weighted_f1")] == [1, 2]
    final = json.loads((run / "metrics.json").read_text())["val"]["weighted_f1"]
    assert abs(acc.Scalars("final/val_weighted_f1")[0].value - final) < 1e-6


def test_an_unknown_tracker_is_named(toy_manifest, tmp_path, capsys):
    assert main(["train", str(toy_manifest / "train.csv"), "--out", str(tmp_path / "r"), *FAST, "--track", "tb"]) == 2
    assert "the trackers are tensorboard, mlflow" in capsys.readouterr().err
