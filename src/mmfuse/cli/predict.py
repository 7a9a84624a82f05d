"""``mmfuse predict``: labels for (unlabelled) data into a CSV, in chunks, with torch or the ONNX export."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmfuse.cli.checks import continue_command, no_empty_folders
from mmfuse.cli.flags import HelpFormatter, scoring, scoring_flags, speed
from mmfuse.distributed import main_process
from mmfuse.rundir.layout import RUN_FILES, is_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict labels for (unlabelled) data", formatter_class=HelpFormatter)
    p.add_argument("run", help="run directory made by mmfuse train")
    p.add_argument("data", help="folder or manifest")
    p.add_argument("--out", required=True, help="predictions CSV to write")
    scoring_flags(p, "predict")
    p.add_argument("--onnx", metavar="DIR", help="the export to run with --backend onnx (default RUN/export)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted predict of the same data, run and options after its last whole chunk "
        "(with nothing to continue, start)",
    )
    p.set_defaults(fn=cmd_predict)


def cmd_predict(args) -> int:
    from mmfuse.inference.backends import loader  # deferred: imports torch
    from mmfuse.inference.predictor import predict_file
    from mmfuse.inference.stream import check_out, leftovers, read_progress

    out = Path(args.out)
    # predict_file says what is wrong with a directory, the input itself or one of a run's files as --out.
    theirs = out.is_dir() or (is_run(out.parent) and out.name in RUN_FILES)
    if not theirs and not (out.exists() and Path(args.data).exists() and out.resolve() == Path(args.data).resolve()):
        check_out(out, args.overwrite, args.resume, continue_command(args))
    try:
        with no_empty_folders(out.parent):
            load = loader(args.run, args.backend, args.onnx, **speed(args))
            path = predict_file(args.run, args.data, args.out, **scoring(args), resume=args.resume, load=load)
    except KeyboardInterrupt:
        found = leftovers(out)
        if not found or not main_process():
            print("interrupted before the first chunk was written: nothing to continue", file=sys.stderr)
        else:
            done = sum(read_progress(p)["rows_done"] for p in found)
            print(
                f"interrupted; {done} row(s) are written, in part files beside {out}. Continue after the last whole "
                f"chunk with: {continue_command(args)}",
                file=sys.stderr,
            )
        return 130
    if main_process():
        print(f"wrote {path}")
    return 0
