"""The on-disk caches of frozen-tower features and decoded images: sharded, indexed, verified on every read.

Each root under ``$MMFUSE_HOME`` (``features``, ``features-bf16``, ``pixels``) keeps its entries in ``v2/``:

- ``shards/<uuid>.shard``: items' bytes appended one after another. A shard has one writer at a time, the process
  holding an exclusive ``flock`` on it (released when the process ends, or when the shard reaches ``SHARD_BYTES``);
  a later process appends to a shard nobody holds, so many short runs do not make many files.
- ``index.sqlite`` (WAL): one row per (tower fingerprint, content key): shard, offset, size, dtype, shape, CRC-32 and
  last use. A row is written only after its bytes are, so a crash leaves at most bytes nobody points to.

Every read checks the item's CRC-32 (3.5 us for a 5 kB feature vector, 60 us for a 224 px image on the development
VM; BLAKE2b took 5x as long), its size, dtype and shape: a shard that was truncated, overwritten or filled with
garbage gives a warning and a miss, so the item is recomputed and stored again, never read as features. The old
layout (one ``.npy``/``.u8`` file per item beside ``v2/``) is not read: it costs a recompute once, never a wrong
feature.

The ``mmfuse cache`` verbs (info, prune, clear, verify) are in ``cache_admin``. Nothing here imports torch:
``mmfuse cache`` answers without it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mmfuse.paths import mmfuse_home

log = logging.getLogger(__name__)

LAYOUT = "v2"
ROOTS = ("features", "features-bf16", "pixels")
SHARD_BYTES = 256 * 2**20  # a shard this large is closed and a new one started
TOUCH_SECONDS = 60.0  # last_used is rewritten only when older than this: reads stay reads
CHUNK = 500  # keys per SQL statement (SQLite allows 32,766 parameters; a smaller batch keeps statements cheap)
ORPHAN_SECONDS = 600.0  # a shard without rows younger than this may be one a writer is just creating
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (fp TEXT NOT NULL, key TEXT NOT NULL, shard TEXT NOT NULL, "
    "offset INTEGER NOT NULL, nbytes INTEGER NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL, "
    "crc INTEGER NOT NULL, last_used REAL NOT NULL, PRIMARY KEY (fp, key)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS entries_shard ON entries (shard)",
    "CREATE TABLE IF NOT EXISTS towers (fp TEXT PRIMARY KEY, name TEXT NOT NULL)",
)
_ROW = "fp, key, shard, offset, nbytes, dtype, shape, crc, last_used"


class BadEntry(Exception):
    """An index row whose bytes are not what was stored (a short read, another item's bytes, garbage)."""


def _try_lock(fd: int) -> bool:
    """An exclusive lock on the open file, without waiting; False when another holds it."""
    if os.name == "posix":
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            return False
        return True
    import msvcrt  # Windows locks are mandatory: lock one byte far past any shard's end, where nobody reads

    os.lseek(fd, 2**40, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path``: a shard locked just as prune removed it is not."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        data = data[os.write(fd, data) :]


def _read_at(fd: int, nbytes: int, offset: int) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)  # writable, aligned: the caller views it as the item's dtype
    if hasattr(os, "preadv"):
        got = os.preadv(fd, [buf], offset)
    else:  # Windows has no pread: seek and read (callers hold the store's lock)
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, nbytes)
        got = len(data)
        buf[:got] = np.frombuffer(data, dtype=np.uint8)
    if got != nbytes:
        raise BadEntry(f"short read ({got} of {nbytes} bytes)")
    return buf


@functools.lru_cache(maxsize=4096)
def _layout(dtype: str, shape: str) -> tuple[np.dtype, tuple[int, ...]]:
    """Parsed once per distinct (dtype, shape): a cache holds few of them (one per tower, or per token count)."""
    return np.dtype(dtype), tuple(int(d) for d in shape.split(",") if d)


