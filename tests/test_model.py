"""Towers, fusion heads, modality dropout and the feature cache."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from conftest import make_image, read_csv, write_csv

import mmfuse.features.cache
from mmfuse.cli import main
from mmfuse.config import ModelConfig
from mmfuse.data.checks import load_checked
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache, embed
from mmfuse.models.classifier import build_model
from mmfuse.models.fusion import build_head, head_names
from mmfuse.models.pooling import NormalisedTokens
from mmfuse.models.towers import EfficientNetLiteTower, build_text, build_vision, repeated_blocks


def test_hf_towers_load_from_a_directory_and_truncate(tiny_vit_dir, tiny_roberta_dir):
    from PIL import Image

    vision = build_vision(str(tiny_vit_dir))
    assert vision.dim == 32
    pixels = vision.preprocess([Image.new("RGB", (50, 40)), Image.new("RGB", (20, 30))])["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32) and vision(pixels).shape == (2, 32)

    full = build_text(str(tiny_roberta_dir))
    cut = build_text(str(tiny_roberta_dir), layers=2, max_length=8)
    assert len(full.model.encoder.layer) == 4 and len(cut.model.encoder.layer) == 2
    # The kept layers are the pretrained first two, not fresh ones.
    torch.testing.assert_close(
        cut.model.encoder.layer[1].output.dense.weight, full.model.encoder.layer[1].output.dense.weight
    )
    batch = cut.preprocess(["a short one", "a much longer sentence that will be cut at eight tokens"])
    assert batch["input_ids"].shape == (2, 8)
    for pooling in ("cls", "mean"):
        assert build_text(str(tiny_roberta_dir), pooling=pooling)(**batch).shape == (2, 32)


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_freeze_below_tunes_only_the_top_layers_and_keeps_the_rest_in_eval(tiny_vit_dir, tiny_roberta_dir, kind):
    """--tune-layers 1: gradients reach the last encoder layer (and what follows it), nothing below; the frozen part
    computes with dropout off, as a cache of its outputs would."""
    from PIL import Image

    if kind == "text":
        tower = build_text(str(tiny_roberta_dir), pooling="mean")
        inputs = tower.preprocess(["a short one", "another sentence"])
    else:
        tower = build_vision(str(tiny_vit_dir))
        inputs = tower.preprocess([Image.new("RGB", (40, 40), "red")] * 2)
    tower.freeze_below(1)
    tower.train()
    tower(**inputs).sum().backward()
    blocks = repeated_blocks(tower)
    embeddings = next(m for name, m in tower.named_modules() if name.endswith("embeddings"))
    last, below = blocks[-1], [*embeddings.parameters(), *blocks[0].parameters()]
    assert all(p.grad is not None for p in last.parameters() if p.requires_grad) and any(
        p.requires_grad for p in last.parameters()
    )
    assert all(not p.requires_grad and p.grad is None for p in below)
    assert not embeddings.training and not blocks[0].training
    assert last.training
    with pytest.raises(MmfuseError, match="repeated layers"):
        EfficientNetLiteTower("efficientnet-lite0", pretrained=False).freeze_below(1)


def test_unavailable_model_error_names_both_options():
    with pytest.raises(MmfuseError) as e:
        build_vision("no-such-org/no-such-vit")
    msg = str(e.value)
    assert "no-such-org/no-such-vit" in msg and "local directory" in msg and "efficientnet-lite0" in msg
    with pytest.raises(MmfuseError, match="vision tower"):
        build_text("efficientnet-lite0")


def test_packaged_efficientnet_knows_a_cat():
    from skimage import data

    from mmfuse.data.images import to_rgb

    tower = EfficientNetLiteTower("efficientnet-lite0").eval()
    from PIL import Image

    pixels = tower.preprocess([to_rgb(Image.fromarray(data.chelsea()))])["pixel_values"]
    with torch.no_grad():
        top = tower.imagenet_logits(pixels).argmax(-1).item()
    assert 281 <= top <= 285  # ImageNet's cat classes (tabby, tiger cat, Persian, Siamese, Egyptian cat)
    assert tower(pixels).shape == (1, 1280)


def test_packaged_minilm_embeds_offline():
    tower = build_text("minilm", pooling="mean")
    with torch.no_grad():
        a, b, c = tower(**tower.preprocess(["a red apple", "a green apple", "a steam train"]))
    cos = torch.nn.functional.cosine_similarity
    assert tower.dim == 384 and cos(a, b, dim=0) > cos(a, c, dim=0)


def test_a_frozen_packaged_tower_is_built_only_when_an_input_needs_it():
    from mmfuse.models.towers import HFTextTower, minilm_path

    model = build_model(ModelConfig(), num_classes=2, build=())
    card = model.cards["text"]
    assert model.text is None and card.dim == 384 and card.spec["layers"] == 6 and card.sequence
    eager = HFTextTower(minilm_path(), pooling="attention", layer_mean=2)  # the packaged default averages two layers
    eager.name = "minilm"
    assert card.fingerprint == eager.fingerprint  # the same cache entries either way
    with torch.no_grad():
        states = model.encode("text", eager.preprocess(["a red apple"]))
    assert model.text is not None and not any(p.requires_grad for p in model.text.parameters())
    with torch.no_grad():
        torch.testing.assert_close(states, eager.eval()(**eager.preprocess(["a red apple"])))


def test_attention_pooling_gives_token_states_and_the_model_pools_them(tiny_roberta_dir):
    tower = build_text(str(tiny_roberta_dir), pooling="attention", layer_mean=2)
    batch = tower.preprocess(["a short one", "a somewhat longer sentence here"])
    with torch.no_grad():
        states = tower(**batch)
    assert tower.sequence and states.shape == (2, batch["input_ids"].shape[1], 32)
    with pytest.raises(MmfuseError, match="text-layer-mean"):
        build_text(str(tiny_roberta_dir), layer_mean=9)

    cfg = ModelConfig(vision="efficientnet-lite0", text=str(tiny_roberta_dir), text_pooling="attention")
    model = build_model(cfg, num_classes=3).eval()
    feats = torch.randn(2, 1280)
    # Token states of two texts, the second padded; its padding must not change its pooled result.
    tokens, mask = torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    out = model(image_feats=feats, text_feats=NormalisedTokens(tokens, mask))
    trimmed = model(image_feats=feats[1:], text_feats=NormalisedTokens(tokens[1:, :2], mask[1:, :2]))
    torch.testing.assert_close(out[1:], trimmed)
    # A row with no tokens at all (missing text) stays finite, forwards and backwards.
    model.train()
    empty = model(image_feats=feats, text_feats=NormalisedTokens(tokens, torch.zeros(2, 5, dtype=torch.long)))
    empty.sum().backward()
    assert torch.isfinite(empty).all() and torch.isfinite(model.poolers["text"].score.weight.grad).all()


def test_packaged_efficientnet_image_size_is_its_input_and_its_fingerprint():
    small, native = build_vision("efficientnet-lite0", image_size=128), build_vision("efficientnet-lite0")
    from PIL import Image

    assert small.preprocess([Image.new("RGB", (136, 128))])["pixel_values"].shape == (1, 3, 128, 128)
    assert native.image_size == 224 and small.fingerprint != native.fingerprint
    with pytest.raises(MmfuseError, match="image-size"):
        build_vision("no-such-org/no-such-vit", image_size=128)


@pytest.mark.parametrize("name", head_names())
def test_each_fusion_head_learns(name):
    """4 classes = one comparison inside each modality: either alone caps at 50%. (Comparisons, not signs,
    because every head layer-normalises its inputs, which moves a single feature's sign.)"""
    torch.manual_seed(0)

    def sample(n):
        a, b = torch.randn(n, 12), torch.randn(n, 6)
        return a, b, 2 * (a[:, 0] > a[:, 1]).long() + (b[:, 0] > b[:, 1]).long()

    a, b, y = sample(512)
    head = build_head(name, [12, 6], 4, hidden=32, dropout=0.1)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(head([a, b]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    a, b, y = sample(512)
    assert (head([a, b]).argmax(1) == y).float().mean() > 0.8  # chance 0.25, one modality at most 0.5


def test_modality_dropout_lets_a_model_predict_without_text(toy_manifest, tmp_path, capsys):
    rows = read_csv(toy_manifest / "test.csv")
    no_text = tmp_path / "no_text.csv"
    write_csv(no_text, [{**r, "image": str(toy_manifest / r["image"]), "text": ""} for r in rows])

    plain = tmp_path / "plain"
    assert main(["train", str(toy_manifest / "train.csv"), "--out", str(plain), "--tune", "head", "--epochs", "3"]) == 0
    assert main(["predict", str(plain), str(no_text), "--out", str(tmp_path / "p.csv")]) == 2
    assert "--modality-dropout" in capsys.readouterr().err

    robust = tmp_path / "robust"
    assert (
        main(
            [
                "train",
                str(toy_manifest / "train.csv"),
                "--out",
                str(robust),
                "--tune",
                "head",
                "--epochs",
                "20",
                "--modality-dropout",
                "0.3",
            ]
        )
        == 0
    )
    assert main(["predict", str(robust), str(no_text), "--out", str(tmp_path / "p.csv")]) == 0
    preds = read_csv(tmp_path / "p.csv")
    # Without text only the colour is knowable: the prediction must get the colour half of the label right.
    right_colour = np.mean([p["label"].split("-")[0] == r["label"].split("-")[0] for p, r in zip(preds, rows)])
    assert len(preds) == len(rows) and right_colour > 0.8


def test_modality_dropout_never_blanks_both():
    model = build_model(ModelConfig(modality_dropout=0.9), num_classes=2)
    present = torch.ones(1000, 2, dtype=torch.bool)
    present[:500, 1] = False  # half the rows have no text already
    out = model._drop_modalities(present, 1000)
    assert out.any(dim=1).all() and (~out).any()
    assert not out[:500, 1].any()  # what was missing stays missing


def test_feature_cache_hits_misses_and_atomic_writes(tmp_path, monkeypatch):
    rng = random.Random(0)
    for i in range(3):
        make_image((i * 80, 0, 0), rng).save(tmp_path / f"{i}.png")
    write_csv(tmp_path / "m.csv", [{"image": f"{i}.png", "text": f"t{i}", "label": "a"} for i in range(3)])
    records = load_checked(tmp_path / "m.csv")
    model = build_model(ModelConfig(), num_classes=2)
    cache = FeatureCache(tmp_path / "cache")

    first = embed(model, "image", records, cache, show=False)
    assert (cache.hits, cache.misses) == (0, 3)
    again = embed(model, "image", records, cache, show=False)
    assert (cache.hits, cache.misses) == (3, 3)
    torch.testing.assert_close(first, again)

    make_image((0, 200, 0), rng).save(tmp_path / "1.png")  # one file changes: only it is recomputed
    changed = embed(model, "image", records, cache, show=False)
    assert (cache.hits, cache.misses) == (5, 4)
    assert not torch.equal(changed[1], first[1]) and torch.equal(changed[0], first[0])

    # A different preprocessing (input size) is a different tower fingerprint: nothing is reused.
    model = build_model(ModelConfig(image_size=192), num_classes=2)
    embed(model, "image", records, cache, show=False)
    assert cache.misses == 7

    # An interrupted write leaves no entry: its bytes are written before its index row, which never comes.
    def boom(fd, data):
        os.write(fd, bytes(data[:7]))
        raise KeyboardInterrupt

    monkeypatch.setattr(mmfuse.features.cache, "_write_all", boom)
    with pytest.raises(KeyboardInterrupt):
        cache.put("fp", "deadbeef", np.zeros(4, dtype=np.float32))
    assert cache.get("fp", "deadbeef") is None


def test_a_run_written_by_an_earlier_version_loads_and_predicts_the_same(tmp_path):
    """tests/fixtures/old_run was written by mmfuse before the data-path restructure (see its README)."""
    import json
    import shutil
    from pathlib import Path

    from conftest import write_toy

    from mmfuse import load

    fixture = Path(__file__).parent / "fixtures" / "old_run"
    run = shutil.copytree(fixture, tmp_path / "run")
    root = write_toy(tmp_path / "toy", per_class=6, seed=0)
    expected = json.loads((run / "expected.json").read_text())
    got = load(run).predict([root / name for name in expected["images"]], expected["texts"])
    np.testing.assert_allclose(got.probs, np.array(expected["probs"]), rtol=0, atol=1e-6)
