"""sources: the uint8 pixel cache holds the towers' own pixels (which reproduce their image processors), batches
normalise on the device, and each modality's source gives what the raw path gives."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmfuse.config import ModelConfig
from mmfuse.data.records import Record
from mmfuse.errors import MmfuseError
from mmfuse.features.cache import close_stores
from mmfuse.features.sources import (
    ImageFileSource,
    PixelCache,
    PixelSource,
    TokenizedTexts,
    batch_collate,
    build_dataset,
    decode_resized,
    load_pixels,
)
from mmfuse.models.classifier import build_model
from mmfuse.models.towers import PixelSpec, normalize


@pytest.fixture
def model(tiny_vit_dir, tiny_roberta_dir):
    cfg = ModelConfig(vision=str(tiny_vit_dir), text=str(tiny_roberta_dir), text_pooling="cls")
    return build_model(cfg, 3).eval()


@pytest.fixture
def jpegs(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(80, 60), (40, 50), (32, 32), (64, 48)]):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    png = tmp_path / "rgba.png"  # a mode the tower's loader converts: alpha composited on white
    Image.fromarray(rng.integers(0, 256, (30, 20, 4), dtype=np.uint8), mode="RGBA").save(png)
    return [*paths, png]


def test_cached_pixels_equal_the_towers_preprocessing(model, jpegs):
    from mmfuse.data.images import load_image

    spec = model.vision.pixel_spec
    assert (spec.height, spec.width) == (32, 32)
    images = [load_image(p) for p in jpegs]
    ref = model.vision.processor(images, return_tensors="pt")["pixel_values"]  # what the spec was read from
    pixels = load_pixels(jpegs, spec, workers=2)
    assert pixels.dtype == torch.uint8 and pixels.shape == (5, 3, 32, 32)
    torch.testing.assert_close(normalize(pixels, spec), ref, atol=1e-5, rtol=0)
    assert torch.equal(model.vision.preprocess(images)["pixel_values"], pixels)  # the tower's own: the same pixels


def test_packaged_efficientnet_spec_matches_its_preprocess():
    from mmfuse.models.towers import build_vision

    tower = build_vision("efficientnet-lite0", image_size=40)
    spec = tower.pixel_spec
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    arr = np.asarray(img.resize((40, 40), Image.BICUBIC), dtype=np.float32)
    # The packaged towers' float preprocessing as it always was, bit for bit: their frozen features do not change.
    ref = torch.from_numpy((arr / 255.0 - 0.5) / 0.5).permute(2, 0, 1)[None]
    out = normalize(torch.from_numpy(decode_resized(img, spec))[None], spec)
    assert torch.equal(out, ref)
    assert torch.equal(tower.float_pixels(tower.preprocess([img])["pixel_values"]), ref)


def test_cache_hits_on_the_second_load_and_misses_a_changed_file(model, jpegs, tmp_path):
    spec = model.vision.pixel_spec
    cache = PixelCache(tmp_path / "pixels")
    first = load_pixels(jpegs, spec, cache)
    assert (cache.hits, cache.misses) == (0, 5)
    again = load_pixels(jpegs, spec, cache)
    assert (cache.hits, cache.misses) == (5, 5)
    assert torch.equal(first, again)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(jpegs[0])
    changed = load_pixels(jpegs, spec, cache)
    assert (cache.hits, cache.misses) == (9, 6)
    assert changed[0, 0].float().mean() > 250 and torch.equal(changed[1:], first[1:])
    # A cut-off shard (a full disk, say) is decoded again rather than read as a smaller image.
    close_stores()
    (shard,) = (tmp_path / "pixels").rglob("*.shard")
    shard.write_bytes(shard.read_bytes()[:100])
    assert torch.equal(load_pixels(jpegs, spec, cache), changed) and cache.misses == 11


def test_unsupported_processor_is_refused():
    class Processor:  # a stand-in for an HF image processor that crops
        size = {"shortest_edge": 224}
        do_center_crop = True

    with pytest.raises(MmfuseError, match="fixed-size resize"):
        PixelSpec.from_processor(Processor())


def test_pixel_batches_give_the_same_logits_as_the_raw_path(model, jpegs):
    records = [Record(p, f"text number {i}", "a", i, p.name) for i, p in enumerate(jpegs)]
    labels = torch.tensor([0, 1, 2, 0, 1])
    raw_ds = build_dataset(model, records, labels, tuned=model.modalities, cache=None)
    px_ds = build_dataset(model, records, labels, tuned=model.modalities, cache=None, pixel_cache=True)
    assert isinstance(raw_ds.sources["image"], ImageFileSource) and isinstance(px_ds.sources["image"], PixelSource)
    raw = next(iter(DataLoader(raw_ds, 5, collate_fn=batch_collate)))
    px = next(iter(DataLoader(px_ds, 5, collate_fn=batch_collate)))
    assert px["image"]["pixel_values"].dtype == torch.uint8  # normalised by the tower, on the device
    assert torch.equal(px["image"]["pixel_values"], raw["image"]["pixel_values"])  # decoded each epoch: the same
    assert torch.equal(px["labels"], raw["labels"]) and torch.equal(px["present"], raw["present"])
    with torch.inference_mode():
        a = model(**{k: v for k, v in raw.items() if k != "labels"})
        b = model(**{k: v for k, v in px.items() if k != "labels"})
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_jpegs_decode_at_a_reduced_scale_only_where_asked_never_for_a_tower(tmp_path):
    """``load_image(at_least=...)`` drafts a JPEG (report thumbnails ask for it); a tower's pixels are decoded in
    full."""
    from mmfuse.data.images import load_image

    x = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
    Image.fromarray(x.astype(np.uint8)).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(x.astype(np.uint8)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.jpg", at_least=224).size == (320, 240)  # 1/2 scale keeps both sides >= 224
    assert load_image(tmp_path / "a.jpg", at_least=300).size == (640, 480)  # 1/2 would cut 480 to 240 < 300
    assert load_image(tmp_path / "a.png", at_least=224).size == (640, 480)  # only JPEGs have a reduced scale
    # A tower's pixels never come from a reduced scale: serving gets decoded images, and must see the same pixels.
    spec = PixelSpec(224, 224, Image.BILINEAR, 1 / 255, (0.5,) * 3, (0.5,) * 3)
    full = np.asarray(load_image(tmp_path / "a.jpg").resize((224, 224), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(decode_resized(tmp_path / "a.jpg", spec), full)


def test_texts_tokenized_once_give_what_the_tokenizer_gives(model, monkeypatch):
    """Fine-tuning tokenizes each distinct text once and then only pads: the same ids and mask as the tower's own
    preprocess, and with padding to a multiple of 8 (the GPU default) the same features."""
    tower = model.towers["text"]
    texts = ["a red square", "", "a much longer text with many more words in it than the others", "a red square"]
    calls = []
    real = tower.tokenize
    monkeypatch.setattr(tower, "tokenize", lambda t: calls.append(list(t)) or real(t))
    tokens = TokenizedTexts(tower, texts)
    got, want = tokens(texts), tower.preprocess(texts)
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(
        got["attention_mask"], want["attention_mask"]
    )
    tokens(["a red square", "new words"])
    assert calls == [
        ["a red square", "", "a much longer text with many more words in it than the others"],
        ["new words"],
    ]

    padded = TokenizedTexts(tower, multiple=8)(texts)
    assert padded["input_ids"].shape[1] % 8 == 0 and padded["input_ids"].shape[1] > want["input_ids"].shape[1]
    assert torch.equal(padded["attention_mask"].sum(1), want["attention_mask"].sum(1))
    with torch.no_grad():
        torch.testing.assert_close(tower(**padded), tower(**want), atol=1e-5, rtol=1e-4)


def test_images_too_large_for_memory_decode_every_epoch(model, jpegs, monkeypatch, caplog):
    """The uint8 cache holds a dataset's images in memory whole; when that would take over half of what is free,
    training decodes every epoch instead, and says so."""
    import mmfuse.features.sources as sources

    records = [Record(p, f"text {i}", "a", i + 1, str(p)) for i, p in enumerate(jpegs)]
    labels = torch.zeros(len(records), dtype=torch.long)
    ds = build_dataset(model, records, labels, model.modalities, None, pixel_cache=True)
    assert isinstance(ds.sources["image"], PixelSource) and not ds.decodes
    monkeypatch.setattr(sources, "available_memory", lambda: 1_000)
    with caplog.at_level("WARNING"):
        ds = build_dataset(model, records, labels, model.modalities, None, pixel_cache=True)
    assert isinstance(ds.sources["image"], ImageFileSource) and ds.decodes
    assert "decoding images every epoch" in caplog.text
    batch = ds.__getitems__(list(range(len(ds))))
    assert batch["image"]["pixel_values"].shape[0] == len(records)


def test_gpu_decoding_reports_itself_unavailable_without_cuda(model, jpegs):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_decode import decode_jpegs_gpu, nvjpeg_available

    if torch.cuda.is_available():
        pytest.skip("covered by the benchmark on a GPU")
    assert nvjpeg_available("cpu") is False
    with pytest.raises(MmfuseError, match="torchvision"):
        decode_jpegs_gpu(jpegs, model.vision.pixel_spec, "cpu")
