"""k-fold bagging: one out-of-fold prediction per row, members averaged at predict time, groups kept whole, refit."""

import json

import numpy as np
import pytest
from conftest import TOY, read_csv, write_csv, write_toy

import mmfuse
from mmfuse.cli import main
from mmfuse.data.checks import load_checked
from mmfuse.metrics import full_report
from mmfuse.training import bag, loop

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "4", "--batch-size", "8"]

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' features, embedded once a session


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The rows of the warm home, in a folder of this module's own (tests add files to it)."""
    return write_toy(tmp_path_factory.mktemp("bagdata") / "toy", **TOY)


@pytest.fixture(scope="module")
def bagged(toy, shared_home, tmp_path_factory):
    run = tmp_path_factory.mktemp("bagrun") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        assert main(["train", str(toy / "all.csv"), "--out", str(run), *FAST, "--bag", "3"]) == 0
    return run


def test_every_row_gets_one_out_of_fold_prediction_and_the_metrics_are_theirs(toy, bagged):
    metrics = json.loads((bagged / "metrics.json").read_text())
    rows = read_csv(bagged / "oof_predictions.csv")
    n = len(read_csv(toy / "all.csv"))
    assert metrics["bag"] == 3 and metrics["members_finished"] == 3 and len(metrics["members"]) == 3
    assert len(rows) == n and len({r["row"] for r in rows}) == n  # each row once
    assert sorted({r["fold"] for r in rows}) == ["0", "1", "2"]
    for m in metrics["members"]:  # a member validated on its fold: exactly its held-out rows
        assert m["rows"] == sum(r["fold"] == str(m["fold"]) for r in rows)
    labels = json.loads((bagged / "labels.json").read_text())
    index = {c: i for i, c in enumerate(labels)}
    y = np.array([index[r["label"]] for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows])
    recomputed = full_report(y, probs.argmax(1), labels)
    assert recomputed["weighted_f1"] == pytest.approx(metrics["val"]["weighted_f1"])
    assert recomputed["confusion_matrix"] == metrics["val"]["confusion_matrix"]
    assert metrics["predict_uses"] == "bag" and metrics["full"] is None
    low, high = metrics["val_interval"]["weighted_f1_low"], metrics["val_interval"]["weighted_f1_high"]
    assert low <= metrics["val"]["weighted_f1"] <= high


def test_predict_averages_the_members_and_reloads_the_same(toy, bagged):
    rows = read_csv(toy / "test.csv")
    images, texts = [toy / r["image"] for r in rows], [r["text"] for r in rows]
    got = mmfuse.load(bagged).predict(images, texts)
    members = [mmfuse.load(bagged / "members" / str(k)).predict(images, texts).probs for k in range(3)]
    np.testing.assert_allclose(got.probs, np.mean(members, axis=0), rtol=0, atol=1e-6)
    assert not np.allclose(members[0], members[1])  # the members differ: averaging them is not a no-op
    again = mmfuse.load(bagged).predict(images, texts)
    np.testing.assert_array_equal(got.probs, again.probs)


