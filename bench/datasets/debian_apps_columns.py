"""Debian desktop applications, in columns: an icon, three text columns and three tabular ones -> the app's category.

    python bench/datasets/debian_apps_columns.py --out data/debian-apps-columns             # needs the files below
    python bench/datasets/debian_apps_columns.py --out data/debian-apps-columns --install   # as root: fetches them

Why: the other visible sets have one text column and no tabular data; this one has several text columns of very
different lengths and numeric and categorical columns, so a run must read and fuse them all.

The rows, the images and the label are those of debian_apps.py (its code builds them): one row per desktop
application of Debian's AppStream (DEP-11) catalogue of the release's main component with a 64x64 icon, the icon
flattened on white, the label its first freedesktop main category (Audio, Video -> AudioVideo); icons identical to
an earlier application's and classes under 15 rows dropped; split 70/15/15 stratified, seed 0. The same files are
needed (`appstream`, and apt's DEP-11 index targets switched on: see debian_apps.py), plus the release's main
Packages list that apt keeps beside them (/var/lib/apt/lists/*_main_binary-ARCH_Packages*, read with apt's own
`apt-helper cat-file`, whatever its compression).

Columns: image; title (the application's name, a few words), summary (one line), description (HTML stripped,
up to a few thousand characters); size_kb (numeric: the Installed-Size of the application's Debian package in the
release's Packages list, in kB), n_keywords (numeric: how many English AppStream keywords it lists, 0 when none),
section (categorical: the package's Debian section, such as games, sound, graphics, net, science, utils; a
`contrib/` or `non-free/` prefix removed); label. The section agrees with the label for many applications (games
-> Game), as a real tabular column can: the tabular columns alone are a fair baseline. A package missing from the
Packages list leaves size_kb and section empty (counted in info.json).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import building, drop_small, finish  # noqa: E402
from debian_apps import applications, architecture, catalogue_info, sha256, sources, write_icons  # noqa: E402

COLUMNS = ["image", "title", "summary", "description", "size_kb", "n_keywords", "section", "label"]
APT_HELPER = "/usr/lib/apt/apt-helper"


def packages_list(catalogue: Path) -> Path | None:
    """The release's main Packages list beside the DEP-11 catalogue (same suite), in whatever compression apt kept."""
    prefix = catalogue.name.split("_main_dep11_")[0]
    found = sorted(catalogue.parent.glob(f"{prefix}_main_binary-{architecture()}_Packages*"))
    return found[0] if found else None


def read_packages(path: Path) -> dict[str, dict[str, str]]:
    """Installed-Size and Section of each package in a Packages list (the first stanza of a name)."""
    text = subprocess.run([APT_HELPER, "cat-file", str(path)], capture_output=True, text=True, check=True).stdout
    packages: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Package" in fields:
            packages.setdefault(fields["Package"], fields)
    return packages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--install", action="store_true", help="apt-get install appstream and fetch the DEP-11 files")
    args = p.parse_args(argv)
    versions, catalogue, icon_tar = sources(args.install)
    listing = packages_list(catalogue)
    if listing is None:
        sys.exit(f"no main Packages list beside {catalogue}; run apt-get update (see debian_apps.py)")
    packages = read_packages(listing)
    header, rows, icons, dropped = applications(catalogue, icon_tar)
    rows, dropped["classes"] = drop_small(rows)

    not_listed = 0
    for row in rows:
        package = packages.get(row["package"])
        not_listed += package is None
        row["title"] = row["name"]
        row["size_kb"] = package.get("Installed-Size", "") if package else ""
        row["section"] = package.get("Section", "").rsplit("/", 1)[-1] if package else ""
        row["n_keywords"] = len(row["keywords"])
    print(f"{len(packages)} packages in {listing.name}; {not_listed} applications' packages not among them", flush=True)

    out = Path(args.out)
    with building(out) as tmp:
        write_icons(tmp, rows, icons)
        info = {
            "name": "debian-apps-columns-v1",
            "image_size": [64, 64],
            "columns": {
                "title": "text: the application's name (AppStream, English)",
                "summary": "text: its one-line summary",
                "description": "text: its description, HTML stripped",
                "size_kb": "numeric: Installed-Size of its package (kB), from the Packages list",
                "n_keywords": "numeric: number of English AppStream keywords",
                "section": "categorical: its package's Debian section, archive area prefix removed",
            },
            "label": "first freedesktop main category (Audio, Video -> AudioVideo)",
            "dropped": dropped,
            "missing": {"package_not_listed": not_listed},
            "sections": len({r["section"] for r in rows}),
            "sources": catalogue_info(header, catalogue, icon_tar, versions)
            | {"packages_list": {"file": str(listing), "sha256": sha256(listing)}},
        }
        finish(tmp, out, rows, args.seed, info, columns=COLUMNS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
