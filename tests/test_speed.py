"""The speed options: a Predictor with bf16 weights, and regional or whole-model torch.compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmfuse.config import ModelConfig, RunConfig, TrainConfig
from mmfuse.errors import MmfuseError
from mmfuse.inference.predictor import Predictor
from mmfuse.models.classifier import build_model
from mmfuse.models.compile import compile_model, repeated_blocks
from mmfuse.paths import mmfuse_home
from mmfuse.rundir.weights import save_model

LABELS = ["blue-apple", "blue-train", "red-apple", "red-train"]


def tiny_cfg(vit, roberta, text_pooling: str = "attention") -> ModelConfig:
    return ModelConfig(vision=str(vit), text=str(roberta), text_layers=2, text_pooling=text_pooling, max_length=16)


def write_run(run, cfg: ModelConfig, tune: str) -> None:
    """A run directory as ``fit`` leaves it, with random weights."""
    run.mkdir(parents=True)
    torch.manual_seed(0)
    run_cfg = RunConfig(model=cfg, train=TrainConfig(tune=tune))
    save_model(build_model(cfg, len(LABELS)), run, run_cfg.tuned)
    run_cfg.to_yaml(run / "config.yaml")
    (run / "labels.json").write_text(json.dumps(LABELS))


@pytest.mark.parametrize("tune", ["all", "text", "head"])
def test_bf16_predictor_runs_the_whole_model_in_bf16_close_to_fp32(
    toy_manifest, tmp_path, tiny_vit_dir, tiny_roberta_dir, tune
):
    """Attention pooling and the head's LayerNorms take bf16 token states; probabilities come back in fp32."""
    run = tmp_path / "run"
    write_run(run, tiny_cfg(tiny_vit_dir, tiny_roberta_dir), tune)
    fp32, bf16 = Predictor(run, "cpu"), Predictor(run, "cpu", dtype="bf16")
    assert fp32.dtype == "fp32" and bf16.weight_dtype == torch.bfloat16
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    records = fp32.load_data(toy_manifest / "test.csv")
    # Through the feature cache (frozen towers) or the uint8 pixel cache (tuned towers), as predict/evaluate run.
    ref, got = fp32.predict_records(records, show=False), bf16.predict_records(records, show=False, cache=True)
    assert got.dtype == np.float32 and np.allclose(got.sum(1), 1.0, atol=1e-5)
    assert np.abs(got - ref).max() < 0.05
    if tune == "head":  # features from bf16 towers never mix with the fp32 ones that training reads
        assert any((mmfuse_home() / "features-bf16").rglob("*.shard"))
    # And from PIL images and strings, as the Python API runs.
    images, texts = [r.image for r in records[:4]], [r.text for r in records[:4]]
    assert np.abs(bf16.predict(images, texts).probs - fp32.predict(images, texts).probs).max() < 0.05


def test_predictor_rejects_an_unknown_dtype(tmp_path):
    with pytest.raises(MmfuseError, match="dtype must be one of"):
        Predictor(tmp_path, "cpu", dtype="fp16")


def test_regional_compile_compiles_each_encoder_layer_in_place(tiny_vit_dir, tiny_roberta_dir):
    model = build_model(tiny_cfg(tiny_vit_dir, tiny_roberta_dir, "cls"), len(LABELS))
    blocks = repeated_blocks(model.vision) + repeated_blocks(model.text)
    assert [type(b).__name__ for b in blocks] == ["ViTLayer"] * 2 + ["RobertaLayer"] * 2
    keys = list(model.state_dict())
    torch.manual_seed(0)
    batch = {
        "image": {"pixel_values": torch.randn(3, 3, 32, 32)},
        "text": {"input_ids": torch.randint(5, 1000, (3, 16)), "attention_mask": torch.ones(3, 16, dtype=torch.long)},
    }
    model.eval()
    with torch.no_grad():
        ref = model(**batch)

    compiled = compile_model(model, "regional", backend="eager")
    assert compiled is model and list(model.state_dict()) == keys  # checkpoints need no unwrapping
    assert all(b._compiled_call_impl is not None for b in blocks)
    model.train()
    F.cross_entropy(model(**batch), torch.tensor([0, 1, 2])).backward()  # trains through the compiled blocks
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), ref)


def test_compile_falls_back_to_the_whole_model_without_tuned_blocks(tiny_vit_dir, tiny_roberta_dir):
    model = build_model(tiny_cfg(tiny_vit_dir, tiny_roberta_dir, "cls"), len(LABELS))
    model.freeze_towers()  # frozen towers run once, into the feature cache: only the head is left to compile
    assert isinstance(compile_model(model, "regional", backend="eager"), torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(compile_model(model, "model", backend="eager"), torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="compile mode"):
        compile_model(model, "layers")
