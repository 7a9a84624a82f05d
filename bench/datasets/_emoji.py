"""What the emoji-based bench sets (emoji_binary.py, emoji_multilabel.py) share: their Debian packages, drawing the
emoji with the Noto font as `mmfuse datasets emoji` does, and the sources their info.json names."""

from __future__ import annotations

from pathlib import Path

from mmfuse.data.datasets.emoji import CLDR_ANNOTATIONS, EMOJI_TEST, NOTO_EMOJI_FONT, _render_all

PACKAGES = ["unicode-data", "unicode-cldr-core", "fonts-noto-color-emoji"]


def draw(tmp: Path, entries: list, paths: list[str], processes: int) -> list[str | None]:
    """Draw each entry's emoji to its path under `tmp`; per entry, the reason it could not be drawn, or None."""
    for folder in {Path(p).parent for p in paths}:
        (tmp / folder).mkdir(parents=True, exist_ok=True)
    jobs = [(e.char, str(tmp / p), str(NOTO_EMOJI_FONT)) for e, p in zip(entries, paths)]
    return _render_all(jobs, processes)


def sources(versions: dict[str, str]) -> dict:
    """info.json's sources: the files read and the packages' versions."""
    return {
        "emoji_test": str(EMOJI_TEST),
        "annotations": str(CLDR_ANNOTATIONS),
        "font": str(NOTO_EMOJI_FONT),
        "packages": versions,
    }
