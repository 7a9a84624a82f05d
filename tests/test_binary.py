"""Binary tasks: the positive class (the minority one, or --positive), roc_auc and pr_auc, and the threshold on the
positive probability, chosen on held-out rows (or fixed) and applied wherever probabilities become labels."""

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TOY, read_csv, write_csv, write_toy

import mmfuse
from mmfuse import binary, metrics
from mmfuse.cli import main
from mmfuse.errors import MmfuseError
from mmfuse.inference.export.runtime import OnnxPredictor
from mmfuse.inference.stream import prediction_rows
from mmfuse.parsing import parse_threshold
from mmfuse.rundir.layout import RUN_FILES

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]
POSITIVE = "red-apple"  # a quarter of the toy rows: the binary task is "is it a red apple?"

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' features, embedded once a session


def f1_at(p: np.ndarray, hit: np.ndarray, t: float) -> float:
    called = p >= t
    return 2 * (hit & called).sum() / max(hit.sum() + called.sum(), 1)


def skewed(n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """5% positives whose probabilities run low: a model that rarely says positive with confidence above 0.5."""
    hit = rng.random(n) < 0.05
    score = rng.normal(0, 1, n) + 2.0 * hit
    return 1 / (1 + np.exp(-(score - 3.5))), hit


# ---------------------------------------------------------------------------------------------------------------------
# The numbers


def test_a_threshold_tuned_on_held_out_rows_beats_one_half_on_new_rows(rng):
    p_val, hit_val = skewed(4000, rng)
    p_test, hit_test = skewed(4000, rng)
    t = binary.choose_threshold(p_val, hit_val)
    assert t < 0.5
    assert f1_at(p_test, hit_test, t) > f1_at(p_test, hit_test, 0.5) + 0.1
    # It is the best cut on the rows it was chosen on.
    assert f1_at(p_val, hit_val, t) >= max(f1_at(p_val, hit_val, c) for c in np.linspace(0.01, 0.99, 99))


def test_choose_threshold_by_hand_and_without_positives():
    p = np.array([0.9, 0.8, 0.4, 0.3, 0.1])
    hit = np.array([True, False, True, False, False])
    assert binary.choose_threshold(p, hit) == pytest.approx(0.35)  # halfway between 0.4 and 0.3: F1 0.8
    assert binary.choose_threshold(p, np.zeros(5, bool)) == 0.5


def test_predicted_applies_the_threshold_to_the_positive_column_and_argmax_without_one():
    probs = np.array([[0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])
    decision = binary.Decision("yes", 0.25)
    np.testing.assert_array_equal(binary.predicted(probs, ["no", "yes"], decision), [1, 0, 1])
    np.testing.assert_array_equal(binary.predicted(probs, ["yes", "no"], decision), [0, 0, 1])  # yes is column 0
    np.testing.assert_array_equal(binary.predicted(probs, ["no", "yes"], None), [0, 0, 1])


def test_roc_auc_and_pr_auc_match_scikit_learn(rng):
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = (rng.random(200) < 0.2).astype(int)
    p1 = np.clip(rng.random(200) * 0.6 + 0.4 * y, 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    assert metrics.score("roc_auc", y, probs) == pytest.approx(roc_auc_score(y, p1))
    assert metrics.score("pr_auc", y, probs) == pytest.approx(average_precision_score(y, p1))  # minority: 1
    assert metrics.score("pr_auc", y, probs, positive=0) == pytest.approx(average_precision_score(1 - y, 1 - p1))
    assert metrics.metric("roc_auc").higher_is_better and metrics.metric("pr_auc").higher_is_better


def test_the_minority_class_is_positive_ties_go_to_the_second_and_positive_overrides():
    assert binary.resolve_positive(["no", "yes"], {"no": 90, "yes": 10}, None) == "yes"
    assert binary.resolve_positive(["a", "b"], {"a": 5, "b": 50}, None) == "a"
    assert binary.resolve_positive(["a", "b"], {"a": 7, "b": 7}, None) == "b"
    assert binary.resolve_positive(["no", "yes"], {"no": 90, "yes": 10}, "no") == "no"
    assert binary.resolve_positive(["a", "b", "c"], {"a": 1, "b": 2, "c": 3}, None) is None
    with pytest.raises(MmfuseError, match="'maybe' is not a class.*'no' and 'yes'"):
        binary.resolve_positive(["no", "yes"], {}, "maybe")
    with pytest.raises(MmfuseError, match="3 classes"):
        binary.resolve_positive(["a", "b", "c"], {}, "a")


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.2", "nan", "half", ""])
def test_a_threshold_is_auto_or_a_probability_strictly_inside_zero_one(bad):
    assert parse_threshold("auto") is None and parse_threshold("0.3") == 0.3
    with pytest.raises(MmfuseError, match="--threshold must be auto or a probability"):
        parse_threshold(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Runs


def binary_toy(root: Path, positive: str = POSITIVE) -> Path:
    """The toy data with each label turned into yes (a red apple: a quarter of the rows) or no."""
    toy = write_toy(root, **TOY)
    for split in ("train", "val", "test", "all"):
        rows = read_csv(toy / f"{split}.csv")
        for r in rows:
            r["label"] = "yes" if r["label"] == positive else "no"
        write_csv(toy / f"{split}.csv", rows)
    return toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return binary_toy(tmp_path_factory.mktemp("binary-data") / "toy")


def train(toy: Path, run: Path, *extra: str, home: Path | None = None, fast: list[str] = FAST) -> Path:
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), *fast, *extra]
    with pytest.MonkeyPatch.context() as mp:
        if home is not None:
            mp.setenv("MMFUSE_HOME", str(home))
        assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def run(toy, shared_home, tmp_path_factory):
    return train(toy, tmp_path_factory.mktemp("binary-run") / "run", home=shared_home)


def rows(toy: Path, split: str = "test") -> tuple[list[Path], list[str], list[str]]:
    found = read_csv(toy / f"{split}.csv")
    return [toy / r["image"] for r in found], [r["text"] for r in found], [r["label"] for r in found]


def with_threshold(run: Path, where: Path, t: float) -> Path:
    """A copy of ``run`` whose threshold.json says ``t`` (a threshold far from the one chosen, so labels move)."""
    copy = shutil.copytree(run, where)
    saved = json.loads((copy / binary.THRESHOLD_FILE).read_text())
    (copy / binary.THRESHOLD_FILE).write_text(json.dumps({**saved, "threshold": t}))
    return copy


def test_a_binary_run_records_its_positive_class_threshold_and_scores(run):
    result = json.loads((run / "metrics.json").read_text())
    val = result["val"]
    assert {"roc_auc", "pr_auc", "positive_f1", "positive", "threshold"} <= set(val)
    assert val["positive"] == result["positive"] == "yes" and 0 < result["threshold"] < 1
    assert result["metric"]["name"] == "roc_auc"  # a binary run's default --metric
    saved = json.loads((run / binary.THRESHOLD_FILE).read_text())
    assert saved == {"positive": "yes", "threshold": result["threshold"], "chosen": "auto", "fitted_on": "validation"}
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["positive"] == "yes"
    assert binary.THRESHOLD_FILE in RUN_FILES  # predict --out never writes over it
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_roc_auc" in row for row in history)  # what the kept epoch was chosen by


def test_predicted_labels_use_the_stored_threshold_through_the_api_predict_and_evaluate(run, toy, tmp_path):
    images, texts, labels = rows(toy)
    chosen = mmfuse.load(run).predict(images, texts)
    yes = chosen.probs[:, chosen.classes.index("yes")]
    assert chosen.labels == [
        "yes" if p >= json.loads((run / "metrics.json").read_text())["threshold"] else "no" for p in yes
    ]
    for t in (0.02, 0.98):  # far enough from the chosen threshold that the labels differ from it
        moved = with_threshold(run, tmp_path / f"t{t}", t)
        predictor = mmfuse.load(moved)
        got = predictor.predict(images, texts)
        yes = got.probs[:, got.classes.index("yes")]
        assert got.labels == ["yes" if p >= t else "no" for p in yes]
        np.testing.assert_array_equal(got.probs, chosen.probs)  # the probabilities themselves are unchanged
        assert mmfuse.load(moved).predict(images, texts).labels == got.labels  # survives a reload
        out = tmp_path / f"p{t}.csv"
        assert main(["predict", str(moved), str(toy / "test.csv"), "--out", str(out)]) == 0
        assert [r["label"] for r in read_csv(out)] == got.labels
        assert main(["evaluate", str(moved), str(toy / "test.csv"), "--out", str(tmp_path / f"eval{t}")]) == 0
        report = json.loads((tmp_path / f"eval{t}" / "metrics.json").read_text())
        right = sum(a == b for a, b in zip(got.labels, labels))
        assert report["accuracy"] == pytest.approx(right / len(labels))
        assert report["threshold"] == t and report["positive"] == "yes"
    low, high = (mmfuse.load(tmp_path / f"t{t}").predict(images, texts).labels for t in (0.02, 0.98))
    assert low.count("yes") > high.count("yes")  # the threshold, not the argmax, made the labels


def test_evaluate_writes_the_curves_and_the_error_page_shows_them(run, toy, tmp_path):
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), str(toy / "test.csv"), "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert {"roc_auc", "pr_auc", "positive_f1", "positive", "threshold"} <= set(report)
    assert report["threshold"] == json.loads((run / "metrics.json").read_text())["threshold"]
    assert (out / "roc.png").stat().st_size > 1000 and (out / "pr.png").stat().st_size > 1000
    page = (out / "errors.html").read_text()
    assert "ROC curve" in page and "precision-recall curve" in page and "positive class yes" in page


def test_positive_and_a_fixed_threshold_are_kept(toy, tmp_path):
    run = train(toy, tmp_path / "run", "--positive", "no", "--threshold", "0.3", "--metric", "pr_auc")
    result = json.loads((run / "metrics.json").read_text())
    assert result["positive"] == "no" and result["threshold"] == 0.3 and result["metric"]["name"] == "pr_auc"
    assert json.loads((run / binary.THRESHOLD_FILE).read_text())["chosen"] == "fixed"
    images, texts, _ = rows(toy)
    got = mmfuse.load(run).predict(images, texts)
    assert got.labels == ["no" if p >= 0.3 else "yes" for p in got.probs[:, got.classes.index("no")]]


def test_a_bag_chooses_its_threshold_out_of_fold(toy, tmp_path):
    args = ["train", str(toy / "all.csv"), "--out", str(tmp_path / "bag"), *FAST, "--bag", "2"]
    assert main(args) == 0
    result = json.loads((tmp_path / "bag" / "metrics.json").read_text())
    assert result["positive"] == "yes" and result["metric"]["name"] == "roc_auc"
    saved = json.loads((tmp_path / "bag" / binary.THRESHOLD_FILE).read_text())
    assert saved["fitted_on"] == "out-of-fold" and saved["threshold"] == result["val"]["threshold"]
    for member in ("0", "1"):  # the bag's positive class, not one each member would derive from its own rows
        cfg = yaml.safe_load((tmp_path / "bag" / "members" / member / "config.yaml").read_text())
        assert cfg["train"]["positive"] == "yes" and cfg["train"]["metric"] == "roc_auc"
    images, texts, _ = rows(toy)
    got = mmfuse.load(tmp_path / "bag").predict(images, texts)
    assert got.labels == ["yes" if p >= saved["threshold"] else "no" for p in got.probs[:, got.classes.index("yes")]]


def test_the_validation_report_and_the_out_of_fold_labels_are_at_the_threshold(toy, tmp_path):
    # A fixed cut far above one half: a report at the argmax would call more rows yes than the run predicts.
    run = train(toy, tmp_path / "run", "--threshold", "0.95")
    result = json.loads((run / "metrics.json").read_text())
    val = read_csv(toy / "val.csv")
    got = mmfuse.load(run).predict([toy / r["image"] for r in val], [r["text"] for r in val])
    classes = got.classes
    y = np.array([classes.index(r["label"]) for r in val])
    at_threshold = metrics.full_report(y, np.array([classes.index(x) for x in got.labels]), classes)
    argmax = metrics.full_report(y, got.probs.argmax(1), classes)
    assert at_threshold["confusion_matrix"] != argmax["confusion_matrix"]  # the cut moves some rows here
    assert result["val"]["confusion_matrix"] == at_threshold["confusion_matrix"]
    assert result["val"]["weighted_f1"] == pytest.approx(at_threshold["weighted_f1"])
    cm, pos = np.array(result["val"]["confusion_matrix"]), classes.index("yes")
    assert result["val"]["positive_f1"] == pytest.approx(2 * cm[pos, pos] / (cm[pos].sum() + cm[:, pos].sum()))
    bag = tmp_path / "bag"
    assert main(["train", str(toy / "all.csv"), "--out", str(bag), *FAST, "--bag", "2", "--threshold", "0.95"]) == 0
    oof = read_csv(bag / "oof_predictions.csv")
    assert [r["predicted"] for r in oof] == ["yes" if float(r["p_yes"]) >= 0.95 else "no" for r in oof]
    hit, called = [r["label"] == "yes" for r in oof], [r["predicted"] == "yes" for r in oof]
    tp = sum(a and b for a, b in zip(hit, called))
    bagged = json.loads((bag / "metrics.json").read_text())["val"]
    assert bagged["positive_f1"] == pytest.approx(2 * tp / (sum(hit) + sum(called)))
    assert np.array(bagged["confusion_matrix"])[:, pos].sum() == sum(called)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--positive", "maybe"], "'maybe' is not a class"),
        (["--threshold", "1.5"], "--threshold must be auto or a probability"),
        (["--threshold", "0"], "--threshold must be auto or a probability"),
    ],
)
def test_bad_positive_or_threshold_is_a_clear_error(toy, tmp_path, capsys, flags, says):
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(tmp_path / "r"), *FAST]
    assert main([*args, *flags]) == 2
    assert says in capsys.readouterr().err


