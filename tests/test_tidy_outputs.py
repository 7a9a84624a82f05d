"""Outputs that hold only what they should: no captions.csv.lock left in a run, and `mmfuse datasets emoji`
reporting every file it wrote with its count."""

from __future__ import annotations

import functools
import threading
import time

import numpy as np
import pytest
from PIL import Image

from mmfuse.captioning import pipeline as captioning
from mmfuse.captioning.pipeline import fill_missing_captions, locked
from mmfuse.cli import main
from mmfuse.data.datasets import emoji
from mmfuse.data.records import Record
from mmfuse.errors import MmfuseError


class Fake(captioning.Captioner):
    def __call__(self, images):
        return [f"colour {int(np.asarray(im).mean())}" for im in images]


def test_captioning_leaves_no_lock_file_in_the_run(tmp_path, monkeypatch):
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    records = [Record(tmp_path / f"{i}.png", "", "x", i + 1, f"{i}.png") for i in range(3)]
    run = tmp_path / "run"
    monkeypatch.setattr(captioning, "build_captioner", lambda *a, **k: Fake())
    filled = fill_missing_captions(records, "fake", run / "captions.csv")
    assert all(r.text.startswith("colour") for r in filled)
    assert sorted(p.name for p in run.iterdir()) == ["captions.csv"]

    def unreachable(*a, **k):
        raise MmfuseError("no such captioner here")

    monkeypatch.setattr(captioning, "build_captioner", unreachable)
    with pytest.raises(MmfuseError):
        fill_missing_captions(records, "fake", tmp_path / "other" / "captions.csv")
    assert list((tmp_path / "other").iterdir()) == []  # not even an empty captions.csv


def test_the_captions_lock_still_excludes(tmp_path):
    path, order = tmp_path / "captions.csv", []

    def hold(name):
        with locked(path):
            order.append(f"{name} in")
            time.sleep(0.2)
            with open(path, "a") as f:
                f.write(name)  # the lock is held while the file is written, and the file stays
            order.append(f"{name} out")

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert order == ["a in", "a out", "b in", "b out"]
    assert path.read_text() == "ab" and sorted(p.name for p in tmp_path.iterdir()) == ["captions.csv"]


@pytest.mark.skipif(not emoji.NOTO_EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji is not installed")
def test_datasets_emoji_reports_every_file_it_wrote(tmp_path, monkeypatch, capsys):
    from test_emoji import EMOJI_TEST, EN_XML

    (tmp_path / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
    (tmp_path / "en.xml").write_text(EN_XML, encoding="utf-8")
    small = functools.partial(
        emoji.build_emoji, emoji_test=tmp_path / "emoji-test.txt", annotations=tmp_path / "en.xml", processes=1
    )
    monkeypatch.setattr(emoji, "build_emoji", small)
    out = tmp_path / "export"
    assert main(["datasets", "emoji", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == ["all.csv", "images", "info.json", "skipped.csv", "test.csv", "train.csv", "val.csv"]
    for name in written:
        assert f"  {name}{'/' * (name == 'images')} " in report, name
    assert "24 PNG images (136x128), one folder per group (3)" in report
    assert "all.csv          24 rows" in report and "train.csv        16 rows" in report
    assert "val.csv           4 rows" in report and "test.csv          4 rows" in report
    assert "skipped.csv       0 emoji" in report
