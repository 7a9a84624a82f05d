"""``mmfuse cache info | prune | clear | verify`` as library functions over the caches' roots (``features.cache``).

    mmfuse cache info                   # every store under $MMFUSE_HOME; entries per tower, oldest and newest use
    mmfuse cache prune --max-size 20GB  # least recently used entries first
    mmfuse cache verify                 # every entry's checksum; bad ones are dropped (exit code 1)
    mmfuse cache clear                  # everything under the cache roots, the old per-item layout too

Nothing here imports torch: ``mmfuse cache`` answers without it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from mmfuse.errors import MmfuseError
from mmfuse.features.cache import (
    _ROW,
    LAYOUT,
    ORPHAN_SECONDS,
    ROOTS,
    BadEntry,
    ShardStore,
    _same_file,
    _transaction,
    _try_lock,
    forget_stores,
)
from mmfuse.paths import mmfuse_home


def describe_tower(modality: str, spec: dict) -> str:
    """The cache index's name for a tower's features: its modality and name, and what else of its spec (which its
    fingerprint hashes) tells two caches of one tower apart: image size, text length, pooling, layers."""
    size = spec.get("image_size") or _processor_size(spec.get("processor"))
    details = [f"{size} px" if size else ""]
    details.append(f"max {spec['max_length']} tokens" if spec.get("max_length") else "")
    details.append(f"{spec['pooling']} pooling" if spec.get("pooling") else "")
    details.append(f"{spec['layers']} layers" if spec.get("layers") else "")
    details.append(f"mean of the last {spec['layer_mean']}" if (spec.get("layer_mean") or 1) > 1 else "")
    details = [d for d in details if d]
    return f"{modality} {spec.get('name', '?')}" + (f" ({', '.join(details)})" if details else "")


def _processor_size(processor: dict | None) -> str | None:
    """A Hugging Face image processor's target size, e.g. ``224`` or ``224x160``."""
    size = (processor or {}).get("size")
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return str(size["height"]) if size["height"] == size["width"] else f"{size['height']}x{size['width']}"
        size = size.get("shortest_edge")
    return str(size) if size else None


def cache_roots(home: Path | None = None) -> dict[str, Path]:
    home = Path(home) if home else mmfuse_home()
    return {name: home / name for name in ROOTS}


_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_UNITS["ti"] = 2**40


