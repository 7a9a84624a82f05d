"""Shared fixtures: tiny random HF towers saved to disk, and generated image+text data. Nothing touches the network."""

from __future__ import annotations

import csv
import importlib.metadata
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ``mmfuse`` under a 2-process gloo launch: --multi_gpu picks accelerate's torchrun launcher, and without CUDA the
# processes join over gloo on the CPU.
LAUNCH_2 = [
    *("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"),
    *("--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmfuse"),
]

COLORS = {"red": (220, 40, 40), "blue": (40, 60, 220)}
THINGS = ["apple", "train"]
TOY = {"per_class": 16, "seed": 0}  # toy_manifest's rows, and those the warm home holds features of
FILLER = ["small", "old", "shiny", "quiet", "near", "the", "a", "big", "bright", "wooden"]


# Homes ($MMFUSE_HOME: the feature and pixel caches, the file-hash database, built datasets). A test starts with an
# empty one of its own; one that trains on the toy data gets a copy of the warm home, where the packaged towers have
# already embedded it (embedding it again in every test was most of the suite's time). Module and session fixtures
# run before a test's home is set: they use shared_home, a warm home they share, or the catch-all session home.


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """The home of fixtures that name none: a scratch one, never the user's ~/.cache/mmfuse."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(tmp_path_factory.mktemp("session-home")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _as_in_ci():
    """The world CI's test tiers see: the mpnet parts are not installed there (make test runs before the quickstart
    installs them). Every lookup of them finds nothing here too, on a developer's full venv as well, so a test that
    passes here cannot depend on them by accident (patching one caller was not enough: a second one found them).
    A test of the installed case patches what it needs itself."""
    # Imported here, not at the top: importing mmfuse there would load huggingface_hub before HF_HUB_OFFLINE is set.
    from mmfuse.models.mpnet import PACKAGES

    real = importlib.metadata.distribution

    def distribution(name):
        if name in PACKAGES:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.metadata, "distribution", distribution)
        yield


def _mmfuse_levels() -> dict[str, int]:
    loggers = logging.root.manager.loggerDict.items()
    found = {n: g.level for n, g in loggers if n.startswith("mmfuse") and isinstance(g, logging.Logger)}
    return {**found, "": logging.root.level}


@pytest.fixture(autouse=True)
def _logging_left_as_found():
    """A verb run in-process (the tests, the Python API) leaves the logging as it found it: `mmfuse search` once left
    mmfuse.training at WARNING, and a later test in the same process saw no INFO lines."""
    before = _mmfuse_levels()
    yield
    after = _mmfuse_levels()
    changed = {n: (logging.getLevelName(v), logging.getLevelName(after[n])) for n, v in before.items() if after[n] != v}
    assert not changed, f"logger levels changed by this test (name: (before, after)): {changed}"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test gets its own home, empty unless the test asks for the warm one (toy_manifest, ``warm``)."""
    path = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("MMFUSE_HOME", str(path))
    return path


@pytest.fixture
def cold_home(_isolated_home):
    """For tests of what is embedded, stored or hit: the test's home stays empty, toy_manifest or not."""
    return _isolated_home


@pytest.fixture
def warm(_isolated_home, warm_home):
    """The test's home starts as a copy of the warm home (``usefixtures("warm")`` where the data is not toy_manifest
    but holds the same rows)."""
    return fill_home(warm_home, _isolated_home)


@pytest.fixture(scope="session")
def warm_home(tmp_path_factory):
    """Built once a session, then only copied (``fill_home``): the toy data (TOY: the cache keys files by content, so
    every copy of these rows hits) embedded by the packaged towers at their own image size and at 32 px."""
    from mmfuse.cli import main  # here, not at the top: HF_HUB_OFFLINE must be set before transformers is imported
    from mmfuse.features.cache import close_stores

    root = tmp_path_factory.mktemp("warm")
    toy = write_toy(root / "toy", **TOY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(root / "home"))
        for size in ([], ["--image-size", "32"]):
            args = ["train", str(toy / "all.csv"), "--out", str(root / f"run{len(size)}"), "--tune", "head"]
            assert main([*args, "--epochs", "1", *size]) == 0
        close_stores()  # the index and shards whole on disk before they are copied
    return root / "home"