def test_positive_or_a_binary_metric_with_more_than_two_classes_is_a_clear_error(toy_manifest, tmp_path, capsys):
    args = ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), *FAST]
    assert main([*args, "--out", str(tmp_path / "a"), "--positive", "red-apple"]) == 2
    assert "4 classes" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--metric", "roc_auc"]) == 2
    assert "scores a binary task" in capsys.readouterr().err


def test_a_multiclass_run_is_unchanged(head_run, toy_data):
    assert not (head_run / binary.THRESHOLD_FILE).exists()
    result = json.loads((head_run / "metrics.json").read_text())
    assert "positive" not in result and "threshold" not in result and "roc_auc" not in result["val"]
    assert result["metric"]["name"] == "weighted_f1"
    images, texts, _ = rows(toy_data)
    predictor = mmfuse.load(head_run)
    got = predictor.predict(images, texts)
    assert predictor.decision is None and got.labels == [got.classes[i] for i in got.probs.argmax(1)]


def test_the_onnx_backend_applies_the_stored_threshold(toy, tmp_path, tiny_vit_dir, tiny_roberta_dir):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "hf"
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir)]
    train(toy, run, *towers, fast=[x for x in FAST if x not in ("--image-size", "32")])
    assert main(["export", str(run), "--out", str(run / "export")]) == 0
    # export.json records the positive class and the threshold; the graph alone (no run given) cuts there too.
    info = json.loads((run / "export" / "export.json").read_text())
    saved = json.loads((run / binary.THRESHOLD_FILE).read_text())
    assert info["positive"] == saved["positive"] == "yes" and info["threshold"] == saved["threshold"]
    alone = OnnxPredictor(run / "export")
    assert alone.decision == binary.Decision("yes", saved["threshold"])
    records = mmfuse.load(run).load_data(toy / "test.csv")
    probs = alone.predict_records(records)
    want = ["yes" if p >= saved["threshold"] else "no" for p in probs[:, alone.classes.index("yes")]]
    assert [r[2] for r in prediction_rows(records, probs, alone.classes, False, alone.decision)] == want
    # The README's example prints the labels at the threshold too: its last lines, run on these probabilities.
    code = re.search(r"```python\n(import json\n.*?)```", (run / "export" / "README.md").read_text(), re.S).group(1)
    compile(code, "README.md", "exec")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code[code.index("pos = ") :], {"info": info, "probs": probs})
    assert printed.getvalue().startswith(repr(want))
    moved = with_threshold(run, tmp_path / "moved", 0.98)  # far from the chosen one: most labels become no
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert main(["predict", str(moved), str(toy / "test.csv"), "--out", str(torch_csv)]) == 0
    assert main(["predict", str(moved), str(toy / "test.csv"), "--out", str(onnx_csv), "--backend", "onnx"]) == 0
    got = read_csv(onnx_csv)
    assert [r["label"] for r in got] == [r["label"] for r in read_csv(torch_csv)]
    assert [r["label"] for r in got] == ["yes" if float(r["p_yes"]) >= 0.98 else "no" for r in got]


