"""Training: one explicit loop on Hugging Face Accelerate, the same code on CPU, one GPU or many.

    mmfuse train DATA --out RUN                                   # CPU or one GPU
    accelerate launch --num_processes 4 -m mmfuse train DATA --out RUN --tune all   # 4 GPUs, one node
    accelerate launch --multi_gpu --num_processes 2 -m mmfuse train DATA --out RUN  # 2 CPU processes (gloo)

Accelerate handles device placement, mixed precision, backward and gathering; everything else is here, in steps:
``setup`` (config, data, model, optimizer: a ``Trainer``), ``run_epochs`` (``run_epoch`` each: ``train_epoch``, a
``train_step`` per batch, then ``validate``), and ``save``. ``fit`` (a run, with checkpoints and resume), a bag's
members and a search's trials all run these steps, each with its own per-epoch hook; the throughput benchmark times
the same ``train_step``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from mmfuse import binary, metrics, multilabel
from mmfuse.calibration import calibrate
from mmfuse.config import TRACKERS, RunConfig, TrainConfig, parse_threshold, resolve
from mmfuse.data.records import Record
from mmfuse.data.tabular import TabularSpec, fit_tabular
from mmfuse.errors import MmfuseError
from mmfuse.features.sources import FeatureCache
from mmfuse.models.classifier import MultimodalClassifier, load_stored, stored_state, tower_cards
from mmfuse.models.compile import compile_model
from mmfuse.models.lora import require_peft, train_adapters
from mmfuse.progress import Progress
from mmfuse.rundir.weights import write_run
from mmfuse.training.augment import Augmenter, make_augmenter
from mmfuse.training.checkpoint import EVERY_SECONDS, data_fingerprint, save_checkpoint
from mmfuse.training.prep import (
    binary_task,
    check_out_dir,
    class_weights,
    decide,
    load_splits,
    loaders,
    positive_index,
    tuned_batch_norm,
)

log = logging.getLogger(__name__)
LOSS_EVERY = 25  # read the loss back to the host only this often: each read is a device sync


class Preempted(Exception):
    """SIGTERM during training, raised once a checkpoint is written: ``--resume`` continues from it."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"stopped by SIGTERM; checkpoint {checkpoint}")
        self.checkpoint = checkpoint


def make_accelerator(
    mixed_precision: str = "auto",
    tune_towers: bool = False,
    grad_accum: int = 1,
    track: list[str] | None = None,
    project_dir: Path | None = None,
) -> Accelerator:
    missing = [t for t in track or () if importlib.util.find_spec(TRACKERS[t]) is None]
    if missing:
        raise MmfuseError(f"--track {' '.join(missing)} needs its package: pip install {' '.join(missing)}")
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Fine-tuned towers carry poolers that CLS pooling never uses; DDP must be told to expect them idle.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=tune_towers)
    # cpu=True on a machine without CUDA is what lets several launched processes join a gloo process group.
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[ddp],
        cpu=not torch.cuda.is_available(),
        log_with=list(track or ()) or None,
        project_dir=str(project_dir) if project_dir else None,
    )


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """Linear warmup from 0, then cosine decay to 0 at ``total``: transformers' get_cosine_schedule_with_warmup,
    written out because importing transformers for it cost 1 s of the 20 s quickstart."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return LambdaLR(optimizer, factor)


def activate(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Probabilities from logits: a softmax over the classes, or for a multi-label run a sigmoid per label."""
    return logits.sigmoid() if multi_label else logits.softmax(-1)


