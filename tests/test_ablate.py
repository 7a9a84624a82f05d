"""The modality ablation (issue 24 part 5, issue 25 items 5 and 9): every arm trained alike, the output saying how,
one line per arm as it finishes instead of every arm's epochs interleaved, and the test scores in each run's eval/."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmfuse.cli import main
from mmfuse.config import RunConfig, resolve
from mmfuse.errors import MmfuseError
from mmfuse.recipes.ablate import describe, training_of, variant_configs

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = ["--image-size", "32", "--epochs", "3", "--batch-size", "8"]
EPOCH_LINE = re.compile(r"epoch \d+(/\d+)?:")  # training's own line per epoch (and its progress lines)


def trainings(cfg: RunConfig) -> dict[str, dict]:
    return {name: training_of(c) for name, c in variant_configs(cfg).items()}


def test_every_arm_is_a_head_on_frozen_features_by_default():
    """train's default (--tune text) has no text tower to tune in the image arm: the ablation's default is --tune head
    for every arm, with one budget (it used to fine-tune MiniLM in two arms beside a frozen image head)."""
    runs = trainings(RunConfig())
    assert {name: (x["tune"], x["tuned_towers"]) for name, x in runs.items()} == {
        "image": ("head", []),
        "text": ("head", []),
        "fusion": ("head", []),
    }
    budgets = {tuple(x[k] for k in ("epochs", "batch_size", "lr", "head_lr", "keep", "seed")) for x in runs.values()}
    assert budgets == {(15, 64, 2e-3, 2e-3, "best", 0)}
    # the default is the ablation's, not asked: a --config of the fusion run re-derives it
    assert "tune" not in variant_configs(RunConfig())["fusion"].asked.get("train", [])


def test_tune_all_fine_tunes_the_towers_each_arm_has_on_one_budget():
    runs = trainings(RunConfig().updated({"train": {"tune": "all"}}))
    assert {name: x["tuned_towers"] for name, x in runs.items()} == {
        "image": ["image"],
        "text": ["text"],
        "fusion": ["image", "text"],
    }
    # --tune text alone would give the text arm 4 epochs at 5e-5 (head 2e-3); every arm gets the fusion arm's budget
    assert {(x["epochs"], x["batch_size"], x["lr"], x["head_lr"]) for x in runs.values()} == {(8, 16, 1e-4, 1e-4)}
    asked = RunConfig().updated({"train": {"tune": "all", "epochs": 2, "lr": 3e-5, "keep": "last", "seed": 7}})
    assert {(x["epochs"], x["lr"], x["keep"], x["seed"]) for x in trainings(asked).values()} == {(2, 3e-5, "last", 7)}
    assert resolve(variant_configs(asked)["text"]).train.augment == "none"  # no images in the text arm
    assert resolve(variant_configs(asked)["image"]).train.augment == "light"  # as in the fusion arm


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tune": "text"}, "would fine-tune the text tower in the text and fusion arms but leave the image arm a head"),
        ({"tune": "image"}, "leave the text arm a head on frozen features.*--tune head.*--tune all"),
        ({"lora": 4}, "--lora applies to fine-tuned towers.*pass --tune all with it"),
        ({"tune_layers": 2}, "--tune-layers applies to fine-tuned towers"),
        ({"tune": "head", "bag": 5}, "trains each arm as one run, not a bag of 5: pass --bag 1"),
    ],
)
def test_settings_that_would_train_the_arms_unalike_or_be_dropped_are_refused(changes, message):
    with pytest.raises(MmfuseError, match=message):
        variant_configs(RunConfig().updated({"train": changes}))


def test_a_refused_tune_mode_stops_the_cli_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", str(tmp_path / "d.csv"), "--out", str(out), "--tune", "text"]) == 2
    assert "--tune head (the ablation's default" in capsys.readouterr().err
    assert not out.exists()


def test_the_description_says_how_the_arms_were_trained():
    head = describe(trainings(RunConfig().updated({"train": {"keep": "last"}})))
    assert head == (
        "the image, text and fusion arms trained alike, each a head on frozen features (--tune head): 15 epochs of "
        "batch 64 at learning rate 0.002, the last epoch kept, seed 0"
    )
    tuned = describe(trainings(RunConfig().updated({"train": {"tune": "all", "seed": 3}})))
    assert "(--tune all: image its image, text its text, fusion its image and text): 8 epochs" in tuned
    assert tuned.endswith("8 epochs of batch 16 at learning rate 0.0001, the epoch best on validation kept, seed 3")
    unalike = trainings(RunConfig())
    unalike["text"] = {**unalike["text"], "epochs": 1}  # arms not trained alike are described one by one
    assert "text: a head on frozen features, 1 epoch of batch" in describe(unalike) and "alike" not in describe(unalike)
    unalike = trainings(RunConfig())
    unalike["fusion"] = {**unalike["fusion"], "tune": "text", "tuned_towers": ["text"]}  # the old, unfair ablation
    assert "image: a head on frozen features, 15 epochs" in describe(unalike)
    assert "fusion: fine-tunes its text tower, 15 epochs" in describe(unalike) and "alike" not in describe(unalike)


def run_redirected(argv: list[str], logs: Path) -> dict[str, str]:
    """``mmfuse ARGV`` in a subprocess with stdout and stderr redirected to files, as a batch job's are."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    paths = {stream: logs.with_suffix(f".{stream}") for stream in ("out", "err")}
    with open(paths["out"], "wb") as out, open(paths["err"], "wb") as err:
        code = subprocess.run([sys.executable, "-m", "mmfuse", *argv], stdout=out, stderr=err, env=env, timeout=600)
    text = {stream: path.read_bytes().decode("utf-8", "replace") for stream, path in paths.items()}
    assert code.returncode == 0, text["err"][-3000:]
    return text


