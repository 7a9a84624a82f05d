"""Multi-label targets: label sets read from a labels column (or label with --label-sep, or lists in JSONL and
parquet), a sigmoid per label trained with a binary cross-entropy, per-label thresholds chosen on validation, the
set scores, and the sets and probabilities through the API, predict and evaluate; what does not handle sets yet
refuses them."""

import base64
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TOY, read_csv, submit_page, write_csv, write_toy

import mmfuse
from mmfuse import metrics, multilabel
from mmfuse.cli import main
from mmfuse.data.read import read_data
from mmfuse.data.records import Record
from mmfuse.data.splits import label_list, stratified_split
from mmfuse.errors import MmfuseError
from mmfuse.rundir.layout import RUN_FILES
from mmfuse.training import selection

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' features, embedded once a session


def label_set(label: str) -> str:
    """The toy's class (red-apple) as a set: its colour and its thing; a red train is only a train."""
    color, thing = label.split("-")
    return thing if label == "red-train" else f"{color}|{thing}"


def multilabel_toy(root: Path) -> Path:
    toy = write_toy(root, **TOY)
    for split in ("train", "val", "test", "all"):
        rows = read_csv(toy / f"{split}.csv")
        for r in rows:
            r["labels"] = label_set(r["label"])
        write_csv(toy / f"{split}.csv", rows, ("image", "text", "labels"))
    return toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return multilabel_toy(tmp_path_factory.mktemp("multilabel-data") / "toy")


@pytest.fixture(scope="module")
def run(toy, shared_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("multilabel-run") / "run"
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(out), *FAST]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        assert main(args) == 0
    return out


def rows(toy: Path, split: str = "test") -> tuple[list[Path], list[str], list[str]]:
    found = read_csv(toy / f"{split}.csv")
    sets = ["|".join(sorted(r["labels"].split("|"))) for r in found]  # as mmfuse writes a set: sorted
    return [toy / r["image"] for r in found], [r["text"] for r in found], sets


# ---------------------------------------------------------------------------------------------------------------------
# The numbers