@torch.no_grad()
def predict_loader(model, loader, acc: Accelerator, multi_label: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities (and labels) for every row exactly once: gather_for_metrics drops the padding that evens
    out the last batch across processes."""
    model.eval()
    probs, ys = [], []
    for batch in loader:
        labels = batch.pop("labels", None)
        p = activate(model(**batch).float(), multi_label)
        probs.append(acc.gather_for_metrics(p).cpu())
        if labels is not None:
            ys.append(acc.gather_for_metrics(labels).cpu())
    return torch.cat(probs).numpy(), (torch.cat(ys).numpy() if ys else None)


def kept_state(model: MultimodalClassifier, tuned: list[str]) -> dict[str, torch.Tensor]:
    """A copy of the weights a run stores (``classifier.stored_state``): the epoch to keep, while training goes on
    changing the model's own.

    On a GPU with room for a second copy it stays there: a device-to-device copy queues behind the step without
    stalling it, where a copy to the host waits for the GPU and then crawls through pageable memory, every epoch
    that improves."""
    state = stored_state(model, tuned)
    device = next(iter(state.values())).device
    if device.type == "cuda":
        size = sum(v.numel() * v.element_size() for v in state.values())
        if torch.cuda.mem_get_info(device)[0] < 2 * size + (1 << 30):  # keep a margin for the steps to come
            device = torch.device("cpu")
    return {k: v.to(device, copy=True) for k, v in state.items()}


def make_optimizer(model: MultimodalClassifier, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable weights, in groups: weight matrices decay, other weights do not (shrinking biases,
    norm scales and the missing-modality placeholders towards zero regularises nothing useful); tuned towers move at
    ``lr``, the head, which starts from scratch, at ``head_lr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_towers = {id(p) for tower in model.towers.values() for p in tower.parameters()}
    head_lr = t.head_lr or t.lr
    groups = [
        {"params": ps, "weight_decay": t.weight_decay if matrix else 0.0, "lr": lr}
        for matrix in (True, False)
        for lr, tower in ((t.lr, True), (head_lr, False))
        if (ps := [p for p in params if (p.ndim >= 2) == matrix and (id(p) in in_towers) == tower])
    ]
    # Fused AdamW is also the fast one on CPU: 12x faster per step for a small head (0.43 vs 5.2 ms).
    return torch.optim.AdamW(groups, lr=t.lr, fused=True)


@dataclass
class Trainer:
    """Everything one training run holds between its steps."""

    cfg: RunConfig
    out: Path
    acc: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    train_dl: DataLoader
    val_dl: DataLoader | None
    """None: no validation rows (a refit on every row)."""
    labels: list[str]
    n_train: int
    n_val: int
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_state: dict | None = None
    val_probs: np.ndarray | None = None
    """The kept epoch's validation probabilities, once saved (a bag's out-of-fold predictions)."""
    frozen_weights: Path | None = None
    """Where frozen Hugging Face towers' weights are stored once for several runs (a bag's members)."""
    class_weight: dict[str, float] | None = None
    """Each class's weight in the loss (``--class-weight``), resolved on the training rows; None: all the same."""
    loss_weight: torch.Tensor | None = None
    """``class_weight`` as the loss takes it: one per class, in label order, on the device."""
    generator: torch.Generator | None = None
    """The training DataLoader's: its state when an epoch begins fixes that epoch's order of batches."""
    data_fingerprint: str = ""
    """What a checkpoint was trained on (``checkpoint.data_fingerprint``)."""
    checkpointing: bool = False
    """Write checkpoints (after each epoch, every ``checkpoint_every`` steps, on SIGTERM)."""
    stop: bool = False
    """Set by SIGTERM: checkpoint at the next optimizer step and stop."""
    resume_at: tuple | None = None
    """(generator state, batches done, (loss sum, rows)) of the epoch to resume, from a checkpoint."""
    last_checkpoint: float = field(default_factory=time.monotonic)
    augment: Augmenter | None = None
    """Augments training images on the device (``--augment``); None when off."""

    @property
    def name(self) -> str:
        """What log lines call this run: its directory's name (image, text, fusion in an ablation)."""
        return self.out.name

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def unwrapped(self) -> MultimodalClassifier:
        return self.acc.unwrap_model(self.model)