def fill_home(warm_home: Path, home: Path) -> Path:
    """Copies the warm home into ``home``, which must be new or empty: copied over a cache in use, the index would no
    longer match its shards."""
    home = Path(home)
    assert not (home.exists() and any(home.iterdir())), f"{home} is in use: give the test a new home"
    shutil.copytree(warm_home, home, dirs_exist_ok=True)
    return home


@pytest.fixture(scope="session")
def shared_home(warm_home, tmp_path_factory):
    """A copy of the warm home for module and session fixtures (the shared runs) to train in; tests get their own."""
    return fill_home(warm_home, tmp_path_factory.mktemp("shared-home"))


@pytest.fixture(scope="module")
def module_home(shared_home):
    """MMFUSE_HOME set to the shared warm home for a module's fixtures (the autouse per-test home is not set yet for
    them); request it from a module's own ``home`` fixture."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        yield shared_home


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """The toy data (TOY) for session and module fixtures: shared, so nothing may write into its folder."""
    return write_toy(tmp_path_factory.mktemp("toy-data") / "toy", **TOY)


@pytest.fixture(scope="session")
def head_run(toy_data, shared_home, tmp_path_factory):
    """The run most tests of a trained run need, trained once: the head on the packaged towers' cached features of
    toy_data's train.csv, validated on val.csv. Shared: a test that changes the run copies it first."""
    from mmfuse.cli import main  # here, not at the top: HF_HUB_OFFLINE must be set before transformers is imported

    run = tmp_path_factory.mktemp("head-run") / "run"
    args = ["train", str(toy_data / "train.csv"), "--val", str(toy_data / "val.csv"), "--out", str(run)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMFUSE_HOME", str(shared_home))
        assert main([*args, "--tune", "head", "--epochs", "2", "--batch-size", "8"]) == 0
    return run


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    ViTModel(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory):
    """A 4-layer random RoBERTa with MiniLM's tokenizer (the only real tokenizer on hand offline)."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from mmfuse.models.towers import minilm_path

    d = tmp_path_factory.mktemp("tiny-roberta")
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = RobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tok.pad_token_id,
    )
    RobertaModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def make_image(color: tuple[int, int, int], rng: random.Random, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    x, y, r = rng.randint(12, 40), rng.randint(12, 40), rng.randint(10, 20)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in color)
    draw.ellipse([x - r, y - r, x + r, y + r], fill=jitter)
    return img


def make_text(thing: str, rng: random.Random) -> str:
    words = rng.sample(FILLER, 3)
    return f"{words[0]} {words[1]} {thing} {words[2]}"


@pytest.fixture
def toy_manifest(tmp_path, request):
    """4 classes = colour x thing: the image shows only the colour and the text names only the thing, so each
    modality alone is capped at 50% accuracy and only fusion can get them all. The test's home gets the warm home's
    features of these rows, unless the test asks for cold_home."""
    if "cold_home" not in request.fixturenames:
        request.getfixturevalue("warm")
    return write_toy(tmp_path / "toy", **TOY)


def write_toy(root, per_class: int, seed: int):
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    for color in COLORS:
        for thing in THINGS:
            for i in range(per_class):
                name = f"images/{color}_{thing}_{i}.png"
                make_image(COLORS[color], rng).save(root / name)
                rows.append({"image": name, "text": make_text(thing, rng), "label": f"{color}-{thing}"})
    rng.shuffle(rows)
    n = len(rows)
    splits = {"train": rows[: n * 6 // 10], "val": rows[n * 6 // 10 : n * 8 // 10], "test": rows[n * 8 // 10 :]}
    for name, part in splits.items():
        write_csv(root / f"{name}.csv", part)
    write_csv(root / "all.csv", rows)
    return root


def write_csv(path, rows, fields=("image", "text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def chrome(width: int, height: int):
    """Debian's headless chromium through Selenium (its chromedriver, no download); skipped, saying why, where the
    browser is not installed (.ci/run and `make test` install it)."""
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        reason = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-extensions"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    # Headless windows are at least 500 px wide: a phone's viewport is emulated instead.
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    return driver


def submit_page(driver, wait) -> None:
    """Presses the served page's submit button and waits for its answer, which must not be an error."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    state = driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")
    assert state == "done", driver.find_element(By.ID, "error").text
