"""Emoji, binary and imbalanced: is this emoji a food? About 6% of the rows are positive.

    python bench/datasets/emoji_binary.py --out data/emoji-binary             # needs the Debian packages below
    python bench/datasets/emoji_binary.py --out data/emoji-binary --install   # as root: apt-get installs them

Why: a two-class set with a rare positive class, from real data, for binary training, thresholds and metrics that
accuracy flatters (always "other" is already 94% right).

Source: every emoji of `mmfuse datasets emoji` (fully-qualified, no skin tones; `unicode-data`), drawn the same way
with its own functions (Noto Color Emoji, `fonts-noto-color-emoji`, 136x128 on white) and captioned the same way
("name: keyword, keyword" from the CLDR annotations, `unicode-cldr-core`). Label: `food` for the emoji of the
Food & Drink group's food subgroups (food-fruit, food-vegetable, food-prepared, food-asian, food-marine, food-sweet:
106 of 1,870 with Unicode 15.0, 5.7%), `other` for all the rest. The negatives include near misses: drinks and
dishware (same group), animals a food is made of, plants. `--positives` takes another regular expression on the
subgroup (for instance `^animal-` gives 124 animals, 6.6%). Split 70/15/15 stratified, seed 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import building, finish, require_packages, slug  # noqa: E402
from _emoji import PACKAGES, draw, sources  # noqa: E402

from mmfuse.data.datasets.emoji import (  # noqa: E402
    CANVAS,
    CLDR_ANNOTATIONS,
    EMOJI_TEST,
    _emoji_version,
    emoji_text,
    parse_cldr_annotations,
    parse_emoji_test,
)

POSITIVES = r"^food-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--positives", default=POSITIVES, help="regular expression on the Unicode subgroup of a positive")
    p.add_argument("--positive-label", default="food", help="the positive class's name")
    p.add_argument("--processes", type=int, default=1, help="render with this many processes")
    p.add_argument("--install", action="store_true", help="apt-get install the missing Debian packages")
    args = p.parse_args(argv)
    versions = require_packages(PACKAGES, args.install)

    entries = parse_emoji_test(EMOJI_TEST)
    annotations = parse_cldr_annotations(CLDR_ANNOTATIONS)
    positive = re.compile(args.positives)
    labels = [args.positive_label if positive.search(e.subgroup) else "other" for e in entries]

    out = Path(args.out)
    with building(out) as tmp:
        paths = [f"images/{slug(label)}/{e.codepoints}.png" for e, label in zip(entries, labels)]
        reasons = draw(tmp, entries, paths, args.processes)
        rows = [
            {"image": path, "text": emoji_text(entry, annotations), "label": label}
            for entry, path, label, reason in zip(entries, paths, labels, reasons)
            if reason is None
        ]
        positives = sum(r["label"] == args.positive_label for r in rows)
        subgroups = sorted({e.subgroup for e, label in zip(entries, labels) if label == args.positive_label})
        print(
            f"{len(rows)} emoji, {positives} {args.positive_label} ({positives / len(rows):.1%}; subgroups "
            f"{', '.join(subgroups)}), {len(entries) - len(rows)} not drawn",
            flush=True,
        )
        info = {
            "name": "emoji-binary-v1",
            "emoji_version": _emoji_version(EMOJI_TEST),
            "image_size": list(CANVAS),
            "text": "the emoji set's caption: name: CLDR keywords",
            "label": f"{args.positive_label!r} when the Unicode subgroup matches {args.positives!r}, else 'other'",
            "positive_subgroups": subgroups,
            "positive_rate": round(positives / len(rows), 4),
            "dropped": {"not_drawn": len(entries) - len(rows)},
            "sources": sources(versions),
        }
        finish(tmp, out, rows, args.seed, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
