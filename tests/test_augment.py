"""--augment: training images cropped, flipped and colour-jittered on the device, only in training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from conftest import read_csv
from test_bad_options import error_of

from mmfuse import load
from mmfuse.cli import main
from mmfuse.config import RunConfig, resolve
from mmfuse.errors import MmfuseError
from mmfuse.training.augment import Augmenter, Strength, make_augmenter


def pixels(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def ramp(n: int = 64, size: int = 32) -> torch.Tensor:
    """Grey images that brighten from left to right: a mirror image darkens instead."""
    row = torch.linspace(30, 225, size).round().to(torch.uint8)
    return row.expand(n, 3, size, size).contiguous()


def test_none_is_off_and_a_crop_of_everything_is_the_identity():
    assert make_augmenter("none", True, 0, None, "cpu") is None
    x = pixels()
    same = Augmenter(Strength((1.0, 1.0), 0.0, (1.0, 1.0)), hflip=False)  # the resampling itself changes nothing
    assert torch.equal(same(x), x)


@pytest.mark.parametrize("strength", ["light", "strong"])
def test_light_and_strong_keep_the_batch_change_pixels_and_repeat_for_a_seed(strength):
    x = pixels()
    out = Augmenter(strength, seed=3)(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    changed = (out.int() - x.int()).abs().flatten(1).float().mean(1)
    assert (changed > 1).all(), changed  # every image moved, not only some
    assert torch.equal(Augmenter(strength, seed=3)(x), out)
    assert not torch.equal(Augmenter(strength, seed=4)(x), out)
    again = Augmenter(strength, seed=3)
    again.reseed(1)  # the next epoch draws other crops
    assert not torch.equal(again(x), out)
    again.reseed(0, 1)  # and so does the next step
    assert not torch.equal(again(x), out)
    again.reseed(0, 0)  # a batch's augmentation depends on its seed, epoch and step alone: resuming repeats it
    assert torch.equal(again(x), out)


def test_strong_changes_more_than_light():
    x = pixels(64)
    moved = {s: (Augmenter(s)(x).float() - x.float()).abs().mean().item() for s in ("light", "strong")}
    assert moved["strong"] > moved["light"], moved


def test_without_hflip_nothing_is_mirrored():
    x = ramp()
    left, right = slice(0, 8), slice(24, 32)

    def mirrored(out: torch.Tensor) -> torch.Tensor:
        return out[..., left].float().mean((1, 2, 3)) > out[..., right].float().mean((1, 2, 3))

    for seed in range(3):
        assert not mirrored(Augmenter("strong", hflip=False, seed=seed)(x)).any()
    flips = mirrored(Augmenter("strong", hflip=True)(x)).float().mean()
    assert 0.25 < flips < 0.75, flips  # about half


def test_normalised_float_batches_get_the_same_augmentation():
    """Batches decoded every epoch arrive normalised by the tower: they are augmented in pixel values, as uint8 ones."""
    x = pixels()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out_u8 = Augmenter("strong", seed=1)(x)
    out_f = Augmenter("strong", seed=1, normalisation=(1 / 255, mean, std))((x.float() / 255 - m) / s)
    assert out_f.dtype == torch.float32
    back = (out_f * s + m) * 255
    assert (back - out_u8.float()).abs().max() <= 0.51  # uint8's rounding only


def config(*flags: str) -> RunConfig:
    from mmfuse.cli import build_parser, run_config

    return resolve(run_config(build_parser().parse_args(["train", "DATA", "--out", "RUN", *flags])))


def test_the_default_follows_tune():
    assert config("--tune", "image").train.augment == "light"
    assert config("--tune", "all").train.augment == "light"
    assert config("--tune", "head").train.augment == "none"
    assert config().train.augment == "none"  # --tune text
    assert config("--tune", "image", "--augment", "strong", "--no-hflip").train.hflip is False
    assert config("--tune", "image").train.hflip is True
    # A run's resolved config re-derives it when --tune changes, unless it was asked for.
    run = config("--tune", "image")
    assert resolve(run.updated({"train": {"tune": "head"}})).train.augment == "none"
    # A text-only model has no images to augment: no error, nothing to do.
    assert config("--tune", "all", "--augment", "light", "--modalities", "text").train.augment == "none"


def test_augmenting_a_frozen_vision_tower_is_refused(capsys, toy_manifest, tmp_path):
    err = error_of(capsys, ["train", str(toy_manifest / "all.csv"), "--out", str(tmp_path / "r"), "--augment", "light",
                            "--tune", "head"])  # fmt: skip
    assert "--augment light" in err and "--tune head" in err and "cached" in err
    with pytest.raises(MmfuseError, match="--tune image or all"):
        config("--augment", "strong", "--tune", "text")
    with pytest.raises(MmfuseError, match="--augment must be one of none, light, strong"):
        config("--augment", "heavy")


@pytest.mark.parametrize("decode_each_epoch", [False, True])
def test_tune_image_augments_training_batches_only(
    toy_manifest, tmp_path, tiny_vit_dir, monkeypatch, decode_each_epoch
):
    """Through the CLI: --tune image turns light augmentation on; every training batch goes through it (uint8, from the
    pixel cache or decoded every epoch alike), validation and prediction never, so predictions repeat exactly."""
    seen = []
    call = Augmenter.__call__

    def spy(self, x):
        seen.append(x.dtype)
        return call(self, x)

    monkeypatch.setattr(Augmenter, "__call__", spy)
    run = tmp_path / "run"
    argv = ["train", str(toy_manifest / "train.csv"), "--val", str(toy_manifest / "val.csv"), "--out", str(run)]
    argv += ["--vision", str(tiny_vit_dir), "--modalities", "image", "--tune", "image", "--epochs", "2"]
    argv += ["--batch-size", "8"] + ["--decode-each-epoch"] * decode_each_epoch
    assert main(argv) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (cfg["augment"], cfg["hflip"]) == ("light", True)
    n_train = len(read_csv(toy_manifest / "train.csv"))
    assert len(seen) == 2 * -(-n_train // 8)  # each training batch of both epochs, and nothing else
    assert set(seen) == {torch.uint8}  # a tower with a PixelSpec gets the same uint8 pixels either way
    seen.clear()
    rows = read_csv(toy_manifest / "test.csv")
    images = [toy_manifest / r["image"] for r in rows]
    predictor = load(run)
    first = predictor.predict(images).probs
    np.testing.assert_array_equal(predictor.predict(images).probs, first)
    assert main(["evaluate", str(run), str(toy_manifest / "test.csv"), "--out", str(tmp_path / "eval")]) == 0
    assert seen == []
