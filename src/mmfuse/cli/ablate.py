"""``mmfuse ablate``: image-only, text-only and fusion runs trained alike and scored on the same split.

mmfuse ablate DATA --out OUT --test TEST        # a line per arm as it finishes, then the table
mmfuse -v ablate DATA --out OUT                 # and every arm's epochs
"""

from __future__ import annotations

import argparse
import contextlib
import logging

from rich.console import Console
from rich.table import Table

from mmfuse.cli.checks import keep_earlier_work, no_empty_folders, out_dir
from mmfuse.cli.flags import HelpFormatter, run_config, training_flags
from mmfuse.distributed import main_process
from mmfuse.errors import MmfuseError

TUNE_HELP = (
    "How every arm trains, applied to the towers each arm has. head (the default): every arm a head on frozen, "
    "cached features (seconds on a CPU). all: every arm fine-tunes the towers it has (the image arm its image tower, "
    "the text arm its text tower, fusion both; wants a GPU). text and image are refused: the arm without that tower "
    "would be a frozen head beside fine-tuned ones. Every arm gets the same epochs, batch size, learning rates, epoch "
    "kept (--keep) and seed."
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ablate",
        help="image-only vs text-only vs fusion, trained alike on the same split",
        formatter_class=HelpFormatter,
    )
    p.add_argument("data", help="training data (folder or manifest)")
    p.add_argument("--out", required=True, help="directory for the three runs, ablation.json and ablation.png")
    p.add_argument("--test", help="held-out data to score the three runs on (default: the validation split)")
    p.add_argument("--test-captions", help="captions CSV for a --test folder")
    training_flags(p)
    # The ablation's own default and choices, where train's help would describe train's.
    actions = {a.dest: a for a in p._actions}
    actions["tune"].help = TUNE_HELP
    preset = actions["preset"]
    preset.help = preset.help.split(" Without a preset:")[0] + (
        " Each arm is one run, not a bag: pass --bag 1 with best. Without a preset: --tune head for every arm"
    )
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
    # A run that fails on its data leaves no empty folders behind.
    with epoch_lines(args.verbose), no_empty_folders(args.out):
        results = ablate(cfg, args.out, test=args.test, test_captions=args.test_captions)
    if not main_process():  # under accelerate launch, the main process reports
        return 0
    print_ablation(results, f"modality ablation ({next(iter(results.values()))['evaluated_on']})")
    print(f"wrote {args.out}/ablation.json and ablation.png")
    return 0


@contextlib.contextmanager
def epoch_lines(verbose: bool):
    """Without -v, the runs' own lines (set-up, every epoch, progress) stay quiet: three arms trained at once
    interleaved 48 of them. The ablation's line per finished arm remains, and each distinct warning once (the
    three arms read the same split and warned of its size three times over)."""
    training = logging.getLogger("mmfuse.training")
    level = training.level
    once = _Once()
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(once)
    if not verbose:
        training.setLevel(logging.WARNING)
    try:
        yield
    finally:
        training.setLevel(level)  # an in-process caller (the tests, the Python API) gets its logging back
        for handler in handlers:
            handler.removeFilter(once)


class _Once(logging.Filter):
    """Passes an mmfuse warning the first time its text is seen. Forked arms inherit what was seen before the
    fork: the parent reads the split (and warns) before it starts them."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not record.name.startswith("mmfuse"):
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def print_ablation(results: dict[str, dict], title: str) -> None:
    """The arms' scores with how each was trained (its tune mode, the epoch kept of those run, its validation
    weighted F1 and seconds), and the sentence that says it in words."""
    from mmfuse.recipes.ablate import describe  # deferred: the recipe imports torch (only after it ran, here)

    table = Table(title=title)
    for col in ("", "tune", "epoch", "val F1", "s", "accuracy", "weighted F1", "macro F1"):
        # no_wrap: the table fits 80 columns, a redirected log's width
        table.add_column(col, justify="left" if col in ("", "tune") else "right", no_wrap=True)
    for name, r in results.items():
        table.add_row(
            name,
            r["training"]["tune"],
            f"{r['best_epoch']}/{r['epochs_run']}",
            f"{r['val_weighted_f1']:.4f}",
            f"{r['seconds']:.1f}",
            f"{r['accuracy']:.4f}",
            f"{r['weighted_f1']:.4f}",
            f"{r['macro_f1']:.4f}",
        )
    Console().print(table)
    how = describe({name: r["training"] for name, r in results.items()})
    print(how[0].upper() + how[1:] + ".")