def _decode(raw: np.ndarray, row: tuple) -> np.ndarray:
    """The stored item from its bytes, or ``BadEntry``."""
    _fp, _key, _shard, _offset, nbytes, dtype, shape, crc, _used = row
    if zlib.crc32(raw) != crc:
        raise BadEntry("checksum mismatch")
    try:
        dt, dims = _layout(dtype, shape)
    except (TypeError, ValueError) as e:
        raise BadEntry(f"bad dtype or shape in the index ({dtype!r}, {shape!r})") from e
    if math.prod(dims) * dt.itemsize != nbytes:
        raise BadEntry(f"{nbytes} bytes do not hold {dtype} {dims}")
    return raw.view(dt).reshape(dims)


class ShardStore:
    """One cache root's shards and index, shared by every cache object of this process (``store_for``).

    Thread-safe: one lock around the index connection, the open shards and the writer.
    """

    def __init__(self, root: Path, shard_bytes: int = SHARD_BYTES):
        self.root = Path(root)
        self.dir = self.root / LAYOUT
        self.shards = self.dir / "shards"
        self.index = self.dir / "index.sqlite"
        self.shard_bytes = shard_bytes
        self.lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._fds: dict[str, int] = {}  # shard name -> fd open for reading
        self._writer: tuple[str, int, int] | None = None  # (shard name, fd, end offset) of the shard this process owns
        self._broken = False
        self._pid = os.getpid()

    # -- the index

    def db(self, create: bool) -> sqlite3.Connection | None:
        """The index connection; None when there is no index yet and ``create`` is False, or it cannot be used."""
        if self._conn is not None or self._broken:
            return self._conn
        if not create and not self.index.exists():
            return None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.index, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # a row that outlives its bytes in a power cut fails its CRC
            for statement in _SCHEMA:
                conn.execute(statement)
        except (sqlite3.Error, OSError) as e:
            log.warning(
                "the cache index %s cannot be used (%s): working without it; `mmfuse cache clear` resets it",
                self.index,
                e,
            )
            self._broken = True
            return None
        self._conn = conn
        return conn

    def rows(self, fp: str, keys: Sequence[str]) -> dict[str, tuple]:
        with self.lock:
            conn = self.db(create=False)
            if conn is None:
                return {}
            out = {}
            try:
                for start in range(0, len(keys), CHUNK):
                    part = list(keys[start : start + CHUNK])
                    marks = ",".join("?" * len(part))
                    sql = f"SELECT {_ROW} FROM entries WHERE fp = ? AND key IN ({marks})"
                    for row in conn.execute(sql, [fp, *part]):
                        out[row[1]] = row
            except sqlite3.Error as e:
                log.warning("reading the cache index %s failed (%s): treating the batch as misses", self.index, e)
                return {}
            return out

    def drop(self, rows: Iterable[tuple]) -> None:
        """Removes these rows, unless another writer has replaced them since."""
        rows = [(r[0], r[1], r[2], r[3]) for r in rows]
        with self.lock:
            conn = self.db(create=False)
            if conn is None or not rows:
                return
            with contextlib.suppress(sqlite3.Error), _transaction(conn):
                conn.executemany("DELETE FROM entries WHERE fp = ? AND key = ? AND shard = ? AND offset = ?", rows)

    def touch(self, fp: str, keys: list[str]) -> None:
        with self.lock:
            conn = self.db(create=False)
            if conn is None or not keys:
                return
            now = time.time()
            try:
                with _transaction(conn):
                    for start in range(0, len(keys), CHUNK):
                        part = keys[start : start + CHUNK]
                        marks = ",".join("?" * len(part))
                        conn.execute(
                            f"UPDATE entries SET last_used = ? WHERE fp = ? AND key IN ({marks})", [now, fp, *part]
                        )
            except sqlite3.Error as e:  # a read-only home, say: reads still work, only the use is not recorded
                log.debug("not recording the use of cache entries in %s: %s", self.index, e)

    # -- reading

    def _fd(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= 64:
                self.close_readers()
            fd = self._fds[shard] = os.open(self.shards / shard, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        return fd

    def read(self, row: tuple) -> np.ndarray:
        """One entry's item, checked; ``BadEntry`` when its bytes are not what was stored."""
        with self.lock:  # held while reading too: another thread may close the open shards (close_readers)
            try:
                fd = self._fd(row[2])
            except FileNotFoundError as e:
                raise BadEntry("its shard is gone") from e
            raw = _read_at(fd, row[4], row[3])
        return _decode(raw, row)

    def get_many(self, fp: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The entries found for ``keys``, each verified; bad ones are dropped from the index with a warning."""
        rows = self.rows(fp, keys)
        found, bad = {}, []
        for key, row in rows.items():
            try:
                found[key] = self.read(row)
            except BadEntry as e:
                bad.append((row, e))
            except OSError as e:  # the file is there but cannot be read now (permissions, I/O): a miss, rows kept
                log.warning("cannot read cache shard %s (%s): recomputing", self.shards / row[2], e)
        if bad:
            row, e = bad[0]
            log.warning(
                "%d cache entr%s in %s failed verification and will be recomputed (e.g. %s in shard %s: %s)",
                len(bad),
                "y" if len(bad) == 1 else "ies",
                self.dir,
                row[1][:16],
                row[2],
                e,
            )
            self.drop(r for r, _ in bad)
        stale = [k for k in found if time.time() - rows[k][8] > TOUCH_SECONDS]
        self.touch(fp, stale)
        return found

    # -- writing

    def _claim(self) -> tuple[str, int, int]:
        """A shard for this process to append to: one nobody holds and not yet full, else a new one."""
        self.shards.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | getattr(os, "O_BINARY", 0)
        candidates = []
        for path in self.shards.glob("*.shard"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                if st.st_size < self.shard_bytes:
                    candidates.append((-st.st_mtime, path))
        for _, path in sorted(candidates):
            try:
                fd = os.open(path, flags)
            except FileNotFoundError:
                continue
            if _try_lock(fd) and _same_file(fd, path):
                return path.name, fd, os.lseek(fd, 0, os.SEEK_END)
            os.close(fd)
        while True:
            path = self.shards / f"{uuid.uuid4().hex}.shard"
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            if _try_lock(fd) and _same_file(fd, path):  # prune may take a shard between its creation and our lock
                return path.name, fd, os.lseek(fd, 0, os.SEEK_END)  # (0; and past the Windows lock's seek)
            os.close(fd)

    def put_many(self, fp: str, items: dict[str, np.ndarray], name: str | None = None) -> None:
        """Appends the items to this process's shard, then indexes them in one transaction."""
        if not items:
            return
        with self.lock:
            conn = self.db(create=True)
            if conn is None:
                return
            now, rows = time.time(), []
            try:
                if self._writer is None:
                    self._writer = self._claim()
                shard, fd, offset = self._writer
                for key, value in items.items():
                    arr = np.ascontiguousarray(value)
                    raw = arr.reshape(-1).view(np.uint8)
                    _write_all(fd, memoryview(raw))
                    shape = ",".join(map(str, arr.shape))
                    rows.append((fp, key, shard, offset, raw.nbytes, arr.dtype.str, shape, zlib.crc32(raw), now))
                    offset += raw.nbytes
            except OSError as e:  # a full disk, say: the caller has the items; they are only not kept for next time
                self.seal()
                log.warning("could not store %d cache entries in %s (%s): going on without", len(items), self.dir, e)
                return
            except BaseException:
                self.seal()  # the file now ends in a partial item: the next writer appends after it
                raise
            self._writer = (shard, fd, offset)
            try:
                with _transaction(conn):
                    conn.executemany(f"INSERT OR REPLACE INTO entries ({_ROW}) VALUES (?,?,?,?,?,?,?,?,?)", rows)
                    if name:
                        conn.execute("INSERT OR REPLACE INTO towers (fp, name) VALUES (?, ?)", (fp, name))
            except sqlite3.Error as e:
                log.warning("could not index %d new cache entries in %s: %s", len(rows), self.index, e)
            if offset >= self.shard_bytes:
                self.seal()

    def seal(self) -> None:
        """Stops writing to this process's shard; closing it releases the lock, and another writer may append."""
        with self.lock:
            if self._writer is not None:
                with contextlib.suppress(OSError):
                    os.close(self._writer[1])
                self._writer = None

    def close_readers(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def close(self) -> None:
        with self.lock:
            if self._pid != os.getpid():  # a forked child must not close (or unlock) its parent's files
                return
            self.seal()
            self.close_readers()
            if self._conn is not None:
                self._conn.close()
                self._conn = None


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection):
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_STORES: dict[tuple[str, int], ShardStore] = {}
_STORES_LOCK = threading.Lock()


def store_for(root: Path) -> ShardStore:
    """This process's store for ``root``: one index connection and one shard being written, however many cache
    objects point there (a new one after a fork: connections and shard ownership must not cross it)."""
    key = (str(Path(root).absolute()), os.getpid())
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = ShardStore(Path(root))
        return store


def close_stores() -> None:
    """Closes this process's stores: their shards are released for other writers (also done at exit)."""
    with _STORES_LOCK:
        for (_, pid), store in list(_STORES.items()):
            if pid == os.getpid():
                store.close()
                del _STORES[_, pid]


def forget_stores(root: Path) -> None:
    """Closes and forgets this process's stores for ``root``, whose files are about to go: the next use starts anew."""
    with _STORES_LOCK:
        for key in [k for k in _STORES if k[0] == str(Path(root).absolute())]:
            _STORES.pop(key).close()


atexit.register(close_stores)


# ---------------------------------------------------------------------------------------------------------------------
# The caches as sources.py sees them


class FeatureCache:
    """Frozen-tower outputs keyed by (tower fingerprint, content key), in ``root`` (default
    ``$MMFUSE_HOME/features``).

    Args:
        root: the cache root; its entries live in ``root/v2``.
        memory: also keep entries read or written in this process (and in processes forked from it): runs that
            share a cache object, like the ablation's three, then read each entry once.
        write: False reads hits but stores nothing new (``predict`` without ``--cache``: one-off inputs).
    """

    default_root = "features"

    def __init__(self, root: Path | None = None, memory: bool = False, write: bool = True):
        self.root = Path(root) if root else mmfuse_home() / self.default_root
        self.hits = self.misses = 0
        self.memory: dict[tuple[str, str], np.ndarray] | None = {} if memory else None
        self.write = write

    @property
    def store(self) -> ShardStore:
        return store_for(self.root)

    def get(self, fingerprint: str, key: str) -> np.ndarray | None:
        return self.get_many(fingerprint, [key])[0]

    def put(self, fingerprint: str, key: str, value: np.ndarray) -> None:
        self.put_many(fingerprint, [(key, value)])

    def get_many(self, fingerprint: str, keys: Sequence[str]) -> list[np.ndarray | None]:
        """Each key's entry, or None; one index query for the batch. A corrupt entry is a None (and a warning)."""
        out: list[np.ndarray | None] = [None] * len(keys)
        ask = []
        for i, key in enumerate(keys):
            if self.memory is not None and (fingerprint, key) in self.memory:
                out[i] = self.memory[fingerprint, key]
            else:
                ask.append(i)
        if ask:
            found = self.store.get_many(fingerprint, list(dict.fromkeys(keys[i] for i in ask)))
            for i in ask:
                out[i] = found.get(keys[i])
                if self.memory is not None and out[i] is not None:
                    self.memory[fingerprint, keys[i]] = out[i]
        return out

    def put_many(self, fingerprint: str, items: Iterable[tuple[str, np.ndarray]], name: str | None = None) -> None:
        """Stores the items (unless ``write`` is False); ``name`` says what made them, for ``mmfuse cache info``."""
        items = dict(items)  # the same key twice in a batch is stored once
        if self.memory is not None:
            for key, value in items.items():
                self.memory[fingerprint, key] = value
        if self.write:
            self.store.put_many(fingerprint, items, name)


class PixelCache(FeatureCache):
    """Decoded images, uint8 (3, H, W), keyed by the ``PixelSpec`` fingerprint (default ``$MMFUSE_HOME/pixels``)."""

    default_root = "pixels"