def test_evaluate_and_predict_files_use_the_bag(toy, bagged, tmp_path):
    assert main(["predict", str(bagged), str(toy / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    preds = read_csv(tmp_path / "p.csv")
    rows = read_csv(toy / "test.csv")
    api = mmfuse.load(bagged).predict([toy / r["image"] for r in rows], [r["text"] for r in rows])
    assert [p["label"] for p in preds] == api.labels


def test_group_folds_never_split_a_group(toy, tmp_path):
    rows = read_csv(toy / "all.csv")
    for i, r in enumerate(rows):
        r["photo"] = f"p{i // 3}"  # groups of three rows
    write_csv(toy / "g.csv", rows, fields=("image", "text", "label", "photo"))
    records = load_checked(toy / "g.csv")
    groups = bag.read_groups(str(toy / "g.csv"), "photo", records)
    held_out = bag.folds(records, 3, seed=0, groups=groups)
    assert sorted(np.concatenate(held_out).tolist()) == list(range(len(records)))
    for k, idx in enumerate(held_out):
        inside = {groups[i] for i in idx}
        outside = {groups[i] for j, other in enumerate(held_out) if j != k for i in other}
        assert not inside & outside
    with pytest.raises(mmfuse.MmfuseError, match="no such column"):
        bag.read_groups(str(toy / "g.csv"), "album", records)


def test_refit_full_trains_on_every_row_for_the_median_best_epoch(toy, tmp_path):
    run = tmp_path / "run"
    assert main(["train", str(toy / "all.csv"), "--out", str(run), *FAST, "--bag", "3", "--refit-full"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    best = sorted(m["best_epoch"] for m in metrics["members"])
    full = json.loads((run / "full" / "metrics.json").read_text())
    assert metrics["predict_uses"] == "full" and metrics["full"]["epochs"] == best[1]
    assert full["n_train"] == len(read_csv(toy / "all.csv")) and full["epochs_run"] == best[1]
    assert json.loads((run / "bag.json").read_text())["predict"] == ["full"]
    rows = read_csv(toy / "test.csv")
    images, texts = [toy / r["image"] for r in rows], [r["text"] for r in rows]
    np.testing.assert_array_equal(
        mmfuse.load(run).predict(images, texts).probs, mmfuse.load(run / "full").predict(images, texts).probs
    )


def test_parallel_members_give_the_sequential_results(toy, tmp_path):
    from mmfuse.cli import build_parser, run_config

    args = build_parser().parse_args(["train", str(toy / "all.csv"), "--out", "x", *FAST, "--bag", "3"])
    cfg = run_config(args).updated({"data": {"train": str(toy / "all.csv")}})
    results = [bag.fit_bag(cfg, tmp_path / str(p), parallel=p) for p in (True, False)]
    assert results[0]["val"] == results[1]["val"] and results[0]["members"][0]["fold"] == 0
    assert [m["best_epoch"] for m in results[0]["members"]] == [m["best_epoch"] for m in results[1]["members"]]
    oof = [read_csv(tmp_path / str(p) / "oof_predictions.csv") for p in (True, False)]
    assert oof[0] == oof[1]


def test_ctrl_c_in_a_parallel_bag_keeps_the_finished_members(toy, tmp_path, monkeypatch, capsys):
    real = loop.run_epoch

    def interrupt_the_third_member(tr, epoch):  # it starts once one of the first two (2 workers) has finished
        if tr.cfg.train.seed == 2 and epoch == 2:
            raise KeyboardInterrupt
        return real(tr, epoch)

    monkeypatch.setattr(loop, "run_epoch", interrupt_the_third_member)
    monkeypatch.setattr(bag.os, "cpu_count", lambda: 2)
    run = tmp_path / "run"
    assert main(["train", str(toy / "all.csv"), "--out", str(run), *FAST, "--bag", "3"]) == 130
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["interrupted"] and 1 <= metrics["members_finished"] <= 2
    assert len(read_csv(run / "oof_predictions.csv")) == sum(m["rows"] for m in metrics["members"])


def test_ctrl_c_keeps_the_finished_members(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bag.os, "cpu_count", lambda: 1)  # members one after another: the count below is this process's
    real = loop.run_epoch
    calls = {"n": 0}

    def interrupt_in_the_second_member(tr, epoch):
        calls["n"] += 1
        if calls["n"] == 6:  # 4 epochs a member: the second member's second epoch
            raise KeyboardInterrupt
        return real(tr, epoch)

    monkeypatch.setattr(loop, "run_epoch", interrupt_in_the_second_member)
    run = tmp_path / "run"
    assert main(["train", str(toy / "all.csv"), "--out", str(run), *FAST, "--bag", "3"]) == 130
    assert "kept the 1 finished member(s) of 3" in capsys.readouterr().err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["interrupted"] and metrics["members_finished"] == 1
    assert len(read_csv(run / "oof_predictions.csv")) == metrics["members"][0]["rows"]
    rows = read_csv(toy / "test.csv")
    result = mmfuse.load(run).predict([toy / r["image"] for r in rows], [r["text"] for r in rows])
    assert len(result.labels) == len(rows)


def test_bad_bag_options_are_named(toy, tmp_path, capsys):
    data = str(toy / "all.csv")
    assert main(["train", data, "--out", str(tmp_path / "a"), *FAST, "--bag", "0"]) == 2
    assert "--bag must be 2 or more" in capsys.readouterr().err
    assert main(["train", data, "--out", str(tmp_path / "b"), *FAST, "--refit-full"]) == 2
    assert "go with --bag K" in capsys.readouterr().err
    args = ["train", data, "--out", str(tmp_path / "c"), *FAST, "--bag", "3", "--val", str(toy / "val.csv")]
    assert main(args) == 2
    assert "put the --val rows into DATA" in capsys.readouterr().err


def test_a_few_validation_rows_get_a_warning(toy_manifest, tmp_path, caplog):
    small = write_toy(tmp_path / "small", per_class=4, seed=2)
    with caplog.at_level("WARNING"):
        assert main(["train", str(small / "train.csv"), "--out", str(tmp_path / "r"), *FAST]) == 0
    assert "validation rows" in caplog.text and "unreliable" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        args = ["train", str(toy_manifest / "all.csv"), "--out", str(tmp_path / "r2"), *FAST, "--val-split", "0.5"]
        assert main(args) == 0
    assert "unreliable" not in caplog.text


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("fast", {"tune": "head", "epochs": 15, "bag": 1, "text": "minilm", "text_pooling": "attention"}),
        ("best", {"tune": "text", "epochs": 4, "bag": 5, "ensemble": True, "text": "minilm"}),
        ("ensemble", {"tune": "head", "epochs": 15, "bag": 5, "ensemble": True, "text": "minilm"}),
        (
            None,
            {"tune": "text", "epochs": 4, "bag": 1, "ensemble": False, "text": "minilm", "text_pooling": "attention"},
        ),
        ("seed", {"tune": "text", "bag": 1, "text": "roberta-base", "text_layers": 8, "text_pooling": "cls"}),
    ],
)
def test_each_preset_resolves_to_its_documented_config(preset, expected):
    """None: the library's defaults (train's command line defaults to the ensemble: test_ensemble)."""
    from mmfuse.cli import build_parser, run_config
    from mmfuse.config import resolve

    argv = ["train", "data.csv", "--out", "run"] + (["--preset", preset] if preset else [])
    cfg = resolve(run_config(build_parser().parse_args(argv)))
    got = {**vars(cfg.model), **vars(cfg.train)}
    assert {k: got[k] for k in expected} == expected
    # A flag beside a preset wins over it.
    cfg = resolve(run_config(build_parser().parse_args([*argv, "--bag", "3", "--text-pooling", "mean"])))
    assert (cfg.train.bag, cfg.model.text_pooling) == (3, "mean")


def test_a_bag_is_not_exported_as_if_it_were_one_model(bagged, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert main(["export", str(bagged), "--out", str(tmp_path / "x")]) == 2
    assert "is a bag of 3 models" in capsys.readouterr().err