def test_set_scores_match_scikit_learn(rng):
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score

    y = (rng.random((60, 5)) < 0.3).astype(int)
    y[:, 4] = 0  # a label no row holds: macro F1 counts it as 0, mAP leaves it out
    probs = np.clip(rng.random((60, 5)) * 0.7 + 0.3 * y, 0, 1)
    pred = probs >= 0.5
    got = metrics.multilabel_summary(y, pred)
    for avg in ("micro", "macro", "weighted", "samples"):
        assert got[f"{avg}_f1"] == pytest.approx(f1_score(y, pred, average=avg, zero_division=0)), avg
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))  # the whole set right
    expected_map = np.mean([average_precision_score(y[:, j], probs[:, j]) for j in range(4)])
    assert metrics.mean_average_precision(y, probs) == pytest.approx(expected_map)
    assert metrics.score("map", y, probs) == pytest.approx(expected_map)
    assert metrics.score("micro_f1", y, probs) == pytest.approx(f1_score(y, pred, average="micro"))
    ties = np.array([0.5, 0.5, 0.2, 0.9])  # tied scores count as one threshold, as scikit-learn does
    assert metrics.average_precision(np.array([1, 0, 1, 0]), ties) == pytest.approx(
        average_precision_score([1, 0, 1, 0], ties)
    )
    bce = -np.mean(y * np.log(probs.clip(1e-15)) + (1 - y) * np.log((1 - probs).clip(1e-15)))
    assert metrics.log_loss(y, probs) == pytest.approx(bce)
    with pytest.raises(ValueError, match="multi-label"):
        metrics.score("micro_f1", np.array([0, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))


def test_thresholds_are_chosen_per_label_and_round_trip(tmp_path, rng):
    y = np.zeros((200, 2), dtype=bool)
    y[:, 0] = rng.random(200) < 0.05  # rare, with low probabilities: wants a threshold under 0.5
    y[:, 1] = rng.random(200) < 0.5
    probs = np.stack([np.clip(0.1 + 0.25 * y[:, 0] + rng.normal(0, 0.05, 200), 0, 1), 0.2 + 0.6 * y[:, 1]], 1)
    chosen = multilabel.choose_thresholds(probs, y)
    assert chosen.values[0] < 0.5
    tuned, half = multilabel.predicted(probs, chosen)[:, 0], probs[:, 0] >= 0.5
    assert (
        metrics.multilabel_summary(y[:, :1], tuned[:, None])["micro_f1"]
        > metrics.multilabel_summary(y[:, :1], half[:, None])["micro_f1"]
    )  # the rare label's F1 gains from its own cut
    multilabel.write_thresholds(tmp_path / multilabel.THRESHOLDS_FILE, ["rare", "common"], chosen, "auto", "val")
    assert multilabel.read_thresholds(tmp_path, ["rare", "common"]) == chosen
    assert multilabel.read_thresholds(tmp_path / "none", ["a", "b"]).values == (0.5, 0.5)  # no file: 0.5 each
    with pytest.raises(MmfuseError, match="does not predict"):
        multilabel.read_thresholds(tmp_path, ["common", "other"])
    (tmp_path / multilabel.THRESHOLDS_FILE).write_text("{")
    with pytest.raises(MmfuseError, match="damaged"):
        multilabel.read_thresholds(tmp_path, ["rare", "common"])
    sets = multilabel.label_sets(np.array([[0.9, 0.1], [0.1, 0.05]]), ["a", "b"], None)
    assert sets == [["a"], []]  # an empty set is a prediction too


# ---------------------------------------------------------------------------------------------------------------------
# Reading sets


def test_label_sets_from_a_labels_column_a_separator_and_lists(tmp_path):
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    write_csv(
        tmp_path / "a.csv", [{"image": "x.png", "text": "t", "labels": "dog| cat |dog"}], ("image", "text", "labels")
    )
    (records, problems) = read_data(tmp_path / "a.csv")
    assert not problems and records[0].labels == ("cat", "dog") and records[0].label == "cat|dog"
    write_csv(tmp_path / "b.csv", [{"image": "x.png", "text": "t", "label": "dog;cat"}])
    assert read_data(tmp_path / "b.csv")[0][0].labels is None  # a label column is one label a row ...
    assert read_data(tmp_path / "b.csv", label_sep=";")[0][0].labels == ("cat", "dog")  # ... unless split
    assert read_data(tmp_path / "b.csv", multi_label=True)[0][0].labels == ("dog;cat",)  # --multi-label splits on |
    lines = [{"image": "x.png", "text": "t", "labels": ["cat", "dog"]}, {"image": "x.png", "text": "t", "label": ["a"]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    records, problems = read_data(tmp_path / "c.jsonl", need_label=False)
    assert records[0].labels == ("cat", "dog")
    (tmp_path / "d.jsonl").write_text(json.dumps(lines[1]))
    records, problems = read_data(tmp_path / "d.jsonl")
    assert not records and "pass --multi-label" in problems[0].reason
    assert read_data(tmp_path / "d.jsonl", multi_label=True)[0][0].labels == ("a",)
    (tmp_path / "e.jsonl").write_text(json.dumps({"image": "x.png", "text": "t", "labels": ["a|b"]}))
    assert "separates the labels" in read_data(tmp_path / "e.jsonl")[1][0].reason
    # A single-label run reads its data as it always did: a labels column beside label is not read.
    write_csv(
        tmp_path / "f.csv",
        [{"image": "x.png", "text": "t", "label": "dog", "labels": "a|b"}],
        ("image", "text", "label", "labels"),
    )
    assert read_data(tmp_path / "f.csv", multi_label=False)[0][0].labels is None


def test_parquet_list_cells_are_sets(tmp_path):
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"image": ["x.png", "y.png"], "text": ["a", "b"], "labels": [["cat", "dog"], ["dog"]]}).to_parquet(
        tmp_path / "m.parquet"
    )
    records, _ = read_data(tmp_path / "m.parquet", need_label=True)
    assert [r.labels for r in records] == [("cat", "dog"), ("dog",)]


def test_a_folder_is_single_label(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(MmfuseError, match="one label an image"):
        read_data(tmp_path, multi_label=True)


def test_the_split_holds_out_every_label_rare_ones_too():
    def rec(i, names):
        return Record(Path(f"{i}.png"), "t", "|".join(names), i + 1, f"{i}.png", labels=tuple(names))

    # "rare" always rides with "common": stratifying by the set's first label would keep it all in train.
    records = [rec(i, ("common", "rare") if i % 10 == 0 else ("common",)) for i in range(100)]
    train, val = stratified_split(records, 0.2, seed=0)
    assert "rare" in label_list(val) and "rare" in label_list(train)
    assert label_list(records) == ["common", "rare"]


# ---------------------------------------------------------------------------------------------------------------------
# A trained run


def test_a_run_records_its_task_thresholds_and_set_scores(run):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["multi_label"] is True and cfg["train"]["metric"] == "micro_f1"
    labels = json.loads((run / "labels.json").read_text())
    assert labels == ["apple", "blue", "red", "train"]
    saved = json.loads((run / multilabel.THRESHOLDS_FILE).read_text())
    assert set(saved["thresholds"]) == set(labels) and saved["fitted_on"] == "validation"
    assert multilabel.THRESHOLDS_FILE in RUN_FILES  # predict --out never writes over it
    result = json.loads((run / "metrics.json").read_text())
    val = result["val"]
    assert {"micro_f1", "macro_f1", "samples_f1", "map", "per_label"} <= set(val)
    assert set(val["per_label"]) == set(labels) and val["thresholds"] == saved["thresholds"]
    assert result["metric"] == {"name": "micro_f1", "value": val["micro_f1"]}
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_micro_f1" in row and "val_map" in row for row in history)  # what the kept epoch was chosen by
    assert not (run / "val_confusion_matrix.png").exists()


def test_sets_and_probabilities_survive_reload_predict_and_evaluate(run, toy, tmp_path):
    images, texts, truth = rows(toy)
    moved = shutil.copytree(run, tmp_path / "moved")  # self-contained: loads from anywhere
    got = mmfuse.load(moved).predict(images, texts)
    thresholds = multilabel.read_thresholds(moved, got.classes)
    assert got.probs.shape == (len(images), 4) and ((got.probs > 0) & (got.probs < 1)).all()
    assert not np.allclose(got.probs.sum(1), 1)  # a sigmoid per label, not a softmax
    expected = [[c for c, p, t in zip(got.classes, row, thresholds.values) if p >= t] for row in got.probs]
    assert got.sets == expected and got.labels == ["|".join(s) for s in expected]
    again = mmfuse.load(moved).predict(images, texts)
    np.testing.assert_allclose(again.probs, got.probs, atol=1e-6)
    assert again.sets == got.sets
    # Thresholds moved by hand move the sets, not the probabilities.
    (moved / multilabel.THRESHOLDS_FILE).write_text(json.dumps({"thresholds": dict.fromkeys(got.classes, 0.999)}))
    assert mmfuse.load(moved).predict(images, texts).sets == [
        [c for c, p in zip(got.classes, r) if p >= 0.999] for r in got.probs
    ]
    shutil.copy(run / multilabel.THRESHOLDS_FILE, moved / multilabel.THRESHOLDS_FILE)
    out = tmp_path / "preds.csv"
    assert main(["predict", str(moved), str(toy / "test.csv"), "--out", str(out)]) == 0
    written = read_csv(out)
    assert list(written[0]) == [
        "row",
        "image",
        "true_labels",
        "correct",
        "labels",
        "p_apple",
        "p_blue",
        "p_red",
        "p_train",
    ]
    assert [r["labels"] for r in written] == got.labels
    assert [r["true_labels"] for r in written] == truth
    np.testing.assert_allclose(
        [[float(r[f"p_{c}"]) for c in got.classes] for r in written], got.probs, atol=1e-4
    )  # cached features vs raw: ~2e-5
    report_dir = tmp_path / "eval"
    assert main(["evaluate", str(moved), str(toy / "test.csv"), "--out", str(report_dir)]) == 0
    report = json.loads((report_dir / "metrics.json").read_text())
    y = np.array([[c in t.split("|") for c in got.classes] for t in truth])
    pred = np.array([[c in s for c in got.classes] for s in got.sets])
    assert report["micro_f1"] == pytest.approx(metrics.multilabel_summary(y, pred)["micro_f1"], abs=1e-6)
    assert report["accuracy"] == pytest.approx(np.mean([a == b for a, b in zip(got.labels, truth)]), abs=1e-6)
    assert {"macro_f1", "samples_f1", "map", "per_label"} <= set(report)
    assert [r["label"] for r in read_csv(report_dir / "per_label.csv")] == got.classes
    wrong = sum(a != b for a, b in zip(got.labels, truth))
    assert len(read_csv(report_dir / "errors.csv")) == wrong
    assert (report_dir / "errors.html").read_text().count("<tr class='error'>") == wrong


def test_serve_answers_sets_and_its_page_shows_them(run, toy, shared_home, monkeypatch):
    fastapi = pytest.importorskip("fastapi.testclient")
    from mmfuse.inference.serve.app import create_app

    monkeypatch.setenv("MMFUSE_HOME", str(shared_home))
    images, texts, _ = rows(toy)
    expected = mmfuse.load(run).predict(images[:4], texts[:4])
    with fastapi.TestClient(create_app(run)) as client:
        end = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end, "the app never became ready"
            time.sleep(0.05)
        info = client.get("/v1/info").json()
        assert info["multi_label"] is True and set(info["thresholds"]) == set(expected.classes)
        with open(images[0], "rb") as f:
            one = client.post("/v1/predict", files={"image": ("x.png", f, "image/png")}, data={"text": texts[0]})
        assert one.status_code == 200, one.text
        assert one.json()["labels"] == expected.sets[0] and one.json()["label"] == expected.labels[0]
        items = [
            {"image": base64.b64encode(Path(im).read_bytes()).decode(), "text": t}
            for im, t in zip(images[:4], texts[:4])
        ]
        answers = client.post("/v1/predict", json={"items": items}).json()["items"]
        assert [a["labels"] for a in answers] == expected.sets
        for a, probs in zip(answers, expected.probs):
            np.testing.assert_allclose([a["probabilities"][c] for c in expected.classes], probs, atol=1e-5)
        page = client.get("/").text
        assert "labels at their thresholds" in page and "out.labels" in page  # the page shows a set as a set


@pytest.mark.slow  # the browser
def test_the_page_shows_the_set_in_a_real_browser(run, toy, shared_home, monkeypatch):
    from conftest import chrome
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import Server

    monkeypatch.setenv("MMFUSE_HOME", str(shared_home))
    images, texts, _ = rows(toy)
    expected = mmfuse.load(run).predict(images[:1], texts[:1])
    server = Server(run)
    driver = chrome(1000, 800)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "submit").is_enabled())
        assert "labels (multi-label)" in driver.find_element(By.ID, "status").text
        driver.find_element(By.ID, "file").send_keys(str(images[0]))
        driver.find_element(By.ID, "text").send_keys(texts[0])
        submit_page(driver, wait)
        assert driver.find_element(By.ID, "label").text == (" · ".join(expected.sets[0]) or "(no label)")
        assert "labels at their thresholds" in driver.find_element(By.ID, "confidence").text
        marked = driver.find_elements(By.CSS_SELECTOR, "#fusion .bar.top .name")
        assert [b.get_attribute("textContent") for b in marked] == expected.sets[0]  # every label of the set
    finally:
        driver.quit()
        assert server.stop() == 0


