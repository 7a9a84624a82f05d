"""The sharded feature cache: hits, misses, entries checked on read, concurrent writers, prune, the old layout, and
``mmfuse cache info|prune|clear|verify``."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, read_csv, write_csv

import mmfuse.errors
import mmfuse.features.cache
from mmfuse.cli import main
from mmfuse.config import ModelConfig
from mmfuse.data.checks import load_checked
from mmfuse.features.cache import FeatureCache, close_stores, store_for
from mmfuse.features.cache_admin import cache_info, parse_size, prune_cache, verify_cache
from mmfuse.features.sources import content_keys, embed
from mmfuse.models.classifier import build_model
from mmfuse.paths import mmfuse_home

SRC = str(Path(__file__).resolve().parents[1] / "src")


def vec(i: int, n: int = 64) -> np.ndarray:
    return np.arange(n, dtype=np.float32) + 1000 * i


def index_rows(root: Path) -> dict[tuple[str, str], tuple]:
    with sqlite3.connect(root / "v2" / "index.sqlite") as conn:
        rows = conn.execute("SELECT fp, key, shard, offset, nbytes, last_used FROM entries").fetchall()
    return {(r[0], r[1]): r[2:] for r in rows}


def shards(root: Path) -> list[Path]:
    return sorted((root / "v2" / "shards").glob("*.shard"))


def overwrite(root: Path, shard: str, offset: int, data: bytes) -> None:
    with open(root / "v2" / "shards" / shard, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_hit_miss_dtypes_and_one_file_for_many_items(tmp_path):
    cache = FeatureCache(tmp_path / "c")
    assert cache.get("fp", "k0") is None
    assert not (tmp_path / "c").exists()  # a read makes nothing
    items = [(f"k{i}", vec(i)) for i in range(300)]
    cache.put_many("fp", items, name="image test-tower")
    cache.put("fp", "tokens", np.ones((5, 8), dtype=np.float16))
    cache.put("px", "img", np.full((3, 4, 4), 7, dtype=np.uint8))
    got = cache.get_many("fp", [f"k{i}" for i in range(300)] + ["absent"])
    assert all(np.array_equal(g, v) for g, (_, v) in zip(got, items)) and got[-1] is None
    tokens = cache.get("fp", "tokens")
    assert tokens.dtype == np.float16 and tokens.shape == (5, 8) and tokens.flags.writeable
    assert cache.get("px", "img").shape == (3, 4, 4)
    assert cache.get("other-fp", "k0") is None  # keyed by the tower's fingerprint too
    assert len(shards(tmp_path / "c")) == 1  # 302 items, one shard file
    # Another cache object on the same root (another run) reads them; nothing is lost when this process lets go.
    close_stores()
    assert np.array_equal(FeatureCache(tmp_path / "c").get("fp", "k7"), vec(7))


def test_memory_mode_reads_each_entry_once(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "c", memory=True)
    cache.put("fp", "a", vec(1))
    close_stores()
    monkeypatch.setattr(mmfuse.features.cache.ShardStore, "rows", lambda *a: pytest.fail("asked the index"))
    assert np.array_equal(cache.get("fp", "a"), vec(1))


def test_read_only_cache_stores_nothing(tmp_path):
    cache = FeatureCache(tmp_path / "c", write=False)
    cache.put_many("fp", [("a", vec(1))])
    assert cache.get("fp", "a") is None and not (tmp_path / "c").exists()
    FeatureCache(tmp_path / "c").put("fp", "a", vec(1))
    assert np.array_equal(cache.get("fp", "a"), vec(1))  # hits are still read


def test_another_entrys_bytes_of_the_same_size_are_detected_and_recomputed(tmp_path, caplog):
    """The issue's case: an image-feature entry overwritten with another image's features was used silently."""
    rng = random.Random(0)
    for i in range(3):
        make_image((i * 80, 40, 200 - i * 60), rng).save(tmp_path / f"{i}.png")
    write_csv(tmp_path / "m.csv", [{"image": f"{i}.png", "text": f"t{i}", "label": "a"} for i in range(3)])
    records = load_checked(tmp_path / "m.csv")
    model = build_model(ModelConfig(image_size=64), num_classes=2)
    cache = FeatureCache(tmp_path / "cache")
    fresh = embed(model, "image", records, cache, show=False)
    assert not torch.equal(fresh[0], fresh[1])

    fp, keys = model.cards["image"].fingerprint, content_keys(records, "image")
    rows = index_rows(tmp_path / "cache")
    shard, offset, nbytes, _ = rows[fp, keys[0]]
    overwrite(tmp_path / "cache", shard, offset, fresh[1].numpy().tobytes())  # entry 0 now holds image 1's features
    assert nbytes == fresh[1].numpy().nbytes
    with caplog.at_level(logging.WARNING):
        again = embed(model, "image", records, cache, show=False)
    torch.testing.assert_close(again, fresh, atol=1e-4, rtol=1e-4)  # recomputed (batch of 1), not read as features
    assert not torch.allclose(again[0], fresh[1])
    assert (cache.hits, cache.misses) == (2, 4)
    assert "1 cache entry" in caplog.text and "checksum mismatch" in caplog.text
    # ... and stored again, so the next run hits all three.
    embed(model, "image", records, cache, show=False)
    assert (cache.hits, cache.misses) == (5, 4)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_truncated_or_garbage_shard_is_never_read_as_features(tmp_path, damage, caplog):
    root = tmp_path / "c"
    cache = FeatureCache(root)
    cache.put_many("fp", [(f"k{i}", vec(i)) for i in range(10)])
    close_stores()
    (shard,) = shards(root)
    size = shard.stat().st_size
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: size // 2])
    else:
        shard.write_bytes(np.random.default_rng(0).bytes(size))
    with caplog.at_level(logging.WARNING):
        got = FeatureCache(root).get_many("fp", [f"k{i}" for i in range(10)])
    if damage == "truncated":  # the first half is intact
        assert all(np.array_equal(g, vec(i)) for i, g in enumerate(got[:5])) and got[5:] == [None] * 5
    else:
        assert got == [None] * 10
    assert "failed verification" in caplog.text
    assert len(index_rows(root)) == (5 if damage == "truncated" else 0)  # bad rows dropped
    FeatureCache(root).put_many("fp", [(f"k{i}", vec(i)) for i in range(10)])  # recomputed and stored again
    assert all(
        np.array_equal(g, vec(i)) for i, g in enumerate(FeatureCache(root).get_many("fp", [f"k{i}" for i in range(10)]))
    )


def test_bad_dtype_or_shape_in_the_index_is_a_miss(tmp_path):
    root = tmp_path / "c"
    FeatureCache(root).put("fp", "a", vec(1))
    with sqlite3.connect(root / "v2" / "index.sqlite") as conn:
        conn.execute("UPDATE entries SET shape = '3,5'")
    assert FeatureCache(root).get("fp", "a") is None


def test_an_interrupted_write_leaves_no_entry_and_the_next_one_works(monkeypatch):
    cache = FeatureCache()
    cache.put("fp", "a", vec(1))

    def boom(fd, data):
        os.write(fd, bytes(data[:7]))
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(mmfuse.features.cache, "_write_all", boom)
        with pytest.raises(KeyboardInterrupt):
            cache.put("fp", "b", vec(2))
    assert cache.get("fp", "b") is None
    cache.put("fp", "c", vec(3))  # appended after the partial item
    assert np.array_equal(cache.get("fp", "a"), vec(1)) and np.array_equal(cache.get("fp", "c"), vec(3))
    close_stores()
    report = verify_cache()["features"]
    assert report["checked"] == 2 and not report["bad"]


def test_a_full_shard_is_closed_and_a_new_one_started(tmp_path):
    root = tmp_path / "c"
    store_for(root).shard_bytes = 64 * 4 * 10  # ten vectors
    cache = FeatureCache(root)
    for start in range(0, 30, 5):
        cache.put_many("fp", [(f"k{i}", vec(i)) for i in range(start, start + 5)])
    assert len(shards(root)) == 3
    assert all(np.array_equal(g, vec(i)) for i, g in enumerate(cache.get_many("fp", [f"k{i}" for i in range(30)])))


FILL = """
import sys, numpy as np
from mmfuse.features.cache import FeatureCache
cache, who = FeatureCache(sys.argv[1]), int(sys.argv[2])
order = range(400) if who == 0 else range(399, -1, -1)
batch = []
for i in order:  # both write every key, in opposite orders, in small batches: overlapping, interleaved writes
    batch.append((f"k{i}", np.arange(256, dtype=np.float32) + 1000 * i))
    if len(batch) == 8:
        cache.put_many("fp", batch)
        batch = []
        got = cache.get_many("fp", [f"k{j}" for j in range(400)])
        want = [np.arange(256, dtype=np.float32) + 1000 * j for j in range(400)]
        assert all(g is None or np.array_equal(g, w) for g, w in zip(got, want))
