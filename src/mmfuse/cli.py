"""The ``mmfuse`` command: one subcommand per verb, each a plain function over the library.

Flags are generated from the config dataclasses (one group per dataclass), so ``--help`` always matches them.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Collection
from dataclasses import MISSING, fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmfuse import __version__
from mmfuse.config import DTYPES, PREDICT_CHUNK, PRESETS, DataConfig, ModelConfig, RunConfig, TrainConfig, resolve
from mmfuse.data.datasets import emoji
from mmfuse.distributed import main_process
from mmfuse.errors import MmfuseError
from mmfuse.rundir import RUN_FILES, check_run, present

log = logging.getLogger("mmfuse")


def field_docs(cls) -> dict[str, str]:
    """The one-line docstrings written under each dataclass field (Python keeps them only in the source)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[prev.target.id] = str(node.value.value)
    return docs


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field; unset flags stay absent from the namespace so presets and YAML can fill them."""
    group = parser.add_argument_group(title)
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        doc = docs.get(f.name, "")
        help_ = (doc + default_note(doc, default)).replace("%", "%%")  # argparse formats help with %
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind == "bool":
            # A switch that is on by default needs its --no- form to be turned off at all.
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            group.add_argument(flag, action=action, default=argparse.SUPPRESS, help=help_)
        elif kind.startswith("list"):
            group.add_argument(flag, nargs="+", default=argparse.SUPPRESS, help=help_)
        else:
            typ = int if kind.startswith("int") else float if kind.startswith("float") else str
            group.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_, metavar=f.name.upper())


def default_note(help_: str, default) -> str:
    """What to append to a help text for its default, "(default: X)", or nothing: not when the text already says it
    (defaults that depend on other flags), nor for None and off switches, where "(default: None)" says nothing."""
    if default is None or default is False or default == [] or "default" in help_.lower():
        return ""
    shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default  # as typed: image text
    return f" (default: {shown})"


class HelpFormatter(argparse.HelpFormatter):
    """Hand-written flags get their default by the dataclass flags' rule (``default_note``), so each default shows
    once; argparse's ArgumentDefaultsHelpFormatter also printed "(default: None)" for required flags, and a second
    default beside the dataclass flags' own."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        if action.default is argparse.SUPPRESS or action.required or not action.option_strings:
            return help_
        return help_ + default_note(help_, action.default).replace("%", "%%")  # argparse formats help with %