@pytest.mark.slow  # trains tiny Hugging Face towers and exports them
def test_export_gives_sigmoids_and_its_sets_match_torch(toy, tmp_path, tiny_vit_dir, tiny_roberta_dir):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "hf"
    fast = [x for x in FAST if x not in ("--image-size", "32")]
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir)]
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), *fast, *towers]
    assert main(args) == 0
    assert main(["export", str(run), "--out", str(run / "export")]) == 0
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["multi_label"] is True and info["parity"]["passed"]
    assert info["thresholds"] == json.loads((run / multilabel.THRESHOLDS_FILE).read_text())["thresholds"]
    assert 'info["thresholds"][c]' in (run / "export" / "README.md").read_text()  # its example prints sets
    moved = shutil.copytree(run, tmp_path / "moved")
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert main(["predict", str(moved), str(toy / "test.csv"), "--out", str(torch_csv)]) == 0
    assert main(["predict", str(moved), str(toy / "test.csv"), "--out", str(onnx_csv), "--backend", "onnx"]) == 0
    got, want = read_csv(onnx_csv), read_csv(torch_csv)
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    names = [f"p_{c}" for c in info["classes"]]
    np.testing.assert_allclose(
        [[float(r[n]) for n in names] for r in got], [[float(r[n]) for n in names] for r in want], atol=1e-4
    )
    probs = np.array([[float(r[n]) for n in names] for r in got])
    assert not np.allclose(probs.sum(1), 1)  # sigmoids, not a softmax


