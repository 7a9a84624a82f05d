"""Debian desktop applications: a real image+text set with long, noisy text (icon + store description -> category).

    python bench/datasets/debian_apps.py --out data/debian-apps             # needs the AppStream files below
    python bench/datasets/debian_apps.py --out data/debian-apps --install   # as root: installs and fetches them

Source: Debian's AppStream (DEP-11) catalogue of the release's main component, which apt fetches beside the package
lists once the `appstream` package is installed (it defines the index targets; this script enables them on the
command line, since some machines switch them off by default):

    apt-get install appstream
    apt-get update -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=true \
                   -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=true

That leaves /var/lib/apt/lists/*_main_dep11_Components-ARCH.yml.gz (the catalogue) and *_main_dep11_icons-64x64.tar.gz
(the applications' own icons, 64x64, as shipped in their packages; about 11 MB together).

One row per desktop application with a cached icon. Image: its icon flattened on white (64x64). Text: the
application's name, summary and description (upstream metainfo, or the Debian package's long description), HTML
stripped: long, and noisy (version notes, feature lists, other languages' names). Label: the first freedesktop main
category the application lists (Audio and Video count as AudioVideo), so an Education;Science program is Education:
the label noise is real. Icons identical to an earlier application's are dropped; classes under 15 rows are dropped.
Split 70/15/15 stratified, seed 0.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import building, drop_small, finish, require_packages, run, slug  # noqa: E402

PACKAGES = ["appstream"]
LISTS = Path("/var/lib/apt/lists")
UPDATE = [
    "apt-get",
    "update",
    "-o",
    "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=true",
    "-o",
    "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=true",
]
MAIN_CATEGORIES = [
    "AudioVideo",
    "Audio",
    "Video",
    "Development",
    "Education",
    "Game",
    "Graphics",
    "Network",
    "Office",
    "Science",
    "Settings",
    "System",
    "Utility",
]
MERGED = {"Audio": "AudioVideo", "Video": "AudioVideo"}


def architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def find_catalogue(lists: Path) -> tuple[Path, Path] | None:
    """The main component's DEP-11 catalogue and 64x64 icon tarball of one suite, or None."""
    for catalogue in sorted(lists.glob(f"*_main_dep11_Components-{architecture()}.yml.gz")):
        prefix = catalogue.name.split("_main_dep11_")[0]
        icons = lists / f"{prefix}_main_dep11_icons-64x64.tar.gz"
        if icons.is_file() and not re.search(r"-(updates|security|backports|proposed-updates)$", prefix):
            return catalogue, icons
    return None


def plain(markup: str) -> str:
    """AppStream description markup (<p>, <ul><li>) as one line of text."""
    markup = re.sub(r"<li>", " - ", markup)
    markup = re.sub(r"</?[a-zA-Z][^>]*>", " ", markup)
    return " ".join(html.unescape(markup).split())


def english(field: dict | str | None) -> str:
    if isinstance(field, dict):
        return str(field.get("C") or field.get("en") or "")
    return str(field or "")


def label_of(categories: list[str]) -> str | None:
    for category in categories:
        if category in MAIN_CATEGORIES:
            return MERGED.get(category, category)
    return None


