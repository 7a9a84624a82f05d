"""``mmfuse cache info`` sizes every store under $MMFUSE_HOME (the caches, the unpacked models, the datasets, the file
index), and tells apart the feature caches of one tower (``features.cache_admin.describe_tower``).

    HF_HUB_OFFLINE=1 pytest -q tests/test_cache_info.py
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mmfuse.cli import main
from mmfuse.features.cache import FeatureCache, close_stores
from mmfuse.features.cache_admin import cache_info, describe_tower, human
from mmfuse.models.mpnet import mpnet_dir
from mmfuse.paths import mmfuse_home


def test_describe_tower_tells_specs_apart():
    lite = {"type": "packaged", "name": "efficientnet-lite0", "mean": [0.5] * 3, "std": [0.5] * 3}
    assert describe_tower("image", {**lite, "image_size": 224}) == "image efficientnet-lite0 (224 px)"
    assert describe_tower("image", {**lite, "image_size": 128}) == "image efficientnet-lite0 (128 px)"
    minilm = {"type": "hf-text", "name": "minilm", "pooling": "attention", "max_length": 64, "layers": 6}
    assert describe_tower("text", {**minilm, "layer_mean": 2}) == (
        "text minilm (max 64 tokens, attention pooling, 6 layers, mean of the last 2)"
    )
    assert (
        describe_tower("text", {**minilm, "layer_mean": 1})
        == "text minilm (max 64 tokens, attention pooling, 6 layers)"
    )
    vit = {
        "type": "hf-vision",
        "name": "google/vit",
        "pooling": "cls",
        "processor": {"size": {"height": 224, "width": 160}},
    }
    assert describe_tower("image", vit) == "image google/vit (224x160 px, cls pooling)"
    clip = {**vit, "processor": {"size": {"shortest_edge": 336}}}
    assert describe_tower("image", clip) == "image google/vit (336 px, cls pooling)"


@pytest.mark.usefixtures("warm")
def test_feature_caches_of_one_tower_are_told_apart():
    """The warm home holds efficientnet-lite0's features at its own image size and at 32 px: two rows that used to
    read the same, "image efficientnet-lite0"."""
    towers = cache_info()["roots"]["features"]["towers"]
    images = sorted(t["name"] for t in towers if t["name"].startswith("image efficientnet-lite0"))
    assert len(images) == 2 and len(set(images)) == 2, images
    assert "image efficientnet-lite0 (32 px)" in images
    texts = [t for t in towers if t["name"].startswith("text minilm")]
    assert texts and all("max " in t["name"] and "pooling" in t["name"] for t in texts)
    assert all(t["dtype"] and t["shape"] for t in towers)


def _fill(path, sizes: dict[str, int]) -> int:
    path.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"x" * size)
    return sum(sizes.values())


def test_info_reports_every_store_under_the_home(capsys):
    home = mmfuse_home()
    cache = FeatureCache()
    cache.put_many("fp1", [("k", np.zeros(8, "float32"))], name="image efficientnet-lite0 (128 px)")
    close_stores()
    mpnet = _fill(mpnet_dir(), {"model.safetensors": 400_000, "config.json": 500, "1_Pooling/config.json": 100})
    emoji = _fill(home / "datasets" / "emoji-v1", {"train.csv": 3_000, "images/a.png": 20_000})
    exports = _fill(home / "exports" / "some-export", {"model.onnx": 50_000})
    (home / "files.sqlite").write_bytes(b"s" * 4096)

    info = cache_info()
    stores = info["stores"]
    assert set(stores) == {"models", "datasets", "exports", "files.sqlite"}
    assert stores["models"]["bytes"] == mpnet and stores["models"]["items"][0]["name"] == mpnet_dir().name
    assert stores["models"]["items"][0]["files"] == 3
    assert stores["datasets"]["bytes"] == emoji and stores["exports"]["bytes"] == exports
    assert info["home_bytes"] == info["bytes"] + mpnet + emoji + exports + 4096
    assert info["bytes"] < 100_000  # what prune shrinks: the caches alone, never the model or the data

    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first == f"{home}: {human(info['home_bytes'])} in {info['home_files']:,} files", first
    assert re.search(rf"  models: 400\.6 kB in 3 files\n    {re.escape(mpnet_dir().name)} +400\.6 kB in 3 files", out)
    assert "  datasets: 23.0 kB in 2 files" in out and "emoji-v1" in out
    assert "  exports: 50.0 kB in 1 files" in out and "  files.sqlite: 4.1 kB" in out
    assert "image efficientnet-lite0 (128 px)  8 float32" in out
    assert "prune and clear act on the caches only" in out

    assert main(["cache", "info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stores"]["models"]["bytes"] == mpnet
    assert main(["cache", "clear"]) == 0  # the caches only
    assert mpnet_dir().is_dir() and (home / "datasets" / "emoji-v1").is_dir()


def test_info_on_an_empty_home(capsys):
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "features: empty" in out and "prune and clear" not in out
    assert cache_info()["stores"] == {} and cache_info()["home_bytes"] == 0
