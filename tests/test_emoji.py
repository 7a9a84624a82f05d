"""The emoji dataset builder, on small copies of the Debian source formats written here."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmfuse.data.datasets import emoji
from mmfuse.data.datasets.emoji import (
    APT_LINE,
    NOTO_EMOJI_FONT,
    MissingPackagesError,
    build_emoji,
    emoji_dataset,
    emoji_text,
    keywords_for,
    parse_cldr_annotations,
    parse_emoji_test,
    render_emoji,
)
from mmfuse.paths import mmfuse_home

needs_font = pytest.mark.skipif(not NOTO_EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji is not installed")

# Eight kept emoji in each of three groups, plus every kind of line the parser must drop.
EMOJI_TEST = """\
# emoji-test.txt
# Version: 15.0
# Format: code points; status # emoji name

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                      ; fully-qualified     # 😀 E1.0 grinning face
1F603                                      ; fully-qualified     # 😃 E0.6 grinning face with big eyes
1F604                                      ; fully-qualified     # 😄 E0.6 grinning face with smiling eyes
1F601                                      ; fully-qualified     # 😁 E0.6 beaming face with smiling eyes
1F606                                      ; fully-qualified     # 😆 E0.6 grinning squinting face
1F605                                      ; fully-qualified     # 😅 E0.6 grinning face with sweat

# subgroup: face-affection
263A FE0F                                  ; fully-qualified     # ☺️ E0.6 smiling face
263A                                       ; unqualified         # ☺ E0.6 smiling face

# subgroup: face-hand
1F636 200D 1F32B FE0F                      ; fully-qualified     # 😶‍🌫️ E13.1 face in clouds
1F636 200D 1F32B                           ; minimally-qualified # 😶‍🌫 E13.1 face in clouds

# Smileys & Emotion subtotal:		10
# Smileys & Emotion subtotal:		10	w/o modifiers

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                      ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F91A                                      ; fully-qualified     # 🤚 E3.0 raised back of hand
1F590 FE0F                                 ; fully-qualified     # 🖐️ E0.7 hand with fingers splayed
1F590                                      ; unqualified         # 🖐 E0.7 hand with fingers splayed
270B                                       ; fully-qualified     # ✋ E0.6 raised hand
1F596                                      ; fully-qualified     # 🖖 E1.0 vulcan salute
1F596 1F3FF                                ; fully-qualified     # 🖖🏿 E1.0 vulcan salute: dark skin tone

# subgroup: hand-fingers-partial
1F44C                                      ; fully-qualified     # 👌 E0.6 OK hand
1F90C                                      ; fully-qualified     # 🤌 E13.0 pinched fingers
1F90F                                      ; fully-qualified     # 🤏 E12.0 pinching hand

# group: Component

# subgroup: skin-tone
1F3FB                                      ; component           # 🏻 E1.0 light skin tone

# subgroup: hair-style
1F9B0                                      ; component           # 🦰 E11.0 red hair

# group: Flags

# subgroup: flag
1F3C1                                      ; fully-qualified     # 🏁 E0.6 chequered flag
1F6A9                                      ; fully-qualified     # 🚩 E0.6 triangular flag
1F38C                                      ; fully-qualified     # 🎌 E0.6 crossed flags
1F3F4                                      ; fully-qualified     # 🏴 E1.0 black flag
1F3F3 FE0F                                 ; fully-qualified     # 🏳️ E0.7 white flag

# subgroup: country-flag
1F1FA 1F1F8                                ; fully-qualified     # 🇺🇸 E0.6 flag: United States
1F1EF 1F1F5                                ; fully-qualified     # 🇯🇵 E0.6 flag: Japan
1F1EB 1F1F7                                ; fully-qualified     # 🇫🇷 E0.6 flag: France
"""

EN_XML = """\
<?xml version="1.0" encoding="UTF-8" ?>
<!DOCTYPE ldml SYSTEM "../../common/dtd/ldml.dtd">
<ldml>
	<identity>
		<version number="$Revision$"/>
		<language type="en"/>
	</identity>
	<annotations>
		<annotation cp="🏻">light skin tone | skin tone | type 1–2</annotation>
		<annotation cp="🏻" type="tts">light skin tone</annotation>
		<annotation cp="😀">face | grin | grinning face</annotation>
		<annotation cp="😀" type="tts">grinning face</annotation>
		<annotation cp="☺">face | outlined | relaxed | smile | smiling face | smile</annotation>
		<annotation cp="☺" type="tts">TTS NAME ONLY</annotation>
		<annotation cp="🖐️">finger | hand | splayed</annotation>
		<annotation cp="👋">hand | wave
			| waving</annotation>
		<annotation cp="🏁">checkered | chequered | chequered flag | racing</annotation>
	</annotations>
