"""``mmfuse train``: a classifier on a folder or manifest, one run or a bag; resumable."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mmfuse.cli.checks import continue_command, keep_earlier_work, no_empty_folders
from mmfuse.cli.flags import HelpFormatter, run_config, training_flags
from mmfuse.cli.printing import print_training
from mmfuse.config import resolve
from mmfuse.errors import MmfuseError

log = logging.getLogger("mmfuse")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a classifier on a folder or manifest",
        formatter_class=HelpFormatter,
        description="Train a classifier. By default an ensemble (--preset ensemble): bagged members on the frozen "
        "offline towers efficientnet-lite0 + minilm (and mpnet, when installed), weighted on their out-of-fold "
        "predictions; leaderboard.csv scores every member and says which modality carries the signal. One model "
        "instead: --tune head (a head on cached features: seconds), --tune text (MiniLM fine-tuned beside cached "
        "image features: minutes on 2 cores for a few thousand rows), --tune all (both towers, as the reference "
        "does: wants a GPU), or --bag K for K of them.",
    )
    p.add_argument(
        "data",
        nargs="?",
        help="training data: folder ROOT/<label>/<images> or .csv/.jsonl/.parquet manifest (default: the --config "
        "file's data.train)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    training_flags(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its latest checkpoint (same data and settings)",
    )
    p.set_defaults(fn=cmd_train)


def cmd_train(args) -> int:
    # Each verb imports its library when it runs (deferred: the library imports torch, which --help, --version and
    # light verbs never need).
    from mmfuse.rundir.layout import RUN_FILES
    from mmfuse.training.bag import fit_bag
    from mmfuse.training.checkpoint import checkpoints
    from mmfuse.training.fit import Preempted, TrainingInterrupted, console_log, fit
    from mmfuse.training.portfolio import fit_portfolio

    # Mistakes in the settings stop here, before the run directory is checked.
    cfg = resolve(run_config(args, ensemble_by_default=True))
    resume = getattr(args, "resume", False)
    interrupted = checkpoints(Path(args.out))
    if resume and not interrupted:
        raise MmfuseError(f"--resume: {args.out} holds no checkpoint to continue from; train without --resume.")
    if interrupted and not resume and not args.overwrite:
        # Killed, preempted or stopped with Ctrl-C: the way on is to continue, not to start again.
        raise MmfuseError(
            f"--out {args.out} holds an interrupted run (its latest checkpoint: {interrupted[-1].name}). Continue it "
            f"with: {continue_command(args)}; or pass --overwrite to start over."
        )
    if not resume:
        # skipped.csv and captions.csv are what an unfinished run leaves behind for the next: not someone else's.
        ours = RUN_FILES - {"skipped.csv", "captions.csv"}
        keep_earlier_work(args.out, args.overwrite, ("metrics.json",), ours)
    cfg.data.train = args.data or cfg.data.train  # a config such as a search's best.yaml names its data
    if not cfg.data.train:
        raise MmfuseError("Give the training data: mmfuse train DATA --out RUN (or a --config that names data.train).")
    args.data = cfg.data.train
    if cfg.data.val and Path(cfg.data.val).resolve() == Path(args.data).resolve():
        log.warning("--val is the training data itself: the validation scores will flatter the model")
    try:
        # No empty run directory is left by a run that fails before writing anything (a mistyped data path).
        with no_empty_folders(args.out), console_log(args.out) as file_log:
            if cfg.train.ensemble:
                if resume:
                    raise MmfuseError(
                        "--resume continues single runs; an ensemble keeps its finished members when stopped."
                    )
                result = fit_portfolio(cfg, args.out)
            elif cfg.train.bag > 1:
                if resume:
                    raise MmfuseError("--resume continues single runs; a bag keeps its finished members when stopped.")
                result = fit_bag(cfg, args.out)
            else:
                result = fit(cfg, args.out, resume=resume)
            file_log.info("%s", summary_line(result, args.out))
    except TrainingInterrupted as e:  # the kept epoch (or members) so far is saved; the exit code says it stopped
        print_training(e.result, args.out)
        print(interrupted_message(e.result, args, bool(checkpoints(Path(args.out)))), file=sys.stderr)
        return 130
    except Preempted as e:
        print(
            f"stopped by SIGTERM; wrote the checkpoint {e.checkpoint}. Continue with: {continue_command(args)}",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        if checkpoints(Path(args.out)):  # a checkpoint written within the first epoch
            print(
                f"interrupted before the first epoch finished; continue from its checkpoint with: "
                f"{continue_command(args)}",
                file=sys.stderr,
            )
        else:
            print("interrupted before the first epoch (or member) finished: nothing was saved", file=sys.stderr)
        return 130
    print_training(result, args.out)
    if result.get("ensemble"):
        print(f"the ensemble's weights: {result['weights']} (leaderboard.csv); {result['modalities']}")
    return 0


def interrupted_message(result: dict, args, resumable: bool) -> str:
    """What Ctrl-C kept, and the exact command that goes on from there (``resumable``: checkpoints were kept)."""
    if result.get("ensemble"):
        return (
            f"interrupted; the ensemble of the {result['members_finished']} finished member(s) is in {args.out}, a run "
            f"predict can use. An ensemble does not resume: to train every member, start it again with: "
            f"{continue_command(args, '--overwrite')}"
        )
    if "bag" in result:
        done, k = result["members_finished"], result["bag"]
        return (
            f"interrupted; kept the {done} finished member(s) of {k} in {args.out}, a run predict can use. A bag does "
            f"not resume: to train all {k} members, start it again with: {continue_command(args, '--overwrite')}"
        )
    said = f"interrupted after {result['epochs_run']} epoch(s); saved epoch {result['best_epoch']} to {args.out}"
    if resumable:
        return f"{said}, a run predict can use. Continue training it with: {continue_command(args)}"
    return said


def summary_line(result: dict, out: str) -> str:
    """The printed summary table as one plain line, for train.log."""
    val = result.get("val")
    if not val:
        return f"trained {out} (no validation rows)"
    kept = "out-of-fold" if "bag" in result else f"best epoch {result['best_epoch']}"
    names = {"accuracy": "accuracy", "weighted_f1": "weighted F1", "macro_f1": "macro F1"}
    metric = result.get("metric", {}).get("name")
    if metric and metric not in names:  # --metric log_loss: the score runs were chosen by
        names[metric] = metric.replace("_", " ")
    scores = ", ".join(f"{name} {val[key]:.4f}" for key, name in names.items())
    line = f"trained {out} ({kept}): validation {scores}"
    if cal := result.get("calibration"):
        line += f"; calibrated, T {cal['temperature']:.3f}, ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}"
    return line