def given(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def run_config(args: argparse.Namespace) -> RunConfig:
    """Config from (lowest first): defaults, --config YAML, --preset, explicit flags."""
    try:
        base = RunConfig.from_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    except TypeError as e:  # a value of the wrong type, e.g. epochs: ten, or lr: 1e-3 (YAML reads that as text)
        raise MmfuseError(
            f"{args.config}: a value has the wrong type ({e}). Write numbers as numbers (lr: 0.001 or 1.0e-3, "
            "not 1e-3, which YAML reads as text) and lists as [a, b]."
        ) from None
    preset = PRESETS.get(getattr(args, "preset", None) or "", {})
    flags = {"data": given(args, DataConfig), "model": given(args, ModelConfig), "train": given(args, TrainConfig)}
    return base.updated({sec: {**preset.get(sec, {}), **flags[sec]} for sec in flags})


def _training_flags(p: argparse.ArgumentParser, skip_data: tuple[str, ...] = ("train",)) -> None:
    p.add_argument("--config", help="a config.yaml (e.g. from an earlier run) to start from; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run already in --out")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a whole recipe, which flags given beside it override. fast: frozen towers and a head (--tune head; "
        "seconds on a CPU). best: mpnet (the mmfuse[mpnet] extra) with attention pooling beside frozen "
        "efficientnet-lite0, 5 bagged heads (--bag 5; minutes on a CPU). seed: the reference towers, "
        "google/vit-base-patch16-224-in21k + roberta-base cut to 8 layers (needs the hub or local copies; pass local "
        "directories with --vision/--text). Without a preset: MiniLM fine-tuned beside frozen image features",
    )
    add_dataclass_flags(p, DataConfig, "data", skip=skip_data)
    add_dataclass_flags(p, ModelConfig, "model")
    add_dataclass_flags(p, TrainConfig, "training")


# ---------------------------------------------------------------------------------------------------------------------
# verbs


def keep_earlier_work(out: str, overwrite: bool, finished: tuple[str, ...], replaced: Collection[str] = ()) -> None:
    """A finished run is work that took time: training into its directory again must be asked for, not happen
    because a name was reused (fit rewrites the weights, config and metrics there). Files a run writes, found in an
    --out that holds no finished run (--out . in a project with its own config.yaml), are someone's: also replaced
    only when asked."""
    if overwrite:
        return
    done = present(out, finished)
    if done:
        raise MmfuseError(
            f"--out {out} already holds a finished run ({done[0]}); choose another --out, or pass --overwrite to "
            "replace it."
        )
    theirs = present(out, replaced)
    if theirs:
        raise MmfuseError(
            f"--out {out} already holds {', '.join(theirs)}, which training would replace; choose another "
            "--out (a new directory), or pass --overwrite."
        )


def cmd_train(args) -> int:
    # Each verb imports its library when it runs (deferred: the library imports torch, which --help, --version and
    # light verbs never need).
    from mmfuse.training.bag import fit_bag
    from mmfuse.training.checkpoint import checkpoints
    from mmfuse.training.fit import Preempted, TrainingInterrupted, fit

    cfg = resolve(run_config(args))  # mistakes in the settings stop here, before the run directory is checked
    resume = getattr(args, "resume", False)
    interrupted = checkpoints(Path(args.out))
    if resume and not interrupted:
        raise MmfuseError(f"--resume: {args.out} holds no checkpoint to continue from; train without --resume.")
    if interrupted and not resume and not args.overwrite:
        # Killed, preempted or stopped with Ctrl-C: the way on is to continue, not to start again.
        raise MmfuseError(
            f"--out {args.out} holds an interrupted run (its latest checkpoint: {interrupted[-1].name}). Continue it "
            "with the same command and --resume, or pass --overwrite to start over."
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
        if cfg.train.bag > 1:
            if resume:
                raise MmfuseError("--resume continues single runs; a bag keeps its finished members when stopped.")
            result = fit_bag(cfg, args.out)
        else:
            result = fit(cfg, args.out, resume=resume)
    except TrainingInterrupted as e:  # the kept epoch (or members) so far is saved; the exit code says it stopped
        print_training(e.result, args.out)
        if "bag" in e.result:
            done, k = e.result["members_finished"], e.result["bag"]
            print(f"interrupted; kept the {done} finished member(s) of {k} in {args.out}", file=sys.stderr)
        else:
            print(
                f"interrupted after {e.result['epochs_run']} epoch(s); saved epoch {e.result['best_epoch']} to "
                f"{args.out}",
                file=sys.stderr,
            )
        return 130
    except Preempted as e:
        print(
            f"stopped by SIGTERM; wrote the checkpoint {e.checkpoint}. Continue with the same command and --resume.",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        print("interrupted before the first epoch (or member) finished: nothing was saved", file=sys.stderr)
        return 130
    print_training(result, args.out)
    return 0


def cmd_search(args) -> int:
    from mmfuse.recipes.search import SearchInterrupted, load_space, search

    if args.trials < 1:
        raise MmfuseError(f"--trials must be >= 1, got {args.trials}")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise MmfuseError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    out_dir(args.out)
    cfg = run_config(args)
    resolve(cfg)  # mistakes in the settings stop here, before the study is opened
    if cfg.train.bag > 1:
        raise MmfuseError(
            "mmfuse search trains each trial as one run, not a bag: leave --bag out, then train the best config as a "
            "bag with mmfuse train --config OUT/best.yaml --bag K --out RUN."
        )
    cfg.data.train = args.data
    space = load_space(args.space) if args.space else None
    # What the user set with flags (or a preset) stays as set: the default space leaves those keys out.
    preset = PRESETS.get(args.preset or "", {})
    fixed = {*given(args, ModelConfig), *given(args, TrainConfig), *(k for sec in preset.values() for k in sec)}
    if not args.verbose:  # a line per trial, not per epoch of every trial
        logging.getLogger("mmfuse.training").setLevel(logging.WARNING)
    try:
        rows = search(cfg, args.out, args.trials, space, args.space, args.timeout, fixed, args.overwrite)
    except SearchInterrupted as e:
        print_leaderboard(e.rows[:5], f"top 5 of {len(e.rows)} trials")
        print(f"interrupted; run the same command again to continue the search in {args.out}", file=sys.stderr)
        return 130
    print_leaderboard(rows[:5], f"top 5 of {len(rows)} trials")
    if rows and rows[0]["state"] == "complete":
        print(
            f"wrote {args.out}/leaderboard.csv and best.yaml (trial {rows[0]['trial']}: "
            f"{args.out}/trials/{rows[0]['trial']:03d}); train it again with: "
            f"mmfuse train --config {args.out}/best.yaml --out RUN"
        )
    return 0


def print_training(result: dict, out: str) -> None:
    """The validation summary and how far to trust it: a bootstrap interval, or for a bag the out-of-fold rows and
    the spread over folds."""
    interval = result.get("val_interval")
    if "bag" in result:
        title = f"trained {out}: {result['members_finished']} bagged members, out-of-fold validation"
        print_summary({"out-of-fold": result["val"]}, title)
        print(
            f"out-of-fold weighted F1 over all {result['n_out_of_fold']} rows; per fold "
            f"{result['fold_weighted_f1_mean']:.4f} ± {result['fold_weighted_f1_sd']:.4f}; predict uses "
            f"{'the refit model' if result['predict_uses'] == 'full' else 'the members averaged'}"
        )
    elif "val" in result:
        print_summary({"validation": result["val"]}, f"trained {out} (best epoch {result['best_epoch']})")
    if interval:
        print(
            f"95% bootstrap interval of the weighted F1: {interval['weighted_f1_low']:.3f}-"
            f"{interval['weighted_f1_high']:.3f} over {interval['n']} validation rows"
        )


def speed(args) -> dict:
    return {"dtype": args.dtype, "compile": args.compile}


def scoring(args) -> dict:
    """The options predict and evaluate share."""
    return {"captions": args.captions, "skip_bad": args.skip_bad, "cache": args.cache, "chunk_size": args.chunk_size}


def cmd_evaluate(args) -> int:
    from mmfuse.inference.predictor import evaluate_file  # deferred: imports torch

    report = evaluate_file(args.run, args.data, args.out, **scoring(args), **speed(args))
    if not main_process():
        return 0  # under accelerate launch, the main process reports for all
    print_report(report)
    out = args.out or Path(args.run) / "eval"
    print(f"wrote {out}/metrics.json, confusion_matrix.csv and .png, errors.csv and errors.html (the misclassified)")
    return 0


def cmd_predict(args) -> int:
    from mmfuse.inference.predictor import predict_file  # deferred: imports torch

    options = {"backend": args.backend, "onnx_dir": args.onnx, "resume": args.resume}
    path = predict_file(args.run, args.data, args.out, **scoring(args), **speed(args), **options)
    if main_process():
        print(f"wrote {path}")
    return 0


def cmd_export(args) -> int:
    from mmfuse.inference.export import export_run

    info = export_run(args.run, args.out, data=args.data, fmt=args.format)
    parity = info["parity"]
    print(
        f"wrote {args.out}/model.onnx ({info['exporter']['name']} exporter, opset {info['exporter']['opset']}): "
        f"parity with torch passed, largest probability difference {parity['max_abs_diff']:.1e} over "
        f"{parity['rows_checked']} rows; see {args.out}/README.md"
    )
    return 0


def out_dir(out: str) -> None:
    """--out of ablate and quickstart is a directory of runs: a file there would fail only when the first is saved."""
    if Path(out).exists() and not Path(out).is_dir():
        raise MmfuseError(f"--out {out} is a file; give a directory for the runs.")


def cmd_ablate(args) -> int:
    from mmfuse.recipes.ablate import ablate  # deferred: imports torch

    if hasattr(args, "modalities"):  # each of the three runs sets its own; the flag would be ignored
        raise MmfuseError("ablate trains image-only, text-only and fusion models itself: leave --modalities out.")
    out_dir(args.out)
    cfg = run_config(args)
    keep_earlier_work(args.out, args.overwrite, ("ablation.json", "fusion/model.safetensors"))
    cfg.data.train = args.data
    results = ablate(cfg, args.out, test=args.test, test_captions=args.test_captions)
    if not main_process():  # under accelerate launch, the main process reports
        return 0
    print_summary(results, f"modality ablation ({next(iter(results.values()))['evaluated_on']})")
    print(f"wrote {args.out}/ablation.json and ablation.png")
    return 0


def cmd_quickstart(args) -> int:
    from mmfuse.recipes.quickstart import quickstart  # deferred: imports torch

    out_dir(args.out)
    results = quickstart(args.out, rebuild_data=args.rebuild_data)
    print_summary(results, "emoji quickstart: test split, 9 classes")
    print(f"wrote the fusion run to {args.out}, the ablation to {args.out}/ablation.json and ablation.png")
    return 0


def cmd_datasets(args) -> int:
    if not 0 <= args.seed < 2**32:
        raise MmfuseError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    # The build replaces --out as a whole: a file there, or a folder of someone's files, would be deleted with it.
    # Only an earlier export (its info.json names the dataset), with nothing added to it, is replaced without asking.
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
    out = emoji.build_emoji(args.out, seed=args.seed)
    print(emoji.export_summary(out))
    return 0


def cmd_caption(args) -> int:
    from mmfuse.captioning.captioners import caption_file  # deferred: imports torch
    from mmfuse.distributed import leave_launch

    for flag in ("batch_size", "max_new_tokens", "num_beams"):
        if getattr(args, flag) < 1:  # 0 failed inside range(), a negative batch size captioned nothing
            raise MmfuseError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.device:
        from mmfuse.inference.predictor import check_device  # deferred: imports torch

        check_device(args.device, "--device")
    try:
        path = caption_file(
            args.data,
            args.out,
            model=args.model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.num_beams,
            skip_bad=args.skip_bad,
            device=args.device,
        )
    finally:
        leave_launch()
    if main_process():  # under accelerate launch, once
        print(f"wrote {path}")
    return 0


def cmd_serve(args) -> int:
    missing = [m for m in ("fastapi", "uvicorn", "python_multipart") if importlib.util.find_spec(m) is None]
    if missing:
        raise MmfuseError(f"mmfuse serve needs {', '.join(missing)}: pip install 'mmfuse[serve]'")
    from mmfuse.inference.serve import serve  # deferred: imports torch

    if args.max_upload_mb <= 0:
        raise MmfuseError(f"--max-upload-mb must be > 0, got {args.max_upload_mb}")
    check_run(args.run)  # found now, not by a server that starts and is never ready
    return serve(
        args.run,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        queue_size=args.queue_size,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        device=args.device,
    )


def print_summary(results: dict[str, dict], title: str) -> None:
    table = Table(title=title)
    for col in ("", "accuracy", "weighted F1", "macro F1"):
        table.add_column(col, justify="right" if col else "left")
    for name, r in results.items():
        table.add_row(name, f"{r['accuracy']:.4f}", f"{r['weighted_f1']:.4f}", f"{r['macro_f1']:.4f}")
    Console().print(table)


def print_leaderboard(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="* the default config")
    for col in ("trial", "state", "val F1", "val acc", "epoch", "s"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    table.add_column("parameters", overflow="fold")
    metrics = {"trial", "state", "default", "val_weighted_f1", "val_accuracy", "best_epoch", "seconds"}
    for r in rows:
        shown = [f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in metrics]
        f1, acc = r["val_weighted_f1"], r["val_accuracy"]
        table.add_row(
            f"{r['trial']}{'*' * r['default']}",
            r["state"],
            "" if f1 is None else f"{f1:.4f}",
            "" if acc is None else f"{acc:.4f}",
            str(r["best_epoch"] or ""),
            "" if r["seconds"] is None else f"{r['seconds']:.1f}",
            " ".join(shown),
        )
    Console().print(table)


def print_report(report: dict) -> None:
    table = Table(title=f"evaluation on {report['n']} rows")
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, r in report["per_class"].items():
        table.add_row(name, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", str(r["support"]))
    table.add_section()
    for key in ("accuracy", "weighted_f1", "macro_f1"):
        table.add_row(key.replace("_", " "), "", "", f"{report[key]:.4f}", "")
    Console().print(table)


# ---------------------------------------------------------------------------------------------------------------------


def cmd_cache(args) -> int:
    """``mmfuse cache info|prune|clear|verify``: the library part is in cache.py, this only prints."""
    from mmfuse.features import cache as c  # torch-free

    if args.action == "info":
        info = c.cache_info()
        if args.json:
            print(json.dumps(info, indent=2))
            return 0

        def when(t: float | None) -> str:
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

        print(f"{info['home']}: {c.human(info['bytes'])} in {info['files']:,} files")
        for name, r in info["roots"].items():
            if not r["files"]:
                print(f"  {name}: empty")
            else:
                dead = f"; {c.human(r['dead_bytes'])} unindexed" if r["dead_bytes"] else ""
                print(
                    f"  {name}: {r['entries']:,} entries, {c.human(r['bytes'])} in {r['files']:,} files "
                    f"({r['shards']} shards + index{dead})"
                )
            for t in r["towers"]:
                print(
                    f"    {t['fingerprint']}  {t['name'] or '?':<26}{t['entries']:>8,} entries{c.human(t['bytes']):>10}"
                    f"  used {when(t['oldest_use'])} .. {when(t['newest_use'])}"
                )
            if r["old_layout_files"]:
                print(
                    f"    old per-item layout (not read): {r['old_layout_files']:,} files, "
                    f"{c.human(r['old_layout_bytes'])}; mmfuse cache clear or prune removes it"
                )
        return 0
    if args.action == "prune":
        r = c.prune_cache(c.parse_size(args.max_size))
        print(
            f"pruned {c.human(r['before'])} to {c.human(r['after'])}: {r['dropped_entries']:,} least recently used "
            f"entries dropped, {r['removed_shards']} shards removed, {r['rewritten_shards']} rewritten"
            + (f", old layout {c.human(r['old_layout_bytes'])} removed" if r["old_layout_bytes"] else "")
            + (f"; {r['held_shards']} shards in use by running processes left alone" if r["held_shards"] else "")
        )
        return 0
    if args.action == "clear":
        for r in c.clear_cache().values():
            print(f"removed {r['path']}: {r['files']:,} files, {c.human(r['bytes'])}")
        return 0
    result = c.verify_cache()
    bad = 0
    for name, r in result.items():
        bad += len(r["bad"])
        print(f"{name}: {r['checked']:,} entries checked, {len(r['bad'])} bad")
        for fp, key, shard, why in r["bad"][:20]:
            print(f"  dropped {fp}/{key[:16]} in {shard}: {why}")
    if bad:
        print(f"{bad} bad entries dropped from the index: they are recomputed when next needed")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmfuse", description="Image+text classifiers from fused pretrained towers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mmfuse {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    fmt = HelpFormatter

    p = sub.add_parser(
        "train",
        help="train a classifier on a folder or manifest",
        formatter_class=fmt,
        description="Train a classifier. Defaults suit a CPU: the offline towers efficientnet-lite0 + minilm, with "
        "MiniLM fine-tuned beside cached image features (--tune text: minutes on 2 cores for a few thousand rows); "
        "--tune head trains only a head on cached features of both (seconds); --tune all fine-tunes both towers "
        "as the reference does, which wants a GPU.",
    )
    p.add_argument(
        "data",
        nargs="?",
        help="training data: folder ROOT/<label>/<images> or .csv/.jsonl/.parquet manifest (default: the --config "
        "file's data.train)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    _training_flags(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its latest checkpoint (same data and settings)",
    )
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser(
        "search",
        help="search hyperparameters with Optuna (the mmfuse[search] extra)",
        formatter_class=fmt,
        description="Train many trials of one config, each a run directory under OUT/trials/, with Optuna's TPE "
        "sampler and median pruning on validation weighted F1. Trial 0 is the default config. The study lives in "
        "OUT/study.sqlite: the same command run again continues it (a trial a killed search left unfinished runs "
        "again). Writes OUT/leaderboard.csv and OUT/best.yaml (mmfuse train --config OUT/best.yaml --out RUN). "
        "Settings given as flags stay fixed; the others are searched over a default space for --tune, or the "
        "--space file.",
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
    _training_flags(p)
    p.set_defaults(fn=cmd_search)

    for verb, fn, helptext in (
        ("evaluate", cmd_evaluate, "score a run on labelled data"),
        ("predict", cmd_predict, "predict labels for (unlabelled) data"),
    ):
        p = sub.add_parser(verb, help=helptext, formatter_class=fmt)
        p.add_argument("run", help="run directory made by mmfuse train")
        p.add_argument("data", help="folder or manifest")
        if verb == "evaluate":
            p.add_argument("--out", help="directory for metrics.json and the confusion matrix (default RUN/eval)")
        else:
            p.add_argument("--out", required=True, help="predictions CSV to write")
        p.add_argument("--captions", help="captions CSV (image,text) for folder data")
        p.add_argument(
            "--skip-bad", action="store_true", help="skip bad rows (listed beside the output) instead of stopping"
        )
        p.add_argument(
            "--dtype",
            choices=DTYPES,
            default="auto",
            help="auto: bf16 autocast on a GPU, fp32 on CPU; bf16: weights cast to bf16 once (faster on a GPU)",
        )
        p.add_argument(
            "--compile", action="store_true", help="torch.compile each encoder layer (GPU; pays a compile once)"
        )
        p.add_argument(
            "--chunk-size",
            type=int,
            default=PREDICT_CHUNK,
            metavar="N",
            help="rows predicted at a time (memory holds one chunk's features; predict appends each to OUT.part); "
            "under accelerate launch each process takes whole chunks",
        )
        p.add_argument(
            "--cache",
            action=argparse.BooleanOptionalAction,
            default=verb == "evaluate",
            help="--cache stores the features (or decoded images) of inputs the caches miss, --no-cache only reads "
            "hits; "
            + (
                "evaluate stores them unless told not to (a test set is scored again for every run trained)"
                if verb == "evaluate"
                else "predict reads hits only unless given --cache (one-off inputs would fill the cache)"
            ),
        )
        if verb == "predict":
            p.add_argument(
                "--backend",
                choices=("torch", "onnx"),
                default="torch",
                help="onnx: the graph mmfuse export wrote (needs mmfuse[export]; --dtype and --compile do not apply)",
            )
            p.add_argument("--onnx", metavar="DIR", help="the export to run with --backend onnx (default RUN/export)")
            p.add_argument(
                "--resume",
                action="store_true",
                help="continue an interrupted predict of the same data, run and options after its last whole chunk "
                "(with nothing to continue, start)",
            )
        p.set_defaults(fn=fn)

    p = sub.add_parser(
        "export",
        help="export a run to one ONNX graph, checked against torch",
        formatter_class=fmt,
        description="Export a run to ONNX: model.onnx (token ids, attention mask, pixels -> logits, probs), the "
        "tokenizer and image preprocessing beside it, and export.json. The graph is run in onnxruntime against the "
        "torch model first (batch sizes 1, 2, 7; short and long texts) and refused if any probability differs by "
        "more than 1e-4 or any top-1 differs. Needs pip install 'mmfuse[export]'.",
    )
    p.add_argument("run", help="run directory made by mmfuse train")
    p.add_argument("--out", required=True, help="directory to write the export to, e.g. RUN/export")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format")
    p.add_argument("--data", help="folder or manifest whose first rows the parity check uses (default: synthetic rows)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("ablate", help="image-only vs text-only vs fusion on the same split", formatter_class=fmt)
    p.add_argument("data", help="training data (folder or manifest)")
    p.add_argument("--out", required=True, help="directory for the three runs, ablation.json and ablation.png")
    p.add_argument("--test", help="held-out data to score the three runs on (default: the validation split)")
    p.add_argument("--test-captions", help="captions CSV for a --test folder")
    _training_flags(p)
    p.set_defaults(fn=cmd_ablate)

    p = sub.add_parser("quickstart", help="train and ablate on the built-in emoji data (offline)", formatter_class=fmt)
    p.add_argument("--out", default="runs/quickstart", help="run directory")
    p.add_argument("--rebuild-data", action="store_true", help="re-render the emoji dataset")
    p.set_defaults(fn=cmd_quickstart)

    p = sub.add_parser("datasets", help="export a built-in dataset as manifests plus images", formatter_class=fmt)
    p.add_argument("name", choices=["emoji"])
    p.add_argument("--out", required=True, help="directory to write train.csv, val.csv, test.csv and images/")
    p.add_argument("--seed", type=int, default=0, help="seed of the 70/15/15 stratified split")
    p.set_defaults(fn=cmd_datasets)

    from mmfuse.captioning.captioners import DEFAULT_CAPTIONER, packaged_captioners  # deferred: imports torch

    p = sub.add_parser(
        "caption",
        help="caption images into a CSV usable as --captions (resumable)",
        formatter_class=fmt,
        description="Caption every image of a folder (searched recursively) or "
        "manifest. Rows are flushed after every batch; a rerun skips images already captioned. The default "
        f"captioner, {DEFAULT_CAPTIONER}, needs the Hugging Face hub or a local copy of it (--model DIR); "
        "--model imagenet-tags works offline (ImageNet class names of the packaged EfficientNet-Lite0 as text).",
    )
    p.add_argument("data", help="folder of images (searched recursively) or a .csv/.jsonl/.parquet manifest")
    p.add_argument("--out", required=True, help="captions CSV (image,text,...) to write or resume")
    p.add_argument(
        "--model",
        default=DEFAULT_CAPTIONER,
        help="Hugging Face image-to-text model (hub id or local directory: ViT-GPT2, BLIP; needs the hub or a local "
        f"copy), or an offline captioner: {', '.join(packaged_captioners())}",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--max-new-tokens", type=int, default=20, help="longest caption, in tokens")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1: greedy, the fast path)")
    p.add_argument("--device", help="torch device, e.g. cuda:1 or cpu (default: cuda when available)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad images and images the model gives no text (listed in OUT.skipped.csv) instead of stopping",
    )
    p.set_defaults(fn=cmd_caption)

    p = sub.add_parser(
        "serve",
        help="serve a run over HTTP, with a page to try it (needs mmfuse[serve])",
        formatter_class=fmt,
        description="POST /v1/predict (multipart image + text, or JSON), GET /v1/info, /healthz, /readyz, /metrics, "
        "and a page at /. Concurrent requests are run in batches on one model thread.",
    )
    p.add_argument("run", help="run directory made by mmfuse train")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, logged)")
    p.add_argument("--max-batch", type=int, default=64, help="most rows in one model batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more rows")
    p.add_argument("--queue-size", type=int, default=1024, help="most rows waiting; more are answered 503")
    p.add_argument("--max-upload-mb", type=float, default=16.0, help="largest request body (413 past it)")
    p.add_argument("--device", help="torch device, e.g. cuda:1 or cpu (None: cuda when available)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "cache",
        help="show, prune, verify or clear the feature and image caches ($MMFUSE_HOME)",
        formatter_class=fmt,
        description="The caches of frozen-tower features and decoded images under $MMFUSE_HOME (features, "
        "features-bf16, pixels): shard files and an index, every entry checked against its checksum when read.",
    )
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = csub.add_parser("info", help="size, entries per tower, oldest and newest use", formatter_class=fmt)
    q.add_argument("--json", action="store_true", help="print the figures as JSON")
    q = csub.add_parser("prune", help="drop least recently used entries down to a size", formatter_class=fmt)
    q.add_argument("--max-size", required=True, help="size to shrink to, e.g. 20GB, 500MB, 1.5GiB")
    csub.add_parser("clear", help="remove every cache entry (and the old per-item layout)", formatter_class=fmt)
    csub.add_parser(
        "verify", help="check every entry's checksum; drop bad ones (exit code 1 if any)", formatter_class=fmt
    )
    p.set_defaults(fn=cmd_cache)
    return parser


def quiet_libraries() -> None:
    # Through the environment rather than transformers' own setters: importing transformers costs 1 s, and many
    # commands (a warm quickstart among them) never load a Hugging Face model.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars follow this


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # An empty path is the current directory to pathlib: --out "" would write a run into it, DATA "" read it.
    empty = [name for name, value in vars(args).items() if isinstance(value, str) and not value.strip()]
    if empty:
        names = [name.upper() if name in ("data", "run") else "--" + name.replace("_", "-") for name in empty]
        print(f"error: {', '.join(names)} is empty; give a path or value.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    quiet_libraries()
    try:
        return args.fn(args)
    except MmfuseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A file that cannot be read or written (no permission, a full disk, a read-only place): the user's to fix,
        # so a line that names the file, not a traceback (-v shows it).
        log.debug("details", exc_info=True)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        # torch.OutOfMemoryError on a GPU; on a CPU a RuntimeError from its allocator (e.g. --hidden 100000000).
        if not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or "allocate memory" in str(e)):
            raise
        log.debug("details", exc_info=True)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        print(
            f"error: out of memory ({first[:200]}). Lower --batch-size, --image-size, --max-length or --hidden, "
            "or use a machine with more memory.",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
