"""Caption and the frozen-tower embedding pass under a 2-process gloo launch: the single-process output, every row
exactly once, in input order, with row counts that do not split evenly over the processes."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LAUNCH_2, read_csv, write_csv, write_toy
from test_captioning import save_captioner, tiny_vit_gpt2, write_images

from mmfuse.captioning.pipeline import caption_file, part_files
from mmfuse.distributed import share
from mmfuse.features.sources import FeatureCache

LAUNCH = [sys.executable, *LAUNCH_2]


def launch(*args: str, home: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    if home is not None:
        env["MMFUSE_HOME"] = str(home)
    return subprocess.Popen(
        [*LAUNCH, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    """stdout and stderr, once the launch succeeded."""
    out, err = proc.communicate(timeout=600)  # read while it runs: a full pipe would stall the launch
    assert proc.returncode == 0, err[-3000:]
    return out, err


def test_shares_cover_every_row_once():
    for n in (0, 1, 2, 7, 10, 81):
        for world in (1, 2, 3):
            for chunk in (1, 4, 64):  # whole chunks, the last cut at n
                rows = [i for rank in range(world) for i in share(n, rank, world, chunk)]
                assert rows == list(range(n))


@pytest.fixture(scope="module")
def captioning(tmp_path_factory) -> tuple[Path, Path, Path]:
    """An odd number of images, a tiny local captioner, and the captions one process writes."""
    root = tmp_path_factory.mktemp("shard-caption")
    model = tiny_vit_gpt2()
    model.generation_config.min_new_tokens = 2
    captioner = save_captioner(model, root / "captioner")
    write_images(root / "imgs", 101)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = caption_file(root / "imgs", root / "one.csv", model=captioner, batch_size=2, max_new_tokens=5, show=False)
    finally:
        torch.set_num_threads(threads)
    return root / "imgs", Path(captioner), one


def caption_args(images: Path, captioner: Path, out: Path) -> list:
    return ["caption", images, "--out", out, "--model", captioner, "--batch-size", "1", "--max-new-tokens", "5"]


@pytest.mark.slow
def test_two_processes_caption_what_one_does(captioning, tmp_path):
    images, captioner, one = captioning
    out = tmp_path / "two.csv"
    finish(launch(*caption_args(images, captioner, out)))
    assert out.read_bytes() == one.read_bytes()  # the same rows, in input order, each once
    assert not part_files(out)


@pytest.mark.slow
def test_a_killed_rank_resumes_every_image_once(captioning, tmp_path):
    images, captioner, one = captioning
    out = tmp_path / "two.csv"
    proc = launch(*caption_args(images, captioner, out))
    end = time.monotonic() + 300
    while not any(p.read_bytes().count(b"\n") >= 3 for p in part_files(out)):  # a header and two rows
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < end
        time.sleep(0.005)
    # One worker (a child of the launcher), as a lost GPU would take it: the launcher then stops the other.
    worker = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0]
    os.kill(int(worker), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    parts = [p.read_bytes() for p in part_files(out)]
    left = sum(b[: b.rfind(b"\n") + 1].count(b"\n") - 1 for b in parts)  # whole rows, after the headers
    # Usually mid-way; on an idle machine both shares may be done before the kill lands (the tiny captioner takes
    # about a millisecond an image), and then the rerun has only the killed launch's parts to merge: still each once.
    assert 2 <= left <= 101

    err = finish(launch(*caption_args(images, captioner, out), "--resume"))[1]
    assert re.search(rf"\b{left} of 101 image\(s\) already captioned", err)  # a half-written row would be cut
    assert out.read_bytes() == one.read_bytes()
    assert not part_files(out)


@pytest.mark.slow
def test_two_processes_embed_each_cache_miss_once(tmp_path, tiny_vit_dir, tiny_roberta_dir):
    # 81 rows: an odd number, so the two shares of the cache misses differ by one.
    data = write_toy(tmp_path / "toy", per_class=21, seed=1)
    rows = read_csv(data / "all.csv")
    write_csv(data / "all.csv", rows[:81])
    args = ["--vision", tiny_vit_dir, "--text", tiny_roberta_dir, "--tune", "head", "--epochs", "1"]
    homes = {n: tmp_path / f"home{n}" for n in (1, 2)}
    one = subprocess.run(
        [sys.executable, "-m", "mmfuse", "train", data / "all.csv", "--out", tmp_path / "run1", *args],
        env={**os.environ, "MMFUSE_HOME": str(homes[1]), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"},
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    err = finish(launch("train", data / "all.csv", "--out", tmp_path / "run2", *args, home=homes[2]))[1]

    distinct = {
        "image": {hashlib.sha256((data / r["image"]).read_bytes()).digest() for r in rows[:81]},
        "text": {r["text"] for r in rows[:81]},
    }
    for modality in ("image", "text"):
        made = re.findall(rf"process (\d) of 2 embedded (\d+) of the (\d+) {modality}\(s\) missing", err)
        assert sorted(int(rank) for rank, _, _ in made) == [0, 1]
        total = int(made[0][2])
        # Whole batches of embed's 64, as one process would make them (so the features are its features).
        assert sorted((int(rank), int(k)) for rank, k, _ in made) == [(r, len(share(total, r, 2, 64))) for r in (0, 1)]
        assert total == len(distinct[modality])
    entries = {n: cached_features(homes[n]) for n in homes}
    assert entries[1].keys() == entries[2].keys()
    assert len(entries[1]) == len(distinct["image"]) + len(distinct["text"])
    for entry, value in entries[1].items():  # the same features, whichever process and batch embedded them
        np.testing.assert_allclose(value, entries[2][entry], rtol=0, atol=1e-5)


def cached_features(home: Path) -> dict[tuple[str, str], np.ndarray]:
    """Every entry of the feature cache under ``home``, by (tower fingerprint, content key)."""
    root = home / "features"
    with sqlite3.connect(root / "v2" / "index.sqlite") as db:
        rows = db.execute("SELECT fp, key FROM entries").fetchall()
    cache = FeatureCache(root)
    return {(fp, key): cache.get(fp, key) for fp, key in rows}


@pytest.mark.slow
def test_ablate_under_a_launch_runs_in_turn_and_reports_once(tmp_path, tiny_vit_dir):
    """Forked workers cannot share a launch's process group (they hung): under a launch the three runs go in turn,
    the embedding pass split over the processes, and the main process alone writes and prints the ablation."""
    data = write_toy(tmp_path / "toy", per_class=7, seed=3)
    proc = launch("ablate", data / "all.csv", "--out", tmp_path / "abl", "--vision", tiny_vit_dir, "--tune", "head")
    out, err = finish(proc)
    images = re.findall(r"process \d of 2 embedded (\d+) of the (\d+) image\(s\) missing", err)
    assert len(images) == 2 and sum(int(k) for k, _ in images) == int(images[0][1]) > 0
    assert (tmp_path / "abl" / "ablation.json").exists() and out.count("wrote") == 1
