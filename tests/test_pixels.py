"""One path from an image to a tower's pixels: a large JPEG gives the same pixels to a tuned vision tower in training
(the pixel cache, or decoded every epoch), in prediction (a path, a PIL image, or bytes as serve decodes them) and in
an ONNX export's preprocessing (``OnnxPredictor.pixels`` and the numpy its README shows)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import write_toy
from PIL import Image

from mmfuse.cli import main
from mmfuse.data.images import MAX_PIXELS
from mmfuse.data.records import Record
from mmfuse.features.sources import PixelCache, PixelSource, build_dataset
from mmfuse.inference.export.exporter import IMAGE_FEEDS, image_preprocess
from mmfuse.inference.export.runtime import OnnxPredictor
from mmfuse.inference.predictor import Predictor
from mmfuse.models.towers import PixelSpec, normalize

TOWERS = {"tiny-vit": None, "efficientnet-lite0": ["--image-size", "32"]}


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> bytes:
    """A 1200x900 JPEG: large enough that a draft decode (at 1/8 scale for a 32-px tower) would change its pixels."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:900, 0:1200]
    base = np.stack([x / 1200 * 255, y / 900 * 255, (x + y) % 256], -1)
    img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module", params=list(TOWERS))
def run(request, tmp_path_factory, tiny_vit_dir):
    """A run whose vision tower was fine-tuned (--tune image), image only."""
    root = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as mp:  # module scope comes before the per-test home: give these their own
        mp.setenv("MMFUSE_HOME", str(root / "home"))
        data = write_toy(root / "toy", per_class=3, seed=0)
        vision = ["--vision", str(tiny_vit_dir)] if TOWERS[request.param] is None else ["--vision", request.param]
        argv = ["train", str(data / "train.csv"), "--out", str(root / "run"), "--modalities", "image"]
        argv += [*vision, *(TOWERS[request.param] or []), "--tune", "image", "--epochs", "1", "--augment", "none"]
        assert main(argv) == 0
    return root / "run"


def seen_by_tower(predictor: Predictor, call) -> list[torch.Tensor]:
    """The ``pixel_values`` the vision tower was given while ``call()`` ran."""
    tower = predictor.model.vision
    seen = []
    real = tower.float_pixels
    tower.float_pixels = lambda pixel_values: seen.append(pixel_values.cpu()) or real(pixel_values)
    try:
        call()
    finally:
        del tower.float_pixels
    return seen


def test_training_and_serving_give_a_tuned_tower_the_same_pixels(run, photo, tmp_path):
    from mmfuse.inference.serve.requests import decode_image

    path = tmp_path / "photo.jpg"
    path.write_bytes(photo)
    predictor = Predictor(run, device="cpu", dtype="fp32")
    model, spec = predictor.model, predictor.model.vision.pixel_spec
    assert spec is not None and (spec.height, spec.width) == (32, 32)

    # Training: the dataset fit builds for a tuned vision tower, from the pixel cache or decoded every epoch.
    records = [Record(path, "", "a", 1, str(path))]
    cached = build_dataset(model, records, None, ["image"], None, pixel_cache=PixelCache(tmp_path / "px"))
    assert isinstance(cached.sources["image"], PixelSource)
    train = cached.__getitems__([0])["image"]["pixel_values"]
    each_epoch = build_dataset(model, records, None, ["image"], None).__getitems__([0])["image"]["pixel_values"]
    assert train.dtype == torch.uint8 and train.shape == (1, 3, 32, 32)
    assert torch.equal(each_epoch, train)

    # Serving: bytes as serve decodes them, a PIL image, a path; and the predict/evaluate verbs' records.
    served = decode_image(photo, MAX_PIXELS)
    calls = {
        "bytes (serve)": lambda: predictor.predict([served]),
        "PIL image": lambda: predictor.predict([Image.open(io.BytesIO(photo))]),
        "path": lambda: predictor.predict([path]),
        "records (predict, evaluate)": lambda: predictor.predict_records(records, show=False),
    }
    for name, call in calls.items():
        (got,) = seen_by_tower(predictor, call)
        assert torch.equal(got, train), name

    # The same, normalised, as an export's preprocessing gives them to the graph.
    floats = normalize(train, spec).numpy()
    written = json.loads(json.dumps(image_preprocess(model.vision)))  # as export.json holds it
    onnx = OnnxPredictor.__new__(OnnxPredictor)  # only its preprocessing: no graph is needed for the pixels
    onnx.processor, onnx.pixel_spec = None, PixelSpec.from_dict(written)
    assert onnx.pixel_spec == spec
    assert np.array_equal(onnx.pixels([served]), floats)
    scope = {"np": np, "info": {"preprocess": {"image": written}}, "images": [served], "feeds": {}}
    exec(IMAGE_FEEDS, scope)  # the export README's numpy, for a deployment without mmfuse
    assert scope["feeds"]["pixel_values"].dtype == np.float32
    assert np.array_equal(scope["feeds"]["pixel_values"], floats)


def test_a_jpeg_is_never_draft_decoded_for_a_tower(photo, tmp_path):
    """The pixel cache's folder names how its images were decoded: entries drafted by earlier versions are not read
    as full decodes."""
    from mmfuse.data.images import load_image
    from mmfuse.models.towers import image_pixels

    path = tmp_path / "photo.jpg"
    path.write_bytes(photo)
    spec = PixelSpec(32, 32, Image.BICUBIC)
    full = np.asarray(load_image(path).resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)
    drafted = np.asarray(load_image(path, at_least=32).resize((32, 32), Image.BICUBIC)).transpose(2, 0, 1)
    assert not np.array_equal(full, drafted)  # the photo tells the two apart
    assert np.array_equal(image_pixels(path, spec), full)
    assert np.array_equal(image_pixels(Image.open(path), spec), full)
    assert spec.fingerprint != PixelSpec(32, 32, Image.BILINEAR).fingerprint
