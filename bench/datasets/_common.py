"""Shared parts of the bench dataset builders: apt checks, small-class dropping, the 70/15/15 split, the files written.

Every builder writes the same layout as `mmfuse datasets emoji`: DIR/images/..., DIR/all.csv, DIR/train.csv,
DIR/val.csv, DIR/test.csv (columns image,text,label; image relative to DIR) and DIR/info.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SPLITS = {"train": 0.70, "val": 0.15, "test": 0.15}
COLUMNS = ["image", "text", "label"]
MIN_ROWS = 15


def package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None when it is not installed."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
    except FileNotFoundError:  # not a Debian system
        return None
    return out[1] if len(out) == 2 and out[0] == "installed" else None


def require_packages(packages: list[str], install: bool) -> dict[str, str]:
    """Check that the Debian packages are installed (installing them with `install`); return their versions.

    Exits with the apt-get line to run when some are missing and `install` is false.
    """
    missing = [p for p in packages if package_version(p) is None]
    if missing and install:
        run(["apt-get", "install", "-y", "--no-install-recommends", *missing])
        missing = [p for p in packages if package_version(p) is None]
    if missing:
        sys.exit(
            f"missing Debian packages: {' '.join(missing)}\n"
            f"install them with:  sudo apt-get install --no-install-recommends {' '.join(missing)}\n"
            "(or run this script again with --install, as root)"
        )
    return {p: package_version(p) or "" for p in packages}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def words(name: str) -> str:
    """Split an identifier into lower-case words: "network-wireless_signalGood" -> "network wireless signal good"."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return " ".join(re.split(r"[^A-Za-z0-9]+", name)).lower().strip()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def drop_small(rows: list[dict], min_rows: int = MIN_ROWS) -> tuple[list[dict], dict[str, int]]:
    """Drop the rows of classes with fewer than `min_rows` rows; return the kept rows and the dropped counts."""
    counts = Counter(r["label"] for r in rows)
    dropped = {label: n for label, n in sorted(counts.items()) if n < min_rows}
    for label, n in dropped.items():
        print(f"dropped class {label!r}: {n} rows (< {min_rows})", flush=True)
    return [r for r in rows if r["label"] not in dropped], dropped


def split(rows: list[dict], seed: int, stratum: str = "label") -> dict[str, list[dict]]:
    """Stratified 70/15/15 split in two stratified cuts, as `mmfuse datasets emoji` does; each part in input order.

    Rows are stratified by their `stratum` field (the label; a multi-label set passes a one-value stand-in).
    """
    from sklearn.model_selection import train_test_split

    index = list(range(len(rows)))
    labels = [r[stratum] for r in rows]
    rest_share = SPLITS["val"] + SPLITS["test"]
    train, rest = train_test_split(index, test_size=rest_share, stratify=labels, random_state=seed)
    val, test = train_test_split(
        rest, test_size=SPLITS["test"] / rest_share, stratify=[labels[i] for i in rest], random_state=seed
    )
    return {name: [rows[i] for i in sorted(part)] for name, part in {"train": train, "val": val, "test": test}.items()}


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def finish(
    tmp: Path,
    out: Path,
    rows: list[dict],
    seed: int,
    info: dict,
    columns: list[str] = COLUMNS,
    multilabel: bool = False,
) -> None:
    """Write the manifests and info.json into the build folder `tmp`, then move it to `out` (replacing `out`).

    `columns` are the manifests' columns. With `multilabel` each row has a `labels` field ("a|b|c") and a `stratum`
    field to split by; info.json then counts each label's rows and gives the mean labels per row.
    """
    parts = split(rows, seed, "stratum" if multilabel else "label")
    write_csv(tmp / "all.csv", rows, columns)
    for name, part in parts.items():
        write_csv(tmp / f"{name}.csv", part, columns)

    def labels_of(row: dict) -> list[str]:
        return row["labels"].split("|") if multilabel else [row["label"]]

    labels = sorted({label for r in rows for label in labels_of(r)})
    info = {
        **info,
        "seed": seed,
        "counts": {"all": len(rows), **{name: len(part) for name, part in parts.items()}},
        "labels": {
            label: {"all": sum(label in labels_of(r) for r in rows)}
            | {name: sum(label in labels_of(r) for r in part) for name, part in parts.items()}
            for label in labels
        },
    }
    if multilabel:
        info["labels_per_row"] = round(sum(len(labels_of(r)) for r in rows) / len(rows), 4)
    (tmp / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, out)
    kind = "labels" if multilabel else "classes"
    print(f"wrote {out}: {len(rows)} rows, {len(labels)} {kind}", flush=True)
    for label in labels:
        print(f"  {label:<14} {info['labels'][label]['all']:>5}", flush=True)


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A fresh hidden build folder beside `out`, renamed into place by `finish`; removed if the build fails, so a
    failed or interrupted build leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
