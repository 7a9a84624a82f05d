"""Several image and text columns per row, and tabular columns (--image-columns, --text-columns, --tabular-columns):
read from manifests, each column through its modality's one tower, masked when empty, tabular columns standardised
or embedded with the training statistics kept in the run, through train, evaluate, predict, the Python API and the
ablation; the verbs that do not support them yet refuse them. Export: test_columns_export.py."""

import json
import random
import re

import numpy as np
import pytest
import yaml
from conftest import COLORS, THINGS, make_image, make_text, read_csv, submit_page, write_csv
from safetensors.torch import load_file

import mmfuse
from mmfuse.cli import main
from mmfuse.config import PRESETS, ModelConfig, RunConfig, resolve
from mmfuse.data.checks import load_checked
from mmfuse.data.columns import Columns, input_slots
from mmfuse.data.tabular import fit_tabular
from mmfuse.errors import MmfuseError
from mmfuse.training import portfolio as portfolio_module
from mmfuse.training.portfolio import portfolio

FIELDS = ("front", "back", "title", "desc", "size", "section", "label")
COLUMNS = [
    "--image-columns",
    "front",
    "back",
    "--text-columns",
    "title",
    "desc",
    "--tabular-columns",
    "size",
    "section",
]
FAST = ["--tune", "head", "--image-size", "32", "--epochs", "2", "--batch-size", "8"]


