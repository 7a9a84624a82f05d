"""LoRA adapters in a fine-tuned text tower (--lora RANK): only they and the head train, a run stores only them beside
the base tower, it reloads into the same probabilities (bags and --resume too), exports merged, and bad combinations
or a missing peft say what to do."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TOY, read_csv, write_toy
from safetensors.torch import load_file

import mmfuse
from mmfuse.cli import main
from mmfuse.config import LORA_LR, RunConfig
from mmfuse.data.checks import load_checked
from mmfuse.models import lora
from mmfuse.models.towers import build_text, minilm_path
from mmfuse.training.fit import fit
from mmfuse.training.loop import run_epoch, save, setup

pytest.importorskip("peft")

SMALL = {"image_size": 32}
FAST = {"tune": "text", "lora": 4, "epochs": 2, "batch_size": 8}

pytestmark = pytest.mark.usefixtures("warm")  # the toy rows' image features, embedded once a session


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The rows of the warm home, in a folder of this module's own."""
    return write_toy(tmp_path_factory.mktemp("loradata") / "toy", **TOY)


def config(toy, model=None, **train) -> RunConfig:
    """As the flags give it: ``updated`` applies them, so defaults that follow --lora (its rate, alpha) follow."""
    data = {"train": str(toy / "train.csv"), "val": str(toy / "val.csv")}
    return RunConfig().updated({"data": data, "model": {**SMALL, **(model or {})}, "train": {**FAST, **train}})


@pytest.fixture(scope="module")
def minilm_run(toy, shared_home, tmp_path_factory):
    """A LoRA run on the packaged MiniLM, trained through train's steps: the in-memory trainer is kept to compare."""
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        tr = setup(config(toy), out)
        trainable = [k for k, p in tr.unwrapped.named_parameters() if p.requires_grad]
        for epoch in (1, 2):
            run_epoch(tr, epoch)
        save(tr, False, 0.0)
        yield tr, out, trainable


@pytest.mark.slow  # MiniLM fine-tuned (minilm_run)
def test_the_flag_resolves_into_the_run_config_with_its_rate_and_alpha(minilm_run):
    tr, out, _ = minilm_run
    saved = RunConfig.from_yaml(out / "config.yaml")
    assert (saved.train.lora, saved.train.lora_alpha, saved.train.lr) == (4, 8.0, LORA_LR)
    assert "lora" in saved.asked["train"] and "lr" not in saved.asked["train"]
    # The rate followed --lora, and follows it back when it is turned off.
    assert saved.updated({"train": {"lora": 0}}).train.lr is None
    spec = json.loads((out / "towers.json").read_text())["text"]["lora"]
    assert spec["rank"] == 4 and spec["alpha"] == 8.0
    # MiniLM (BERT): query, key, value and the attention output of each of its 6 layers.
    assert len(spec["targets"]) == 24 and spec["targets"][:4] == [
        f"encoder.layer.0.attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")
    ]


@pytest.mark.slow  # MiniLM fine-tuned (minilm_run)
def test_only_adapters_and_the_head_train(minilm_run):
    tr, _, trainable = minilm_run
    in_text = [k for k in trainable if k.startswith("text.")]
    assert in_text and all(lora.is_adapter(k) for k in in_text)
    assert any(k.startswith("head.") for k in trainable)
    assert {id(p) for p in tr.params} == {id(p) for k, p in tr.unwrapped.named_parameters() if k in trainable}
    adapters = sum(p.numel() for k, p in tr.unwrapped.named_parameters() if lora.is_adapter(k))
    tower = sum(p.numel() for p in tr.unwrapped.text.parameters())
    assert adapters < 0.01 * tower  # rank 4 in 24 projections of 384 x 384: 74k of MiniLM's 23M


@pytest.mark.slow  # MiniLM fine-tuned (minilm_run)
def test_the_run_stores_only_the_adapters_beside_the_packaged_tower(minilm_run):
    _, out, _ = minilm_run
    state = load_file(str(out / "model.safetensors"))
    text = [k for k in state if k.startswith("text.")]
    assert text and all(lora.is_adapter(k) for k in text)
    assert any(state[k].abs().sum() > 0 for k in text if "lora_B" in k)  # trained: lora_B starts at zero
    base = (minilm_path() + "/model.safetensors").replace("//", "/")
    assert (out / "model.safetensors").stat().st_size < 0.05 * __import__("os").path.getsize(base)
    assert not (out / "text_tower").exists()  # the packaged tower comes back from its wheel


@pytest.mark.slow  # MiniLM fine-tuned (minilm_run)
def test_a_reloaded_run_gives_the_probabilities_it_was_validated_with(toy, minilm_run):
    tr, out, _ = minilm_run
    val = load_checked(str(toy / "val.csv"))
    again = mmfuse.load(out, dtype="fp32").predict_records(val, show=False)
    np.testing.assert_allclose(again, tr.val_probs, rtol=0, atol=1e-5)
    # Without its adapters the tower gives other probabilities: the check above could fail.
    from peft.tuners.tuners_utils import BaseTunerLayer

    predictor = mmfuse.load(out, dtype="fp32")
    for module in predictor.model.text.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(False)
    assert not np.allclose(predictor.predict_records(val, show=False), tr.val_probs, atol=1e-4)


