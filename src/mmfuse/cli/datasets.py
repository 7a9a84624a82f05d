"""``mmfuse datasets``: a built-in dataset exported as manifests plus images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfuse.cli.checks import no_empty_folders, refuse_existing
from mmfuse.cli.flags import HelpFormatter
from mmfuse.errors import MmfuseError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "datasets", help="export a built-in dataset as manifests plus images", formatter_class=HelpFormatter
    )
    p.add_argument("name", choices=["emoji"])
    p.add_argument("--out", required=True, help="directory to write train.csv, val.csv, test.csv and images/")
    p.add_argument("--seed", type=int, default=0, help="seed of the 70/15/15 stratified split")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of the dataset in --out")
    p.set_defaults(fn=cmd_datasets)


def cmd_datasets(args) -> int:
    from mmfuse.data.datasets import emoji  # deferred: imports numpy and PIL, which --help never needs

    if not 0 <= args.seed < 2**32:
        raise MmfuseError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    # The build replaces --out as a whole: a file there, or a folder of someone's files, would be deleted with it.
    # Only an earlier export (its info.json names the dataset), with nothing added to it, is replaced, and only when
    # asked (--overwrite).
    target = Path(args.out)
    if target.exists() and not target.is_dir():
        raise MmfuseError(f"--out {args.out} is a file; give a new directory for the dataset.")
    try:
        ours = json.loads((target / "info.json").read_text(encoding="utf-8")).get("name") == emoji.DATASET_NAME
    except (OSError, ValueError, AttributeError):
        ours = False
    exported = {"all.csv", "train.csv", "val.csv", "test.csv", "skipped.csv", "info.json", "images"}
    if target.is_dir() and (not ours and any(target.iterdir()) or {p.name for p in target.iterdir()} - exported):
        raise MmfuseError(
            f"--out {args.out} already holds other files, which the export would replace; give a new or empty "
            "directory."
        )
    if ours:
        refuse_existing(
            args.out, f"an earlier export of {args.name} (info.json, the manifests, images/)", args.overwrite
        )
    with no_empty_folders(args.out):
        out = emoji.build_emoji(args.out, seed=args.seed)
    print(emoji.export_summary(out))
    return 0
