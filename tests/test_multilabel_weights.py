"""Multi-label runs with --class-weight (each label's pos_weight in its binary cross-entropy) and --calibrate (one
temperature on the sigmoids, the per-label thresholds chosen after it), in a single run, a bag and an ensemble."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY, read_csv, write_csv, write_toy

import mmfuse
from mmfuse import metrics, multilabel
from mmfuse.calibration import calibrate, scale_sigmoids
from mmfuse.cli import main
from mmfuse.data.records import Record
from mmfuse.rundir.layout import CALIBRATION_FILE
from mmfuse.training.portfolio import one_vs_rest, per_label_weights
from mmfuse.training.prep import MAX_POS_WEIGHT, class_weights

FAST = ["--tune", "head", "--image-size", "32", "--batch-size", "8"]
RARE = {"train": 4, "val": 3, "test": 3, "all": 6}  # the red apples kept of each split's 16 / 4 or so

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' features, embedded once a session


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def skewed_toy(root: Path) -> Path:
    """The toy as label sets (colour|thing; a red train only a train), with most red apples dropped: "red" is then
    the label of about one row in nine, the others of half the rows."""
    toy = write_toy(root, **TOY)
    for split in ("train", "val", "test", "all"):
        kept, reds = [], 0
        for r in read_csv(toy / f"{split}.csv"):
            color, thing = r["label"].split("-")
            r["labels"] = thing if r["label"] == "red-train" else f"{color}|{thing}"
            reds += r["label"] == "red-apple"
            if r["label"] != "red-apple" or reds <= RARE[split]:
                kept.append(r)
        write_csv(toy / f"{split}.csv", kept, ("image", "text", "labels"))
    return toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return skewed_toy(tmp_path_factory.mktemp("skewed-multilabel") / "toy")


def sets(toy: Path, split: str) -> list[Record]:
    rows = read_csv(toy / f"{split}.csv")
    return [Record("", "", r["labels"], i, "", labels=tuple(r["labels"].split("|"))) for i, r in enumerate(rows)]


def train(toy: Path, out: Path, *extra: str) -> dict:
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(out), *FAST, *extra]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# --class-weight


def test_balanced_pos_weights_are_negatives_over_positives_capped_and_named_ones_default_to_one():
    labels = ["common", "rare", "everywhere", "nowhere"]
    rows = [("common", "everywhere")] * 6 + [("common", "rare", "everywhere")] + [("everywhere",)] * 3
    records = [Record("", "", "|".join(s), i, "", labels=s) for i, s in enumerate(rows)]
    got = class_weights("balanced", labels, records, multi_label=True)
    # common: 7 of 10 rows; rare: 1 of 10; every row and no row hold the last two: nothing to balance.
    assert got == {"common": pytest.approx(3 / 7), "rare": pytest.approx(9.0), "everywhere": 1.0, "nowhere": 1.0}
    many = [Record("", "", "x", i, "", labels=("common",) if i else ("common", "rare")) for i in range(1000)]
    assert (
        class_weights("balanced", ["common", "rare"], many, multi_label=True)["rare"] == MAX_POS_WEIGHT
    )  # 999 without the cap
    assert class_weights("rare=4", labels, records, multi_label=True) == {
        "common": 1.0,
        "rare": 4.0,
        "everywhere": 1.0,
        "nowhere": 1.0,
    }


def test_the_probe_gives_each_label_its_class_weight(rng):
    x = rng.normal(size=(200, 3))
    y = np.stack([x[:, 0] > 1.5, x[:, 1] > 0], 1).astype(np.float32)  # label 0 on 7% of the rows
    weights = per_label_weights("balanced", ["rare", "half"], {"rare": 13.0, "half": 1.0})
    assert weights == ["balanced", "balanced"]
    named = per_label_weights("rare=5", ["rare", "half"], {"rare": 5.0, "half": 1.0})
    assert named == [{0: 1.0, 1: 5.0}, {0: 1.0, 1: 1.0}]
    plain, weighted = one_vs_rest(x, y)[:2], one_vs_rest(x, y, weights)[:2]
    recall = [((x @ c[0] + b[0] >= 0) & (y[:, 0] > 0)).sum() / y[:, 0].sum() for c, b in (plain, weighted)]
    assert recall[1] > recall[0]


def test_balanced_raises_the_rare_labels_recall_and_the_run_records_its_weights(toy, tmp_path):
    # One epoch at a fixed cut of 0.5: unweighted, the head has not yet learned to call the rare label.
    plain = train(toy, tmp_path / "plain", "--epochs", "1", "--threshold", "0.5")
    balanced = train(toy, tmp_path / "balanced", "--epochs", "1", "--threshold", "0.5", "--class-weight", "balanced")
    assert balanced["val"]["per_label"]["red"]["recall"] > plain["val"]["per_label"]["red"]["recall"]
    n = len(read_csv(toy / "train.csv"))
    assert "class_weight" not in plain
    assert balanced["class_weight"]["red"] == pytest.approx((n - RARE["train"]) / RARE["train"])
    named = train(toy, tmp_path / "named", "--epochs", "1", "--class-weight", "red=3")
    assert named["class_weight"] == {"apple": 1.0, "blue": 1.0, "red": 3.0, "train": 1.0}


def test_a_bag_and_an_ensemble_weigh_their_members(toy, tmp_path):
    bag = tmp_path / "bag"
    args = ["train", str(toy / "all.csv"), "--out", str(bag), *FAST, "--epochs", "1", "--bag", "2"]
    assert main([*args, "--class-weight", "balanced"]) == 0
    n = len(read_csv(toy / "all.csv"))
    assert json.loads((bag / "metrics.json").read_text())["class_weight"]["red"] == pytest.approx((n - 6) / 6)
    member = json.loads((bag / "members" / "0" / "metrics.json").read_text())["class_weight"]
    assert member["red"] > 1 and member["blue"] < 1  # each member's own, on its folds
    ens = tmp_path / "ens"
    args = ["train", str(toy / "all.csv"), "--out", str(ens), "--image-size", "32", "--bag", "2", "--time-limit", "1s"]
    assert main([*args, "--preset", "ensemble", "--class-weight", "balanced"]) == 0  # the probes alone
    assert json.loads((ens / "metrics.json").read_text())["class_weight"]["red"] == pytest.approx((n - 6) / 6)


# ---------------------------------------------------------------------------------------------------------------------
# --calibrate


def overconfident(n: int = 3000, labels: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label sets drawn from sigmoid(z) (so sigmoid(z) is calibrated), and a model that says sigmoid(4 z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-0.5, 1.5, (n, labels))
    y = (rng.random((n, labels)) < sigmoid(z)).astype(np.float32)
    return sigmoid(4 * z).astype(np.float32), y


def test_one_temperature_on_the_sigmoids_recovers_the_overconfidence_and_lowers_the_ece():
    probs, y = overconfident()
    cal = calibrate(probs, y, "validation")
    assert cal.temperature == pytest.approx(4.0, rel=0.15)
    report = cal.report()
    assert report["ece_after"] < report["ece_before"] / 3 and report["ece_after"] < 0.03
    assert report["nll_after"] < report["nll_before"] and report["ece_over"] == "every (row, label) pair"
    open_ = probs < 1  # a sigmoid saturated in float32 has no logit left to divide
    z = np.log(probs[open_]) - np.log1p(-probs[open_])
    np.testing.assert_allclose(cal.calibrated[open_], sigmoid(z / cal.temperature), atol=1e-5)  # sigmoid(logits / T)
    assert scale_sigmoids(probs, 1.0) is probs


def test_the_multi_label_ece_is_over_every_row_label_pair():
    # Four pairs at 0.9 (two hold the label), four at 0.2 (one does): |0.5 - 0.9| / 2 + |0.25 - 0.2| / 2.
    probs = np.array([[0.9, 0.2], [0.9, 0.2], [0.9, 0.2], [0.9, 0.2]])
    y = np.array([[1, 1], [1, 0], [0, 0], [0, 0]])
    assert metrics.expected_calibration_error(probs, y) == pytest.approx(0.225)


@pytest.fixture(scope="module")
def calibrated(toy, module_home, tmp_path_factory):
    out = tmp_path_factory.mktemp("multilabel-calibrated") / "run"
    train(toy, out, "--epochs", "3", "--calibrate")
    return out


def test_a_calibrated_run_records_its_temperature_and_chooses_its_thresholds_after_it(calibrated, toy, tmp_path):
    result = json.loads((calibrated / "metrics.json").read_text())
    cal = result["calibration"]
    assert cal == json.loads((calibrated / CALIBRATION_FILE).read_text()) and cal["fitted_on"] == "validation"
    assert cal["n"] == result["n_val"] and cal["ece_over"] == "every (row, label) pair"
    assert (calibrated / "reliability.png").stat().st_size > 1000
    # Predict serves sigmoid(logits / T): a copy without calibration.json gives sigmoid(logits).
    raw = shutil.copytree(calibrated, tmp_path / "raw")
    (raw / CALIBRATION_FILE).unlink()
    val = read_csv(toy / "val.csv")
    images, texts = [toy / r["image"] for r in val], [r["text"] for r in val]
    got, before = mmfuse.load(calibrated).predict(images, texts), mmfuse.load(raw).predict(images, texts)
    np.testing.assert_allclose(got.probs, scale_sigmoids(before.probs, cal["temperature"]), atol=1e-5)
    # The thresholds are those chosen on the calibrated validation probabilities, not on the raw ones.
    y = multilabel.targets(sets(toy, "val"), got.classes)
    saved = multilabel.read_thresholds(calibrated, got.classes).values
    np.testing.assert_allclose(saved, multilabel.choose_thresholds(got.probs, y).values, atol=1e-5)
    assert got.sets == [[c for c, p, t in zip(got.classes, r, saved) if p >= t] for r in got.probs]
    report = tmp_path / "eval"
    assert main(["evaluate", str(calibrated), str(toy / "val.csv"), "--out", str(report)]) == 0
    evaluated = json.loads((report / "metrics.json").read_text())
    assert evaluated["temperature"] == cal["temperature"]
    assert evaluated["ece"] == pytest.approx(cal["ece_after"], abs=1e-3)  # the rows it was fitted on


def test_a_bag_and_an_ensemble_calibrate_their_sigmoids_out_of_fold(toy, tmp_path):
    bag = tmp_path / "bag"
    assert (
        main(["train", str(toy / "all.csv"), "--out", str(bag), *FAST, "--epochs", "2", "--bag", "2", "--calibrate"])
        == 0
    )
    result = json.loads((bag / "metrics.json").read_text())
    cal = result["calibration"]
    assert cal["fitted_on"] == "out-of-fold" and cal["n"] == result["n_out_of_fold"]
    assert not (bag / "members" / "0" / CALIBRATION_FILE).exists()  # the bag's alone
    test = read_csv(toy / "test.csv")
    images, texts = [toy / r["image"] for r in test], [r["text"] for r in test]
    members = np.mean([mmfuse.load(bag / "members" / str(k)).predict(images, texts).probs for k in range(2)], 0)
    got = mmfuse.load(bag).predict(images, texts)
    np.testing.assert_allclose(got.probs, scale_sigmoids(members, cal["temperature"]), atol=1e-5)
    # The thresholds: chosen on the calibrated out-of-fold probabilities (oof_predictions.csv keeps the raw ones).
    oof = read_csv(bag / "oof_predictions.csv")
    raw = np.array([[float(r[f"p_{c}"]) for c in got.classes] for r in oof], dtype=np.float32)
    y = multilabel.targets(sets(toy, "all"), got.classes)
    chosen = multilabel.choose_thresholds(scale_sigmoids(raw, cal["temperature"]), y).values
    np.testing.assert_allclose(multilabel.read_thresholds(bag, got.classes).values, chosen, atol=1e-5)
    ens = tmp_path / "ens"
    args = ["train", str(toy / "all.csv"), "--out", str(ens), "--image-size", "32", "--bag", "2", "--time-limit", "1s"]
    assert main([*args, "--preset", "ensemble", "--calibrate"]) == 0  # the probes alone
    cal = json.loads((ens / "metrics.json").read_text())["calibration"]
    assert cal["fitted_on"] == "out-of-fold" and (ens / "reliability.png").is_file()
    weights = json.loads((ens / "ensemble.json").read_text())["members"]
    blend = sum(w["weight"] * mmfuse.load(ens / w["dir"]).predict(images, texts).probs for w in weights)
    np.testing.assert_allclose(
        mmfuse.load(ens).predict(images, texts).probs, scale_sigmoids(blend, cal["temperature"]), atol=1e-5
    )


@pytest.mark.slow  # trains tiny Hugging Face towers and exports them
def test_the_export_of_a_calibrated_multi_label_run_gives_its_calibrated_sigmoids(
    toy, tmp_path, tiny_vit_dir, tiny_roberta_dir
):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "hf"
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir)]
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), "--tune", "head"]
    assert main([*args, "--epochs", "2", "--batch-size", "8", *towers, "--calibrate"]) == 0
    assert main(["export", str(run), "--out", str(run / "export")]) == 0
    info = json.loads((run / "export" / "export.json").read_text())
    t = json.loads((run / CALIBRATION_FILE).read_text())["temperature"]
    assert info["temperature"] == t != 1.0 and info["multi_label"] and info["parity"]["passed"]
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    assert main(["predict", str(run), str(toy / "test.csv"), "--out", str(torch_csv)]) == 0
    assert main(["predict", str(run), str(toy / "test.csv"), "--out", str(onnx_csv), "--backend", "onnx"]) == 0
    got, want = read_csv(onnx_csv), read_csv(torch_csv)
    names = [f"p_{c}" for c in info["classes"]]
    np.testing.assert_allclose(
        [[float(r[n]) for n in names] for r in got], [[float(r[n]) for n in names] for r in want], atol=1e-4
    )
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
