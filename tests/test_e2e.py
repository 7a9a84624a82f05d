"""End to end through the CLI: train -> evaluate -> predict, reload, determinism, ablation, fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import read_csv, write_csv
from safetensors.torch import load_file

from mmfuse import load
from mmfuse.cli import main
from mmfuse.models.towers import build_text
from mmfuse.rundir.weights import load_model

FAST = ["--tune", "head", "--epochs", "30", "--batch-size", "8"]  # the head on cached features


def test_train_evaluate_predict_and_reload(toy_manifest, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), "--out", str(run), *FAST]
        )
        == 0
    )
    for name in (
        "config.yaml",
        "labels.json",
        "model.safetensors",
        "towers.json",
        "metrics.json",
        "history.csv",
        "training_curves.png",
        "val_confusion_matrix.png",
    ):
        assert (run / name).exists(), name
    # Frozen packaged towers are rebuilt from their wheels by name; nothing else of them is stored.
    towers = json.loads((run / "towers.json").read_text())
    assert towers["text"]["name"] == "minilm" and towers["image"]["name"] == "efficientnet-lite0"
    assert len(read_csv(run / "history.csv")) == 30

    assert main(["evaluate", str(run), str(toy_manifest / "test.csv")]) == 0
    report = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"accuracy", "weighted_f1", "macro_f1", "per_class", "confusion_matrix"} <= set(report)
    assert report["weighted_f1"] > 0.8  # 4 classes: chance is 0.25, and either modality alone caps at 0.5
    assert (run / "eval" / "confusion_matrix.png").exists() and (run / "eval" / "confusion_matrix.csv").exists()

    # Predict on unlabeled rows: one output row per input, in input order.
    rows = read_csv(toy_manifest / "test.csv")
    unlabeled = tmp_path / "unlabeled.csv"
    unlabeled.write_text("image,text\n" + "".join(f"{toy_manifest / r['image']},{r['text']}\n" for r in rows))
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(unlabeled), "--out", str(preds)]) == 0
    out = read_csv(preds)
    labels = json.loads((run / "labels.json").read_text())
    assert [r["image"] for r in out] == [str(toy_manifest / r["image"]) for r in rows]
    assert set(out[0]) == {"row", "image", "label", "confidence", *(f"p_{c}" for c in labels)}
    probs = np.array([[float(r[f"p_{c}"]) for c in labels] for r in out])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)

    # The Python API on a reloaded run gives the same probabilities as the CLI, from paths or PIL images.
    from PIL import Image

    predictor = load(run)
    result = predictor.predict([toy_manifest / r["image"] for r in rows], [r["text"] for r in rows])
    # The CLI read cached token states (layer-normalised, stored in float16); the API embedded afresh in float32.
    np.testing.assert_allclose(result.probs, probs, atol=1e-4)
    again = load(run).predict([Image.open(toy_manifest / r["image"]) for r in rows], [r["text"] for r in rows])
    np.testing.assert_array_equal(again.probs, result.probs)
    assert result.labels == [r["label"] for r in out]


@pytest.mark.slow  # MiniLM fine-tuned twice (--tune text: one model)
def test_same_seed_same_metrics(toy_manifest, tmp_path):
    args = ["train", str(toy_manifest / "train.csv"), "--epochs", "5", "--tune", "text"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "metrics.json").read_text())["val"] for x in "ab")
    assert a["weighted_f1"] == b["weighted_f1"] and a["confusion_matrix"] == b["confusion_matrix"]
    history = [read_csv(tmp_path / x / "history.csv") for x in "ab"]
    for row in history[0] + history[1]:
        row.pop("samples_per_s")  # wall-clock speed is the one column allowed to differ
    assert history[0] == history[1]


def test_ablation_fusion_beats_each_modality(toy_manifest, tmp_path):
    out = tmp_path / "ablate"
    code = main(
        [
            "ablate",
            str(toy_manifest / "train.csv"),
            "--val",
            str(toy_manifest / "val.csv"),
            "--test",
            str(toy_manifest / "test.csv"),
            "--out",
            str(out),
            *FAST,
        ]
    )
    assert code == 0
    results = json.loads((out / "ablation.json").read_text())
    assert set(results) == {"image", "text", "fusion"}
    assert (out / "ablation.png").exists()
    assert results["fusion"]["weighted_f1"] > 0.8
    assert results["fusion"]["accuracy"] > results["image"]["accuracy"] + 0.2
    assert results["fusion"]["accuracy"] > results["text"]["accuracy"] + 0.2


def test_parallel_ablation_gives_the_sequential_results(toy_manifest, tmp_path):
    from mmfuse.config import RunConfig
    from mmfuse.recipes.ablate import ablate

    cfg = RunConfig()
    cfg.data.train, cfg.data.val = str(toy_manifest / "train.csv"), str(toy_manifest / "val.csv")
    cfg.train.tune, cfg.train.epochs, cfg.train.batch_size = "head", 5, 8
    scores = [
        {k: v["weighted_f1"] for k, v in ablate(cfg, tmp_path / str(p), parallel=p).items()} for p in (True, False)
    ]
    assert scores[0] == scores[1] and set(scores[0]) == {"image", "text", "fusion"}


@pytest.mark.parametrize("fusion", ["gated", "attention"])
def test_other_fusion_heads_train(toy_manifest, tmp_path, fusion):
    run = tmp_path / fusion
    assert main(["train", str(toy_manifest / "all.csv"), "--out", str(run), "--fusion", fusion, *FAST]) == 0
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] > 0.5  # chance is 0.25


def test_label_smoothing_learns_and_is_checked(toy_manifest, tmp_path, capsys):
    run = tmp_path / "smooth"
    assert main(["train", str(toy_manifest / "all.csv"), "--out", str(run), "--label-smoothing", "0.1", *FAST]) == 0
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] > 0.5  # chance is 0.25
    assert main(["train", str(toy_manifest / "all.csv"), "--out", str(run), "--label-smoothing", "1"]) == 2
    assert "--label-smoothing must be in [0, 1)" in capsys.readouterr().err


def test_gradient_accumulation_learns_and_keeps_the_schedule(toy_manifest, tmp_path):
    run = tmp_path / "accum"
    args = ["train", str(toy_manifest / "all.csv"), "--out", str(run), "--grad-accum", "3", *FAST]
    assert main(args) == 0
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] > 0.5  # chance is 0.25
    lrs = [float(r["lr"]) for r in read_csv(run / "history.csv")]
    assert lrs[len(lrs) // 2] > 0.3e-3 and lrs[-1] < 1e-6  # cosine from 1e-3 reaches 0 at the last step, not before


def test_fine_tune_hf_towers_and_reload(toy_manifest, tmp_path, tiny_vit_dir, tiny_roberta_dir):
    """--tune all through tiny random HF towers loaded from directories (the code path a hub id takes)."""
    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(toy_manifest / "all.csv"),
            "--out",
            str(run),
            "--vision",
            str(tiny_vit_dir),
            "--text",
            str(tiny_roberta_dir),
            "--text-layers",
            "2",
            "--max-length",
            "16",
            "--tune",
            "all",
            "--epochs",
            "2",
            "--batch-size",
            "16",
        ]
    )
    assert code == 0
    towers = json.loads((run / "towers.json").read_text())
    assert towers["text"]["layers"] == 2 and towers["image"]["type"] == "hf-vision"
    # Fine-tuned towers are stored with the run, so it reloads without the original directories.
    rows = read_csv(toy_manifest / "test.csv")
    images, texts = [toy_manifest / r["image"] for r in rows], [r["text"] for r in rows]
    first = load(run).predict(images, texts)
    # Rebuilt towers skip drawing random weights: every one of them must then come from the run's file.
    model, _, _ = load_model(run)
    saved, state = load_file(str(run / "model.safetensors")), model.state_dict()
    assert {k for k in state if k.startswith(("vision.", "text."))} <= set(saved)
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    for d in (tiny_vit_dir, tiny_roberta_dir):
        for f in d.iterdir():
            f.rename(f.with_name(f.name + ".moved"))
    try:
        np.testing.assert_array_equal(load(run).predict(images, texts).probs, first.probs)
    finally:
        for d in (tiny_vit_dir, tiny_roberta_dir):
            for f in d.iterdir():
                f.rename(f.with_name(f.name.removesuffix(".moved")))


@pytest.mark.slow  # MiniLM fine-tuned
def test_tune_text_fine_tunes_only_the_text_tower_beside_cached_image_features(toy_manifest, tmp_path):
    """--tune text (one model's default): MiniLM is fine-tuned and stored with the run; EfficientNet stays frozen, read
    from the feature cache in training and in predict_file, and is rebuilt from its wheel; both predict paths agree."""
    run = tmp_path / "run"
    argv = ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), "--out", str(run)]
    assert main([*argv, "--epochs", "4", "--batch-size", "16", "--fusion", "concat"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (cfg["tune"], cfg["lr"], cfg["head_lr"]) == ("text", 5e-5, 2e-3)  # one model's default
    state = load_file(str(run / "model.safetensors"))
    assert not any(k.startswith("vision.") for k in state)  # frozen and packaged: rebuilt from the wheel
    tuned = {k: v for k, v in state.items() if k.startswith("text.")}
    packaged = build_text("minilm", "attention", layer_mean=2)
    packaged = packaged.state_dict()
    assert tuned and any(not torch.equal(v, packaged[k.removeprefix("text.")]) for k, v in tuned.items())
    assert json.loads((run / "metrics.json").read_text())["val"]["accuracy"] > 0.5  # chance is 0.25
    preds = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(toy_manifest / "test.csv"), "--out", str(preds)]) == 0
    rows = read_csv(toy_manifest / "test.csv")
    direct = load(run).predict([toy_manifest / r["image"] for r in rows], [r["text"] for r in rows])
    from_file = np.array([[float(r[f"p_{c}"]) for c in direct.classes] for r in read_csv(preds)])
    np.testing.assert_allclose(from_file, direct.probs, atol=1e-4)


def test_tune_image_beside_cached_text_token_states(toy_manifest, tmp_path, tiny_vit_dir, tiny_roberta_dir):
    """--tune image: the ViT changes, the RoBERTa (attention pooling over cached token states) does not, and
    evaluating the validation data reproduces the validation metrics training reported."""
    run = tmp_path / "run"
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir), "--text-pooling", "attention"]
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), "--out", str(run)]
    assert main(["train", *data, *towers, "--tune", "image", "--epochs", "2", "--head-lr", "2e-3"]) == 0
    state = load_file(str(run / "model.safetensors"))
    before = {
        **load_file(str(tiny_vit_dir / "model.safetensors")),
        **load_file(str(tiny_roberta_dir / "model.safetensors")),
    }

    def changed(prefix: str) -> bool:
        own = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(prefix)}  # e.g. vision.model.<key>
        return any(not torch.equal(v, before[k]) for k, v in own.items() if k in before)

    assert changed("vision.") and not changed("text.")
    assert main(["evaluate", str(run), str(toy_manifest / "val.csv"), "--out", str(tmp_path / "ev")]) == 0
    trained = json.loads((run / "metrics.json").read_text())["val"]
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["accuracy"] == trained["accuracy"] and again["weighted_f1"] == trained["weighted_f1"]


def test_missing_hub_model_names_both_options(toy_manifest, tmp_path, capsys):
    code = main(["train", str(toy_manifest / "train.csv"), "--out", str(tmp_path / "r"), "--preset", "seed"])
    assert code == 2
    err = capsys.readouterr().err
    assert "google/vit-base-patch16-224-in21k" in err and "local directory" in err and "--local-dir" in err


def test_runs_and_outputs_that_cannot_be_used_are_clear_errors(toy_manifest, tmp_path, capsys):
    data = str(toy_manifest / "train.csv")
    run = tmp_path / "run"
    assert main(["train", data, "--out", str(run), "--tune", "head", "--epochs", "1"]) == 0  # any run will do
    capsys.readouterr()
    cases = [
        (["predict", str(run), data, "--out", str(tmp_path)], "is a directory"),
        (["predict", str(run), data, "--out", data], "overwrite it"),
        (["evaluate", str(run), data, "--out", data], "is a file"),
        (["train", data, "--out", data], "is a file"),
        (["train", data, "--out", str(tmp_path / "x"), "--lr", "nan"], "--lr a finite number > 0"),
        (["train", data, "--out", str(tmp_path / "x"), "--config", str(tmp_path / "nope.yaml")], "not found"),
        (["train", data, "--out", str(tmp_path / "x"), "--text", "./no_such_dir"], "does not exist"),
        (["evaluate", str(tmp_path / "nope"), data], "Run directory not found"),
    ]
    for args, expected in cases:
        assert main(args) == 2, args
        assert expected in capsys.readouterr().err, args
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["evaluate", str(run), data]) == 2
    assert "unreadable or truncated" in capsys.readouterr().err


def test_a_split_with_no_validation_rows_stops_before_training(toy_manifest, tmp_path, capsys):
    rows = read_csv(toy_manifest / "train.csv")
    one_each = list({r["label"]: r for r in rows}.values())
    write_csv(toy_manifest / "single.csv", one_each)
    argv = ["train", str(toy_manifest / "single.csv"), "--out", str(tmp_path / "r")]
    assert main([*argv, "--tune", "head"]) == 2
    assert "No validation rows" in capsys.readouterr().err and not (tmp_path / "r" / "history.csv").exists()
    # The default, an ensemble on 5 folds, says so before it starts.
    assert main(argv) == 2
    assert "--bag 5 needs at least 5 rows; the data has 4" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_every_verb_prints_its_help(capsys):
    """Help texts are built from the config docstrings; a bare % in one once broke `mmfuse train --help`."""
    from mmfuse.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0, verb
        assert "usage: mmfuse" in capsys.readouterr().out, verb
    assert {"train", "evaluate", "predict", "ablate", "quickstart", "caption"} <= set(verbs)
