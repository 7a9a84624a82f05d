"""Emoji, multi-label: a real image+text set, each item with one or more labels (its frequent CLDR keyword words).

    python bench/datasets/emoji_multilabel.py --out data/emoji-multilabel             # needs the Debian packages below
    python bench/datasets/emoji_multilabel.py --out data/emoji-multilabel --install   # as root: apt-get installs them

Why: every other visible set has one label per row; this one tests multi-label training and metrics on real data
with real co-occurrence (eye and face, japanese and button, arrow and button, hand and gesture go together).

Source: the emoji of `mmfuse datasets emoji` (fully-qualified, no skin tones; `unicode-data`), drawn the same way
with its own functions (Noto Color Emoji, `fonts-noto-color-emoji`, 136x128 on white), and the English CLDR keyword
annotations it reads (`unicode-cldr-core`, /usr/share/unicode/cldr/common/annotations/en.xml).

Labels: the words of an emoji's CLDR keywords ("fairy tale" gives fairy and tale; a few function words such as
"with" and "of" are skipped; a plural counts as its singular when both occur, so "eyes" is "eye"), kept as labels
when they occur on at least --min-count emoji. Whole keywords are too sparse for that: only 5 occur on 30 or more
emoji, so the default is 20 keyword words, giving about 20 labels at about 1.2 labels per item. The `labels` column
joins an item's labels with "|". Emoji left with no label (most flags, most objects) are dropped.

Text: the emoji's caption as in the emoji set ("name: keyword, keyword"), with every label word (and its plural)
removed, so the text does not spell the labels out: "grinning face: face, grin, grinning face" labelled face reads
"grinning: grin". The remaining words still hint at them (a "grin" is on a face): that is the signal to learn.
Items whose text is then empty are dropped. Split 70/15/15 stratified by each item's rarest label, seed 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import building, finish, require_packages, slug  # noqa: E402
from _emoji import PACKAGES, draw, sources  # noqa: E402

from mmfuse.data.datasets.emoji import (  # noqa: E402
    CANVAS,
    CLDR_ANNOTATIONS,
    EMOJI_TEST,
    _emoji_version,
    keywords_for,
    parse_cldr_annotations,
    parse_emoji_test,
)

COLUMNS = ["image", "text", "labels"]
MIN_COUNT = 20
# Function words of multi-word keywords ("face with tears of joy"); "o" is the o of "o'clock".
STOP = {"a", "and", "at", "by", "for", "in", "of", "on", "or", "the", "to", "with", "o", "s", "no", "up", "down"}
MIN_STRATUM = 10  # an item's rarest label is its split stratum; rarer strata are pooled


def keyword_words(keywords: list[str]) -> set[str]:
    return {w for k in keywords for w in re.findall(r"[a-z]+", k.lower())} - STOP


def singular(words: set[str], vocabulary: set[str]) -> set[str]:
    """Each word as its singular when that is a word of the vocabulary too ("eyes" -> "eye", "hands" -> "hand")."""
    out = set()
    for w in words:
        if w.endswith("es") and w[:-2] in vocabulary:
            w = w[:-2]
        elif w.endswith("s") and w[:-1] in vocabulary:
            w = w[:-1]
        out.add(w)
    return out


def without(text: str, labels: list[str]) -> str:
    """`text` with each label word and its plural removed as whole words, and the space and punctuation left tidied."""
    for label in labels:
        text = re.sub(rf"(?<![a-z]){re.escape(label)}(?:e?s)?(?![a-z])", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"(?<![a-z])o[’'](?![a-z])", " ", text, flags=re.IGNORECASE)  # what "clock" leaves of "o'clock"
    return " ".join(text.split()).strip(" ,:;-–’'\"“”&")


def caption(name: str, keywords: list[str], labels: list[str]) -> str:
    """The emoji set's caption "name: keyword, keyword" with the label words removed; empty pieces dropped."""
    head = without(name, labels)
    rest = list(dict.fromkeys(k for k in (without(k, labels) for k in keywords) if k and k != head))
    if head and rest:
        return f"{head}: {', '.join(rest)}"
    return head or ", ".join(rest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--min-count", type=int, default=MIN_COUNT, help="a keyword word is a label on this many emoji")
    p.add_argument("--processes", type=int, default=1, help="render with this many processes")
    p.add_argument("--install", action="store_true", help="apt-get install the missing Debian packages")
    args = p.parse_args(argv)
    versions = require_packages(PACKAGES, args.install)

    entries = parse_emoji_test(EMOJI_TEST)
    annotations = parse_cldr_annotations(CLDR_ANNOTATIONS)
    keywords = {e.char: list(dict.fromkeys(keywords_for(e.char, annotations))) for e in entries}
    vocabulary = {w for ks in keywords.values() for w in keyword_words(ks)}
    words = {e.char: singular(keyword_words(keywords[e.char]), vocabulary) for e in entries}
    no_keywords = sum(not words[e.char] for e in entries)
    entries = [e for e in entries if words[e.char]]

    out = Path(args.out)
    with building(out) as tmp:
        paths = [f"images/{slug(e.group)}/{e.codepoints}.png" for e in entries]
        reasons = draw(tmp, entries, paths, args.processes)
        drawn = [(e, p) for e, p, reason in zip(entries, paths, reasons) if reason is None]
        counts = Counter(w for e, _ in drawn for w in words[e.char])
        labels = sorted(w for w, n in counts.items() if n >= args.min_count)

        rows, no_label, empty_text = [], 0, 0
        for entry, path in drawn:
            mine = sorted(words[entry.char] & set(labels))
            # Longer labels first, so "man" is not taken out of a longer label word before it.
            text = caption(entry.name, keywords[entry.char], sorted(labels, key=len, reverse=True)) if mine else ""
            if not mine or not text:
                no_label += not mine
                empty_text += bool(mine)
                (tmp / path).unlink()
                continue
            rows.append({"image": path, "text": text, "labels": "|".join(mine), "mine": mine})
        frequency = Counter(label for r in rows for label in r["mine"])
        for row in rows:
            row["stratum"] = min(row["mine"], key=lambda label: (frequency[label], label))
        strata = Counter(r["stratum"] for r in rows)
        for row in rows:
            if strata[row["stratum"]] < MIN_STRATUM:
                row["stratum"] = "(pooled)"
        print(
            f"{len(rows)} emoji with {len(labels)} labels (dropped: {no_keywords} without keywords, "
            f"{len(entries) - len(drawn)} not drawn, {no_label} without a label, {empty_text} with no text left)",
            flush=True,
        )
        info = {
            "name": "emoji-multilabel-v1",
            "emoji_version": _emoji_version(EMOJI_TEST),
            "image_size": list(CANVAS),
            "columns": COLUMNS,
            "text": "the emoji set's caption (name: keywords) with the label words and their plurals removed",
            "label": f"words of the CLDR keywords on at least {args.min_count} emoji, joined with '|'",
            "min_count": args.min_count,
            "stop_words": sorted(STOP),
            "dropped": {
                "no_keywords": no_keywords,
                "not_drawn": len(entries) - len(drawn),
                "no_label": no_label,
                "empty_text": empty_text,
            },
            "sources": sources(versions),
        }
        finish(tmp, out, rows, args.seed, info, columns=COLUMNS, multilabel=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
