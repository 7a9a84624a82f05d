"""Imbalance and the metric: --class-weight in the loss, --balanced-sampling's draws, and --metric choosing the kept
epoch, the ensemble's members, a bag's headline and what the run files report; bad values stop with a clear error."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import read_csv, write_csv

from mmfuse import metrics
from mmfuse.cli import main
from mmfuse.config import METRICS, DataConfig, ModelConfig, RunConfig, TrainConfig, parse_class_weight
from mmfuse.errors import MmfuseError
from mmfuse.training import loop, selection
from mmfuse.training.prep import balanced_sampler, class_weights

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "3", "--batch-size", "8"]
LABELS = ["blue-apple", "blue-train", "red-apple", "red-train"]


def imbalanced(toy) -> str:
    """The toy rows with every red-apple row and 3 of each other class: 16 against 3, 3, 3."""
    kept, seen = [], Counter()
    for r in read_csv(toy / "all.csv"):
        if r["label"] == "red-apple" or seen[r["label"]] < 3:
            kept.append(r)
            seen[r["label"]] += 1
    write_csv(toy / "imbalanced.csv", kept)
    return str(toy / "imbalanced.csv")


# ---------------------------------------------------------------------------------------------------------------------
# The metric registry


def test_every_metric_config_names_is_registered_and_ranked_its_way():
    assert set(METRICS) == set(metrics._METRICS)
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    assert metrics.score("accuracy", y, probs) == pytest.approx(0.75)
    assert metrics.score("log_loss", y, probs) == pytest.approx(-np.log([0.9, 0.4, 0.8, 0.7]).mean())
    assert metrics.score("weighted_f1", y, probs) == metrics.summary(y, probs.argmax(1))["weighted_f1"]
    assert metrics.ranked("log_loss", 0.2) > metrics.ranked("log_loss", 0.3)  # lower loss ranks higher
    assert metrics.ranked("macro_f1", 0.3) > metrics.ranked("macro_f1", 0.2)


# ---------------------------------------------------------------------------------------------------------------------
# --class-weight


def test_class_weights_balanced_is_sklearns_and_named_ones_default_to_one():
    from sklearn.utils.class_weight import compute_class_weight

    class R:  # a record: only its label counts
        def __init__(self, label):
            self.label = label

    rows = [R("a")] * 6 + [R("b")] * 3 + [R("c")] * 1
    got = class_weights("balanced", ["a", "b", "c"], rows)
    want = compute_class_weight("balanced", classes=np.array(["a", "b", "c"]), y=np.array([r.label for r in rows]))
    assert list(got.values()) == pytest.approx(list(want))
    assert class_weights("c=4, a=0.5", ["a", "b", "c"], rows) == {"a": 0.5, "b": 1.0, "c": 4.0}
    assert class_weights(None, ["a", "b"], rows) is None
    with pytest.raises(MmfuseError, match="'dog', not a class of the data; the classes are a, b, c"):
        class_weights("a=2,dog=1", ["a", "b", "c"], rows)
    assert parse_class_weight("balanced") == "balanced"


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_a_class_weight_changes_the_loss_and_its_gradient_exactly_as_torchs_weight(smoothing):
    acc = Accelerator(cpu=True)
    x, labels = (
        torch.randn(16, 5, generator=torch.Generator().manual_seed(1)),
        torch.tensor([0] * 10 + [1] * 4 + [2] * 2),
    )
    weight = torch.tensor([0.5, 1.5, 3.0])
    steps = {}
    for name, w in (("weighted", weight), ("plain", None)):
        model = Linear()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        params = list(model.parameters())
        loss, n = loop.train_step(
            model, {"x": x, "labels": labels}, optimizer, scheduler, acc, params, 0.0, smoothing, None, w
        )
        # torch's own, on the weights before the step: the same loss, and the step is its gradient (SGD, lr 1)
        ref = Linear()
        ref.load_state_dict(before)
        want = F.cross_entropy(ref(x), labels, weight=w, label_smoothing=smoothing)
        want.backward()
        assert n == 16 and loss.item() == pytest.approx(want.item() * 16, rel=1e-6)
        torch.testing.assert_close(model.fc.weight, before["fc.weight"] - ref.fc.weight.grad)
        steps[name] = loss.item()
    assert steps["weighted"] != pytest.approx(steps["plain"])


# ---------------------------------------------------------------------------------------------------------------------
# --balanced-sampling


def test_the_balanced_sampler_draws_a_rare_class_about_as_often_as_a_common_one():
    y = torch.tensor([0] * 90 + [1] * 10)
    sampler = balanced_sampler(y, 2, torch.Generator().manual_seed(0))
    drawn = [int(y[i]) for _ in range(20) for i in sampler]
    assert len(drawn) == 20 * len(y)  # as many rows an epoch as without it
    assert 0.45 < np.mean(drawn) < 0.55  # the 10% class drawn half the time


def test_balanced_sampling_through_setup_evens_the_classes_and_replays_from_the_generator(toy_manifest, tmp_path):
    data = imbalanced(toy_manifest)
    cfg = RunConfig(
        data=DataConfig(train=data, val_split=0.2),
        model=ModelConfig(image_size=32),
        train=TrainConfig(tune="head", epochs=1, batch_size=4, balanced_sampling=True, class_weight="balanced"),
    )
    tr = loop.setup(cfg, tmp_path / "run")  # the loader prepared by Accelerate, as fit's is

    def epoch():
        return [int(y) for batch in tr.train_dl for y in batch["labels"]]

    state = tr.generator.get_state()  # what a checkpoint saves as an epoch begins
    first = epoch()
    tr.generator.set_state(state)  # and what --resume restores
    assert epoch() == first
    draws = [y for _ in range(30) for y in epoch()]
    share = np.bincount(draws, minlength=4) / len(draws)
    assert len(first) == tr.n_train and np.all(np.abs(share - 0.25) < 0.08), share
    # the balanced weights, counted on the training rows, are what the loss uses
    counts = Counter(r["label"] for r in read_csv(data))
    assert tr.class_weight["red-apple"] < 1 < tr.class_weight["blue-apple"]
    assert tr.loss_weight.tolist() == pytest.approx([tr.class_weight[c] for c in tr.labels])
    assert set(tr.class_weight) == set(counts)


# ---------------------------------------------------------------------------------------------------------------------
# --metric: the kept epoch, the ensemble's selection


def history():
    """Epochs where the metrics disagree: 2 and 5 tie on the best weighted F1, 3 has the best macro F1, 4 the best
    accuracy and the lowest loss."""
    return [
        {"epoch": 1, "val_weighted_f1": 0.70, "val_macro_f1": 0.50, "val_accuracy": 0.80, "val_loss": 0.90},
        {"epoch": 2, "val_weighted_f1": 0.80, "val_macro_f1": 0.55, "val_accuracy": 0.82, "val_loss": 0.70},
        {"epoch": 3, "val_weighted_f1": 0.78, "val_macro_f1": 0.65, "val_accuracy": 0.81, "val_loss": 0.60},
        {"epoch": 4, "val_weighted_f1": 0.75, "val_macro_f1": 0.60, "val_accuracy": 0.84, "val_loss": 0.40},
        {"epoch": 5, "val_weighted_f1": 0.80, "val_macro_f1": 0.55, "val_accuracy": 0.79, "val_loss": 0.65},
    ]


@pytest.mark.parametrize("metric, epoch", [("weighted_f1", 5), ("macro_f1", 3), ("accuracy", 4), ("log_loss", 4)])
def test_the_metric_picks_the_kept_epoch_and_a_tie_goes_to_the_lower_loss(metric, epoch):
    rows = [{**r, "val_log_loss": r["val_loss"]} for r in history()]
    best = None
    for row in rows:  # run_epoch's rule
        if best is None or loop.epoch_key(row, metric) > loop.epoch_key(best, metric):
            best = row
    # weighted F1: epochs 2 and 5 tie at 0.80 and 5 has the lower loss, as the default has always chosen
    assert best["epoch"] == epoch


def skewed():
    """90 rows of class 0, 10 of class 1. ``majority`` always says 0: the better weighted F1. ``fair`` finds every
    rare row but takes 30 common ones for rare: the better macro F1."""
    y = np.array([0] * 90 + [1] * 10)
    majority = np.tile([0.8, 0.2], (100, 1))
    fair = np.tile([0.8, 0.2], (100, 1))
    fair[60:] = [0.3, 0.7]
    return y, majority, fair


def test_selection_by_macro_f1_prefers_the_member_better_on_it_and_worse_on_weighted_f1():
    y, majority, fair = skewed()
    assert selection.score(y, majority)[0] > selection.score(y, fair)[0]
    assert selection.score(y, majority, "macro_f1")[0] < selection.score(y, fair, "macro_f1")[0]
    assert list(selection.select([majority, fair], y, steps=1).weights) == [1.0, 0.0]  # the default: weighted F1
    chosen = selection.select([majority, fair], y, steps=1, metric="macro_f1")
    assert list(chosen.weights) == [0.0, 1.0]
    assert chosen.metric == "macro_f1" and chosen.score == pytest.approx(0.6)
    assert chosen.weighted_f1 == pytest.approx(metrics.score("weighted_f1", y, fair))
    greedy = selection.select([majority, fair], y, metric="macro_f1")
    assert greedy.score >= chosen.score
    # log loss as the metric: the lower one wins (the majority's 0.36 against 0.53), not the higher
    assert selection.score(y, majority, "log_loss")[0] < selection.score(y, fair, "log_loss")[0]
    assert list(selection.select([fair, majority], y, steps=1, metric="log_loss").weights) == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# End to end, and bad values


def test_a_run_records_its_metric_its_weights_and_keeps_the_epoch_the_metric_chose(toy_manifest, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", imbalanced(toy_manifest), "--out", str(run), *FAST, "--val-split", "0.3"]
    assert main([*args, "--metric", "log_loss", "--class-weight", "balanced", "--balanced-sampling"]) == 0
    result = json.loads((run / "metrics.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lowest = min(history, key=lambda r: (r["val_log_loss"], r["val_loss"]))
    assert result["best_epoch"] == lowest["epoch"]
    assert result["metric"]["name"] == "log_loss"
    assert result["metric"]["value"] == pytest.approx(result["val"]["log_loss"])
    assert set(result["class_weight"]) == set(LABELS) and result["class_weight"]["red-apple"] < 1
    config = (run / "config.yaml").read_text()
    assert "class_weight: balanced" in config and "balanced_sampling: true" in config and "metric: log_loss" in config
    assert "validation log loss" in capsys.readouterr().out


def test_a_bag_reports_its_metric_as_the_headline(toy_manifest, tmp_path, capsys):
    run = tmp_path / "bag"
    assert (
        main(["train", imbalanced(toy_manifest), "--out", str(run), *FAST, "--bag", "2", "--metric", "macro_f1"]) == 0
    )
    result = json.loads((run / "metrics.json").read_text())
    assert result["metric"]["name"] == "macro_f1"
    assert result["metric"]["value"] == pytest.approx(result["val"]["macro_f1"])
    assert len(result["metric"]["folds"]) == 2
    assert "out-of-fold macro F1" in capsys.readouterr().out


def test_the_ensembles_leaderboard_and_ensemble_json_carry_the_metric(toy_manifest, tmp_path):
    run = tmp_path / "ens"
    args = ["train", str(toy_manifest / "all.csv"), "--out", str(run), "--preset", "ensemble", "--bag", "2"]
    assert main([*args, "--image-size", "32", "--time-limit", "1s", "--metric", "accuracy"]) == 0  # the probes
    board = read_csv(run / "leaderboard.csv")
    assert "oof_accuracy" in board[0] and "oof_macro_f1" in board[0]
    ensemble = json.loads((run / "ensemble.json").read_text())
    result = json.loads((run / "metrics.json").read_text())
    assert ensemble["metric"] == "accuracy" and ensemble["oof_accuracy"] == pytest.approx(result["metric"]["value"])
    assert float(board[-1]["oof_accuracy"]) == pytest.approx(result["val"]["accuracy"], abs=1e-6)
    assert float(board[-1]["oof_accuracy"]) >= max(float(r["oof_accuracy"]) for r in board[:-1])


def error_of(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--metric", "roc"], "--metric must be one of weighted_f1, macro_f1, accuracy, log_loss, roc_auc, pr_auc"),
        (["--class-weight", "heavy"], "--class-weight must be balanced or per class as cat=2,dog=0.5"),
        (["--class-weight", "red-apple=0"], "weights > 0"),
        (["--class-weight", "red-apple=1,red-apple=2"], "names the class 'red-apple' twice"),
    ],
)
def test_bad_values_stop_with_an_error_naming_the_choices(flags, expected, tmp_path, capsys):
    err = error_of(capsys, ["train", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run"), *FAST, *flags])
    assert expected in err


def test_an_unknown_class_in_class_weight_names_the_classes(toy_manifest, tmp_path, capsys):
    args = ["train", str(toy_manifest / "all.csv"), "--out", str(tmp_path / "run"), *FAST]
    err = error_of(capsys, [*args, "--class-weight", "red-apple=2,purple-pear=3"])
    assert "'purple-pear', not a class of the data; the classes are " + ", ".join(LABELS) in err


def test_a_checkpoint_from_before_these_flags_still_resumes_but_a_changed_metric_does_not():
    import hashlib
    from dataclasses import asdict

    from mmfuse.training.checkpoint import FREE_KEYS, config_fingerprint

    cfg = RunConfig()
    raw = asdict(cfg)  # the fingerprint as it was computed before the flags existed
    raw.pop("asked")
    for section in raw.values():
        # The settings added since (multi-label's among them): absent from a checkpoint written before them.
        for key in FREE_KEYS | {"class_weight", "balanced_sampling", "metric", "multi_label", "label_sep"}:
            section.pop(key, None)
    before = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert config_fingerprint(cfg) == before
    assert config_fingerprint(cfg.updated({"train": {"metric": "macro_f1"}})) != before
    assert config_fingerprint(cfg.updated({"train": {"balanced_sampling": True}})) != before


@pytest.mark.parametrize("sampling", [[], ["--balanced-sampling"]], ids=["shuffled", "balanced"])
def test_interrupted_mid_epoch_resumes_to_the_same_weights(toy_manifest, tmp_path, monkeypatch, sampling):
    from safetensors.torch import load_file

    data = imbalanced(toy_manifest)
    args = [*FAST, "--batch-size", "4", *sampling, "--checkpoint-every", "1", "--val-split", "0.3", "--keep", "last"]
    assert main(["train", data, "--out", str(tmp_path / "whole"), *args]) == 0
    real, calls = loop.train_step, []

    def ctrl_c_in_epoch_2(*a, **kw):  # the third step of epoch 2: its second step is checkpointed
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "train_step", ctrl_c_in_epoch_2)
    assert main(["train", data, "--out", str(tmp_path / "run"), *args]) == 130
    monkeypatch.setattr(loop, "train_step", real)
    assert main(["train", data, "--out", str(tmp_path / "run"), *args, "--resume"]) == 0
    whole, resumed = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("whole", "run"))
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6)


def test_a_search_by_log_loss_minimises_it_and_ranks_its_trials_by_it(toy_manifest, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "search"
    data = [str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv")]
    args = ["search", *data, "--out", str(out), "--trials", "3", "--tune", "head", "--image-size", "32"]
    assert main([*args, "--epochs", "2", "--metric", "log_loss"]) == 0
    rows = read_csv(out / "leaderboard.csv")
    losses = [float(r["val_log_loss"]) for r in rows if r["state"] == "complete"]
    assert losses == sorted(losses) and "val_macro_f1" in rows[0]  # lowest first
    study = optuna.load_study(study_name="mmfuse", storage=f"sqlite:///{out / 'study.sqlite'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_value == pytest.approx(losses[0])
    assert (
        (out / "best.yaml")
        .read_text()
        .startswith(f"# mmfuse search {out}: trial {rows[0]['trial']}, validation log loss")
    )
    assert "log loss" in capsys.readouterr().out  # the printed leaderboard's column
