"""--calibrate: temperature scaling fitted on validation or out-of-fold rows, ECE before and after, and the calibrated
probabilities through every way a run predicts (the API, predict, evaluate, a reload, a bag, an ensemble, ONNX)."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY, read_csv, write_toy

import mmfuse
from mmfuse.calibration import calibrate, fit_temperature, nll, scale
from mmfuse.cli import main
from mmfuse.errors import MmfuseError
from mmfuse.metrics import expected_calibration_error, reliability
from mmfuse.rundir.layout import CALIBRATION_FILE, RUN_FILES, temperature

FAST = ["--tune", "head", "--image-size", "32", "--epochs", "3", "--batch-size", "8"]
FIXTURE = Path(__file__).parent / "fixtures" / "old_run"

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' features, embedded once a session


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def overconfident(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z) (so softmax(z) is calibrated), and a model that says softmax(5 z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    p = softmax(z)
    y = (rng.random(n)[:, None] > p.cumsum(1)).sum(1)
    return softmax(5 * z).astype(np.float32), y


# ---------------------------------------------------------------------------------------------------------------------
# The numbers


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_the_ece():
    probs, y = overconfident()
    cal = calibrate(probs, y, "validation")
    assert cal.temperature == pytest.approx(5.0, rel=0.15)
    report = cal.report()
    assert report["ece_after"] < report["ece_before"] / 3 and report["ece_after"] < 0.03
    assert report["nll_after"] < report["nll_before"]
    assert report["fitted_on"] == "validation" and report["n"] == len(y) and report["bins"] == 15
    np.testing.assert_array_equal(cal.calibrated.argmax(1), probs.argmax(1))  # only the confidence moves


def test_scale_is_softmax_of_logits_over_t_and_t_one_changes_nothing(rng):
    logits = rng.normal(0, 3, (50, 5))
    np.testing.assert_allclose(scale(softmax(logits).astype(np.float32), 2.5), softmax(logits / 2.5), atol=1e-6)
    probs = softmax(logits).astype(np.float32)
    assert scale(probs, 1.0) is probs
    assert nll(probs, np.zeros(50, int), 1.0) == pytest.approx(-np.log(probs[:, 0]).mean(), rel=1e-5)


def test_ece_by_hand():
    # Two rows at confidence 0.9 (one right), two at 0.6 (both right): |0.5 - 0.9| / 2 + |1 - 0.6| / 2.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.4)
    conf, acc, count = reliability(probs, y)
    assert count.sum() == 4 and count[13] == 2 and count[8] == 2  # 0.9 in (13/15, 14/15], 0.6 in (8/15, 9/15]
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0  # sure and right


def test_a_perfectly_separated_set_stops_at_the_bound_with_a_warning(caplog):
    probs = np.array([[0.8, 0.2], [0.3, 0.7]] * 10, dtype=np.float32)
    y = np.array([0, 1] * 10)
    assert fit_temperature(probs, y) == pytest.approx(0.05, rel=1e-2)
    assert "bound" in caplog.text


# ---------------------------------------------------------------------------------------------------------------------
# A single run


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("calib-data") / "toy", **TOY)


@pytest.fixture(scope="module")
def calibrated(toy, shared_home, tmp_path_factory):
    run = tmp_path_factory.mktemp("calib-run") / "run"
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), *FAST, "--calibrate"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        assert main(args) == 0
    return run


def rows(toy: Path, split: str = "test") -> tuple[list[Path], list[str], list[str]]:
    found = read_csv(toy / f"{split}.csv")
    return [toy / r["image"] for r in found], [r["text"] for r in found], [r["label"] for r in found]


def with_temperature(run: Path, where: Path, t: float | None) -> Path:
    """A copy of ``run`` whose calibration.json says ``t`` (None: no calibration.json, as an uncalibrated run)."""
    copy = shutil.copytree(run, where)
    (copy / CALIBRATION_FILE).unlink(missing_ok=True)
    if t is not None:
        (copy / CALIBRATION_FILE).write_text(json.dumps({"temperature": t}))
    return copy


def test_a_calibrated_run_records_its_temperature_and_ece(calibrated, capsys):
    metrics = json.loads((calibrated / "metrics.json").read_text())
    saved = json.loads((calibrated / CALIBRATION_FILE).read_text())
    cal = metrics["calibration"]
    assert cal == saved and cal["fitted_on"] == "validation" and cal["n"] == metrics["n_val"]
    assert 0.05 <= cal["temperature"] <= 20 and temperature(calibrated) == cal["temperature"]
    assert 0 <= cal["ece_after"] <= 1 and 0 <= cal["ece_before"] <= 1
    assert (calibrated / "reliability.png").stat().st_size > 1000
    assert {CALIBRATION_FILE, "reliability.png"} <= RUN_FILES  # predict --out never writes over them
    assert f"calibrated, T {cal['temperature']:.3f}" in (calibrated / "train.log").read_text()


def test_predicted_probabilities_are_softmax_of_logits_over_t_and_survive_a_reload(
    calibrated, toy, tmp_path, monkeypatch
):
    run = with_temperature(calibrated, tmp_path / "t3", 3.0)  # a temperature far from 1, whatever the fit found
    images, texts, _ = rows(toy)
    predictor = mmfuse.load(run)
    logits, real = [], predictor._outputs

    def spy(batch, models):  # the model's own logits on the predictor's one batch path
        out = real(batch, models)
        logits.extend(o.float().numpy() for o in out)
        return out

    monkeypatch.setattr(predictor, "_outputs", spy)
    got = predictor.predict(images, texts)
    np.testing.assert_allclose(got.probs, softmax(np.concatenate(logits) / 3.0), atol=1e-6)
    uncalibrated = mmfuse.load(with_temperature(calibrated, tmp_path / "none", None)).predict(images, texts).probs
    assert not np.allclose(got.probs, uncalibrated, atol=1e-3)
    np.testing.assert_array_equal(got.probs.argmax(1), uncalibrated.argmax(1))
    np.testing.assert_array_equal(mmfuse.load(run).predict(images, texts).probs, got.probs)  # reloaded


def test_predict_and_evaluate_files_give_the_calibrated_probabilities(calibrated, toy, tmp_path):
    run = with_temperature(calibrated, tmp_path / "t3", 3.0)
    images, texts, labels = rows(toy)
    api = mmfuse.load(run).predict(images, texts)
    assert main(["predict", str(run), str(toy / "test.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    preds = read_csv(tmp_path / "p.csv")
    p = np.array([[float(r[f"p_{c}"]) for c in api.classes] for r in preds])
    np.testing.assert_allclose(p, api.probs, atol=1e-4)  # predict reads cached features: float noise
    assert main(["evaluate", str(run), str(toy / "test.csv"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    y = np.array([api.classes.index(label) for label in labels])
    assert report["temperature"] == 3.0
    assert report["ece"] == pytest.approx(expected_calibration_error(api.probs, y), abs=1e-4)


def test_temperature_one_and_no_file_predict_exactly_as_before(calibrated, toy, tmp_path):
    images, texts, _ = rows(toy)
    none = mmfuse.load(with_temperature(calibrated, tmp_path / "none", None)).predict(images, texts).probs
    one = mmfuse.load(with_temperature(calibrated, tmp_path / "one", 1.0)).predict(images, texts).probs
    np.testing.assert_array_equal(one, none)


def test_an_old_run_has_no_calibration_and_evaluate_reports_its_ece(tmp_path):
    run = shutil.copytree(FIXTURE, tmp_path / "run")
    assert not (run / CALIBRATION_FILE).exists() and mmfuse.load(run).temperature == 1.0
    root = write_toy(tmp_path / "toy", per_class=6, seed=0)
    assert main(["evaluate", str(run), str(root / "all.csv"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["temperature"] == 1.0 and 0 <= report["ece"] <= 1


def test_a_damaged_calibration_file_is_a_clear_error(calibrated, tmp_path):
    run = with_temperature(calibrated, tmp_path / "bad", -2.0)
    with pytest.raises(MmfuseError, match="calibration.json is damaged"):
        mmfuse.load(run)
    (run / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(MmfuseError, match="calibration.json is damaged"):
        mmfuse.load(run)


def test_training_again_without_calibrate_drops_the_temperature(calibrated, toy, tmp_path):
    run = shutil.copytree(calibrated, tmp_path / "run")
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), *FAST, "--overwrite"]
    assert main(args) == 0
    assert not (run / CALIBRATION_FILE).exists() and not (run / "reliability.png").exists()
    assert "calibration" not in json.loads((run / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# A bag and an ensemble: fitted out of fold


def test_a_bag_calibrates_on_its_out_of_fold_rows(toy, tmp_path):
    run = tmp_path / "bag"
    assert main(["train", str(toy / "all.csv"), "--out", str(run), *FAST, "--bag", "2", "--calibrate"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["fitted_on"] == "out-of-fold" and cal["n"] == metrics["n_out_of_fold"] == len(read_csv(toy / "all.csv"))
    assert not any((run / "members" / str(k) / CALIBRATION_FILE).exists() for k in range(2))  # the bag's alone
    # The temperature fitted on the out-of-fold probabilities written beside it.
    oof = read_csv(run / "oof_predictions.csv")
    labels = json.loads((run / "labels.json").read_text())
    probs = np.array([[float(r[f"p_{c}"]) for c in labels] for r in oof])
    y = np.array([labels.index(r["label"]) for r in oof])
    assert cal["temperature"] == pytest.approx(fit_temperature(probs, y), rel=1e-3)
    images, texts, _ = rows(toy)
    got = mmfuse.load(run).predict(images, texts).probs
    members = np.mean([mmfuse.load(run / "members" / str(k)).predict(images, texts).probs for k in range(2)], 0)
    np.testing.assert_allclose(got, scale(members, cal["temperature"]), atol=1e-6)


def test_an_ensemble_calibrates_its_blend_out_of_fold(toy, tmp_path):
    run = tmp_path / "ens"
    args = ["train", str(toy / "all.csv"), "--out", str(run), "--preset", "ensemble", "--bag", "2", "--calibrate"]
    assert main([*args, "--image-size", "32", "--time-limit", "1s"]) == 0  # the probes alone
    metrics = json.loads((run / "metrics.json").read_text())
    cal = metrics["calibration"]
    assert cal["fitted_on"] == "out-of-fold" and cal["n"] == metrics["n_rows"]
    assert (run / "reliability.png").is_file()
    members = json.loads((run / "ensemble.json").read_text())["members"]
    assert not any((run / m["dir"] / CALIBRATION_FILE).exists() for m in members)
    images, texts, _ = rows(toy)
    got = mmfuse.load(run).predict(images, texts).probs
    blend = sum(m["weight"] * mmfuse.load(run / m["dir"]).predict(images, texts).probs for m in members)
    np.testing.assert_allclose(got, scale(blend, cal["temperature"]), atol=1e-6)
    records = mmfuse.load(run).load_data(toy / "test.csv")
    np.testing.assert_allclose(mmfuse.load(run).predict_records(records, show=False), got, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# ONNX


def test_the_export_bakes_the_temperature_in_and_passes_its_parity_gate(toy, tiny_vit_dir, tiny_roberta_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "hf"
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir)]
    args = ["train", str(toy / "train.csv"), "--val", str(toy / "val.csv"), "--out", str(run), "--calibrate"]
    assert main([*args, "--tune", "head", "--epochs", "1", *towers]) == 0
    (run / CALIBRATION_FILE).write_text(json.dumps({"temperature": 0.25}))  # sharpen: tiny towers are unsure
    assert main(["export", str(run), "--out", str(run / "export")]) == 0
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["status"] == "passed" and info["temperature"] == 0.25 and info["parity"]["max_abs_diff"] <= 1e-4
    assert "divided by its temperature 0.25" in (run / "export" / "README.md").read_text()
    test = str(toy / "test.csv")
    assert main(["predict", str(run), test, "--out", str(tmp_path / "torch.csv")]) == 0
    assert main(["predict", str(run), test, "--out", str(tmp_path / "onnx.csv"), "--backend", "onnx"]) == 0
    cols = [f"p_{c}" for c in info["classes"]]
    p_torch = np.array([[float(r[c]) for c in cols] for r in read_csv(tmp_path / "torch.csv")])
    p_onnx = np.array([[float(r[c]) for c in cols] for r in read_csv(tmp_path / "onnx.csv")])
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    (run / CALIBRATION_FILE).write_text(json.dumps({"temperature": 2.0}))  # the run's changed since the export
    out = tmp_path / "again.csv"
    assert main(["predict", str(run), test, "--out", str(out), "--backend", "onnx"]) == 2


def test_serve_answers_with_the_calibrated_probabilities(calibrated, toy, tmp_path):
    from fastapi.testclient import TestClient

    from mmfuse.inference.serve.app import create_app

    run = with_temperature(calibrated, tmp_path / "t3", 3.0)
    row = read_csv(toy / "test.csv")[0]
    expected = mmfuse.load(run).predict([toy / row["image"]], [row["text"]])
    with TestClient(create_app(run)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        with open(toy / row["image"], "rb") as f:
            r = client.post("/v1/predict", files={"image": ("x.png", f, "image/png")}, data={"text": row["text"]})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(list(r.json()["probabilities"].values()), expected.probs[0], atol=1e-6)


def test_an_interrupted_predict_does_not_resume_across_a_new_temperature(calibrated, tmp_path):
    from mmfuse.inference.stream import run_identity

    run = with_temperature(calibrated, tmp_path / "none", None)
    before = run_identity(run)
    assert all("calibration" not in w[0] for w in before["weights"])  # an uncalibrated run's identity is as before
    (run / CALIBRATION_FILE).write_text(json.dumps({"temperature": 2.0}))
    assert run_identity(run) != before