def setup(
    cfg: RunConfig,
    out: str | Path,
    cache: FeatureCache | None = None,
    towers: dict | None = None,
    splits: tuple[list[Record], list[Record], list[str]] | None = None,
    tracking: tuple[Path, str] | None = None,
    checkpointing: bool = False,
    tabular: TabularSpec | None = None,
) -> Trainer:
    """Resolves the config, reads and checks the data, builds the model, its data and its optimizer, prepared by
    Accelerate.

    Args:
        cache: the feature cache (default: ``$MMFUSE_HOME/features``).
        towers: already built towers shared between runs of the same config (only sensible when frozen).
        splits: train rows, validation rows (may be empty: no validation) and class names, already read; by
            default read from ``cfg.data``.
        checkpointing: write checkpoints as it trains (``fit``; a bag's members and a search's trials do not).
        tabular: the tabular columns' statistics, fitted on a bag's rows; default: fitted on the training rows.
        tracking: with ``--track``, the trackers' folder and this run's name in it (default ``out/tracking`` and
            ``out``'s name); a search puts its trials side by side in one.
    """
    out = Path(out)
    check_out_dir(out, cfg.data.train)
    cfg = resolve(cfg)
    tuned = cfg.tuned
    t = cfg.train
    check_columns(cfg)
    if t.lora:
        require_peft()  # before the data is read and the towers are loaded
    tracking_dir, run_name = tracking or (out / "tracking", out.name)
    acc = make_accelerator(t.mixed_precision, bool(tuned), t.grad_accum, t.track, tracking_dir)
    set_seed(cfg.train.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "skipped.csv").unlink(missing_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a line per epoch from here on (a resume rewrites it)
    acc.wait_for_everyone()
    train, val, labels = splits if splits is not None else load_splits(cfg, out)
    cfg = binary_task(cfg, labels, train)
    if t.calibrate and not val:  # found before training, not after it
        raise MmfuseError("--calibrate fits its temperature on validation rows, and this run has none: give --val.")
    # DDP checks that every process holds the same weights: build every tower everywhere, not only where one embeds.
    towers = towers if towers is not None else {}
    cards = tower_cards(cfg.model, towers, cfg.model.modalities if acc.num_processes > 1 else tuned)
    if t.lora:  # config.TrainConfig allows it with --tune text alone
        train_adapters(towers["text"], t.lora, t.lora_alpha, t.tune_layers)
        cards["text"] = towers["text"].card
    set_seed(cfg.train.seed)  # the head's initialisation must not depend on whether the towers were built just now
    spec = tabular
    if spec is None and "tabular" in cfg.model.modalities:
        spec = fit_tabular(train, cfg.model.tabular_columns)
    model = MultimodalClassifier(cards, len(labels), cfg.model, towers, spec)
    for m, tower in model.towers.items():
        if m not in tuned:
            tower.freeze()
        elif cfg.train.tune_layers and not t.lora:  # with --lora, it chose the layers that get adapters
            tower.freeze_below(cfg.train.tune_layers)
    if cfg.train.batch_size == 1 and (norms := tuned_batch_norm(model, tuned)):
        raise MmfuseError(
            f"--batch-size 1 cannot fine-tune the {norms[0]} tower: its batch norm layers need at least 2 rows a "
            "batch. Pass --batch-size 2 or more."
        )
    cache = cache if cache is not None else FeatureCache()
    train_dl, val_dl, generator = loaders(model, train, val, labels, cfg, acc, cache)
    weights = class_weights(t.class_weight, labels, train, cfg.data.multi_label)
    optimizer = make_optimizer(model, cfg.train)
    # Accelerate steps a prepared scheduler once per process for every optimizer step, and not at all on
    # accumulation-only steps; each process sees ceil(batches / processes) batches an epoch.
    n, accum = acc.num_processes, cfg.train.grad_accum
    steps = cfg.train.epochs * math.ceil(math.ceil(len(train_dl) / n) / accum) * n
    scheduler = warmup_cosine(optimizer, int(cfg.train.warmup_ratio * steps), steps)
    augment = None
    if "image" in tuned:
        augment = make_augmenter(t.augment, t.hflip, t.seed, model.towers["image"], acc.device, acc.process_index)
    if cfg.train.compile:
        model = compile_model(model)  # each encoder layer of the tuned towers (speed.py says why)
    model, optimizer, train_dl, scheduler = acc.prepare(model, optimizer, train_dl, scheduler)
    val_dl = acc.prepare(val_dl) if val_dl is not None else None
    if acc.is_main_process:
        m = cfg.model
        log.info(
            "%s: %d training rows, %d validation rows, %d %s; %s on %s, --tune %s%s, %d epochs of batch %d on %s",
            out.name,
            len(train),
            len(val),
            len(labels),
            "labels (multi-label)" if cfg.data.multi_label else "classes",
            " + ".join({"image": m.vision, "text": m.text, "tabular": "tabular columns"}[x] for x in m.modalities),
            "+".join(m.modalities),
            cfg.train.tune,
            f" --augment {t.augment}{'' if t.hflip else ' --no-hflip'}" if augment else "",
            cfg.train.epochs,
            cfg.train.batch_size,
            acc.device,
        )
    if t.track:
        acc.init_trackers(run_name, config=_flat(asdict(cfg)))
    tr = Trainer(cfg, out, acc, model, optimizer, scheduler, train_dl, val_dl, labels, len(train), len(val))
    tr.generator, tr.checkpointing, tr.augment, tr.class_weight = generator, checkpointing, augment, weights
    if weights is not None:
        tr.loss_weight = torch.tensor([weights[c] for c in labels], dtype=torch.float32, device=acc.device)
    if checkpointing:  # what a checkpoint was trained on: hashes every row's text and image once
        tr.data_fingerprint = data_fingerprint(train, val)
    return tr


def check_columns(cfg: RunConfig) -> None:
    """Refuses what named columns do not support yet, before the data is read."""
    m = cfg.model
    if m.image_columns and "image" in cfg.tuned:
        raise MmfuseError(
            f"--tune {cfg.train.tune} with --image-columns is not supported yet (an empty image cell has no pixels to "
            "tune on): the columns' images go through the frozen vision tower with --tune head or --tune text."
        )
    if m.columns and cfg.data.caption_missing:
        raise MmfuseError(
            "--caption-missing is not supported yet with --image-columns, --text-columns or --tabular-columns: an "
            "empty text cell is masked (pass --modality-dropout 0.1 or so to train for that)."
        )


def train_step(
    model,
    batch: dict,
    optimizer,
    scheduler,
    acc: Accelerator,
    params,
    grad_clip: float,
    label_smoothing: float = 0.0,
    augment: Augmenter | None = None,
    class_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """One batch forward and backward; the optimizer and scheduler step, and gradients are zeroed, only every
    ``grad_accum`` batches (Accelerate's ``accumulate``). ``augment`` changes its images first (training only);
    ``class_weight`` (one per class) weighs the loss as torch's ``cross_entropy(weight=)`` does. Multi-label targets
    ((rows, labels) of 0/1) train a binary cross-entropy per label instead, averaged over the labels, where
    ``class_weight`` is each label's ``pos_weight`` (how much its positive rows count).
    Returns the batch's summed loss (on the device, unread: reading it is a sync) and its row count."""
    labels = batch.pop("labels")
    if augment is not None:
        batch = augment.batch(batch)
    with acc.accumulate(model):
        if labels.ndim == 2:
            loss = F.binary_cross_entropy_with_logits(model(**batch).float(), labels, pos_weight=class_weight)
        else:
            loss = F.cross_entropy(model(**batch), labels, weight=class_weight, label_smoothing=label_smoothing)
        acc.backward(loss)
        if grad_clip > 0 and acc.sync_gradients:
            acc.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach() * len(labels), len(labels)


def train_epoch(tr: Trainer, epoch: int) -> tuple[float, float]:
    """One pass over the training data (the rest of it, when resuming); returns the mean training loss over all
    processes and the samples/s. Writes a checkpoint when one is due."""
    t, acc = tr.cfg.train, tr.acc
    tr.model.train()
    params = tr.params
    generator_state = tr.generator.get_state()  # before this epoch's iterator draws its order from it
    done, (loss_sum, rows) = 0, (0.0, 0)
    if tr.resume_at is not None:
        generator_state, done, (loss_sum, rows) = tr.resume_at
        tr.generator.set_state(generator_state)
        tr.resume_at = None
    total, seen, t0 = torch.tensor(loss_sum, device=acc.device), rows, time.perf_counter()
    steps = len(tr.train_dl)

    def line() -> str:  # a log file's progress line, only when one is due: reading the loss is a device sync
        elapsed = time.perf_counter() - t0
        rate, left = (seen - rows) * acc.num_processes / elapsed, (steps - step) * elapsed / (step - done)
        return f"step {step}/{steps}, loss {total.item() / seen:.4f}, {rate:.0f} rows/s, {left:.0f} s left in the epoch"

    batches = acc.skip_first_batches(tr.train_dl, done) if done else tr.train_dl
    desc = f"{tr.name} epoch {epoch}/{t.epochs}"
    # The run's own logger, not progress's: a search quiets its trials' lines by it.
    with Progress(steps, desc, unit="step", show=acc.is_main_process, initial=done, line=line, logger=log) as bar:
        for step, batch in enumerate(batches, start=done + 1):
            if tr.augment is not None:
                tr.augment.reseed(epoch, step)
            loss, n = train_step(
                tr.model,
                batch,
                tr.optimizer,
                tr.scheduler,
                acc,
                params,
                t.grad_clip,
                t.label_smoothing,
                tr.augment,
                tr.loss_weight,
            )
            total += loss
            seen += n
            bar.update()
            if step % LOSS_EVERY == 0 and bar.terminal:
                rate = (seen - rows) * acc.num_processes / (time.perf_counter() - t0)
                bar.postfix(loss=f"{total.item() / seen:.4f}", samples_s=f"{rate:.0f}")
            if tr.checkpointing and acc.sync_gradients and step < steps and checkpoint_due(tr, step):
                path = save_checkpoint(tr, epoch, step, generator_state, (total.item(), seen))
                tr.last_checkpoint = time.monotonic()
                if tr.stop:
                    raise Preempted(path)
    train_loss = acc.reduce(total, "sum").item() / (seen * acc.num_processes)
    if not math.isfinite(train_loss):  # a diverged model predicts NaN: it must not be saved as if trained
        raise MmfuseError(
            f"Training diverged: the loss is {train_loss} in epoch {epoch}. Lower --lr ({t.lr}) or --head-lr "
            f"({t.head_lr or t.lr})."
        )
    return train_loss, (seen - rows) * acc.num_processes / (time.perf_counter() - t0)


def checkpoint_due(tr: Trainer, step: int) -> bool:
    """Every ``--checkpoint-every`` steps, after ``checkpoint.EVERY_SECONDS``, or when SIGTERM asked to stop; every
    process must agree, so the flags are reduced across processes."""
    every = tr.cfg.train.checkpoint_every
    due = tr.stop or (every is not None and step % every == 0) or time.monotonic() - tr.last_checkpoint > EVERY_SECONDS
    if tr.acc.num_processes > 1:
        flags = torch.tensor([float(due), float(tr.stop)], device=tr.acc.device)
        due, tr.stop = (bool(x) for x in (tr.acc.reduce(flags, "max") > 0).tolist())
    return due


def validate(tr: Trainer) -> tuple[np.ndarray, np.ndarray]:
    """Validation probabilities and labels, every row exactly once."""
    return predict_loader(tr.model, tr.val_dl, tr.acc, tr.cfg.data.multi_label)


def epoch_key(row: dict, metric: str) -> tuple[float, float]:
    """What ranks an epoch's row (higher is better): its validation ``metric``, then its lower validation loss. Ties
    in F1 (common on small validation sets) go to the lower loss: the first epoch to reach a score is rarely the best
    trained, and a refit after bagging trains for the members' kept epochs."""
    return metrics.ranked(metric, row[f"val_{metric}"]), -row["val_loss"]


def run_epoch(tr: Trainer, epoch: int) -> dict:
    """Trains one epoch, validates, and keeps the weights when this epoch is the one to keep; returns its row."""
    train_loss, rate = train_epoch(tr, epoch)
    row = {"epoch": epoch, "train_loss": train_loss}
    metric = tr.cfg.train.metric
    if tr.val_dl is not None and tr.cfg.data.multi_label:
        probs, y = validate(tr)
        row["val_loss"] = metrics.log_loss(y, probs)
        row.update({f"val_{k}": v for k, v in metrics.multilabel_summary(y, probs >= 0.5).items()})
        row["val_map"] = metrics.mean_average_precision(y, probs)
        if f"val_{metric}" not in row:  # log_loss: the binary cross-entropy, as selection computes it
            row[f"val_{metric}"] = metrics.score(metric, y, probs)
    elif tr.val_dl is not None:
        probs, y = validate(tr)
        row["val_loss"] = float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())
        row.update({f"val_{k}": v for k, v in metrics.summary(y, probs.argmax(1)).items()})
        if f"val_{metric}" not in row:  # log_loss, roc_auc, pr_auc: the metric as selection computes it
            row[f"val_{metric}"] = metrics.score(metric, y, probs, positive_index(tr.cfg, tr.labels))
    row.update({"samples_per_s": rate, "lr": tr.scheduler.get_last_lr()[0]})
    tr.history.append(row)
    log_epoch(tr, row)
    if tr.acc.is_main_process:
        scores = ""
        if "val_loss" in row and tr.cfg.data.multi_label:  # at a threshold of 0.5; the per-label ones come last
            scores = (
                f", val loss {row['val_loss']:.4f}, val micro F1 {row['val_micro_f1']:.4f}, val mAP "
                f"{row['val_map']:.4f}"
            )
        elif "val_loss" in row:
            scores = (
                f", val loss {row['val_loss']:.4f}, val weighted F1 {row['val_weighted_f1']:.4f}, val macro F1 "
                f"{row['val_macro_f1']:.4f}"
            )
        log.info("%s epoch %d: train loss %.4f%s", tr.name, epoch, train_loss, scores)
    if tr.cfg.train.keep == "last" or tr.val_dl is None:
        better = True  # each finished epoch replaces the one before, so an interrupt keeps the last one
    else:
        better = tr.best is None or epoch_key(row, metric) > epoch_key(tr.best, metric)
    if better:  # one assignment: an interrupt while the state is copied must not pair this row with the last
        tr.best, tr.best_state = row, kept_state(tr.unwrapped, tr.cfg.tuned)
    return row


def run_epochs(tr: Trainer, on_epoch: Callable[[int, dict], bool] | None = None, first: int = 1) -> bool:
    """Runs the epochs from ``first`` (after a resume) to the last; after each, ``on_epoch(epoch, row)`` (fit's
    checkpoint, a search's pruner) may return True to stop there. Returns whether every epoch ran."""
    with training_threads(tr):
        for epoch in range(first, tr.cfg.train.epochs + 1):
            row = run_epoch(tr, epoch)
            if on_epoch is not None and on_epoch(epoch, row):
                return False
    return True


def log_epoch(tr: Trainer, row: dict) -> None:
    """An epoch's row to RUN/metrics.jsonl (always) and the trackers asked for (``--track``)."""
    if tr.cfg.train.track:
        tr.acc.log({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
    if tr.acc.is_main_process:
        with open(tr.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def _flat(config: dict, prefix: str = "") -> dict:
    """The config as the flat scalars trackers take (TensorBoard's hparams refuse lists and None)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


@contextlib.contextmanager
def training_threads(tr: Trainer):
    """One CPU thread while a head trains on cached features, the caller's count back afterwards: its matrix products
    of a few hundred kFLOPs lose more to thread hand-offs than they gain (one thread ran 4x faster here, 20x when
    another process shared the cores)."""
    threads = torch.get_num_threads()
    if not tr.cfg.tuned and tr.acc.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save(tr: Trainer, interrupted: bool, seconds: float) -> dict:
    """Restores the kept epoch's weights, reports them on validation, and writes the run directory."""
    # Only now restore the kept weights: evaluating is cheap, writing a checkpoint every epoch is not.
    missing, unexpected = load_stored(tr.unwrapped, tr.best_state, tr.cfg.tuned)
    if missing or unexpected:
        raise RuntimeError(f"the kept weights do not fit the model: {(missing + unexpected)[:5]}")
    result = {
        "best_epoch": tr.best["epoch"],
        "epochs_run": len(tr.history),
        "interrupted": interrupted,
        "n_train": tr.n_train,
        "n_val": tr.n_val,
        "train_seconds": seconds,
        "num_processes": tr.acc.num_processes,
    }
    if tr.class_weight is not None:
        result["class_weight"] = tr.class_weight
    y = None
    if tr.val_dl is not None:
        tr.val_probs, y = validate(tr)
    calibration = calibrate(tr.val_probs, y, "validation") if tr.cfg.train.calibrate else None
    if calibration is not None:
        result["calibration"] = calibration.report()
    if tr.val_dl is not None and tr.cfg.data.multi_label:
        # The thresholds and the set scores are those of the probabilities predict serves: calibrated, with --calibrate.
        served = calibration.calibrated if calibration is not None else tr.val_probs
        fixed = parse_threshold(tr.cfg.train.threshold)
        thresholds = multilabel.thresholds_at(served, y, "auto" if fixed is None else fixed)
        result["val"] = multilabel.report(y, served, tr.labels, thresholds)
        result["val"]["log_loss"] = metrics.log_loss(y, served)
        result["val"]["decision"] = {"chosen": "auto" if fixed is None else "fixed", "fitted_on": "validation"}
    decision, scores = decide(tr.cfg, tr.labels, tr.val_probs, y, calibration, "validation")
    if tr.val_dl is not None and not tr.cfg.data.multi_label:
        # The labels predict gives: a binary run's at its threshold (on the calibrated probabilities), else the argmax.
        served = calibration.calibrated if calibration is not None else tr.val_probs
        pred = binary.predicted(served, tr.labels, decision)
        result["val"] = metrics.full_report(y, pred, tr.labels)
        result["val"]["log_loss"] = metrics.log_loss(y, tr.val_probs)
        result["val_interval"] = metrics.bootstrap_interval(y, pred, seed=tr.cfg.train.seed)
    if decision is not None:
        result["val"] |= scores
        result |= {"positive": decision.positive, "threshold": decision.threshold}
    if tr.val_dl is not None:
        metric = tr.cfg.train.metric
        result["metric"] = {"name": metric, "value": result["val"][metric]}
    if tr.cfg.train.track:
        final = {f"final/val_{k}": result["val"][k] for k in ("accuracy", "weighted_f1", "macro_f1") if "val" in result}
        tr.acc.log({**final, "final/best_epoch": result["best_epoch"]}, step=len(tr.history))
        tr.acc.end_training()
    if tr.acc.is_main_process:
        write_run(tr.out, tr.cfg, tr.labels, tr.unwrapped, tr.history, result, tr.frozen_weights, calibration)
    tr.acc.wait_for_everyone()
    return result