"""


def test_two_processes_filling_the_same_cache_leave_it_readable_and_correct(tmp_path):
    root = mmfuse_home() / "features"
    env = {**os.environ, "PYTHONPATH": SRC}
    procs = [
        subprocess.Popen([sys.executable, "-c", FILL, str(root), str(who)], env=env, stderr=subprocess.PIPE)
        for who in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    got = FeatureCache(root).get_many("fp", [f"k{i}" for i in range(400)])
    assert all(np.array_equal(g, np.arange(256, dtype=np.float32) + 1000 * i) for i, g in enumerate(got))
    assert len(shards(root)) <= 2  # one per writer
    close_stores()
    report = verify_cache()["features"]
    assert report["checked"] == 400 and not report["bad"]


def age(root: Path, last_used: dict[str, float]) -> None:
    with sqlite3.connect(root / "v2" / "index.sqlite") as conn:
        for key, t in last_used.items():
            conn.execute("UPDATE entries SET last_used = ? WHERE key = ?", (t, key))


def test_prune_drops_least_recently_used_first(tmp_path):
    home, mb = mmfuse_home(), np.arange(2**18, dtype=np.float32)  # 1 MiB each
    cache = FeatureCache()
    cache.put_many("fp", [("a", mb), ("b", mb + 1), ("c", mb + 2)], name="image t")
    close_stores()
    now = time.time()
    age(home / "features", {"a": now - 3000, "b": now - 1000, "c": now - 2000})
    assert cache.get("fp", "a") is not None  # a read is a use: a is now the most recent
    close_stores()
    before = cache_info()["bytes"]
    report = prune_cache(before - 2**19)  # room for two of the three
    assert report["dropped_entries"] == 1 and report["rewritten_shards"] == 1 and report["after"] < before - 2**19
    assert set(index_rows(home / "features")) == {("fp", "a"), ("fp", "b")}
    got = FeatureCache().get_many("fp", ["a", "c"])  # (reading b would make it the most recent)
    assert np.array_equal(got[0], mb) and got[1] is None
    # The copies kept their last use: b (older than a) goes next.
    close_stores()
    prune_cache(cache_info()["bytes"] - 2**19)
    got = FeatureCache().get_many("fp", ["a", "b"])
    assert np.array_equal(got[0], mb) and got[1] is None
    prune_cache(0)
    assert FeatureCache().get("fp", "a") is None and not shards(home / "features")


def test_prune_never_touches_a_shard_being_written(tmp_path):
    home = mmfuse_home()
    writer = FeatureCache()
    writer.put("fp", "a", vec(1))  # this process now holds the shard it writes
    age(home / "features", {"a": 0.0})
    report = prune_cache(0)
    assert report["held_shards"] == 1 and report["dropped_entries"] == 0
    assert np.array_equal(writer.get("fp", "a"), vec(1))
    writer.put("fp", "b", vec(2))  # and it can go on writing
    close_stores()  # the writer lets go: now prune may take it
    assert prune_cache(0)["dropped_entries"] == 2
    assert FeatureCache().get("fp", "b") is None


def test_old_per_item_files_are_ignored_reported_and_removed(tmp_path):
    home = mmfuse_home()
    old = home / "features" / "0123456789abcdef" / "ab" / "abcd.npy"
    old.parent.mkdir(parents=True)
    np.save(old, vec(9))
    (home / "pixels" / "fedcba9876543210" / "ab").mkdir(parents=True)
    (home / "pixels" / "fedcba9876543210" / "ab" / "abcd.u8").write_bytes(b"\0" * 48)
    assert FeatureCache().get("0123456789abcdef", "abcd") is None  # never read as features
    FeatureCache().put("0123456789abcdef", "abcd", vec(1))
    assert np.array_equal(FeatureCache().get("0123456789abcdef", "abcd"), vec(1))
    info = cache_info()
    assert info["roots"]["features"]["old_layout_files"] == 1 and info["roots"]["pixels"]["old_layout_files"] == 1
    close_stores()
    prune_cache(cache_info()["bytes"] - 1)  # over the limit: the old layout goes first
    assert not old.exists() and np.array_equal(FeatureCache().get("0123456789abcdef", "abcd"), vec(1))


def test_a_damaged_index_is_worked_around(tmp_path, caplog):
    root = tmp_path / "c"
    (root / "v2").mkdir(parents=True)
    (root / "v2" / "index.sqlite").write_bytes(b"not a database" * 100)
    cache = FeatureCache(root)
    with caplog.at_level(logging.WARNING):
        assert cache.get("fp", "a") is None
        cache.put("fp", "a", vec(1))  # nothing stored, nothing raised
    assert "cache clear" in caplog.text


def test_parse_size():
    assert parse_size("20GB") == 20 * 10**9 and parse_size("500MB") == 500 * 10**6 and parse_size("0") == 0
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("800 kb") == 800_000 and parse_size("12") == 12
    with pytest.raises(mmfuse.errors.MmfuseError, match="20GB"):
        parse_size("lots")


def test_cache_verbs(tmp_path, capsys):
    cache = FeatureCache()
    cache.put_many("fp1", [(f"k{i}", vec(i)) for i in range(5)], name="image efficientnet-lite0")
    cache.put_many("fp2", [("t", vec(0, 8))], name="text minilm")
    close_stores()
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert "features: 6 entries" in out and "image efficientnet-lite0" in out and "text minilm" in out
    assert main(["cache", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    towers = {t["name"]: t for t in info["roots"]["features"]["towers"]}
    assert towers["image efficientnet-lite0"]["entries"] == 5 and towers["text minilm"]["bytes"] == 32

    assert main(["cache", "verify"]) == 0
    assert "features: 6 entries checked, 0 bad" in capsys.readouterr().out
    shard, offset, *_ = index_rows(mmfuse_home() / "features")["fp1", "k2"]
    overwrite(mmfuse_home() / "features", shard, offset, vec(3).tobytes())
    assert main(["cache", "verify"]) == 1
    out = capsys.readouterr().out
    assert "1 bad" in out and "checksum mismatch" in out
    assert main(["cache", "verify"]) == 0  # the bad row was dropped
    capsys.readouterr()

    assert main(["cache", "prune", "--max-size", "lots"]) == 2
    assert "20GB" in capsys.readouterr().err
    assert main(["cache", "prune", "--max-size", "1GB"]) == 0
    assert "0 least recently used entries dropped" in capsys.readouterr().out
    assert main(["cache", "clear"]) == 0
    assert "removed" in capsys.readouterr().out and not (mmfuse_home() / "features").exists()
    assert main(["cache", "info"]) == 0
    assert "features: empty" in capsys.readouterr().out


def entries() -> int:
    info = cache_info()
    return sum(r["entries"] for r in info["roots"].values())


def test_predict_stores_one_off_inputs_only_with_cache_and_evaluate_by_default(
    cold_home, toy_manifest, tmp_path, tiny_vit_dir, tiny_roberta_dir
):
    run, data = tmp_path / "run", toy_manifest
    fast = ["--tune", "head", "--epochs", "2", "--vision", str(tiny_vit_dir), "--text", str(tiny_roberta_dir)]
    fast += ["--text-pooling", "cls"]
    assert main(["train", str(data / "train.csv"), "--val", str(data / "val.csv"), "--out", str(run), *fast]) == 0
    trained = entries()
    assert trained > 0
    test = str(data / "test.csv")
    assert main(["predict", str(run), test, "--out", str(tmp_path / "p.csv")]) == 0
    assert entries() == trained  # one-off inputs are read through the cache, not stored
    assert main(["evaluate", str(run), test, "--out", str(tmp_path / "e1"), "--no-cache"]) == 0
    assert entries() == trained
    assert main(["evaluate", str(run), test, "--out", str(tmp_path / "e2")]) == 0  # a test set: stored
    evaluated = entries()
    assert evaluated > trained
    assert main(["predict", str(run), test, "--out", str(tmp_path / "q.csv"), "--cache"]) == 0
    assert (tmp_path / "p.csv").read_text() == (tmp_path / "q.csv").read_text()  # the same, read from the cache
    rows = [{**r, "text": r["text"] + " again"} for r in read_csv(data / "test.csv")]
    write_csv(tmp_path / "new.csv", [{**r, "image": str(data / r["image"])} for r in rows])
    assert main(["predict", str(run), str(tmp_path / "new.csv"), "--out", str(tmp_path / "r.csv"), "--cache"]) == 0
    assert entries() == evaluated + len(rows)  # new texts stored


def test_a_full_disk_only_stops_caching(tmp_path, monkeypatch, caplog):
    def full(fd, data):
        raise OSError(28, "No space left on device")

    cache = FeatureCache()
    monkeypatch.setattr(mmfuse.features.cache, "_write_all", full)
    with caplog.at_level(logging.WARNING):
        cache.put_many("fp", [("a", vec(1))])  # no exception: the caller has the features
    assert "No space left" in caplog.text and cache.get("fp", "a") is None
