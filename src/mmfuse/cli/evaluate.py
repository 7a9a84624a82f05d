"""``mmfuse evaluate``: a run scored on labelled data (metrics.json, the confusion matrix, the misclassified)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmfuse.cli.checks import no_empty_folders, refuse_existing
from mmfuse.cli.flags import HelpFormatter, scoring, scoring_flags, speed
from mmfuse.cli.printing import print_binary, print_report
from mmfuse.distributed import main_process
from mmfuse.rundir.layout import is_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a run on labelled data", formatter_class=HelpFormatter)
    p.add_argument("run", help="run directory made by mmfuse train")
    p.add_argument("data", help="folder or manifest")
    p.add_argument("--out", help="directory for metrics.json and the confusion matrix (default RUN/eval)")
    scoring_flags(p, "evaluate")
    p.set_defaults(fn=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from mmfuse.inference.predictor import evaluate_file  # deferred: imports torch

    out = Path(args.out) if args.out else Path(args.run) / "eval"
    if (out / "metrics.json").is_file() and not is_run(out):  # a run there is refused, with its own reason, below
        refuse_existing(out, "an earlier evaluation (metrics.json, the confusion matrix, errors.csv)", args.overwrite)
    with no_empty_folders(out):
        report = evaluate_file(args.run, args.data, args.out, **scoring(args), **speed(args))
    if not main_process():
        return 0  # under accelerate launch, the main process reports for all
    print_report(report)
    if "threshold" in report:  # a binary run
        print_binary(report)
        print(f"wrote {out}/roc.png and pr.png")
    if "per_label" in report:  # a multi-label run
        print(f"wrote {out}/metrics.json, per_label.csv, errors.csv and errors.html (the rows whose set is wrong)")
        return 0
    print(f"wrote {out}/metrics.json, confusion_matrix.csv and .png, errors.csv and errors.html (the misclassified)")
    return 0
