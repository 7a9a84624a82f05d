"""What mmfuse has worked out about files (does the image decode, its content hash), remembered across runs.

An entry holds while the file's size and modification time are unchanged, as git's index trusts file stats: a warm
run then neither decodes nor hashes files it has seen. Files modified in the last few seconds are not remembered,
because a same-size rewrite within the file system's timestamp granularity would leave the stats unchanged.

Kept in one SQLite file under ``$MMFUSE_HOME``, which concurrent runs share safely. If it can't be used (read-only
home, a damaged file), work is simply done again: this is a cache, never a reason to fail.
"""

from __future__ import annotations

import builtins
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmfuse.paths import mmfuse_home
from mmfuse.progress import Progress

log = logging.getLogger(__name__)
RACY_SECONDS = 3.0
STORE_EVERY = 4096  # files computed between two writes to the database
_NONE = ""  # how a computed None (e.g. "no problem found") is stored


class FileIndex:
    def __init__(self, path: Path):
        self.path = path
        self.memory: dict[tuple[str, str], tuple[int, int, str]] = {}  # (kind, path) -> (size, mtime_ns, value)
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._broken = False

    def _db(self) -> sqlite3.Connection | None:
        if self._broken:
            return None
        if self._conn is None or self._pid != os.getpid():  # a connection must not cross a fork
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS files (kind TEXT, path TEXT, size INTEGER, mtime_ns INTEGER, "
                    "value TEXT, PRIMARY KEY (kind, path))"
                )
            except (sqlite3.Error, OSError) as e:
                return self._give_up(e)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _give_up(self, error: Exception) -> None:
        log.debug("not remembering file checks in %s: %s", self.path, error)
        self._broken = True
        return None

    def values(
        self,
        kind: str,
        paths: list[str],
        compute: Callable[[str], str | None],
        workers: int = 1,
        desc: str | None = None,
    ) -> list[str | None]:
        """``compute(path)`` for every path, reusing what was remembered for files whose stats are unchanged.

        ``kind`` names what is computed, and everything its result depends on besides the file. ``workers`` threads
        compute; ``desc`` names a progress bar (rows/s) over the files computed, none without it. Results are stored
        every ``STORE_EVERY`` files, so a pass interrupted over a million files keeps what it had done.
        """
        # (size, mtime_ns, mtime) rather than whole stat results: a million of those hold 200 MB.
        stats: list[tuple[int, int, float] | None] = []
        for p in paths:
            try:
                st = os.stat(p)
                stats.append((st.st_size, st.st_mtime_ns, st.st_mtime))
            except OSError:
                stats.append(None)  # missing: compute says what is wrong, and nothing is remembered
        out: list[str | None] = [None] * len(paths)
        todo = []
        # SQLite takes UTF-8 text only: a path that is not (undecodable bytes in a file name) is computed every time.
        known = self._lookup(kind, [p for p, st in zip(paths, stats) if st is not None and _utf8(p)])
        for i, (p, st) in enumerate(zip(paths, stats)):
            hit = known.get(p)
            if st is not None and hit is not None and hit[:2] == st[:2]:
                out[i] = None if hit[2] == _NONE else hit[2]
            else:
                todo.append(i)
        del known
        if not todo:
            return out
        pool = ThreadPoolExecutor(workers) if workers > 1 and len(todo) > 1 else None

        def one(i: int) -> str | None:
            return compute(paths[i])

        try:
            with Progress(len(todo), desc or "", show=desc is not None) as bar:
                # In blocks, not one map over every file: a million pending futures would hold their own gigabyte.
                for start in range(0, len(todo), STORE_EVERY):
                    block = todo[start : start + STORE_EVERY]
                    results = (pool or builtins).map(one, block)  # hashing and PIL decoding release the GIL
                    settled = time.time() - RACY_SECONDS
                    rows = []
                    for i, value in zip(block, results):
                        out[i] = value
                        bar.update()
                        st = stats[i]
                        if st is not None and st[2] < settled and _utf8(paths[i]) and _utf8(value or ""):
                            rows.append((kind, paths[i], st[0], st[1], _NONE if value is None else value))
                    self._store(rows)
        finally:
            if pool:
                pool.shutdown(cancel_futures=True)
        return out

    def _lookup(self, kind: str, paths: list[str]) -> dict[str, tuple[int, int, str]]:
        found = {p: self.memory[kind, p] for p in paths if (kind, p) in self.memory}
        missing = [p for p in paths if p not in found]
        db = self._db() if missing else None
        if db is not None:
            try:
                for start in range(0, len(missing), 500):  # SQLite caps the parameters of one statement
                    chunk = missing[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    rows = db.execute(
                        f"SELECT path, size, mtime_ns, value FROM files WHERE kind = ? AND path IN ({marks})",
                        [kind, *chunk],
                    )
                    for p, size, mtime_ns, value in rows:
                        found[p] = self.memory[kind, p] = (size, mtime_ns, value)
            except sqlite3.Error as e:
                self._give_up(e)
        return found

    def _store(self, rows: list[tuple]) -> None:
        for kind, p, size, mtime_ns, value in rows:
            self.memory[kind, p] = (size, mtime_ns, value)
        db = self._db() if rows else None
        if db is not None:
            try:
                with db:  # one transaction
                    db.execute("BEGIN")
                    db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
            except sqlite3.Error as e:
                self._give_up(e)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_INDEXES: dict[Path, FileIndex] = {}


def file_index() -> FileIndex:
    """The index of this process for the current ``$MMFUSE_HOME``."""
    path = mmfuse_home() / "files.sqlite"
    if path not in _INDEXES:
        _INDEXES[path] = FileIndex(path)
    return _INDEXES[path]


def default_workers() -> int:
    """Threads for checking or hashing files: one per core, at most 8 (more only contend for the GIL)."""
    return max(1, min(8, os.cpu_count() or 1))
