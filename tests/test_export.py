"""mmfuse export: one ONNX graph per run, refused unless it matches torch; predict --backend onnx runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TOY, read_csv, write_toy

pytest.importorskip("onnxruntime")

from mmfuse.cli import main  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_toy(tmp_path_factory.mktemp("export") / "toy", **TOY)


def trained_and_exported(data: Path, out: Path, train: list[str], export: list[str]) -> Path:
    args = ["train", str(data / "train.csv"), "--tune", "head", "--epochs", "1", "--out", str(out)]
    assert main([*args, *train]) == 0
    assert main(["export", str(out), "--out", str(out / "export"), *export]) == 0
    return out


@pytest.fixture(scope="module")
def hf(data, tiny_vit_dir, tiny_roberta_dir):
    """Tiny HF towers trained with modality dropout (so the graph takes ``present``), and its export."""
    towers = ["--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir), "--modality-dropout", "0.2"]
    return trained_and_exported(data, data.parent / "hf", towers, [])


@pytest.fixture(scope="module")
def pk(data, shared_home):
    """The packaged towers at 32 px (frozen, built only for the export), and its export: the slow tier's."""
    with pytest.MonkeyPatch.context() as mp:  # module scope comes before the per-test home: the shared warm one
        mp.setenv("MMFUSE_HOME", str(shared_home))
        return trained_and_exported(data, data.parent / "pk", ["--image-size", "32"], ["--data", str(data / "val.csv")])


class Runs(dict):
    """The data and the two runs by name, each trained and exported when a test first asks for it."""

    def __init__(self, request, data):
        super().__init__(data=data)
        self.request = request

    def __missing__(self, name):
        self[name] = self.request.getfixturevalue(name)
        return self[name]


@pytest.fixture
def runs(request, data):
    """Shared by the tests: the packaged run's export takes most of a minute, so only the tests that use it build it
    (they are marked slow)."""
    return Runs(request, data)


PK = pytest.mark.slow  # exports the packaged towers (the pk fixture)


def probs(path: Path) -> tuple[np.ndarray, list[str]]:
    rows = read_csv(path)
    cols = [c for c in rows[0] if c.startswith("p_")]
    return np.array([[float(r[c]) for c in cols] for r in rows]), [r["label"] for r in rows]