def test_a_redirected_ablation_shows_a_line_per_arm_and_says_how_they_trained(toy_manifest, tmp_path):
    """Three arms trained at once used to interleave 3 x 16 lines (set-up and every epoch); now one line per arm as
    it finishes, the table and how the arms were trained. The test scores go to each run's eval/, as evaluate's do."""
    out = tmp_path / "abl"
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    argv = ["ablate", *data, "--test", str(toy_manifest / "test.csv"), "--out", str(out), *FAST, "--keep", "last"]
    text = run_redirected(argv, tmp_path / "quiet")
    assert "\r" not in text["out"] + text["err"]
    assert not EPOCH_LINE.search(text["err"]), text["err"]
    done = re.findall(
        r"^INFO (\w+) arm done: last epoch 3 of 3, validation weighted F1 [\d.]+, macro F1 [\d.]+, [\d.]+ s$",
        text["err"],
        re.M,
    )
    assert sorted(done) == ["fusion", "image", "text"], text["err"]
    lines = text["err"].splitlines()
    # the ablation's one line of how, then the three arms; a warning (13 validation rows) once, not once per arm
    assert len([x for x in lines if not x.startswith("WARNING")]) == 4 and len(set(lines)) == len(lines), lines
    rows = re.findall(r"^│ (image|text|fusion) +│ head +│ +3/3 │", text["out"], re.M)
    assert rows == ["image", "text", "fusion"], text["out"]
    assert "each a head on frozen features (--tune head): 3 epochs of batch 8" in text["out"]
    results = json.loads((out / "ablation.json").read_text())
    assert list(results) == ["image", "text", "fusion"]
    for name, r in results.items():
        assert r["training"]["tune"] == "head" and r["training"]["epochs"] == 3 and r["training"]["seed"] == 0
        assert r["best_epoch"] == r["epochs_run"] == 3 and r["seconds"] > 0
        assert (out / name / "eval" / "metrics.json").is_file() and not (out / name / "test").exists()
        assert json.loads((out / name / "eval" / "metrics.json").read_text())["weighted_f1"] == r["weighted_f1"]


@pytest.mark.slow
def test_verbose_shows_every_arms_epochs(toy_manifest, tmp_path):
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    text = run_redirected(["-v", "ablate", *data, "--out", str(tmp_path / "abl"), *FAST], tmp_path / "verbose")
    assert "\r" not in text["out"] + text["err"]
    for arm in ("image", "text", "fusion"):
        assert len(re.findall(rf"^INFO {arm} epoch \d+: train loss", text["err"], re.M)) == 3, text["err"]
        assert len(re.findall(rf"^INFO {arm} arm done:", text["err"], re.M)) == 1


@pytest.mark.slow
def test_tune_all_trains_every_arms_towers_on_the_fusion_arms_budget(
    toy_manifest, tmp_path, tiny_vit_dir, tiny_roberta_dir
):
    out = tmp_path / "abl"
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir), "--max-length", "32"]
    argv = ["ablate", str(toy_manifest / "all.csv"), "--out", str(out), "--tune", "all", *towers]
    assert main([*argv, "--epochs", "1", "--batch-size", "8"]) == 0
    results = json.loads((out / "ablation.json").read_text())
    assert {name: r["training"]["tuned_towers"] for name, r in results.items()} == {
        "image": ["image"],
        "text": ["text"],
        "fusion": ["image", "text"],
    }
    for name in results:
        saved = yaml.safe_load((out / name / "config.yaml").read_text())["train"]
        assert (saved["epochs"], saved["batch_size"], saved["lr"], saved["head_lr"]) == (1, 8, 1e-4, 1e-4), name