def parse_size(text: str) -> int:
    """``20GB``, ``500MB``, ``1.5G``, ``800MiB`` or a number of bytes, as bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise MmfuseError(f"--max-size {text!r}: give a size such as 20GB, 500MB or 1.5GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def human(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def _files(folder: Path) -> tuple[int, int]:
    count = size = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            with contextlib.suppress(OSError):
                size += os.stat(os.path.join(dirpath, n)).st_size
                count += 1
    return count, size


def _legacy(root: Path) -> list[Path]:
    """What the old per-item layout left in ``root``: everything beside ``v2/``."""
    return [p for p in root.iterdir() if p.name != LAYOUT] if root.is_dir() else []


def home_stores(home: Path | None = None) -> dict[str, dict]:
    """Everything else under the home, beside the cache roots: by top-level name (``models`` with the unpacked mpnet,
    ``datasets`` with the emoji, ``files.sqlite``, ...) its path, files and bytes, and for a folder its items."""
    home = Path(home) if home else mmfuse_home()
    out = {}
    for path in sorted(home.iterdir()) if home.is_dir() else []:
        if path.name in ROOTS:
            continue
        if not path.is_dir():
            with contextlib.suppress(OSError):
                out[path.name] = {"path": str(path), "files": 1, "bytes": path.stat().st_size, "items": []}
            continue
        items = []
        for item in sorted(path.iterdir()):
            files, size = _files(item) if item.is_dir() else (1, item.stat().st_size)
            items.append({"name": item.name, "files": files, "bytes": size})
        out[path.name] = {
            "path": str(path),
            "files": sum(i["files"] for i in items),
            "bytes": sum(i["bytes"] for i in items),
            "items": items,
        }
    return out


def cache_info(home: Path | None = None) -> dict:
    """Per cache root: entries and bytes per tower fingerprint (with the tower's name and one entry's shape and
    dtype), oldest and newest use, shard files, dead bytes (in shards but no longer indexed), and the old layout's
    files; totals over all roots (``files``, ``bytes``: what ``prune`` shrinks). Then every other store under the home
    (``home_stores``) and the home's totals (``home_files``, ``home_bytes``)."""
    roots, total_files, total_bytes = {}, 0, 0
    for name, root in cache_roots(home).items():
        store = ShardStore(root)
        info: dict = {"path": str(root), "towers": [], "entries": 0, "entry_bytes": 0}
        conn = store.db(create=False)
        if conn is not None:
            names = dict(conn.execute("SELECT fp, name FROM towers"))
            # One entry's dtype and shape (SQLite takes them from some row of the group): the feature width tells
            # apart caches that an older mmfuse indexed under the same name.
            sql = (
                "SELECT fp, COUNT(*), SUM(nbytes), MIN(last_used), MAX(last_used), dtype, shape FROM entries "
                "GROUP BY fp ORDER BY MAX(last_used) DESC"
            )
            for fp, n, nbytes, oldest, newest, dtype, shape in conn.execute(sql):
                tower = {"fingerprint": fp, "name": names.get(fp, ""), "entries": n, "bytes": nbytes}
                tower.update(dtype=np.dtype(dtype).name, shape=[int(d) for d in shape.split(",") if d])
                info["towers"].append({**tower, "oldest_use": oldest, "newest_use": newest})
                info["entries"] += n
                info["entry_bytes"] += nbytes
            store.close()
        shards = list(store.shards.glob("*.shard")) if store.shards.is_dir() else []
        info["shards"] = len(shards)
        info["shard_bytes"] = sum(p.stat().st_size for p in shards)
        info["dead_bytes"] = max(0, info["shard_bytes"] - info["entry_bytes"])
        files, size = _files(store.dir) if store.dir.is_dir() else (0, 0)
        info["files"], info["bytes"] = files, size
        legacy = [_files(p) if p.is_dir() else (1, p.stat().st_size) for p in _legacy(root)]
        info["old_layout_files"] = sum(f for f, _ in legacy)
        info["old_layout_bytes"] = sum(s for _, s in legacy)
        uses = [t["oldest_use"] for t in info["towers"]]
        info["oldest_use"] = min(uses) if uses else None
        info["newest_use"] = max((t["newest_use"] for t in info["towers"]), default=None)
        total_files += files + info["old_layout_files"]
        total_bytes += size + info["old_layout_bytes"]
        roots[name] = info
    others = home_stores(home)
    return {
        "home": str(Path(home) if home else mmfuse_home()),
        "roots": roots,
        "files": total_files,
        "bytes": total_bytes,
        "stores": others,
        "home_files": total_files + sum(s["files"] for s in others.values()),
        "home_bytes": total_bytes + sum(s["bytes"] for s in others.values()),
    }


def clear_cache(home: Path | None = None) -> dict:
    """Removes every cache root whole (shards, index, the old layout). Returns files and bytes removed per root."""
    out = {}
    for name, root in cache_roots(home).items():
        files, size = _files(root) if root.is_dir() else (0, 0)
        forget_stores(root)  # this process's open stores point into what is removed: start them afresh
        if root.exists():
            shutil.rmtree(root)
        out[name] = {"path": str(root), "files": files, "bytes": size}
    return out


def verify_cache(home: Path | None = None) -> dict:
    """Reads every entry and checks it (CRC-32, size, dtype, shape); bad rows are dropped. Returns per root the
    entries checked and the bad ones, ``[(fingerprint, key, shard, reason)]``."""
    out = {}
    for name, root in cache_roots(home).items():
        store = ShardStore(root)
        conn = store.db(create=False)
        checked, bad = 0, []
        if conn is not None:
            for row in conn.execute(f"SELECT {_ROW} FROM entries ORDER BY shard, offset").fetchall():
                checked += 1
                try:
                    store.read(row)
                except (BadEntry, OSError) as e:
                    bad.append((row, e))
            store.drop(r for r, e in bad if isinstance(e, BadEntry))  # unreadable (OSError) rows are only reported
            store.close()
        out[name] = {"path": str(root), "checked": checked, "bad": [(r[0], r[1], r[2], str(e)) for r, e in bad]}
    return out


