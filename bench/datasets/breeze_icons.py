"""Breeze icons: a real image+text set where the image is weak and the text (the icon's name) carries the signal.

    python bench/datasets/breeze_icons.py --out data/breeze-icons          # needs the two Debian packages below
    python bench/datasets/breeze_icons.py --out data/breeze-icons --install   # as root: apt-get installs them

Source: the KDE Breeze icon theme from Debian (`breeze-icon-theme`, /usr/share/icons/breeze), rasterised with
`rsvg-convert` (`librsvg2-bin`) to 48x48 on white. Only the theme's small sizes are used (22 px, else 16 px: the
toolbar and menu icons, mostly monochrome line drawings in every context, so the picture says little about the
context; `--sizes 48,64,32,22,16` takes the large, colourful ones first instead). One row per distinct icon file:
symbolic links and the `-symbolic` and HiDPI (@2x, @3x) variants are left out, one size is kept per (context, name),
and files or renders identical to an earlier one are dropped. Text: the icon name's words
(`network-wireless-signal-good` -> "network wireless signal good"). Label: the theme's context folder (actions,
devices, mimetypes, places, status, ...). Each class keeps at most --cap rows (the first by a hash of the name, so
the choice is stable); classes under 15 rows are dropped. Split 70/15/15 stratified, seed 0.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import building, drop_small, finish, require_packages, words  # noqa: E402

PACKAGES = ["breeze-icon-theme", "librsvg2-bin"]
THEME = Path("/usr/share/icons/breeze")
SIZE = 48
SMALL = "22,16"  # the toolbar and menu sizes, mostly monochrome line icons in every context


def candidates(theme: Path, size_order: list[str]) -> tuple[list[dict], int]:
    """One source file per (context, name), identical files dropped; also return how many were dropped."""
    rows, seen, duplicates = [], set(), 0
    for context in sorted(p for p in theme.iterdir() if p.is_dir()):
        chosen: dict[str, Path] = {}
        sizes = {p.name: p for p in context.iterdir() if p.is_dir()}
        for size in [s for s in size_order if s in sizes]:
            for svg in sorted(sizes[size].glob("*.svg")):
                name = svg.stem
                if svg.is_symlink() or name.endswith("-symbolic") or name in chosen:
                    continue
                chosen[name] = svg
        for name in sorted(chosen):
            digest = hashlib.sha256(chosen[name].read_bytes()).hexdigest()
            if digest in seen:
                duplicates += 1
                continue
            seen.add(digest)
            rows.append({"source": chosen[name], "name": name, "text": words(name), "label": context.name})
    return rows, duplicates


def cap_rows(rows: list[dict], cap: int) -> list[dict]:
    """At most `cap` rows per label: the first by sha1 of the name, kept in their original order."""
    keep = set()
    for label in sorted({r["label"] for r in rows}):
        mine = [i for i, r in enumerate(rows) if r["label"] == label]
        keep.update(sorted(mine, key=lambda i: hashlib.sha1(rows[i]["name"].encode()).hexdigest())[:cap])
    return [r for i, r in enumerate(rows) if i in keep]


def render(svg: Path) -> bytes:
    """Rasterise an SVG to a SIZE x SIZE RGB PNG on white, aspect kept, centred."""
    from PIL import Image

    png = subprocess.run(
        ["rsvg-convert", "-w", str(SIZE), "-h", str(SIZE), "--keep-aspect-ratio", "-b", "white", str(svg)],
        capture_output=True,
        check=True,
    ).stdout
    icon = Image.open(io.BytesIO(png)).convert("RGB")
    canvas = Image.new("RGB", (SIZE, SIZE), "white")
    canvas.paste(icon, ((SIZE - icon.width) // 2, (SIZE - icon.height) // 2))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--cap", type=int, default=300, help="at most this many rows per class")
    p.add_argument("--sizes", default=SMALL, help="the theme's size folders to take icons from, in preference order")
    p.add_argument("--install", action="store_true", help="apt-get install the missing Debian packages")
    args = p.parse_args(argv)
    versions = require_packages(PACKAGES, args.install)

    rows, identical_files = candidates(THEME, args.sizes.split(","))
    print(f"{len(rows)} distinct icon files in {THEME} ({identical_files} identical copies dropped)", flush=True)
    rows = cap_rows(rows, args.cap)
    out = Path(args.out)
    with building(out) as tmp:
        build(rows, tmp, out, args, versions, identical_files)
    return 0


def build(rows: list[dict], tmp: Path, out: Path, args: argparse.Namespace, versions: dict, identical: int) -> None:
    with ThreadPoolExecutor(2) as pool:
        pngs = list(pool.map(render, [r["source"] for r in rows]))
    kept, seen, identical_renders = [], set(), 0
    for row, png in zip(rows, pngs):
        digest = hashlib.sha256(png).hexdigest()
        if digest in seen:
            identical_renders += 1
            continue
        seen.add(digest)
        row["png"] = png
        kept.append(row)
    kept, dropped = drop_small(kept)
    for row in kept:
        row["image"] = f"images/{row['label']}/{row['name']}.png"
        (tmp / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp / row["image"]).write_bytes(row["png"])
    info = {
        "name": "breeze-icons-v1",
        "image_size": [SIZE, SIZE],
        "text": "the icon name's words",
        "label": "the theme's context folder",
        "cap_per_class": args.cap,
        "theme_sizes": args.sizes,
        "dropped": {"identical_files": identical, "identical_renders": identical_renders, "classes": dropped},
        "sources": {"theme": str(THEME), "packages": versions},
    }
    finish(tmp, out, kept, args.seed, info)


if __name__ == "__main__":
    raise SystemExit(main())
