"""Per-file facts remembered across runs: reused while a file's stats hold, recomputed when it changes."""

from __future__ import annotations

import os
import time

from mmfuse.data.filestats import RACY_SECONDS, FileIndex


def _age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_reused_while_unchanged_recomputed_after_a_change(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"one")
    _age(f, 60)
    calls = []

    def compute(path):
        calls.append(path)
        return open(path, "rb").read().decode()

    index = FileIndex(tmp_path / "files.sqlite")
    assert index.values("content", [str(f)], compute) == ["one"]
    # A new process (a fresh index object) reads it back from disk without computing.
    assert FileIndex(tmp_path / "files.sqlite").values("content", [str(f)], compute) == ["one"]
    assert len(calls) == 1
    f.write_bytes(b"two!")
    _age(f, 30)
    assert FileIndex(tmp_path / "files.sqlite").values("content", [str(f)], compute) == ["two!"]
    assert len(calls) == 2
    # Another kind of fact about the same file is kept apart.
    assert index.values("upper", [str(f)], lambda p: compute(p).upper()) == ["TWO!"]


def test_fresh_files_and_missing_files_are_never_remembered(tmp_path):
    fresh, missing = tmp_path / "fresh.bin", tmp_path / "missing.bin"
    fresh.write_bytes(b"x")  # modified just now: a same-size rewrite could keep its stats, so it is not trusted
    index = FileIndex(tmp_path / "files.sqlite")
    calls = []

    def compute(path):
        calls.append(path)
        return None if os.path.exists(path) else "not found"

    assert index.values("check", [str(fresh), str(missing)], compute) == [None, "not found"]
    assert index.values("check", [str(fresh), str(missing)], compute) == [None, "not found"]
    assert len(calls) == 4
    assert RACY_SECONDS > 0


def test_an_unusable_database_only_costs_recomputing(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"data")
    _age(f, 60)
    bad = tmp_path / "files.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    calls = []
    index = FileIndex(bad)
    for _ in range(2):
        assert index.values("n", [str(f)], lambda p: calls.append(p) or "4") == ["4"]
    assert FileIndex(bad).values("n", [str(f)], lambda p: calls.append(p) or "4") == ["4"]
    assert len(calls) == 2  # the in-process memory still works; the damaged file is simply not used