def test_a_bag_averages_sigmoids_and_tunes_its_thresholds_out_of_fold(toy, tmp_path):
    out = tmp_path / "bag"
    assert main(["train", str(toy / "all.csv"), "--out", str(out), *FAST, "--bag", "2"]) == 0
    saved = json.loads((out / multilabel.THRESHOLDS_FILE).read_text())
    assert saved["fitted_on"] == "out-of-fold"
    result = json.loads((out / "metrics.json").read_text())
    assert result["val"]["thresholds"] == saved["thresholds"] and result["metric"]["name"] == "micro_f1"
    oof = read_csv(out / "oof_predictions.csv")
    assert len(oof) == result["n_out_of_fold"] == len(read_csv(toy / "all.csv"))
    images, texts, _ = rows(toy)
    bag = mmfuse.load(out).predict(images, texts)
    members = [mmfuse.load(out / "members" / str(i)).predict(images, texts).probs for i in range(2)]
    np.testing.assert_allclose(bag.probs, np.mean(members, 0), atol=1e-5)  # the members' sigmoids averaged
    cut = [saved["thresholds"][c] for c in bag.classes]
    assert bag.sets == [[c for c, p, t in zip(bag.classes, r, cut) if p >= t] for r in bag.probs]


def test_a_checkpoint_of_one_task_does_not_resume_as_the_other():
    from mmfuse.config import RunConfig
    from mmfuse.training.checkpoint import config_fingerprint

    cfg = RunConfig()  # at the defaults the new settings leave the fingerprint as it was (test_imbalance_metric)
    assert config_fingerprint(cfg.updated({"data": {"multi_label": True}})) != config_fingerprint(cfg)


