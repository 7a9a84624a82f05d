"""bench/cross_validate.py on a set with named columns: fold files that keep every column (images made absolute),
the probe's tabular arm encoded as a run encodes it, and the fold files of a set of one image and one text as before.
No recipe trains and no tower is built: the probe reads only the tabular columns here."""

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import read_csv, write_toy
from test_columns import FIELDS, write_columns

from mmfuse.data.checks import load_checked
from mmfuse.data.columns import Columns
from mmfuse.errors import MmfuseError

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "cross_validate.py"


@pytest.fixture(scope="module")
def cv():
    spec = importlib.util.spec_from_file_location("cross_validate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    logging.disable(logging.NOTSET)  # main() quiets logging for its own output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_columns(tmp_path_factory.mktemp("cv-columns") / "data", per_class=10)


def test_fold_files_keep_every_column_with_absolute_images(cv, data, tmp_path):
    cols = '{"image_columns": ["front", "back"], "text_columns": ["title"]}'
    assert cv.main(["{}", "--no-probe", "--data", str(data), "--columns", cols, "--out", str(tmp_path)]) == 0
    source = read_csv(data / "all.csv")
    for k in range(5):
        train, test = read_csv(tmp_path / f"train{k}.csv"), read_csv(tmp_path / f"test{k}.csv")
        assert list(train[0]) == list(FIELDS) and len(train) + len(test) == len(source)
        for row in train + test:
            for c in ("front", "back"):
                assert row[c] == "" or (os.path.isabs(row[c]) and Path(row[c]).is_file())
        made_relative = [
            {**r, **{c: os.path.relpath(r[c], data) if r[c] else "" for c in ("front", "back")}} for r in test
        ]
        assert all(r in source for r in made_relative)
    tests = [r["title"] + r["size"] for k in range(5) for r in read_csv(tmp_path / f"test{k}.csv")]
    assert sorted(tests) == sorted(r["title"] + r["size"] for r in source)  # each row tested once


def test_the_tabular_probe_arm_is_standardised_on_each_folds_train_with_categories_one_hot(cv, data, capsys):
    columns = {"tabular_columns": ["size", "section"]}
    recs = load_checked(str(data / "all.csv"), named=Columns(tabular=("size", "section")))
    folds = [(np.arange(0, 30), np.arange(30, 40)), (np.arange(10, 40), np.arange(0, 10))]
    feats = cv.column_features(recs, Columns(tabular=("size", "section")), columns, folds, [0, 1])
    assert set(feats) == {"tabular"}
    for k, (train, _) in enumerate(folds):
        x = feats["tabular"][k]
        assert x.shape == (len(recs), 2 + 3)  # size, its missing indicator, sections x, y, z
        missing = np.array([r.cells["size"] == "" for r in recs])
        assert np.array_equal(x[:, 1] == 1, missing) and np.all(x[missing, 0] == 0)
        given = train[~missing[train]]
        assert abs(x[given, 0].mean()) < 1e-5 and abs(x[given, 0].std() - 1) < 1e-4
        assert np.all(x[:, 2:].sum(1) == 1)  # every row has one of the sections seen in training
    cv.main(["{}", "--data", str(data), "--columns", '{"tabular_columns": ["size", "section"]}'])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("probe")]
    assert [line.split(")")[0] for line in lines] == ["probe (LR C=4, tabular", "probe (LR C=4, concat"]
    assert lines[0].split("weighted F1")[1] == lines[1].split("weighted F1")[1]  # tabular is all there is


def test_a_set_of_one_image_and_one_text_keeps_its_fold_files(cv, tmp_path):
    data = write_toy(tmp_path / "toy", per_class=5, seed=0)
    assert cv.main(["{}", "--no-probe", "--data", str(data), "--out", str(tmp_path / "cv"), "--k", "2"]) == 0
    source = read_csv(data / "all.csv")
    rows = read_csv(tmp_path / "cv" / "train0.csv") + read_csv(tmp_path / "cv" / "test0.csv")
    assert all(list(r) == ["image", "text", "label"] for r in rows)
    assert sorted((str(data / r["image"]), r["text"], r["label"]) for r in source) == sorted(
        tuple(r.values()) for r in rows
    )


def test_a_set_without_image_and_text_or_bad_columns_is_refused_with_what_to_do(cv, data, tmp_path):
    with pytest.raises(MmfuseError, match="--columns"):
        cv.main(["{}", "--no-probe", "--data", str(data), "--out", str(tmp_path)])
    with pytest.raises(MmfuseError, match="image_columns, text_columns, tabular_columns"):
        cv.main(["{}", "--no-probe", "--data", str(data), "--columns", '{"texts": ["title"]}'])