def read_catalogue(path: Path) -> tuple[dict, list[dict]]:
    """The header and the desktop applications of a DEP-11 Components file."""
    import yaml

    with gzip.open(path, "rt", encoding="utf-8") as f:
        docs = list(yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    return docs[0], [d for d in docs[1:] if d and d.get("Type") == "desktop-application"]


def flatten(png: bytes) -> bytes:
    """An icon with alpha composited on white, as an RGB PNG."""
    from PIL import Image

    icon = Image.open(io.BytesIO(png)).convert("RGBA")
    canvas = Image.new("RGBA", icon.size, (255, 255, 255, 255))
    out = io.BytesIO()
    Image.alpha_composite(canvas, icon).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sources(install: bool) -> tuple[dict[str, str], Path, Path]:
    """The packages' versions, the DEP-11 catalogue and its 64x64 icon tarball (fetched first with `install`)."""
    versions = require_packages(PACKAGES, install)
    found = find_catalogue(LISTS)
    if found is None and install:
        run(UPDATE)
        found = find_catalogue(LISTS)
    if found is None:
        sys.exit(
            f"no DEP-11 catalogue with 64x64 icons in {LISTS}; fetch it with:\n  sudo {' '.join(UPDATE)}\n"
            "(or run this script again with --install, as root)"
        )
    return versions, *found


def applications(catalogue: Path, icon_tar: Path) -> tuple[dict, list[dict], dict[str, bytes], dict[str, int]]:
    """The catalogue's header, one row per kept application, the icons by name, and the counts dropped.

    A row holds id, icon, text and label (the set's columns) and the parts: package, name, summary, description
    and keywords (the English ones, a list).
    """
    header, apps = read_catalogue(catalogue)
    with tarfile.open(icon_tar, "r:gz") as tar:
        icons = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}

    rows, no_icon, no_category, identical = [], 0, 0, 0
    seen: set[str] = set()
    for app in sorted(apps, key=lambda a: str(a["ID"])):
        cached = [i["name"] for i in (app.get("Icon") or {}).get("cached", []) if i.get("width") == 64]
        label = label_of(app.get("Categories") or [])
        if not cached or cached[0] not in icons:
            no_icon += 1
            continue
        if label is None:
            no_category += 1
            continue
        digest = hashlib.sha256(icons[cached[0]]).hexdigest()
        if digest in seen:
            identical += 1
            continue
        seen.add(digest)
        name, summary = english(app.get("Name")).strip(), english(app.get("Summary")).strip().rstrip(".")
        description = plain(english(app.get("Description")))
        text = " ".join(f"{name}: {summary}. {description}".split())
        keywords = app.get("Keywords")
        keywords = (keywords.get("C") or keywords.get("en") or []) if isinstance(keywords, dict) else []
        rows.append(
            {
                "id": str(app["ID"]),
                "icon": cached[0],
                "text": text,
                "label": label,
                "package": str(app.get("Package") or ""),
                "name": name,
                "summary": summary,
                "description": description,
                "keywords": [str(k) for k in keywords],
            }
        )
    print(
        f"{len(rows)} applications from {catalogue.name} (dropped: {no_icon} without a 64x64 icon, "
        f"{no_category} without a main category, {identical} with an icon identical to an earlier one)",
        flush=True,
    )
    dropped = {"no_64px_icon": no_icon, "no_main_category": no_category, "identical_icon": identical}
    return header, rows, icons, dropped


def write_icons(tmp: Path, rows: list[dict], icons: dict[str, bytes]) -> None:
    """Each row's icon flattened on white, at images/<label>/<id>.png (set as the row's image)."""
    for row in rows:
        row["image"] = f"images/{slug(row['label'])}/{slug(row['id'])}.png"
        (tmp / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp / row["image"]).write_bytes(flatten(icons[row["icon"]]))


def catalogue_info(header: dict, catalogue: Path, icon_tar: Path, versions: dict[str, str]) -> dict:
    return {
        "packages": versions,
        "catalogue": {
            "file": str(catalogue),
            "sha256": sha256(catalogue),
            "origin": header.get("Origin"),
            "time": str(header.get("Time")),
        },
        "icons": {"file": str(icon_tar), "sha256": sha256(icon_tar)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--install", action="store_true", help="apt-get install appstream and fetch the DEP-11 files")
    args = p.parse_args(argv)
    versions, catalogue, icon_tar = sources(args.install)
    header, rows, icons, dropped = applications(catalogue, icon_tar)
    rows, dropped["classes"] = drop_small(rows)

    out = Path(args.out)
    with building(out) as tmp:
        write_icons(tmp, rows, icons)
        info = {
            "name": "debian-apps-v1",
            "image_size": [64, 64],
            "text": "name: summary. description (AppStream, English, HTML stripped)",
            "label": "first freedesktop main category (Audio, Video -> AudioVideo)",
            "dropped": dropped,
            "sources": catalogue_info(header, catalogue, icon_tar, versions),
        }
        finish(tmp, out, rows, args.seed, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