@pytest.mark.slow  # MiniLM fine-tuned (minilm_run)
def test_export_merges_the_adapters_and_passes_its_parity_gate(minilm_run, tmp_path):
    pytest.importorskip("onnx")
    import onnx

    _, out, _ = minilm_run
    assert main(["export", str(out), "--out", str(tmp_path / "export")]) == 0
    info = json.loads((tmp_path / "export" / "export.json").read_text())
    assert info["status"] == "passed"
    graph = onnx.load(str(tmp_path / "export" / "model.onnx"), load_external_data=False)
    assert not [i.name for i in graph.graph.initializer if "lora" in i.name]


def test_a_bag_stores_the_hf_base_once_and_adapters_in_the_last_layers_per_member(toy, tiny_roberta_dir, tmp_path):
    run = tmp_path / "bag"
    flags = ["--text", str(tiny_roberta_dir), "--image-size", "32", "--tune", "text", "--lora", "2"]
    args = [*flags, "--tune-layers", "2", "--epochs", "2", "--batch-size", "8", "--bag", "2"]
    assert main(["train", str(toy / "all.csv"), "--out", str(run), *args]) == 0
    spec = json.loads((run / "members" / "0" / "towers.json").read_text())["text"]
    assert {t.split(".")[2] for t in spec["lora"]["targets"]} == {"2", "3"}  # the last 2 of its 4 layers
    base = load_file(str(run / "frozen_towers.safetensors"))
    pretrained = load_file(str(tiny_roberta_dir / "model.safetensors"))
    key = "encoder.layer.3.attention.self.query.weight"
    torch.testing.assert_close(base[f"text.model.{key.replace('.weight', '.base_layer.weight')}"], pretrained[key])
    for k in range(2):
        state = load_file(str(run / "members" / str(k) / "model.safetensors"))
        assert all(lora.is_adapter(key) for key in state if key.startswith("text."))
    rows = read_csv(toy / "test.csv")
    images, texts = [toy / r["image"] for r in rows], [r["text"] for r in rows]
    got = mmfuse.load(run, dtype="fp32").predict(images, texts).probs
    members = [mmfuse.load(run / "members" / str(k), dtype="fp32").predict(images, texts).probs for k in range(2)]
    np.testing.assert_allclose(got, np.mean(members, axis=0), rtol=0, atol=1e-6)
    assert not np.allclose(members[0], members[1])


def test_resume_restores_the_adapters(toy, tiny_roberta_dir, tmp_path):
    cfg = config(toy, {"text": str(tiny_roberta_dir)}, keep_checkpoints=True)
    fit(cfg, tmp_path / "run")
    whole = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert any(lora.is_adapter(k) for k in whole)
    fit(cfg, tmp_path / "run", resume=True)  # from its checkpoint before epoch 2: epoch 2 again
    resumed = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert resumed.keys() == whole.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--tune", "head", "--lora", "4"], "--tune head tunes no tower"),
        (["--tune", "image", "--lora", "4"], "--tune image tunes the image tower"),
        (["--tune", "all", "--lora", "4"], "--tune all tunes both towers"),
        (["--tune", "text", "--lora", "-1"], "--lora is the adapters' rank, >= 1"),
        (["--tune", "text", "--lora-alpha", "8"], "goes with --lora RANK"),
        (["--tune", "text", "--lora", "4", "--modalities", "image"], "--modalities image leaves out"),
    ],
)
def test_bad_combinations_say_what_to_do(toy, tmp_path, capsys, flags, says):
    assert main(["train", str(toy / "train.csv"), "--out", str(tmp_path / "run"), *flags]) == 2
    assert says in capsys.readouterr().err


def test_a_tower_without_attention_projections_is_refused(tiny_roberta_dir, monkeypatch):
    tower = build_text(str(tiny_roberta_dir))
    assert len(lora.attention_projections(tower)) == 16
    monkeypatch.setattr(lora, "ATTENTION_WORDS", ("nothing-matches",))
    with pytest.raises(mmfuse.MmfuseError, match="found no attention projections"):
        lora.train_adapters(tower, 4, 8.0)


def test_missing_peft_names_the_pip_command(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails as if it were not installed
    args = ["--tune", "text", "--lora", "4", "--image-size", "32", "--epochs", "1"]
    assert main(["train", str(toy / "train.csv"), "--out", str(tmp_path / "run"), *args]) == 2
    assert "pip install 'mmfuse[lora]'" in capsys.readouterr().err


def test_import_mmfuse_does_not_import_peft():
    code = (
        "import sys, mmfuse, mmfuse.training.fit, mmfuse.models.classifier, mmfuse.inference.predictor; "
        "assert 'peft' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