def test_the_default_ensemble_chooses_by_roc_auc_and_its_threshold_out_of_fold(toy, tmp_path):
    out = tmp_path / "ens"
    args = ["train", str(toy / "all.csv"), "--out", str(out), "--image-size", "32", "--bag", "2"]
    assert main([*args, "--preset", "ensemble", "--time-limit", "1s", "--calibrate"]) == 0  # the probes alone
    result = json.loads((out / "metrics.json").read_text())
    assert (
        result["metric"]["name"] == "roc_auc" and json.loads((out / "ensemble.json").read_text())["metric"] == "roc_auc"
    )
    assert {"roc_auc", "pr_auc", "positive_f1"} <= set(result["val"]) and result["positive"] == "yes"
    saved = json.loads((out / binary.THRESHOLD_FILE).read_text())
    assert saved["fitted_on"] == "out-of-fold" and saved["threshold"] == result["threshold"]
    images, texts, _ = rows(toy)
    got = mmfuse.load(out).predict(images, texts)  # calibrated probabilities, cut at the threshold
    assert got.labels == ["yes" if p >= saved["threshold"] else "no" for p in got.probs[:, got.classes.index("yes")]]


def test_serve_answers_with_the_threshold():
    from mmfuse.inference.serve.requests import answer

    probs, classes = np.array([0.7, 0.3], dtype=np.float32), ["no", "yes"]
    got = answer(probs, classes, binary.Decision("yes", 0.25))
    assert got["label"] == "yes" and got["confidence"] == pytest.approx(0.3)
    assert got["probabilities"] == {"no": pytest.approx(0.7), "yes": pytest.approx(0.3)}
    assert answer(probs, classes)["label"] == "no"  # a run without a threshold: the argmax


def test_a_binary_runs_config_reused_on_more_classes_drops_its_positive_class(run, toy_manifest, tmp_path):
    out = tmp_path / "multi"
    args = ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), "--out", str(out)]
    assert main([*args, "--config", str(run / "config.yaml")]) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["metric"]["name"] == "weighted_f1" and "threshold" not in result
    assert not (out / binary.THRESHOLD_FILE).exists()
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["positive"] is None


def test_a_config_file_may_write_the_threshold_as_a_number(tmp_path):
    from mmfuse.config import RunConfig

    (tmp_path / "c.yaml").write_text("train:\n  threshold: 0.3\n")
    assert RunConfig.from_yaml(tmp_path / "c.yaml").train.threshold == "0.3"
    (tmp_path / "c.yaml").write_text("train:\n  threshold: 1.5\n")
    with pytest.raises(MmfuseError, match="threshold"):
        RunConfig.from_yaml(tmp_path / "c.yaml")