def prune_cache(max_bytes: int, home: Path | None = None) -> dict:
    """Shrinks the caches to ``max_bytes`` (all roots together): the old layout goes first, then the least
    recently used entries. A shard that keeps some entries is rewritten without the others (and without dead
    bytes); a shard a live writer holds is never touched (its bytes count as kept).

    Returns bytes before and after, entries dropped, shards removed or rewritten, and shards skipped as held.
    """
    roots = cache_roots(home)
    before = cache_info(home)["bytes"]
    report = {"before": before, "old_layout_bytes": 0, "dropped_entries": 0, "removed_shards": 0}
    report.update(rewritten_shards=0, held_shards=0)
    if before <= max_bytes:
        return {**report, "after": before}
    for root in roots.values():
        for p in _legacy(root):
            report["old_layout_bytes"] += (_files(p) if p.is_dir() else (1, p.stat().st_size))[1]
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    stores: list[tuple[ShardStore, dict[str, int]]] = []
    locks, fixed, candidates = [], 0, []
    try:
        for root in roots.values():
            store = ShardStore(root)
            conn = store.db(create=False)
            if conn is None:
                continue
            mine = {}  # shard name -> size, for the shards prune holds
            for path in store.shards.glob("*.shard") if store.shards.is_dir() else []:
                fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
                if _try_lock(fd) and _same_file(fd, path):
                    mine[path.name] = path.stat().st_size
                    locks.append(fd)
                else:  # a live writer's: kept whole
                    os.close(fd)
                    with contextlib.suppress(FileNotFoundError):
                        fixed += path.stat().st_size
                    report["held_shards"] += 1
            # The index (its -shm file is only shared memory, gone when the last connection closes).
            fixed += sum(p.stat().st_size for p in store.dir.glob("index.sqlite*") if not p.name.endswith("-shm"))
            stores.append((store, mine))
            rows = conn.execute(f"SELECT {_ROW} FROM entries").fetchall()
            candidates += [(id(store), row) for row in rows if row[2] in mine]
        # Most recently used first: kept while they fit, and nothing older than the first that does not.
        candidates.sort(key=lambda c: c[1][8], reverse=True)
        budget, kept = max_bytes - fixed, set()
        for sid, row in candidates:
            if row[4] > budget:
                break
            budget -= row[4]
            kept.add((sid, row[0], row[1], row[2]))
        for store, mine in stores:
            for k, v in _shrink(store, mine, kept).items():
                report[k] += v
    finally:
        for store, _ in stores:
            store.close()
        for fd in locks:
            os.close(fd)
    return {**report, "after": cache_info(home)["bytes"]}


def _shrink(store: ShardStore, mine: dict[str, int], kept: set) -> dict:
    """Removes or rewrites each shard in ``mine`` (held by prune) so that only its ``kept`` entries remain."""
    conn = store.db(create=False)
    out = {"dropped_entries": 0, "removed_shards": 0, "rewritten_shards": 0}
    for shard, size in mine.items():
        rows = conn.execute(f"SELECT {_ROW} FROM entries WHERE shard = ?", (shard,)).fetchall()
        keep = [r for r in rows if (id(store), r[0], r[1], shard) in kept]
        path = store.shards / shard
        if not rows and time.time() - path.stat().st_mtime < ORPHAN_SECONDS:
            continue  # maybe a writer's new shard, between its creation and its lock
        if keep and sum(r[4] for r in keep) == size:
            continue  # nothing to drop, no dead bytes
        moved = []
        for row in keep:  # copied to a shard of prune's own, checked on the way
            try:
                value = store.read(row)
            except (BadEntry, OSError):
                continue
            store.put_many(row[0], {row[1]: value})
            moved.append(row)
        with _transaction(conn):
            for row in moved:  # the copies keep their last use
                conn.execute("UPDATE entries SET last_used = ? WHERE fp = ? AND key = ?", (row[8], row[0], row[1]))
            # What still points here is what was dropped (a row another writer replaced meanwhile points elsewhere).
            out["dropped_entries"] += conn.execute("DELETE FROM entries WHERE shard = ?", (shard,)).rowcount
        out["rewritten_shards" if moved else "removed_shards"] += 1
        store.close_readers()
        path.unlink(missing_ok=True)
    store.seal()
    return out