</ldml>
"""

KEPT_PER_GROUP = {"Smileys & Emotion": 8, "People & Body": 8, "Flags": 8}


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "emoji-test.txt").write_text(EMOJI_TEST, encoding="utf-8")
    (tmp_path / "en.xml").write_text(EN_XML, encoding="utf-8")
    return {"emoji_test": tmp_path / "emoji-test.txt", "annotations": tmp_path / "en.xml"}


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def test_parse_emoji_test_keeps_fully_qualified_without_skin_tones_or_components(sources):
    entries = parse_emoji_test(sources["emoji_test"])
    chars = [e.char for e in entries]

    assert {g: sum(e.group == g for e in entries) for g in KEPT_PER_GROUP} == KEPT_PER_GROUP
    assert len(chars) == len(set(chars)) == sum(KEPT_PER_GROUP.values())
    assert "\u263a\ufe0f" in chars and "\u263a" not in chars  # fully-qualified kept, unqualified dropped
    assert chars.count("\U0001f636\u200d\U0001f32b\ufe0f") == 1  # minimally-qualified duplicate dropped
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for ch in chars for c in ch)
    assert all(e.group != "Component" and "\U0001f9b0" not in e.char for e in entries)

    first = entries[0]
    assert (first.char, first.name, first.group, first.subgroup) == (
        "😀",
        "grinning face",
        "Smileys & Emotion",
        "face-smiling",
    )
    assert entries[-1].name == "flag: France" and entries[-1].codepoints == "1f1eb-1f1f7"


def test_parse_cldr_annotations_skips_tts_and_tolerates_fe0f(sources):
    notes = parse_cldr_annotations(sources["annotations"])

    assert notes["😀"] == ["face", "grin", "grinning face"]
    assert "TTS NAME ONLY" not in notes["☺"]
    assert notes["👋"] == ["hand", "wave", "waving"]
    # en.xml keys carry no U+FE0F but emoji-test.txt chars do, and either side may differ in other sources.
    assert keywords_for("\u263a\ufe0f", notes) == keywords_for("\u263a", notes) != []
    assert keywords_for("\U0001f590\ufe0f", notes) == keywords_for("\U0001f590", notes) == ["finger", "hand", "splayed"]
    assert keywords_for("🇺🇸", notes) == []


def test_emoji_text_is_name_plus_deduplicated_keywords_on_one_line(sources):
    entries = {e.name: e for e in parse_emoji_test(sources["emoji_test"])}
    notes = parse_cldr_annotations(sources["annotations"])

    assert emoji_text(entries["grinning face"], notes) == "grinning face: face, grin, grinning face"
    assert emoji_text(entries["smiling face"], notes) == "smiling face: face, outlined, relaxed, smile, smiling face"
    assert emoji_text(entries["waving hand"], notes) == "waving hand: hand, wave, waving"
    assert emoji_text(entries["flag: Japan"], notes) == "flag: Japan"


@needs_font
def test_render_emoji_draws_a_136x128_rgb_image():
    image = render_emoji("😀", NOTO_EMOJI_FONT)
    assert (image.size, image.mode) == ((136, 128), "RGB")
    assert not emoji.is_blank(image)
    assert emoji.is_blank(render_emoji("\ue000", NOTO_EMOJI_FONT))  # private use: no glyph


@needs_font
def test_build_emoji_writes_images_and_a_stratified_split(sources, tmp_path):
    # A code point the font has no glyph for must be reported in skipped.csv, not silently dropped.
    with sources["emoji_test"].open("a", encoding="utf-8") as f:
        f.write("E000 ; fully-qualified # \ue000 E0.0 no such glyph\n")
    out = build_emoji(tmp_path / "emoji", **sources, seed=0, processes=1)

    splits = {name: pd.read_csv(out / f"{name}.csv") for name in ("train", "val", "test", "all")}
    for frame in splits.values():
        assert list(frame.columns) == ["image", "text", "label"]
    everything = splits.pop("all")
    assert len(everything) == 24
    images = [set(frame["image"]) for frame in splits.values()]
    assert set.union(*images) == set(everything["image"])
    assert sum(map(len, images)) == len(everything)  # no row in two splits
    assert [len(f) for f in splits.values()] == [16, 4, 4]
    for frame in splits.values():
        assert set(frame["label"]) == set(KEPT_PER_GROUP)  # every group in every split

    row = everything.iloc[0]
    assert (row["image"], row["text"], row["label"]) == (
        "images/smileys-emotion/1f600.png",
        "grinning face: face, grin, grinning face",
        "Smileys & Emotion",
    )
    for rel in everything["image"]:
        with Image.open(out / rel) as image:
            assert (image.size, image.mode) == ((136, 128), "RGB")
            assert not emoji.is_blank(image)

    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped[["codepoints", "label"]].values.tolist() == [["e000", "Flags"]]
    assert "blank" in skipped["reason"][0]

    info = json.loads((out / "info.json").read_text(encoding="utf-8"))
    assert info["counts"] == {"all": 24, "train": 16, "val": 4, "test": 4, "skipped": 1}
    assert {g: v["all"] for g, v in info["groups"].items()} == KEPT_PER_GROUP
    assert info["emoji_version"] == "15.0"
    assert _siblings(out) == ["emoji", "emoji-test.txt", "en.xml"]  # no build or swap directory left over


@needs_font
def test_rebuild_is_atomic(sources, tmp_path, monkeypatch):
    out = build_emoji(tmp_path / "emoji", **sources, seed=0, processes=1)
    before = (out / "train.csv").read_text()

    calls = 0

    def render_then_fail(job):
        nonlocal calls
        calls += 1
        if calls > 5:
            raise KeyboardInterrupt
        return real_render(job)

    real_render = emoji._render_to_file
    monkeypatch.setattr(emoji, "_render_to_file", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        build_emoji(out, **sources, seed=1, processes=1)
    assert (out / "train.csv").read_text() == before  # the old dataset is untouched
    assert _siblings(out) == ["emoji", "emoji-test.txt", "en.xml"]

    monkeypatch.setattr(emoji, "_render_to_file", real_render)
    build_emoji(out, **sources, seed=1, processes=1)
    assert json.loads((out / "info.json").read_text())["seed"] == 1
    assert _siblings(out) == ["emoji", "emoji-test.txt", "en.xml"]


def test_missing_packages_names_files_packages_and_apt_line(sources, tmp_path):
    font = tmp_path / "NotoColorEmoji.ttf"
    with pytest.raises(MissingPackagesError) as info:
        build_emoji(tmp_path / "emoji", **sources, font=font)
    message = str(info.value)
    assert APT_LINE in message
    assert str(font) in message and "fonts-noto-color-emoji" in message
    assert "unicode-data" not in message.replace(APT_LINE, "")  # only the missing file is named
    assert not (tmp_path / "emoji").exists()

    with pytest.raises(MissingPackagesError) as info:
        build_emoji(tmp_path / "emoji", emoji_test=tmp_path / "a", annotations=tmp_path / "b", font=font)
    assert len(info.value.missing) == 3


def test_emoji_dataset_builds_once_under_mmfuse_home(tmp_path, monkeypatch):
    built = []

    def fake_build(out_dir):
        built.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "info.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(emoji, "build_emoji", fake_build)
    monkeypatch.setenv("MMFUSE_HOME", str(tmp_path / "home"))
    assert mmfuse_home() == tmp_path / "home"

    path = emoji_dataset()
    assert path == tmp_path / "home" / "datasets" / "emoji-v1"
    assert emoji_dataset() == path and len(built) == 1  # cached
    emoji_dataset(rebuild=True)
    assert emoji_dataset(tmp_path / "other") == tmp_path / "other" / "datasets" / "emoji-v1"
    assert len(built) == 3

    monkeypatch.delenv("MMFUSE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mmfuse_home() == tmp_path / ".cache" / "mmfuse"


@pytest.mark.skipif(not emoji.EMOJI_TEST.is_file(), reason="unicode-data is not installed")
def test_real_emoji_test_has_nine_groups():
    # Exact counts move with each Unicode release (15.0 gives 1,870), so only the shape is pinned here.
    groups = {e.group for e in parse_emoji_test()}
    assert groups == {
        "Smileys & Emotion",
        "People & Body",
        "Animals & Nature",
        "Food & Drink",
        "Travel & Places",
        "Activities",
        "Objects",
        "Symbols",
        "Flags",
    }
    assert len(parse_emoji_test()) > 1800


@pytest.mark.slow
@pytest.mark.skipif(
    not all(p.is_file() for p in (emoji.EMOJI_TEST, emoji.CLDR_ANNOTATIONS, NOTO_EMOJI_FONT)),
    reason="the quickstart needs " + APT_LINE,
)
def test_a_redirected_quickstart_prints_a_line_per_arm_and_writes_eval(tmp_path):
    """Issue 25: the quickstart's three arms, trained at once, printed 48 interleaved epoch lines; now one line per
    arm as it finishes, the table, how the arms were trained, and no carriage return. Its test scores go to eval/,
    where mmfuse evaluate writes them, not test/."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "qs"
    with open(tmp_path / "out.log", "wb") as stdout, open(tmp_path / "err.log", "wb") as stderr:
        argv = [sys.executable, "-m", "mmfuse", "quickstart", "--out", str(out)]
        code = subprocess.run(argv, stdout=stdout, stderr=stderr, env=env, timeout=900).returncode
    logs = {name: (tmp_path / f"{name}.log").read_bytes().decode("utf-8", "replace") for name in ("out", "err")}
    assert code == 0, logs["err"][-3000:]
    assert "\r" not in logs["out"] + logs["err"]
    assert not re.search(r"epoch \d+(/\d+)?:", logs["err"]), logs["err"]
    arms = re.findall(r"^INFO (\w+) arm done: last epoch 15 of 15, validation weighted F1", logs["err"], re.M)
    assert sorted(arms) == ["fusion", "image", "text"], logs["err"]
    assert re.findall(r"^│ (image|text|fusion) +│ head +│ +15/15 │", logs["out"], re.M) == ["image", "text", "fusion"]
    assert "each a head on frozen features (--tune head): 15 epochs of batch 64" in logs["out"]
    results = json.loads((out / "ablation.json").read_text())
    for run in (out, out / "image", out / "text"):
        assert (run / "eval" / "metrics.json").is_file() and not (run / "test").exists()
    assert results["fusion"]["weighted_f1"] > max(results["image"]["weighted_f1"], results["text"]["weighted_f1"])
