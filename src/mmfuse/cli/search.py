"""``mmfuse search``: hyperparameters searched with Optuna, each trial a run directory; resumable."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmfuse.cli.checks import continue_command, no_empty_folders, out_dir, refuse_existing
from mmfuse.cli.flags import HelpFormatter, given, run_config, training_flags
from mmfuse.cli.printing import print_leaderboard
from mmfuse.config import PRESETS, ModelConfig, TrainConfig, resolve
from mmfuse.errors import MmfuseError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search",
        help="search hyperparameters with Optuna (the mmfuse[search] extra)",
        formatter_class=HelpFormatter,
        description="Train many trials of one config, each a run directory under OUT/trials/, with Optuna's TPE "
        "sampler and median pruning on the validation --metric (weighted F1 by default). Trial 0 is the default "
        "config. The study lives in OUT/study.sqlite: the same command with --resume continues it (a trial a killed "
        "search left unfinished runs again). Writes OUT/leaderboard.csv and OUT/best.yaml (mmfuse train --config "
        "OUT/best.yaml --out RUN). Settings given as flags stay fixed; the others are searched over a default space "
        "for --tune, or the --space file.",
    )
    p.add_argument("data", help="training data: folder ROOT/<label>/<images> or .csv/.jsonl/.parquet manifest")
    p.add_argument("--out", required=True, help="directory for the study, the trials, leaderboard.csv and best.yaml")
    p.add_argument("--trials", type=int, required=True, help="trials to complete (or prune), counting earlier runs'")
    p.add_argument(
        "--space",
        help="YAML search space replacing the default: key: {low: 0.0001, high: 0.01, log: true} for numbers, "
        "key: [a, b] for choices; each key a training or model setting",
    )
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the search in --out (an interrupted one, or one to give more --trials); a trial a killed "
        "search left unfinished runs again",
    )
    training_flags(p)
    p.set_defaults(fn=cmd_search)


def cmd_search(args) -> int:
    from mmfuse.recipes.search import SearchInterrupted, search  # deferred: imports torch
    from mmfuse.recipes.space import load_space

    if args.trials < 1:
        raise MmfuseError(f"--trials must be >= 1, got {args.trials}")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise MmfuseError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    out_dir(args.out)
    cfg = run_config(args)
    resolved = resolve(cfg)  # mistakes in the settings stop here, before the study is opened
    study = Path(args.out) / "study.sqlite"
    if args.resume and not study.exists():
        raise MmfuseError(f"--resume: {args.out} holds no search to continue; search without --resume.")
    if study.exists() and not args.resume:
        refuse_existing(
            args.out, "a search (study.sqlite, trials/)", args.overwrite, f"continue it with: {continue_command(args)}"
        )
    if cfg.train.bag > 1:
        raise MmfuseError(
            "mmfuse search trains each trial as one run, not a bag: leave --bag out, then train the best config as a "
            "bag with mmfuse train --config OUT/best.yaml --bag K --out RUN."
        )
    cfg.data.train = args.data
    if not study.exists():
        check_data(resolved, args.data)  # before the study and its folder are made
    space = load_space(args.space) if args.space else None
    # What the user set with flags (or a preset) stays as set: the default space leaves those keys out.
    preset = PRESETS.get(args.preset or "", {})
    fixed = {*given(args, ModelConfig), *given(args, TrainConfig), *(k for sec in preset.values() for k in sec)}
    training = logging.getLogger("mmfuse.training")
    level = training.level
    if not args.verbose:  # a line per trial, not per epoch of every trial
        training.setLevel(logging.WARNING)
    try:
        with no_empty_folders(args.out):
            rows = search(cfg, args.out, args.trials, space, args.space, args.timeout, fixed, args.overwrite)
    except SearchInterrupted as e:
        print_leaderboard(e.rows[:5], f"top 5 of {len(e.rows)} trials")
        print(f"interrupted; continue the search in {args.out} with: {continue_command(args)}", file=sys.stderr)
        return 130
    finally:
        training.setLevel(level)  # an in-process caller (the tests, the Python API) gets its logging back
    print_leaderboard(rows[:5], f"top 5 of {len(rows)} trials")
    if rows and rows[0]["state"] == "complete":
        print(
            f"wrote {args.out}/leaderboard.csv and best.yaml (trial {rows[0]['trial']}: "
            f"{args.out}/trials/{rows[0]['trial']:03d}); train it again with: "
            f"mmfuse train --config {args.out}/best.yaml --out RUN"
        )
    return 0


def check_data(cfg, data: str) -> None:
    """The training (and validation) rows checked as a trial will check them, before the study is made: bad input
    stops here with the report, not in trial 0 with a study left behind. A warm check decodes nothing again."""
    from mmfuse.config import resolve
    from mmfuse.data.checks import load_checked  # deferred: imports numpy and PIL
    from mmfuse.data.columns import Columns

    named = Columns.of(resolve(cfg).model)
    need_text = cfg.model.modality_dropout == 0 and "text" in cfg.model.modalities and not cfg.data.caption_missing
    need_text = need_text and named is None  # a column's empty cells are masked
    checks = logging.getLogger("mmfuse.data")
    level = checks.level
    if cfg.data.skip_bad:  # each trial warns of the rows it skips: once is enough
        checks.setLevel(logging.ERROR)
    try:
        load_checked(data, captions=cfg.data.captions, need_text=need_text, skip_bad=cfg.data.skip_bad, named=named)
        if cfg.data.val:
            captions = cfg.data.val_captions or cfg.data.captions
            load_checked(cfg.data.val, captions=captions, need_text=need_text, skip_bad=cfg.data.skip_bad, named=named)
    finally:
        checks.setLevel(level)
