"""``mmfuse ablate``: image-only, text-only and fusion runs trained and scored on the same split."""

from __future__ import annotations

import argparse

from mmfuse.cli.checks import keep_earlier_work, no_empty_folders, out_dir
from mmfuse.cli.flags import HelpFormatter, run_config, training_flags
from mmfuse.cli.printing import print_summary
from mmfuse.distributed import main_process
from mmfuse.errors import MmfuseError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate", help="image-only vs text-only vs fusion on the same split", formatter_class=HelpFormatter
    )
    p.add_argument("data", help="training data (folder or manifest)")
    p.add_argument("--out", required=True, help="directory for the three runs, ablation.json and ablation.png")
    p.add_argument("--test", help="held-out data to score the three runs on (default: the validation split)")
    p.add_argument("--test-captions", help="captions CSV for a --test folder")
    training_flags(p)
    p.set_defaults(fn=cmd_ablate)


def cmd_ablate(args) -> int:
    from mmfuse.recipes.ablate import ablate  # deferred: imports torch

    if hasattr(args, "modalities"):  # each of the three runs sets its own; the flag would be ignored
        raise MmfuseError("ablate trains image-only, text-only and fusion models itself: leave --modalities out.")
    out_dir(args.out)
    cfg = run_config(args)
    # Each of the three runs is work kept: one an interrupted ablation finished, too.
    runs = tuple(f"{name}/{f}" for name in ("image", "text", "fusion") for f in ("metrics.json", "model.safetensors"))
    keep_earlier_work(args.out, args.overwrite, ("ablation.json", *runs))
    cfg.data.train = args.data
    with no_empty_folders(args.out):  # a run that fails on its data leaves no empty folders behind
        results = ablate(cfg, args.out, test=args.test, test_captions=args.test_captions)
    if not main_process():  # under accelerate launch, the main process reports
        return 0
    print_summary(results, f"modality ablation ({next(iter(results.values()))['evaluated_on']})")
    print(f"wrote {args.out}/ablation.json and ablation.png")
    return 0