def test_a_multiclass_run_is_unchanged(head_run):
    assert not (head_run / multilabel.THRESHOLDS_FILE).exists()
    assert yaml.safe_load((head_run / "config.yaml").read_text())["data"]["multi_label"] is False
    loaded = mmfuse.load(head_run)
    assert loaded.thresholds is None and not loaded.multi_label
    got = loaded.predict([], [])  # no rows: still a single-label Prediction
    assert got.sets is None and got.probs.shape == (0, len(loaded.classes))


# ---------------------------------------------------------------------------------------------------------------------
# What does not apply, or does not handle sets yet


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        ([*FAST, "--metric", "roc_auc"], "scores a binary task"),
        ([*FAST, "--balanced-sampling"], "--balanced-sampling"),
        ([*FAST, "--label-smoothing", "0.1"], "--label-smoothing"),
    ],
)
def test_what_does_not_handle_sets_says_so(toy, tmp_path, capsys, flags, says):
    args = ["train", str(toy / "train.csv"), "--out", str(tmp_path / "r"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_every_metric_a_multi_label_run_takes_picks_its_epoch(toy, tmp_path):
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), *FAST]
    for metric in ("map", "log_loss", "macro_f1"):
        out = tmp_path / metric
        assert main([*args, "--out", str(out), "--metric", metric]) == 0
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(f"val_{metric}" in row for row in history)
        assert json.loads((out / "metrics.json").read_text())["metric"]["name"] == metric


def test_the_task_follows_the_data_or_the_flag_not_a_reused_config(run, toy_manifest, tmp_path):
    args = ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), *FAST]
    # A multi-label run's config.yaml on single-label data: the data decides, and it is single-label.
    assert main([*args, "--out", str(tmp_path / "reused"), "--config", str(run / "config.yaml")]) == 0
    cfg = yaml.safe_load((tmp_path / "reused" / "config.yaml").read_text())
    assert cfg["data"]["multi_label"] is False and cfg["train"]["metric"] == "weighted_f1"
    assert not (tmp_path / "reused" / multilabel.THRESHOLDS_FILE).exists()
    # --multi-label reads the label column as sets (of one label here): a sigmoid per label.
    assert main([*args, "--out", str(tmp_path / "forced"), "--multi-label"]) == 0
    assert yaml.safe_load((tmp_path / "forced" / "config.yaml").read_text())["data"]["multi_label"] is True
    assert (tmp_path / "forced" / multilabel.THRESHOLDS_FILE).exists()


