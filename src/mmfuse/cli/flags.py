"""Flags generated from the config dataclasses (one argument group per dataclass), the help formatter every verb
uses, and the flags several verbs share; ``run_config`` turns the parsed flags back into a ``RunConfig``."""

from __future__ import annotations

import argparse
import ast
import inspect
from dataclasses import MISSING, fields

from mmfuse.config import (
    DTYPES,
    PREDICT_CHUNK,
    PRESETS,
    TOWER_BACKENDS,
    DataConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    default_preset,
)
from mmfuse.errors import MmfuseError


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


def run_config(args: argparse.Namespace, ensemble_by_default: bool = False) -> RunConfig:
    """Config from (lowest first): defaults, --config YAML, --preset, explicit flags.

    ``ensemble_by_default`` (train): without --preset, --config or a flag that describes one model, the ensemble
    preset applies (``config.default_preset``)."""
    try:
        base = RunConfig.from_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    except TypeError as e:  # a value of the wrong type, e.g. epochs: ten, or lr: 1e-3 (YAML reads that as text)
        raise MmfuseError(
            f"{args.config}: a value has the wrong type ({e}). Write numbers as numbers (lr: 0.001 or 1.0e-3, "
            "not 1e-3, which YAML reads as text) and lists as [a, b]."
        ) from None
    flags = {"data": given(args, DataConfig), "model": given(args, ModelConfig), "train": given(args, TrainConfig)}
    name = getattr(args, "preset", None)
    if ensemble_by_default and not getattr(args, "config", None):
        # A --config (an earlier run's, a search's best.yaml) is a whole recipe: it trains what it says.
        name = default_preset(name, flags)
    preset = PRESETS.get(name or "", {})
    return base.updated({sec: {**preset.get(sec, {}), **flags[sec]} for sec in flags})


def training_flags(p: argparse.ArgumentParser, skip_data: tuple[str, ...] = ("train",)) -> None:
    """The flags of the verbs that train (train, search, ablate): --config, --overwrite, --preset and the three
    config dataclasses."""
    p.add_argument("--config", help="a config.yaml (e.g. from an earlier run) to start from; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run already in --out")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a whole recipe, which flags given beside it override. ensemble (train's default): a portfolio of "
        "bagged members on frozen towers (logistic-regression probes, image-only, text-only and fusion heads; mpnet's "
        "heads too when the mmfuse[mpnet] extra is installed) weighted by greedy selection on their out-of-fold "
        "predictions, so it is never much worse than its best member (minutes per 1,000 rows on 2 cores; "
        "bench/RESULTS.md has the times). fast: one head on frozen towers (--tune head; seconds). best: the ensemble "
        "plus MiniLM fine-tuned beside frozen image features, bagged, and mpnet's heads (needs mmfuse[mpnet]; many "
        "minutes on a CPU). seed: the reference towers, google/vit-base-patch16-224-in21k + roberta-base cut to 8 "
        "layers (needs the hub or local copies; pass local directories with --vision/--text). Without a preset, "
        "train fits the ensemble unless --tune, --fusion, --bag, --refit-full or --lora describe one model (or a "
        "--config file says what to train)",
    )
    add_dataclass_flags(p, DataConfig, "data", skip=skip_data)
    add_dataclass_flags(p, ModelConfig, "model")
    add_dataclass_flags(p, TrainConfig, "training")


def scoring_flags(p: argparse.ArgumentParser, verb: str) -> None:
    """The flags evaluate and predict share (after their RUN, DATA and --out); only --cache's default differs."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace what --out already holds ("
        + (
            "an earlier evaluation's reports)"
            if verb == "evaluate"
            else "earlier predictions, or start an interrupted prediction over)"
        ),
    )
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
    p.add_argument("--compile", action="store_true", help="torch.compile each encoder layer (GPU; pays a compile once)")
    p.add_argument(
        "--backend",
        choices=TOWER_BACKENDS,
        default="auto",
        help="what runs the run's frozen towers on inputs no cache holds: auto (onnxruntime on a CPU, each tower "
        "exported once and checked against torch; torch on a GPU), torch, or "
        + (
            "onnx (onnxruntime, or an error)"
            if verb == "evaluate"
            else "onnx: the whole run as the graph mmfuse export wrote (needs mmfuse[export]; --dtype and --compile do "
            "not apply)"
        ),
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


def speed(args) -> dict:
    return {"dtype": args.dtype, "compile": args.compile}


def scoring(args) -> dict:
    """The options predict and evaluate share."""
    return {"captions": args.captions, "skip_bad": args.skip_bad, "cache": args.cache, "chunk_size": args.chunk_size}
