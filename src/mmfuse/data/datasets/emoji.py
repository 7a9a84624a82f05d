"""The emoji dataset: Noto Color Emoji images, labelled by Unicode group, captioned with CLDR keywords.

Everything comes from three Debian packages, so it builds offline on any machine that has them:

    sudo apt-get install fonts-noto-color-emoji unicode-data unicode-cldr-core

Build the cached copy (about 1,870 images in 9 groups, a stratified 70/15/15 split) and get its path:

    python -c "from mmfuse.data.datasets import emoji_dataset; print(emoji_dataset())"

or build into any directory with `build_emoji(out_dir)`. The result holds `images/<group>/<codepoints>.png`,
the manifests `train.csv`, `val.csv`, `test.csv` and `all.csv` (columns image,text,label), `skipped.csv`
(emoji the font could not draw, with the reason) and `info.json` (counts and sources).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from mmfuse.errors import MmfuseError
from mmfuse.paths import mmfuse_home

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
NOTO_EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
APT_LINE = "sudo apt-get install fonts-noto-color-emoji unicode-data unicode-cldr-core"

DATASET_NAME = "emoji-v1"
FONT_SIZE = 109  # the only size the bitmap strike in Noto Color Emoji has
CANVAS = (136, 128)  # width, height of one glyph of that strike
SPLITS = {"train": 0.70, "val": 0.15, "test": 0.15}
MANIFEST_COLUMNS = ["image", "text", "label"]

_SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)
_VS16 = "\ufe0f"
_LINE = re.compile(r"^(?P<cps>[0-9A-Fa-f ]+?)\s*;\s*(?P<status>[\w-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(?P<name>.+?)\s*$")


class MissingPackagesError(MmfuseError):
    """A source file of the emoji dataset is absent; the message gives the apt-get line that installs it."""

    def __init__(self, missing: list[tuple[Path, str]]):
        self.missing = missing
        lines = ["The emoji dataset needs files that are not installed:"]
        lines += [f"  {path} (Debian package {package})" for path, package in missing]
        lines += ["Install them with:", f"  {APT_LINE}"]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji from emoji-test.txt."""

    char: str
    """The emoji itself, variation selectors included."""
    name: str
    """Its CLDR short name, e.g. "grinning face"."""
    group: str
    """Its Unicode group, the dataset's label, e.g. "Smileys & Emotion"."""
    subgroup: str
    """Its Unicode subgroup, e.g. "face-smiling"."""

    @property
    def codepoints(self) -> str:
        """Lower-case hex code points joined by "-", e.g. "1f600"; unique, so it names the image file."""
        return "-".join(f"{ord(c):x}" for c in self.char)


@dataclass(frozen=True)
class Skipped:
    """An emoji left out of the dataset, and why."""

    entry: EmojiEntry
    reason: str


def parse_emoji_test(path: str | Path = EMOJI_TEST) -> list[EmojiEntry]:
    """Read emoji-test.txt, keeping fully-qualified emoji without skin-tone modifiers, outside the Component group.

    Args:
        path: The emoji-test.txt file.

    Returns:
        The kept emoji in file (CLDR) order.
    """
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            match = _LINE.match(line)
            if match is None or match["status"] != "fully-qualified" or group == "Component":
                continue
            codes = [int(cp, 16) for cp in match["cps"].split()]
            if any(cp in _SKIN_TONES for cp in codes):
                continue
            # Build the char from the code points: the "# 😀" column is for humans and has been malformed before.
            entries.append(EmojiEntry("".join(map(chr, codes)), match["name"], group, subgroup))
    return entries


def parse_cldr_annotations(path: str | Path = CLDR_ANNOTATIONS) -> dict[str, list[str]]:
    """Read CLDR keyword annotations (the `type="tts"` entries only repeat the name, so they are skipped).

    Args:
        path: A CLDR annotations XML file such as en.xml.

    Returns:
        Keywords per emoji, keyed without U+FE0F; look them up with `keywords_for`.
    """
    annotations: dict[str, list[str]] = {}
    for node in ET.parse(path).getroot().iter("annotation"):
        cp = node.get("cp")
        if not cp or node.get("type") == "tts" or not node.text:
            continue
        keywords = [k.strip() for k in node.text.split("|") if k.strip()]
        annotations.setdefault(cp.replace(_VS16, ""), []).extend(keywords)
    return annotations