@pytest.mark.parametrize("name", ["hf", pytest.param("pk", marks=PK)])
def test_export_passes_its_parity_gate_and_records_it(runs, name):
    out = runs[name] / "export"
    info = json.loads((out / "export.json").read_text())
    assert info["status"] == "passed" and (out / "model.onnx").is_file() and (out / "tokenizer").is_dir()
    assert info["exporter"]["name"] == "dynamo" and info["exporter"]["opset"] >= 17
    assert set(info["versions"]) >= {"torch", "onnx", "onnxruntime", "mmfuse"}
    parity = info["parity"]
    assert parity["batch_sizes"] == [1, 2, 7] and parity["texts"] == ["short", "long"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["top1_differs"] == 0 and parity["passed"]
    long = [c for c in parity["cases"] if c["texts"] == "long"]
    assert all(c["tokens"] == info["preprocess"]["text"]["max_length"] for c in long)  # texts at max_length tokens
    assert info["classes"] == json.loads((runs[name] / "labels.json").read_text())
    # present is a graph input only where the model learned what a missing text means (modality dropout).
    expected = ["input_ids", "attention_mask", "pixel_values"] + ["present"] * (name == "hf")
    assert list(info["inputs"]) == expected
    assert ("synthetic" in parity["rows"]) == (name == "hf")
    assert f"largest\nprobability difference {parity['max_abs_diff']:.1e}," in (out / "README.md").read_text()


@pytest.mark.parametrize("name", ["hf", pytest.param("pk", marks=PK)])
def test_predict_onnx_backend_matches_torch(runs, name, tmp_path):
    test = str(runs["data"] / "test.csv")
    assert main(["predict", str(runs[name]), test, "--out", str(tmp_path / "torch.csv")]) == 0
    assert main(["predict", str(runs[name]), test, "--out", str(tmp_path / "onnx.csv"), "--backend", "onnx"]) == 0
    p_torch, l_torch = probs(tmp_path / "torch.csv")
    p_onnx, l_onnx = probs(tmp_path / "onnx.csv")
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    assert l_onnx == l_torch
    t, o = read_csv(tmp_path / "torch.csv"), read_csv(tmp_path / "onnx.csv")
    assert [r["image"] for r in o] == [r["image"] for r in t] and list(o[0]) == list(t[0])


@PK
@pytest.mark.parametrize("readme", ["export", "project"])
def test_readme_example_runs(runs, readme):
    """The snippet the export writes into its README.md, and the project README's, run as written (with a real image
    and the packaged run's export)."""
    out = runs["pk"] / "export"
    page = Path(__file__).resolve().parents[1] / "docs" / "export.md"  # the project's snippet lives on its Export page
    text = (out / "README.md" if readme == "export" else page).read_text()
    code = re.search(r"```python\n(import json\n.*?)```", text, re.S).group(1)
    image = runs["data"] / read_csv(runs["data"] / "test.csv")[0]["image"]
    code = code.replace('"cat.png"', repr(str(image))).replace('"runs/emoji/export"', repr(str(out)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=out.parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    classes = json.loads((out / "export.json").read_text())["classes"]
    assert any(c in proc.stdout for c in classes)


@PK
def test_a_broken_graph_is_refused_and_never_used(runs, tmp_path, monkeypatch, capsys):
    """Wrong normalisation constants written beside the graph: the gate finds it and marks the export failed."""
    import mmfuse.inference.export.exporter as export

    real = export.image_preprocess

    def wrong_mean(tower):
        return {**real(tower), "mean": [0.2, 0.2, 0.2]}

    monkeypatch.setattr(export, "image_preprocess", wrong_mean)
    out = tmp_path / "broken"
    assert main(["export", str(runs["pk"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not match the torch model" in err and "limit 1e-04" in err
    info = json.loads((out / "export.json").read_text())
    assert info["status"] == "failed" and info["parity"]["max_abs_diff"] > 1e-4
    assert not (out / "model.onnx").exists() and (out / "model.failed.onnx").exists()
    test = str(runs["data"] / "test.csv")
    args = ["predict", str(runs["pk"]), test, "--out", str(tmp_path / "p.csv"), "--backend", "onnx", "--onnx"]
    assert main([*args, str(out)]) == 2
    assert "failed its parity gate" in capsys.readouterr().err


@PK
def test_bad_input_is_a_clear_error(runs, tmp_path, capsys):
    run = str(runs["pk"])
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    cases = [
        (["export", str(tmp_path), "--out", str(tmp_path / "e")], "not an mmfuse run directory"),
        (["export", run, "--out", run], "is the run directory itself"),
        (["export", run, "--out", str(a_file)], "is a file"),
        (["export", run, "--out", str(tmp_path / "theirs")], "already holds other files"),
        (["export", run, "--out", str(runs["hf"])], "holds a trained run"),
        (
            ["predict", str(runs["hf"]), str(runs["data"] / "test.csv"), "--out", str(tmp_path / "p.csv")]
            + ["--backend", "onnx", "--onnx", str(tmp_path / "nothing")],
            f"mmfuse export {runs['hf']} --out {tmp_path / 'nothing'}",
        ),
        (
            ["predict", str(runs["hf"]), str(runs["data"] / "test.csv"), "--out", str(tmp_path / "p.csv")]
            + ["--backend", "onnx", "--onnx", str(runs["pk"] / "export")],
            "made from other weights",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


@PK
def test_missing_extra_names_the_pip_command(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    assert main(["export", str(runs["pk"]), "--out", str(tmp_path / "e")]) == 2
    assert "pip install 'mmfuse[export]'" in capsys.readouterr().err
    args = ["predict", str(runs["pk"]), str(runs["data"] / "test.csv"), "--out", str(tmp_path / "p.csv")]
    assert main([*args, "--backend", "onnx"]) == 2
    assert "pip install 'mmfuse[export]'" in capsys.readouterr().err


def test_import_mmfuse_does_not_import_onnx():
    code = (
        "import sys, mmfuse, mmfuse.cli, mmfuse.inference.predictor, mmfuse.inference.export, "
        "mmfuse.inference.backends; print('onnx' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_predictor_does_not_import_the_export():
    """The torch predictor stands below the export (which runs it for its parity gate): --backend is chosen above
    both (inference.backends)."""
    code = (
        "import sys, mmfuse.inference.predictor; "
        "print(any(m.startswith('mmfuse.inference.export') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow  # the benchmark, run as a test in a subprocess
def test_bench_small_runs(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MMFUSE_HOME": str(tmp_path / "home")}
    out = subprocess.run(
        [sys.executable, str(BENCH / "export.py"), "--small", "--repeats", "3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) >= 3 and any(line.startswith("| 32 ") for line in rows), out.stdout