def test_set_metrics_on_single_label_data_say_so(toy_manifest, tmp_path, capsys):
    args = ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), *FAST]
    assert main([*args, "--out", str(tmp_path / "a"), "--metric", "map"]) == 2
    assert "scores multi-label data" in capsys.readouterr().err


def test_the_default_ensemble_selects_on_out_of_fold_sets(toy, tmp_path):
    out = tmp_path / "ens"
    # The probes alone (--time-limit 1s): one-vs-rest logistic regressions, each a bag on the ensemble's folds.
    args = ["train", str(toy / "all.csv"), "--out", str(out), "--image-size", "32", "--bag", "2", "--time-limit", "1s"]
    assert main([*args, "--preset", "ensemble"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["ensemble"] and result["metric"]["name"] == "micro_f1"
    saved = json.loads((out / multilabel.THRESHOLDS_FILE).read_text())
    assert saved["fitted_on"] == "out-of-fold" and result["val"]["thresholds"] == saved["thresholds"]
    board = read_csv(out / "leaderboard.csv")
    assert {r["name"] for r in board} >= {"probe-image", "probe-text", "probe-both", "ensemble"}
    assert "oof_micro_f1" in board[0]  # the column selection maximised
    # Members and blend are scored alike, at thresholds chosen on their own out-of-fold rows: never below the best.
    assert float(board[-1]["oof_micro_f1"]) >= max(float(r["oof_micro_f1"]) for r in board[:-1])
    images, texts, truth = rows(toy)
    got = mmfuse.load(out).predict(images, texts)
    assert not np.allclose(got.probs.sum(1), 1)  # blended sigmoids
    weights = json.loads((out / "ensemble.json").read_text())["members"]
    parts = [w["weight"] * mmfuse.load(out / w["dir"]).predict(images, texts).probs for w in weights]
    np.testing.assert_allclose(got.probs, np.sum(parts, 0), atol=1e-5)
    cut = [saved["thresholds"][c] for c in got.classes]
    assert got.sets == [[c for c, p, t in zip(got.classes, r, cut) if p >= t] for r in got.probs]
    assert np.mean([a == b for a, b in zip(got.labels, truth)]) > 0.8  # the probes learn the toy sets


def test_search_scores_trials_by_micro_f1(toy, tmp_path):
    out = tmp_path / "search"
    args = ["search", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(out), "--trials", "1"]
    assert main([*args, *FAST]) == 0
    board = read_csv(out / "leaderboard.csv")
    assert "val_micro_f1" in board[0] and board[0]["state"] == "complete"
    assert yaml.safe_load((out / "best.yaml").read_text())["train"]["metric"] == "micro_f1"


def test_ablate_scores_each_arm_on_sets(toy, tmp_path):
    args = ["ablate", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(tmp_path / "a")]
    assert main([*args, "--test", str(toy / "test.csv"), "--image-size", "32", "--epochs", "2"]) == 0
    results = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert set(results) == {"image", "text", "fusion"}
    for arm in results.values():
        assert {"micro_f1", "samples_f1", "map", "macro_f1"} <= set(arm) and arm["evaluated_on"] == "test"
        assert json.loads((Path(arm["run_dir"]) / "eval" / "metrics.json").read_text())["micro_f1"] == arm["micro_f1"]


def test_selection_scores_a_blend_at_the_thresholds_the_ensemble_will_use(rng):
    y = (rng.random((200, 3)) < 0.3).astype(np.float32)
    # A ranks every label perfectly, its probabilities all below 0.5; B is right on 80% of decisions, cut at 0.5.
    ranks = 0.1 + 0.3 * y + 0.05 * rng.random(y.shape)
    noisy = np.where(rng.random(y.shape) < 0.8, y, 1 - y) * 0.6 + 0.2
    at_half = selection.select([ranks, noisy], y, metric="micro_f1")
    assert at_half.member_scores[0][0] == 0.0 and at_half.score < 1.0  # at 0.5, A alone calls nothing
    tuned = selection.select([ranks, noisy], y, metric="micro_f1", cut="auto")
    assert tuned.weights.tolist() == [1.0, 0.0] and tuned.score == 1.0
    assert tuned.member_scores[0][0] == 1.0 > tuned.member_scores[1][0]
    fixed = selection.select([ranks, noisy], y, metric="micro_f1", cut=0.3)  # a fixed --threshold, as set
    assert fixed.score == 1.0 and fixed.weights[0] == 1.0
