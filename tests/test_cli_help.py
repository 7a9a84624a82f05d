"""What the command line says about itself: --version, help texts that show each default once (and no
"(default: None)"), and the caption error when the default hub captioner is out of reach."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

import mmfuse
from mmfuse.cli import build_parser, main

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_is_pyprojects(capsys, monkeypatch):
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmfuse {version}" == f"mmfuse {mmfuse.__version__}"

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a source tree never installed
    assert mmfuse._version() == version


def test_help_shows_each_default_once_and_never_none(capsys):
    verbs = build_parser()._subparsers._group_actions[0].choices
    for verb in verbs:
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        assert "(default: None)" not in text and "(default: False)" not in text, verb
        for block in re.split(r"\n  (?=-)", text.split("options:", 1)[1]):  # one block per option
            assert len(re.findall(r"\bdefault\b", block, flags=re.IGNORECASE)) <= 1, (verb, block)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT run directory to write --config" in text  # required: no default to show
    assert "(default: 0.15)" in text and "(default: image text)" in text and "(default: 128)" in text


def test_caption_without_the_hub_names_captioners_not_towers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    assert main(["caption", str(tmp_path), "--out", str(tmp_path / "caps.csv")]) == 2
    err = capsys.readouterr().err
    assert "The default captioner, nlpconnect/vit-gpt2-image-captioning, needs the hub or a local copy" in err
    assert "Captioners that always work offline: imagenet-tags, imagenet-tags-lite2" in err
    assert "efficientnet-lite0" not in err and "minilm" not in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert "--model imagenet-tags works offline" in " ".join(capsys.readouterr().out.split())