def keywords_for(char: str, annotations: dict[str, list[str]]) -> list[str]:
    """Return an emoji's keywords whether or not `char` or the annotation keys carry U+FE0F.

    Args:
        char: The emoji.
        annotations: The result of `parse_cldr_annotations`, or any dict keyed by emoji.

    Returns:
        Its keywords, or an empty list (flags and most ZWJ sequences have none in en.xml).
    """
    for key in (char, char.replace(_VS16, "")):
        if key in annotations:
            return annotations[key]
    return []


def emoji_text(entry: EmojiEntry, annotations: dict[str, list[str]]) -> str:
    """Caption an emoji as its name plus its de-duplicated keywords, on one line.

    Args:
        entry: The emoji.
        annotations: Keywords per emoji.

    Returns:
        E.g. "grinning face: face, grin, grinning face", or just the name when there are no keywords.
    """
    keywords = list(dict.fromkeys(keywords_for(entry.char, annotations)))
    text = f"{entry.name}: {', '.join(keywords)}" if keywords else entry.name
    return " ".join(text.split())


@lru_cache(maxsize=4)
def _load_font(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, FONT_SIZE)


def render_emoji(char: str, font: str | Path | ImageFont.FreeTypeFont = NOTO_EMOJI_FONT) -> Image.Image:
    """Draw one emoji in colour on white.

    Args:
        char: The emoji.
        font: A colour emoji font loaded at size 109, or the path of one.

    Returns:
        A 136x128 RGB image; all white when the font has no glyph for `char` (see `is_blank`).
    """
    if not isinstance(font, ImageFont.FreeTypeFont):
        font = _load_font(str(font))
    canvas = Image.new("RGBA", CANVAS, (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
    return Image.alpha_composite(Image.new("RGBA", CANVAS, (255, 255, 255, 255)), canvas).convert("RGB")


def is_blank(image: Image.Image) -> bool:
    """Return True when every pixel is white, i.e. nothing was drawn."""
    return all(low == 255 for low, _ in image.convert("RGB").getextrema())


def _render_to_file(job: tuple[str, str, str]) -> str | None:
    """Render one emoji to a PNG; return why it was skipped, or None. Module-level so a Pool can pickle it."""
    char, dest, font_path = job
    font = _load_font(font_path)
    # Without libraqm Pillow cannot shape ZWJ sequences and flags into one glyph: they would come out as
    # several glyphs, clipped to the first, under the wrong label.
    if font.getlength(char) > 1.5 * CANVAS[0]:
        return "renders as several glyphs (this Pillow cannot shape the sequence; it needs libraqm)"
    image = render_emoji(char, font)
    if is_blank(image):
        return "blank render (the font has no glyph for it)"
    # Level 1: files about 12% larger than the default level 6, saved about 30% faster (measured on this font).
    image.save(dest, format="PNG", compress_level=1)
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _check_sources(emoji_test: Path, annotations: Path, font: Path) -> None:
    packages = [(emoji_test, "unicode-data"), (annotations, "unicode-cldr-core"), (font, "fonts-noto-color-emoji")]
    missing = [(path, package) for path, package in packages if not path.is_file()]
    if missing:
        raise MissingPackagesError(missing)


def _split(frame: pd.DataFrame, seed: int) -> dict[str, pd.DataFrame]:
    """Split 70/15/15, stratified by label, in two stratified cuts."""
    # Imported here: scikit-learn takes over a second to import, and a cached dataset never needs it.
    from sklearn.model_selection import train_test_split

    rest_share = SPLITS["val"] + SPLITS["test"]
    try:
        train, rest = train_test_split(frame, test_size=rest_share, stratify=frame["label"], random_state=seed)
        val, test = train_test_split(
            rest, test_size=SPLITS["test"] / rest_share, stratify=rest["label"], random_state=seed
        )
    except ValueError as err:
        # Only tiny builds (a small `limit`) get here: too few rows per group to stratify.
        log.warning("emoji split is not stratified: %s", err)
        train, rest = train_test_split(frame, test_size=rest_share, random_state=seed)
        val, test = train_test_split(rest, test_size=SPLITS["test"] / rest_share, random_state=seed)
    # Back to CLDR order so manifests read naturally and diff cleanly between builds.
    return {name: part.sort_index() for name, part in {"train": train, "val": val, "test": test}.items()}


def _emoji_version(path: Path) -> str | None:
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith("# Version:"):
                return line.split(":", 1)[1].strip()
            if not line.startswith("#"):
                return None
    return None


def _render_all(jobs: list[tuple[str, str, str]], processes: int) -> list[str | None]:
    if processes <= 1 or len(jobs) < 200:
        return [_render_to_file(job) for job in jobs]
    with Pool(processes) as pool:
        return pool.map(_render_to_file, jobs, chunksize=64)


def build_emoji(
    out_dir: str | Path,
    *,
    emoji_test: str | Path = EMOJI_TEST,
    annotations: str | Path = CLDR_ANNOTATIONS,
    font: str | Path = NOTO_EMOJI_FONT,
    seed: int = 0,
    limit: int | None = None,
    processes: int | None = None,
) -> Path:
    """Render the emoji dataset into `out_dir`, replacing it atomically.

    The build happens in a hidden sibling directory that is renamed into place only when complete, so an
    interrupted build leaves either the old dataset or none, never half of one.

    Args:
        out_dir: Where the dataset ends up.
        emoji_test: emoji-test.txt (Debian package unicode-data).
        annotations: CLDR annotations en.xml (Debian package unicode-cldr-core).
        font: NotoColorEmoji.ttf (Debian package fonts-noto-color-emoji).
        seed: Seed of the train/val/test split.
        limit: Keep at most this many emoji per group (first in CLDR order), for quick smoke builds.
        processes: Render with this many processes; default: up to 2, the CPUs this machine has.

    Returns:
        `out_dir`, as a Path.

    Raises:
        MissingPackagesError: A source file is missing.
        MmfuseError: No emoji were left to build from.
    """
    out_dir = Path(out_dir)
    emoji_test, annotations, font = Path(emoji_test), Path(annotations), Path(font)
    _check_sources(emoji_test, annotations, font)

    entries = parse_emoji_test(emoji_test)
    if limit is not None:
        taken: Counter[str] = Counter()
        kept = []
        for entry in entries:
            taken[entry.group] += 1
            if taken[entry.group] <= limit:
                kept.append(entry)
        entries = kept
    if not entries:
        raise MmfuseError(f"no fully-qualified emoji found in {emoji_test}; is it an emoji-test.txt file?")
    keywords = parse_cldr_annotations(annotations)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        paths = [Path("images") / _slug(e.group) / f"{e.codepoints}.png" for e in entries]
        for folder in {p.parent for p in paths}:
            (tmp / folder).mkdir(parents=True, exist_ok=True)
        procs = processes if processes is not None else min(2, os.cpu_count() or 1)
        reasons = _render_all([(e.char, str(tmp / p), str(font)) for e, p in zip(entries, paths)], procs)

        rows, skipped = [], []
        for entry, path, reason in zip(entries, paths, reasons):
            if reason is None:
                rows.append({"image": path.as_posix(), "text": emoji_text(entry, keywords), "label": entry.group})
            else:
                skipped.append(Skipped(entry, reason))
        if not rows:
            raise MmfuseError(f"no emoji could be rendered with {font}; see the reasons in the log")
        if skipped:
            log.warning("%d emoji skipped (listed in skipped.csv), e.g. %s: %s", len(skipped), *_first(skipped))

        import pandas as pd  # only when building: a cached dataset never needs it

        frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        splits = _split(frame, seed)
        frame.to_csv(tmp / "all.csv", index=False)
        for name, part in splits.items():
            part.to_csv(tmp / f"{name}.csv", index=False)
        pd.DataFrame(
            [
                {"codepoints": s.entry.codepoints, "name": s.entry.name, "label": s.entry.group, "reason": s.reason}
                for s in skipped
            ],
            columns=["codepoints", "name", "label", "reason"],
        ).to_csv(tmp / "skipped.csv", index=False)

        groups = list(dict.fromkeys(frame["label"]))
        info = {
            "name": DATASET_NAME,
            "emoji_version": _emoji_version(emoji_test),
            "seed": seed,
            "limit": limit,
            "image_size": list(CANVAS),
            "counts": {
                "all": len(frame),
                **{name: len(part) for name, part in splits.items()},
                "skipped": len(skipped),
            },
            "groups": {
                g: {"all": int((frame["label"] == g).sum())}
                | {name: int((part["label"] == g).sum()) for name, part in splits.items()}
                for g in groups
            },
            "sources": {
                "emoji_test": {"path": str(emoji_test), "package": "unicode-data"},
                "annotations": {"path": str(annotations), "package": "unicode-cldr-core"},
                "font": {"path": str(font), "package": "fonts-noto-color-emoji"},
            },
        }
        (tmp / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %d emoji in %d groups at %s", len(frame), len(groups), out_dir)
    return out_dir


def export_summary(out_dir: str | Path) -> str:
    """What an export holds, file by file with its counts, read back from the folder (so it reports what is there)."""
    out_dir = Path(out_dir)
    info = json.loads((out_dir / "info.json").read_text(encoding="utf-8"))
    counts = info.get("counts", {})
    images = sum(1 for p in (out_dir / "images").rglob("*.png"))
    folders = sum(1 for p in (out_dir / "images").iterdir() if p.is_dir())
    width, height = info.get("image_size", ("?", "?"))
    lines = [f"wrote {out_dir} (emoji {info.get('emoji_version')}, split seed {info.get('seed')}):"]
    lines.append(f"  images/      {images:>6,} PNG images ({width}x{height}), one folder per group ({folders})")
    lines.append(f"  all.csv      {counts.get('all', 0):>6,} rows (image, text, label): every rendered emoji")
    for name in ("train", "val", "test"):
        lines.append(f"  {name + '.csv':<12} {counts.get(name, 0):>6,} rows, ~{SPLITS[name]:.0%} of each group")
    lines.append(f"  skipped.csv  {counts.get('skipped', 0):>6,} emoji the font could not draw, with the reason")
    lines.append("  info.json    counts by group and split, Unicode version, seed and source files")
    return "\n".join(lines)


def _first(skipped: list[Skipped]) -> tuple[str, str]:
    return f"{skipped[0].entry.name} ({skipped[0].entry.codepoints})", skipped[0].reason


def _swap_into_place(new: Path, out_dir: Path) -> None:
    """Rename `new` to `out_dir`; an existing `out_dir` is moved aside first, since rename cannot replace a full one."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "data")
    try:
        os.replace(new, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "data", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def emoji_dataset(home: str | Path | None = None, *, rebuild: bool = False) -> Path:
    """Return the cached emoji dataset, building it on first use.

    Args:
        home: The mmfuse cache root; default `mmfuse_home()` (`$MMFUSE_HOME`, else ~/.cache/mmfuse).
        rebuild: Build again even when a cached copy exists.

    Returns:
        `<home>/datasets/emoji-v1`, holding train.csv, val.csv, test.csv, all.csv and images/.

    Raises:
        MissingPackagesError: The Debian packages the dataset is built from are not installed.
    """
    root = Path(home) if home is not None else mmfuse_home()
    out_dir = root / "datasets" / DATASET_NAME
    # info.json is written last inside the build, so its presence means a complete dataset.
    if rebuild or not (out_dir / "info.json").is_file():
        build_emoji(out_dir)
    return out_dir
