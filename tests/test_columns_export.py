"""mmfuse export of a run with named columns: one graph with an input group per image and text column (the towers'
weights shared), the tabular inputs and the presence mask, checked against torch on rows with empty cells; the ONNX
runtime and ``predict --backend onnx`` read rows as torch does."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import read_csv, write_csv
from test_columns import api_rows, write_columns

pytest.importorskip("onnxruntime")

import mmfuse  # noqa: E402
from mmfuse.cli import main  # noqa: E402
from mmfuse.errors import MmfuseError  # noqa: E402
from mmfuse.inference.export import OnnxPredictor  # noqa: E402

COLUMNS = ["--image-columns", "front", "back", "--text-columns", "title", "--tabular-columns", "size", "section"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_vit_dir, tiny_roberta_dir, module_home):
    """Tiny HF towers (frozen, a head on their features) over two image columns, one text column and a numeric and
    a categorical tabular column; exported to RUN/export with the synthetic parity rows."""
    data = write_columns(tmp_path_factory.mktemp("columns-export") / "data", per_class=4)
    out = data.parent / "run"
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir)]
    fast = ["--tune", "head", "--epochs", "1", "--batch-size", "8"]
    assert (
        main(
            [
                "train",
                str(data / "train.csv"),
                "--val",
                str(data / "val.csv"),
                "--out",
                str(out),
                *COLUMNS,
                *towers,
                *fast,
            ]
        )
        == 0
    )
    assert main(["export", str(out), "--out", str(out / "export")]) == 0
    return out


def test_the_graph_takes_each_column_and_records_them(run):
    info = json.loads((run / "export" / "export.json").read_text())
    assert info["status"] == "passed" and info["parity"]["passed"]
    assert info["columns"] == {"image": ["front", "back"], "text": ["title"], "tabular": ["size", "section"]}
    assert list(info["inputs"]) == [
        "image0_pixel_values",
        "image1_pixel_values",
        "text0_input_ids",
        "text0_attention_mask",
        "tabular_numeric",
        "tabular_codes",
        "present",
    ]
    assert [(s["name"], s["column"]) for s in info["slots"]] == [
        ("image0", "front"),
        ("image1", "back"),
        ("text0", "title"),
        ("tabular", ""),
    ]
    # The training statistics travel with the graph, so new rows encode as in training.
    assert json.loads((run / "export" / "tabular.json").read_text()) == json.loads((run / "tabular.json").read_text())
    parity = info["parity"]
    assert parity["texts"] == ["short", "long"] and parity["rows_checked"] == 20
    long = [c for c in parity["cases"] if c["texts"] == "long"]
    assert all(c["tokens"] == info["preprocess"]["text"]["max_length"] for c in long)
    import onnx

    graph = onnx.load(str(run / "export" / "model.onnx"))
    assert [i.name for i in graph.graph.input] == list(info["inputs"])
    # One tower per modality, run once per column: the vision weights are in the graph once, not once per column.
    sizes = [int(np.prod(t.dims)) for t in graph.graph.initializer]
    assert sum(sizes) < 1.5 * sum(p.numel() for p in mmfuse.load(run, device="cpu").model.parameters())


def test_the_export_readme_example_runs(run):
    """The snippet the export writes into its README.md, run as written (in a process of its own) but for a real
    image."""
    text = (run / "export" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    image = api_rows(run.parent / "data", run.parent / "data" / "val.csv")[0]["front"]
    proc = subprocess.run([sys.executable, "-c", code.replace("front.png", image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    classes = json.loads((run / "labels.json").read_text())
    assert any(c in proc.stdout for c in classes)


def test_onnx_matches_torch_on_rows_with_empty_cells(run):
    data = run.parent / "data"
    rows = api_rows(data, data / "val.csv")[:5]
    rows[1] = {**rows[1], "back": None, "size": None}
    rows[2] = {**rows[2], "front": None, "title": "", "section": "never seen"}
    rows[3] = {**rows[3], "title": None, "size": "not a number"}
    torch_probs = mmfuse.load(run, device="cpu").predict(rows=rows).probs
    onnx = OnnxPredictor(run / "export", run)
    got = onnx.predict(rows=rows)
    np.testing.assert_allclose(got, torch_probs, atol=1e-5)
    # The empty cells matter (their columns' placeholders): a gate that ignored present would not pass this.
    full = onnx.predict(rows=api_rows(data, data / "val.csv")[:5])
    assert not np.allclose(full[1:4], got[1:4], atol=1e-5)
    np.testing.assert_allclose(full[[0, 4]], got[[0, 4]], atol=1e-6)
    # One row at a time gives the same as the batch (padding of the text column to the longest does not leak).
    alone = np.concatenate([onnx.predict(rows=[r]) for r in rows])
    np.testing.assert_allclose(alone, got, atol=1e-5)


def test_predict_with_the_onnx_backend_matches_torch(run, tmp_path):
    data = str(run.parent / "data" / "all.csv")
    assert main(["predict", str(run), data, "--out", str(tmp_path / "torch.csv")]) == 0
    assert main(["predict", str(run), data, "--out", str(tmp_path / "onnx.csv"), "--backend", "onnx"]) == 0
    t, o = read_csv(tmp_path / "torch.csv"), read_csv(tmp_path / "onnx.csv")
    assert list(o[0]) == list(t[0]) and len(o) == len(t) == len(read_csv(data))
    cols = [c for c in t[0] if c.startswith("p_")]
    p_t = np.array([[float(r[c]) for c in cols] for r in t])
    p_o = np.array([[float(r[c]) for c in cols] for r in o])
    np.testing.assert_allclose(p_o, p_t, atol=1e-4)
    assert [r["label"] for r in o] == [r["label"] for r in t]


def test_the_runtime_says_how_to_call_each_kind_of_graph(run, tmp_path):
    onnx = OnnxPredictor(run / "export")
    with pytest.raises(MmfuseError, match=r"predict\(rows="):
        onnx.predict([None], ["a text"])
    with pytest.raises(MmfuseError, match=r"no value for column\(s\) \['section'\]"):
        onnx.predict(rows=[{"front": None, "back": None, "title": "a", "size": 1}])
    with pytest.raises(MmfuseError, match="back image file"):
        onnx.predict(
            rows=[{"front": None, "back": str(tmp_path / "none.png"), "title": "a", "size": 1, "section": "x"}]
        )


def test_a_multi_label_text_and_numbers_run_exports_its_sigmoids(run, tiny_roberta_dir, tmp_path):
    """A multi-label run with no image column and no categorical column: the graph has no pixel or code input, gives
    a sigmoid per label, and predict --backend onnx gives torch's sets."""
    data = run.parent / "data"
    fields = ["title", "size", "labels"]
    for name in ("train", "val"):
        rows = read_csv(data / f"{name}.csv")
        for r in rows:
            r["labels"] = r["label"].replace("-", "|")
        write_csv(tmp_path / f"{name}.csv", [{f: r[f] for f in fields} for r in rows], fields)
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "train.csv"), "--val", str(tmp_path / "val.csv"), "--out", str(out)]
    cols = ["--modalities", "text", "tabular", "--text-columns", "title", "--tabular-columns", "size"]
    fast = ["--text", str(tiny_roberta_dir), "--tune", "head", "--epochs", "1", "--batch-size", "8"]
    assert main([*args, *cols, *fast]) == 0
    # Synthetic parity rows: the validation rows' sigmoids are where the thresholds were chosen, so a 1e-8 difference
    # there may flip a set (a pre-existing trait of the multi-label gate, not of columns).
    assert main(["export", str(out), "--out", str(out / "export")]) == 0
    info = json.loads((out / "export" / "export.json").read_text())
    assert info["multi_label"] is True and info["parity"]["passed"]
    assert list(info["inputs"]) == ["text0_input_ids", "text0_attention_mask", "tabular_numeric", "present"]
    assert "no label set different" in (out / "export" / "README.md").read_text()
    torch_csv, onnx_csv = tmp_path / "torch.csv", tmp_path / "onnx.csv"
    rows = str(tmp_path / "train.csv")  # not the rows the thresholds were chosen on (their sigmoids are at them)
    assert main(["predict", str(out), rows, "--out", str(torch_csv)]) == 0
    assert main(["predict", str(out), rows, "--out", str(onnx_csv), "--backend", "onnx"]) == 0
    got, want = read_csv(onnx_csv), read_csv(torch_csv)
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    names = [c for c in want[0] if c.startswith("p_")]
    np.testing.assert_allclose(
        [[float(r[n]) for n in names] for r in got], [[float(r[n]) for n in names] for r in want], atol=1e-4
    )
    probs = OnnxPredictor(out / "export").predict(rows=[{"title": "a red apple", "size": None}])
    assert probs.shape == (1, len(info["classes"])) and not np.isclose(probs.sum(), 1.0)  # sigmoids, not a softmax