def write_columns(root, per_class: int = 10, seed: int = 0):
    """The toy task spread over columns: the colour is in the back image only (front is grey), the thing in the
    texts; size is larger for red rows. Some cells are empty: a back image of every third row, a description of every
    fourth, a size of every fifth."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for color in COLORS:
        for thing in THINGS:
            for i in range(per_class):
                front, back = f"images/{color}_{thing}_{i}_front.png", f"images/{color}_{thing}_{i}_back.png"
                make_image((128, 128, 128), rng, 32).save(root / front)
                make_image(COLORS[color], rng, 32).save(root / back)
                size = rng.random() * 10 + (5 if color == "red" else 0)
                rows.append(
                    {
                        "front": front,
                        "back": back if i % 3 else "",
                        "title": make_text(thing, rng),
                        "desc": make_text(thing, rng) if i % 4 else "",
                        "size": f"{size:.3f}" if i % 5 else "",
                        "section": rng.choice(["x", "y", "z"]),
                        "label": f"{color}-{thing}",
                    }
                )
    rng.shuffle(rows)
    n = len(rows)
    write_csv(root / "train.csv", rows[: n * 7 // 10], FIELDS)
    write_csv(root / "val.csv", rows[n * 7 // 10 :], FIELDS)
    write_csv(root / "all.csv", rows, FIELDS)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_columns(tmp_path_factory.mktemp("columns") / "data")


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A head on frozen features over two image columns, two text columns and two tabular columns."""
    out = tmp_path_factory.mktemp("columns-run") / "run"
    home = tmp_path_factory.mktemp("columns-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(home))
        args = ["train", str(data / "train.csv"), "--val", str(data / "val.csv"), "--out", str(out)]
        assert main([*args, *COLUMNS, *FAST]) == 0
    return out


def rows_of(path):
    return [{k: v for k, v in r.items() if k != "label"} for r in read_csv(path)]


def test_slots_name_each_column_and_leave_runs_without_columns_as_they_were():
    assert [s.name for s in input_slots(ModelConfig())] == ["image", "text"]
    m = resolve(RunConfig(model=ModelConfig(image_columns=["a", "b"], text_columns=["t"], tabular_columns=["x"]))).model
    assert m.modalities == ["image", "text", "tabular"]
    assert [(s.name, s.column) for s in input_slots(m)] == [
        ("image0", "a"),
        ("image1", "b"),
        ("text0", "t"),
        ("tabular", ""),
    ]


def test_the_run_records_its_columns_and_the_training_statistics(run, data):
    cfg = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (cfg["image_columns"], cfg["text_columns"]) == (["front", "back"], ["title", "desc"])
    assert cfg["tabular_columns"] == ["size", "section"] and "tabular" in cfg["modalities"]
    spec = json.loads((run / "tabular.json").read_text())["columns"]
    train = read_csv(data / "train.csv")
    sizes = np.array([float(r["size"]) for r in train if r["size"]])
    assert spec[0]["name"] == "size" and spec[0]["kind"] == "num"
    assert spec[0]["mean"] == pytest.approx(sizes.mean()) and spec[0]["sd"] == pytest.approx(sizes.std())
    assert spec[1]["kind"] == "cat" and sorted(spec[1]["vocab"]) == sorted({r["section"] for r in train})
    # One placeholder per input, each column its own; the towers' weights are shared (packaged: none stored).
    state = load_file(str(run / "model.safetensors"))
    assert {k for k in state if k.startswith("missing.")} == {
        f"missing.{n}" for n in ("image0", "image1", "text0", "text1", "tabular")
    }
    assert not any(k.startswith(("vision.", "text.")) for k in state)
    assert set(json.loads((run / "towers.json").read_text())) == {"image", "text"}


def test_evaluate_and_predict_read_the_columns_and_match_the_python_api(run, data, tmp_path):
    assert main(["evaluate", str(run), str(data / "val.csv"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["accuracy"] > 0.25  # above chance for 4 classes
    assert main(["predict", str(run), str(data / "val.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    written = read_csv(tmp_path / "p.csv")
    pred = mmfuse.load(run, device="cpu").predict(rows=api_rows(data, data / "val.csv"))
    cols = [f"p_{c}" for c in pred.classes]
    file_probs = np.array([[float(r[c]) for c in cols] for r in written])
    np.testing.assert_allclose(pred.probs, file_probs, atol=2e-4)  # cached features vs the towers run now
    assert pred.labels == [r["label"] for r in written]


def test_empty_cells_are_masked_and_the_tabular_statistics_apply_to_new_rows(run, data):
    model = mmfuse.load(run, device="cpu")
    row = rows_of(data / "val.csv")[0]
    row = {**row, "front": str(data / row["front"]), "back": None, "size": "3.0", "section": "x"}
    p = lambda **change: model.predict(rows=[{**row, **change}]).probs[0]  # noqa: E731
    # An empty text is the column's placeholder, whatever the spaces; a real text is something else.
    np.testing.assert_array_equal(p(desc=""), p(desc="   "))
    np.testing.assert_array_equal(p(desc=None), p(desc=""))
    assert not np.allclose(p(desc=""), p(desc="a shiny train"))
    # A category never seen in training reads as an empty one; a number moves the prediction.
    np.testing.assert_array_equal(p(section="never-seen"), p(section=""))
    assert not np.allclose(p(size="3.0"), p(size="30.0"))
    assert not np.allclose(p(size="3.0"), p(size=None))  # a missing number has its own indicator


def test_the_python_api_says_how_to_call_a_model_with_columns(run, data, head_run):
    model = mmfuse.load(run, device="cpu")
    with pytest.raises(MmfuseError, match=r"predict\(rows="):
        model.predict([str(data / "images" / "red_apple_0_front.png")], ["an apple"])
    with pytest.raises(MmfuseError, match=r"no value for column\(s\) \['section'\]"):
        model.predict(rows=[{"front": None, "back": None, "title": "a", "desc": "", "size": 1}])
    with pytest.raises(MmfuseError, match="trained without them"):
        mmfuse.load(head_run, device="cpu").predict(rows=[{"image": "x.png", "text": "a"}])


def test_the_ablation_trains_a_tabular_arm(data, tmp_path):
    out = tmp_path / "ablate"
    args = ["ablate", str(data / "train.csv"), "--val", str(data / "val.csv"), "--out", str(out), *COLUMNS, *FAST]
    assert main(args) == 0
    results = json.loads((out / "ablation.json").read_text())
    assert list(results) == ["image", "text", "tabular", "fusion"]
    tabular = yaml.safe_load((out / "tabular" / "config.yaml").read_text())["model"]
    assert tabular["modalities"] == ["tabular"]
    assert json.loads((out / "tabular" / "towers.json").read_text()) == {}
    state = load_file(str(out / "tabular" / "model.safetensors"))
    assert {k for k in state if k.startswith("missing.")} == {"missing.tabular"}
    assert any(k.startswith("tabular.embeds.0") for k in state)  # the section column's embedding
    assert results["tabular"]["training"]["tuned_towers"] == [] and results["tabular"]["evaluated_on"] == "validation"


def test_tabular_kinds_are_inferred_or_forced(data):
    named = Columns(tabular=("size", "section"))
    records = load_checked(data / "train.csv", need_text=False, named=named)
    kinds = [c.kind for c in fit_tabular(records, ["size", "section"]).columns]
    assert kinds == ["num", "cat"]
    forced = fit_tabular(records, ["size:cat", "section"]).columns[0]
    assert forced.kind == "cat" and forced.name == "size" and len(forced.vocab) > 10
    with pytest.raises(MmfuseError, match="none of the column's cells is a number"):
        fit_tabular(records, ["section:num"])


def refused(args: list[str], capsys, match: str) -> None:
    assert main(args) != 0
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_bad_column_input_is_refused_with_what_to_do(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    train = str(data / "train.csv")
    refused(
        ["train", train, "--out", out, "--image-columns", "front", "--text-columns", "blurb", *FAST],
        capsys,
        r"missing column\(s\) \['blurb'\]",
    )
    refused(
        ["train", str(data / "images"), "--out", out, "--text-columns", "title", *FAST],
        capsys,
        "name the columns of a manifest",
    )
    with pytest.raises(MmfuseError, match="named twice"):
        ModelConfig(image_columns=["front"], text_columns=["front"])
    refused(["train", train, "--out", out, *COLUMNS, "--tune", "all"], capsys, "not supported yet")
    # An image file that is missing is a bad row naming its column.
    rows = read_csv(data / "train.csv")
    rows[0]["back"] = "images/nowhere.png"
    write_csv(tmp_path / "bad.csv", rows, FIELDS)
    (tmp_path / "images").symlink_to(data / "images")
    refused(["train", str(tmp_path / "bad.csv"), "--out", out, *COLUMNS, *FAST], capsys, "back: image file not found")


def test_serve_takes_each_column_as_a_field_of_its_own(run, data):
    import base64
    import time

    from fastapi.testclient import TestClient

    from mmfuse.inference.serve.app import create_app

    rows = api_rows(data, data / "val.csv")[:3]
    expected = mmfuse.load(run, device="cpu").predict(rows=rows).probs

    def item(row: dict) -> dict:
        images = {
            c: base64.b64encode(open(row[c], "rb").read()).decode() if row[c] else None for c in ("front", "back")
        }
        return {**row, **images, "size": float(row["size"]) if row["size"] else None}

    with TestClient(create_app(run)) as client:
        end = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < end, "the app never became ready"
            time.sleep(0.05)
        info = client.get("/v1/info").json()
        assert info["columns"] == {
            "image": ["front", "back"],
            "text": ["title", "desc"],
            "tabular": ["size", "section"],
        }
        answer = client.post("/v1/predict", json={"items": [item(r) for r in rows]}).json()["items"]
        got = np.array([list(a["probabilities"].values()) for a in answer], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        # multipart: an image column is a file, the others are form fields; absent fields are empty cells
        r = rows[0]
        files = {"front": ("f.png", open(r["front"], "rb").read(), "image/png")}
        form = client.post("/v1/predict", files=files, data={"title": r["title"]}).json()
        alone = mmfuse.load(run, device="cpu").predict(
            rows=[{**dict.fromkeys(r), "front": r["front"], "title": r["title"]}]
        )
        np.testing.assert_allclose(list(form["probabilities"].values()), alone.probs[0], atol=1e-5)
        bad = client.post("/v1/predict", json={"image": "", "text": "x"})
        assert bad.status_code == 422 and "front" in bad.json()["message"]


def api_rows(data, path):
    rows = rows_of(path)
    for r in rows:
        for c in ("front", "back"):
            r[c] = str(data / r[c]) if r[c] else None
    return rows


def assert_predict_file_matches_the_api(out, data, tmp_path):
    """`mmfuse predict` of the run on val.csv writes the probabilities the Python API gives for the same rows."""
    assert main(["predict", str(out), str(data / "val.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    written = read_csv(tmp_path / "p.csv")
    pred = mmfuse.load(out, device="cpu").predict(rows=api_rows(data, data / "val.csv"))
    file_probs = np.array([[float(r[f"p_{c}"]) for c in pred.classes] for r in written])
    np.testing.assert_allclose(pred.probs, file_probs, atol=2e-4)


def test_a_bag_encodes_every_row_with_one_set_of_tabular_statistics(data, tmp_path):
    out = tmp_path / "bag"
    assert main(["train", str(data / "all.csv"), "--out", str(out), "--bag", "2", *COLUMNS, *FAST]) == 0
    specs = [json.loads((out / "members" / m / "tabular.json").read_text()) for m in ("0", "1")]
    assert specs[0] == specs[1]
    sizes = np.array([float(r["size"]) for r in read_csv(data / "all.csv") if r["size"]])
    assert specs[0]["columns"][0]["mean"] == pytest.approx(sizes.mean())
    assert_predict_file_matches_the_api(out, data, tmp_path)


def test_a_multi_label_run_reads_its_label_sets_through_the_columns(data, tmp_path):
    """Multi-label (a labels column) and named columns together: train, evaluate, predict and the Python API give
    sets at the run's thresholds; a bag tunes its thresholds out of fold with one set of tabular statistics."""
    fields = [f for f in FIELDS if f != "label"] + ["labels"]
    for name in ("train", "val"):
        rows = read_csv(data / f"{name}.csv")
        for r in rows:
            color, thing = r["label"].split("-")
            r["labels"] = f"{color}|{thing}"
        write_csv(tmp_path / f"{name}.csv", rows, fields)
    for r in [*read_csv(data / "train.csv"), *read_csv(data / "val.csv")]:  # the images the manifests name
        for c in ("front", "back"):
            if r[c] and not (tmp_path / r[c]).exists():
                (tmp_path / r[c]).parent.mkdir(exist_ok=True)
                (tmp_path / r[c]).symlink_to(data / r[c])
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "train.csv"), "--val", str(tmp_path / "val.csv"), "--out", str(out)]
    assert main([*args, *COLUMNS, *FAST]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["multi_label"] is True
    assert (out / "thresholds.json").is_file() and (out / "tabular.json").is_file()
    assert sorted(json.loads((out / "labels.json").read_text())) == sorted([*COLORS, *THINGS])
    assert main(["evaluate", str(out), str(tmp_path / "val.csv"), "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "micro_f1" in report
    assert main(["predict", str(out), str(tmp_path / "val.csv"), "--out", str(tmp_path / "p.csv")]) == 0
    written = read_csv(tmp_path / "p.csv")
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in read_csv(tmp_path / "val.csv")]
    for r in rows:
        for c in ("front", "back"):
            r[c] = str(tmp_path / r[c]) if r[c] else None
    pred = mmfuse.load(out, device="cpu").predict(rows=rows)
    assert pred.sets is not None and len(pred.sets) == len(rows)
    assert pred.labels == ["|".join(s) for s in pred.sets]
    file_probs = np.array([[float(r[f"p_{c}"]) for c in pred.classes] for r in written])
    np.testing.assert_allclose(pred.probs, file_probs, atol=2e-4)  # cached features vs the towers run now
    # A set may differ only where a probability is at its threshold (a threshold is cut at a validation row's).
    cuts = json.loads((out / "thresholds.json").read_text())["thresholds"]
    for got, want, p in zip(pred.labels, (r["labels"] for r in written), pred.probs):
        near = {c for c, x in zip(pred.classes, p) if abs(x - cuts[c]) < 1e-3}
        assert set(filter(None, got.split("|"))) ^ set(filter(None, want.split("|"))) <= near
    assert ((pred.probs >= 0) & (pred.probs <= 1)).all() and not np.allclose(pred.probs.sum(1), 1)
    bag = tmp_path / "bag"
    assert main(["train", str(tmp_path / "train.csv"), "--out", str(bag), "--bag", "2", *COLUMNS, *FAST]) == 0
    assert (bag / "thresholds.json").is_file()
    specs = [json.loads((bag / "members" / m / "tabular.json").read_text()) for m in ("0", "1")]
    assert specs[0] == specs[1]


@pytest.mark.slow
def test_a_tuned_text_tower_reads_every_text_column(data, tmp_path):
    out = tmp_path / "tuned"
    args = ["train", str(data / "train.csv"), "--val", str(data / "val.csv"), "--out", str(out), *COLUMNS]
    assert main([*args, "--tune", "text", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]) == 0
    assert (out / "text_tower").is_dir()
    state = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("text.") for k in state)  # the one tuned tower, shared by both text columns
    assert_predict_file_matches_the_api(out, data, tmp_path)


@pytest.mark.parametrize("mpnet", [False, True])
def test_the_ensemble_fuses_the_tabular_columns_and_gives_them_a_head(monkeypatch, mpnet):
    # The members must not depend on this machine: CI installs no mpnet, a developer's venv may.
    monkeypatch.setattr(portfolio_module, "mpnet_installed", lambda: mpnet)
    columns = ModelConfig(image_columns=["a", "b"], text_columns=["t"], tabular_columns=["x"])
    cfg = resolve(RunConfig(model=columns).updated(PRESETS["ensemble"]))
    members = {m.name: m.cfg.model.modalities for m in portfolio(cfg)}
    assert members["head-tabular"] == ["tabular"] and members["probe-both"] == ["image", "text", "tabular"]
    assert members["fusion-gated"] == ["image", "text", "tabular"]
    assert ("mpnet-fusion-gated" in members) == mpnet
    without = resolve(RunConfig(model=ModelConfig(text_columns=["t", "u"])).updated(PRESETS["ensemble"]))
    assert "head-tabular" not in {m.name for m in portfolio(without)}


@pytest.mark.slow
def test_the_ensemble_trains_and_predicts_on_columns(data, tmp_path):
    out = tmp_path / "ensemble"
    args = ["train", str(data / "all.csv"), "--out", str(out), "--preset", "ensemble", "--bag", "2", *COLUMNS]
    assert main([*args, "--image-size", "32", "--epochs", "2"]) == 0
    board = read_csv(out / "leaderboard.csv")
    assert {"probe-both", "head-tabular", "fusion-attention"} <= {r["name"] for r in board}
    tabular = json.loads((out / "members" / "probe-both" / "members" / "0" / "tabular.json").read_text())
    assert [c["name"] for c in tabular["columns"]] == ["size", "section"]
    assert_predict_file_matches_the_api(out, data, tmp_path)


def test_jsonl_and_parquet_manifests_give_the_same_cells_as_csv(data, tmp_path):
    import pandas as pd

    named = Columns(("front", "back"), ("title", "desc"), ("size", "section"))
    frame = pd.read_csv(data / "train.csv", keep_default_na=False)
    frame["size"] = pd.to_numeric(frame["size"]).astype("Float64")  # a number column with nulls, as parquet keeps it
    frame["extra"] = "not read"
    (tmp_path / "images").symlink_to(data / "images")
    frame.to_json(tmp_path / "m.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "m.parquet")
    base = load_checked(data / "train.csv", need_text=False, named=named)
    for name in ("m.jsonl", "m.parquet"):
        records = load_checked(tmp_path / name, need_text=False, named=named)
        assert [r.label for r in records] == [r.label for r in base]
        for r, b in zip(records, base):
            assert [(v.name if v else None) for v in map(r.cells.get, named.image)] == [
                (v.name if v else None) for v in map(b.cells.get, named.image)
            ]
            assert [r.cells[c] for c in ("title", "desc", "section")] == [
                b.cells[c] for c in ("title", "desc", "section")
            ]
            assert (float(r.cells["size"]) if r.cells["size"] != "" else None) == (
                float(b.cells["size"]) if b.cells["size"] else None
            )
            assert "extra" not in r.cells


def test_the_head_masks_each_empty_column_and_dropout_never_blanks_a_whole_row():
    import torch

    from mmfuse.data.tabular import TabularColumn, TabularSpec
    from mmfuse.models.classifier import build_model

    cfg = ModelConfig(
        image_columns=["a", "b"],
        text_columns=["t"],
        tabular_columns=["x", "c"],
        text_pooling="mean",
        modality_dropout=0.5,
    )
    cfg = resolve(RunConfig(model=cfg)).model
    spec = TabularSpec([TabularColumn("x", "num", 2.0, 3.0), TabularColumn("c", "cat", vocab=["p", "q"])])
    model = build_model(cfg, 3, build=(), tabular=spec).eval()  # packaged towers stay cards: nothing is built
    b = 8
    feats = {f"{s.name}_feats": torch.randn(b, model.cards[s.modality].dim) for s in model.slots if s.name != "tabular"}
    tab = {"numeric": torch.randn(b, 2), "codes": torch.randint(0, 3, (b, 1))}
    present = torch.ones(b, 4, dtype=torch.bool)
    present[:4, 1] = False  # the second image column empty in the first four rows
    out = model(**feats, tabular=tab, present=present)
    other = {**feats, "image1_feats": torch.randn(b, model.cards["image"].dim)}
    changed = model(**other, tabular=tab, present=present)
    torch.testing.assert_close(out[:4], changed[:4])  # an empty cell's features are never read
    assert not torch.allclose(out[4:], changed[4:])
    model.train()
    kept = model._drop_modalities(torch.ones(4000, 4, dtype=torch.bool), 4000)
    assert kept.any(dim=1).all()
    dropped = (~kept).sum(0)
    assert (dropped > 0).all() and kept.float().mean() < 0.95  # every column, the tabular one too, is blanked


@pytest.mark.slow
def test_search_trials_read_the_columns(data, tmp_path):
    out = tmp_path / "search"
    args = ["search", str(data / "train.csv"), "--val", str(data / "val.csv"), "--out", str(out), "--trials", "2"]
    assert main([*args, *COLUMNS, *FAST]) == 0
    best = yaml.safe_load((out / "best.yaml").read_text())["model"]
    assert best["tabular_columns"] == ["size", "section"] and best["image_columns"] == ["front", "back"]
    assert (out / "trials" / "000" / "tabular.json").is_file()


@pytest.mark.slow  # the browser
def test_the_page_has_a_field_per_column_in_a_real_browser(run, data, shared_home, monkeypatch, tmp_path):
    from conftest import chrome
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_serve import Server

    monkeypatch.setenv("MMFUSE_HOME", str(shared_home))
    row = api_rows(data, data / "val.csv")[0]
    filled = {"front": row["front"], "title": row["title"], "desc": "", "size": "13.5", "section": "y"}
    model = mmfuse.load(run, device="cpu")
    expected = model.predict(rows=[{**dict.fromkeys(row), **filled, "desc": None}])
    server = Server(run)
    driver = chrome(390, 844)  # a phone: every field stacked, nothing wider than the window
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "submit").is_enabled())
        assert not driver.find_element(By.ID, "image-field").is_displayed()
        assert not driver.find_element(By.ID, "text-field").is_displayed()
        fields = {
            e.get_attribute("data-column"): e for e in driver.find_elements(By.CSS_SELECTOR, "#columns [data-column]")
        }
        assert list(fields) == ["front", "back", "title", "desc", "size", "section"]
        assert [fields[c].get_attribute("type") for c in ("front", "back")] == ["file", "file"]
        assert [fields[c].tag_name for c in ("title", "desc", "size", "section")] == ["textarea"] * 2 + ["input"] * 2
        labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#columns label.field")]
        assert labels == [
            "front (image)",
            "back (image)",
            "title (text)",
            "desc (text)",
            "size (tabular)",
            "section (tabular)",
        ]
        fields["front"].send_keys(str(filled["front"]))
        for c in ("title", "size", "section"):
            fields[c].send_keys(filled[c])
        submit_page(driver, wait)
        assert driver.find_element(By.ID, "label").text == expected.labels[0]
        bars = driver.find_elements(By.CSS_SELECTOR, "#fusion .bar")
        assert [b.find_element(By.CSS_SELECTOR, ".name").get_attribute("textContent") for b in bars] == expected.classes
        shown = np.array([float(b.get_attribute("data-p")) for b in bars])
        np.testing.assert_allclose(shown, expected.probs[0], atol=1e-5)
        # Every filled field was sent: without the size (or the front image) the model answers otherwise.
        for empty in ("size", "front"):
            other = model.predict(rows=[{**dict.fromkeys(row), **filled, "desc": None, empty: None}]).probs[0]
            assert not np.allclose(shown, other, atol=1e-5), empty
        assert not driver.find_element(By.ID, "image-only").is_displayed()
        inner, client, scroll = driver.execute_script(
            "const e = document.documentElement; return [window.innerWidth, e.clientWidth, e.scrollWidth]"
        )
        assert scroll <= client
        driver.save_screenshot(str(tmp_path / "columns-page.png"))
    finally:
        driver.quit()
        assert server.stop() == 0
