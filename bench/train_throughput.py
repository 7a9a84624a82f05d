"""Fine-tuning and inference throughput of the reference architecture, built through mmfuse's own model code.

ViT-B/16 (224 px) + RoBERTa-base cut to 8 layers (128 tokens) + the concat head, 11 classes, random weights
(throughput does not depend on weight values), every variant measured in the same run on the same device:

    python bench/train_throughput.py                    # GPU: full size; bf16 where mmfuse uses it
    python bench/train_throughput.py --compile regional,model --infer-compile regional   # + compiled variants
    python bench/train_throughput.py --small            # CPU: tiny towers, fp32, well under a minute; what tests/ runs

Rows:
- naive: fp32, eager attention, ``torch.optim.Adam``, batch 16, ``loss.item()`` every step (a typical first loop).
- tuned: ``mmfuse.training.loop.train_step``, the step ``fit`` runs, with ``--tune all``. ``fit`` reads data files and
  validates every epoch, so it cannot time a synthetic batch; ``TunedTrainer`` calls its pieces instead: the same
  Accelerator (``make_accelerator``: bf16 autocast on a GPU, fp32 on CPU), optimizer (``make_optimizer``: fused
  AdamW in head and tower groups), cosine schedule (``warmup_cosine``) and step (gradient clipping, accumulation,
  the loss summed on the device and no per-step host sync). SDPA attention (transformers' default). Shapes are
  static, as ``drop_last`` makes them in ``fit``. Timed at
  ``--batch-size`` and at each of ``--big-batches`` (a batch that does not fit fails its row with the OOM error).
- augmentation: the tuned step on uint8 images (what the pixel cache feeds, normalised by the tower), then the same
  with each of ``--augment`` (``mmfuse.training.augment.Augmenter``: a batched crop, flip and colour jitter on the
  device,
  ``--augment light``, the default with ``--tune image`` or ``all``), side by side.
- from files: the same tuned step fed by a DataLoader over JPEG files on disk, prepared by the same Accelerator:
  (1) ``mmfuse.features.sources.ImageFileSource`` (PIL decode and the HF processor in DataLoader workers every step) and
  (2) ``PixelSource``: images decoded once into the uint8 pixel cache, normalised on the device by the tower (the
  cache fill is timed on its own line). On a GPU with a working torchvision, (3) nvJPEG decodes each batch on the
  device (``bench/gpu_decode.py``).
- inference: ``Predictor.probs``, the call ``predict_records`` makes per batch (a ``Predictor`` loaded from a run
  directory written by ``save_model``; inputs cast to its dtype, softmax in fp32, probabilities copied to the host),
  for each of its dtypes: fp32 at batch 64, then bf16 autocast (predict's default on a GPU) and bf16 weights at each
  of ``--infer-batches``. Both bf16 paths' logits are checked against fp32 first.
- compiled (``mmfuse.models.compile.compile_model``), last, since each pays its compile first (the first step's time is
  printed): the tuned step with ``--compile regional`` (each encoder layer, fit's ``--compile``) and/or ``model``
  (whole model), and bf16-weights inference with ``--infer-compile``. On CPU the backend is ``aot_eager``: it traces
  what Inductor would compile, without minutes of C++ builds.

Each row is printed as it finishes, so a run cut short by a time limit still reports what it measured, and a row
that raises (out of memory, a compile error) is reported as failed without stopping the others.

MFU counts 150 GFLOP per trained sample and 50 per inferred one against 790 TFLOP/s of bf16 (shared/PERF.md); it is
only given at full size and at 128 tokens. The table is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from reference_models import vit_config  # noqa: E402

NUM_CLASSES = 11
PEAK_BF16 = 790e12  # measured bf16 matmul FLOP/s on H100/H200 (shared/PERF.md)
TRAIN_FLOP, INFER_FLOP = 150e9, 50e9  # per sample at full size and 128 tokens (shared/PERF.md)
BF16_TOLERANCE = 1e-2

# Short texts for generated data; a label's colour and noun go together so the data is learnable.
NOUNS = ["apple", "boat", "car", "dog", "kite", "lamp", "moon", "pear", "sock", "tree", "vase"]
ADJECTIVES = ["small", "old", "shiny", "quiet", "big", "bright", "wooden", "red", "blue", "green", "tiny"]
PLACES = ["table", "street", "window", "garden", "beach", "shelf", "road", "field"]


# ---------------------------------------------------------------------------------------------------------------------
# The reference architecture with random weights, and generated data


def build_reference(root: Path, small: bool) -> tuple[Path, Path]:
    """Saves a random ViT (with its processor) and a random RoBERTa (with MiniLM's tokenizer) as local directories.

    Full size is ViT-B/16 at 224 px and RoBERTa-base (12 layers, of which mmfuse keeps 8). The tokenizer is MiniLM's,
    the only one on hand offline: its 30,522 ids all exist in RoBERTa's 50,265-row embedding.
    """
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel, ViTImageProcessor, ViTModel

    from mmfuse.models.towers import minilm_path

    vit = vit_config(small)
    if small:
        roberta = RobertaConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
        )
    else:
        roberta = RobertaConfig(
            vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, num_hidden_layers=12, pad_token_id=1
        )
    torch.manual_seed(0)
    vision_dir, text_dir = root / "vit", root / "roberta"
    ViTModel(vit).save_pretrained(vision_dir)
    ViTImageProcessor(size={"height": vit.image_size, "width": vit.image_size}).save_pretrained(vision_dir)
    RobertaModel(roberta).save_pretrained(text_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(text_dir)
    return vision_dir, text_dir


def model_config(vision_dir: Path, text_dir: Path, small: bool):
    from mmfuse.config import ModelConfig

    return ModelConfig(
        vision=str(vision_dir),
        text=str(text_dir),
        text_layers=2 if small else 8,
        vision_pooling="cls",
        text_pooling="cls",
        max_length=128,
    )


def short_text(label: int, rng: random.Random) -> str:
    return f"a {rng.choice(ADJECTIVES)} {NOUNS[label]} near the {rng.choice(PLACES)}"


def _draw(path: Path, label: int, size: tuple[int, int], seed: int) -> None:
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    w, h = size
    hue = (label * 23) % 256
    # A smooth background with a few shapes and some grain compresses like a photo (tens of kB at 640x480), so
    # decoding costs what real files cost; pure noise would be several times larger and slower.
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    img = Image.blend(img, Image.new("RGB", (w, h), (hue, 255 - hue, (hue * 7) % 256)), 0.6)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(max(2, w // 20), max(3, w // 5))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(rng.randrange(256) for _ in range(3)))
    img = img.filter(ImageFilter.GaussianBlur(1))
    noise = Image.effect_noise((w, h), 12).convert("RGB")
    Image.blend(img, noise, 0.08).save(path, quality=90)


def write_jpegs(root: Path, n: int, size: tuple[int, int], seed: int = 0, workers: int = 8) -> list[dict]:
    """Writes ``n`` JPEGs of ``size`` (width, height) under ``root/images``.

    Returns:
        One dict per image: image (relative path), text, label.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % NUM_CLASSES
        rows.append({"image": f"images/{i:05d}.jpg", "text": short_text(label, rng), "label": NOUNS[label]})
    # Processes: PIL's drawing and noise hold the GIL (threads took 72 s for 3,170 images on 16 cores).
    jobs = [(root / rows[i]["image"], i % NUM_CLASSES, size, seed * 100_003 + i) for i in range(n)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_draw_job, jobs, chunksize=max(1, n // (4 * workers))))
    return rows


def _draw_job(job: tuple) -> None:
    _draw(*job)


# ---------------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def samples_per_s(
    step: Callable[[dict], None], batches: Iterator[dict], steps: int, warmup: int, device, timing: dict | None = None
) -> float:
    """Runs ``warmup`` untimed steps, then ``steps`` timed ones; fetching each batch counts as part of the step.

    ``timing`` gets ``first_step_s``: what compiling costs, for the compiled variants.
    """
    batch_size = 0
    start = time.perf_counter()
    for i in range(warmup):
        step(next(batches))
        if i == 0 and timing is not None:
            sync(device)
            timing["first_step_s"] = time.perf_counter() - start
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        b = next(batches)
        batch_size = len(b["labels"])
        step(b)
    sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def repeat(batch: dict) -> Iterator[dict]:
    while True:
        yield batch


def synthetic_batch(
    batch: int, image_size: int, tokens: int, vocab: int, device, seed: int = 0, uint8: bool = False
) -> dict:
    """Random pixels and token ids (never zeros: some kernels take shortcuts on them), already on the device; with
    ``uint8``, pixels as the pixel cache gives them, for the tower to normalise."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, tokens), generator=g)
    ids[:, 0] = 101  # MiniLM's [CLS], the token CLS pooling reads
    shape = (batch, 3, image_size, image_size)
    pixels = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8) if uint8 else torch.randn(*shape, generator=g)
    out = {
        "image": {"pixel_values": pixels},
        "text": {"input_ids": ids, "attention_mask": torch.ones(batch, tokens, dtype=torch.long)},
        "present": torch.ones(batch, 2, dtype=torch.bool),
        "labels": torch.randint(0, NUM_CLASSES, (batch,), generator=g),
    }
    return to(out, device)


def to(batch: dict, device) -> dict:
    return {k: to(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True) for k, v in batch.items()}


def set_attention(model, impl: str) -> None:
    """Switches both towers' attention kernels (``eager`` or ``sdpa``) through transformers' own setter."""
    for tower in model.towers.values():
        tower.model.set_attn_implementation(impl)
        if tower.model.config._attn_implementation != impl:
            raise RuntimeError(f"{type(tower.model).__name__} kept {tower.model.config._attn_implementation}")


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


# ---------------------------------------------------------------------------------------------------------------------
# The variants


def naive_rate(cfg, device, data: dict, steps: int, warmup: int) -> float:
    from mmfuse.models.classifier import build_model

    model = build_model(cfg, NUM_CLASSES).to(device)
    set_attention(model, "eager")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(b: dict) -> None:
        loss = F.cross_entropy(model(**model_inputs(b)), b["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # what a loop that logs every step does: a host sync per step

    return samples_per_s(step, repeat(data), steps, warmup, device)  # the caller frees the model: add() does


class TunedTrainer:
    """``mmfuse.training.loop.train_step`` with ``--tune all``, on a model, optimizer and schedule built as ``fit``
    builds
    them."""

    def __init__(
        self,
        cfg,
        acc,
        total_steps: int,
        compile: str | None = None,
        backend: str = "inductor",
        channels_last=False,
        augment: str | None = None,
    ):
        from mmfuse.config import TrainConfig
        from mmfuse.models.classifier import build_model
        from mmfuse.models.compile import compile_model
        from mmfuse.training.augment import make_augmenter
        from mmfuse.training.loop import make_optimizer, warmup_cosine

        self.acc, self.channels_last = acc, channels_last
        model = build_model(cfg, NUM_CLASSES)
        if channels_last:
            model.vision.to(memory_format=torch.channels_last)
        # --tune all's defaults: one learning rate (1e-4) for towers and head, weight decay 0.01, clipping at 1.
        self.train_cfg = TrainConfig(tune="all", lr=1e-4, head_lr=1e-4)
        optimizer = make_optimizer(model, self.train_cfg)
        scheduler = warmup_cosine(optimizer, int(0.1 * total_steps), total_steps)
        self.augment = make_augmenter(augment, True, 0, model.vision, acc.device)  # built where fit builds it
        if compile:  # "regional" or "model", where fit compiles: after the optimizer, before prepare
            model = compile_model(model, compile, backend=backend)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train()
        self.total = torch.zeros((), device=acc.device)

    def step(self, batch: dict) -> None:
        from mmfuse.training.loop import train_step

        batch = dict(batch)
        if self.channels_last:
            pixels = batch["image"]["pixel_values"]
            batch["image"] = {"pixel_values": pixels.contiguous(memory_format=torch.channels_last)}
        t = self.train_cfg
        loss, _ = train_step(
            self.model, batch, self.optimizer, self.scheduler, self.acc, self.params, t.grad_clip, augment=self.augment
        )
        self.total += loss

    def close(self) -> None:
        if not torch.isfinite(self.total):  # read once, after timing: a diverged run would time NaN kernels
            raise RuntimeError("the training loss went non-finite")
        del self.model, self.optimizer, self.scheduler, self.params
        self.acc.free_memory()


def free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fixed_length(text: dict, tokens: int, pad_id: int) -> dict:
    """Pads tokenised texts to ``tokens``, as the synthetic rows are, so that a files row differs from them only in
    where the images come from (the generated texts are about 10 tokens; dynamic padding would flatter it)."""
    extra = tokens - text["input_ids"].shape[1]
    if extra <= 0:
        return text
    fill = {"input_ids": pad_id}
    return {k: F.pad(v, (0, extra), value=fill.get(k, 0)) for k, v in text.items()}


def file_loaders(model, rows: list[dict], root: Path, batch: int, workers: int, acc, total_batches: int, tokens: int):
    """DataLoaders over the JPEG files: decoded every step (``ImageFileSource``), and decoded once into the uint8 pixel
    cache (``PixelSource``, with its fill time).

    One long shuffled epoch (``RandomSampler`` drawing ``total_batches`` batches) so that epoch restarts, which a
    real run pays once per epoch of thousands of samples, do not count against a few timed steps here.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from mmfuse.data.records import Record
    from mmfuse.features.sources import MultimodalDataset, PixelSource, batch_collate, build_dataset, load_pixels

    records = [Record(root / r["image"], r["text"], r["label"], i, r["image"]) for i, r in enumerate(rows)]
    labels = torch.tensor([NOUNS.index(r["label"]) for r in rows])
    common = {"batch_size": batch, "drop_last": True, "pin_memory": torch.cuda.is_available()}

    def loader(ds, collate, n_workers: int):
        sampler = RandomSampler(ds, num_samples=total_batches * batch, generator=torch.Generator().manual_seed(0))
        dl = DataLoader(
            ds, sampler=sampler, collate_fn=collate, num_workers=n_workers, persistent_workers=n_workers > 0, **common
        )
        return acc.prepare(dl)

    raw_ds = build_dataset(model, records, labels, tuned=model.modalities, cache=None)
    pad_id = model.text.tokenizer.pad_token_id

    def padded(b: dict) -> dict:
        return {**batch_collate(b), "text": fixed_length(b["text"], tokens, pad_id)}

    spec = model.vision.pixel_spec
    start = time.perf_counter()
    pixels = load_pixels([r.image for r in records], spec, workers=max(1, workers))
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    load_pixels([r.image for r in records], spec, workers=max(1, workers))
    reload_s = time.perf_counter() - start
    px_ds = MultimodalDataset({**raw_ds.sources, "image": PixelSource(pixels)}, raw_ds.present, labels)
    # Indexing a uint8 tensor and tokenising are light: one worker overlaps them with a GPU step, while on a CPU a
    # worker would only take cores from the step itself.
    px_workers = 1 if acc.device.type == "cuda" else 0
    raw_dl = loader(raw_ds, padded, workers)
    px_dl = loader(px_ds, padded, px_workers)
    return raw_dl, px_dl, spec, fill_s, reload_s


def nvjpeg_batches(paths, texts: list[str], labels: torch.Tensor, batch: int, spec, model, device, tokens: int):
    """Batches decoded on the GPU every step (torchvision nvJPEG), in the main process."""
    from gpu_decode import decode_jpegs_gpu

    g = torch.Generator().manual_seed(0)
    pad_id = model.text.tokenizer.pad_token_id
    while True:
        idx = torch.randperm(len(paths), generator=g)[:batch].tolist()
        pixels = decode_jpegs_gpu([paths[i] for i in idx], spec, device)
        text = fixed_length(model.text.preprocess([texts[i] for i in idx]), tokens, pad_id)
        yield {
            "image": {"pixel_values": pixels},
            "text": to(text, device),
            "present": torch.ones(batch, 2, dtype=torch.bool, device=device),
            "labels": labels[idx].to(device),
        }


def augment_note(level: str, batch: int, image_size: int, device, steps: int, warmup: int) -> str:
    """The augmentation alone, timed on a uint8 batch on the device: the part of the step it adds."""
    from mmfuse.training.augment import Augmenter

    augmenter = Augmenter(level, device=device)
    data = synthetic_batch(batch, image_size, 8, 30522, device, uint8=True)
    rate = samples_per_s(augmenter.batch, repeat(data), steps * 4, warmup, device)
    return f"--augment {level} alone: {1e3 * batch / rate:.2f} ms per batch of {batch} at {image_size} px"


def write_run_dir(cfg, run: Path) -> None:
    """A run directory as ``fit`` leaves it (config, labels, towers, weights), so ``Predictor`` loads it."""
    from mmfuse.config import RunConfig, TrainConfig
    from mmfuse.models.classifier import build_model
    from mmfuse.rundir.weights import save_model

    run.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, NUM_CLASSES)
    save_model(model, run, model.modalities)
    RunConfig(model=cfg, train=TrainConfig(tune="all")).to_yaml(run / "config.yaml")
    (run / "labels.json").write_text(json.dumps(NOUNS))


def inference_rate(predictor, data: dict, steps: int, warmup: int, device, timing: dict | None = None) -> float:
    """``Predictor.probs``, the call ``predict_records`` makes per batch: inputs cast to the predictor's dtype,
    inference mode, softmax in fp32, probabilities copied to the host."""
    inputs = model_inputs(data)
    return samples_per_s(lambda _: predictor.probs(inputs), repeat(data), steps, warmup, device, timing)


@torch.inference_mode()
def relative_error(model, data: dict, device, bf16: bool, reference_impl: str | None = None) -> float:
    """||logits - fp32 SDPA logits|| / ||fp32 SDPA logits||, for bf16 autocast or another attention kernel."""
    inputs = model_inputs(data)
    ref = model(**inputs).float()
    if reference_impl:
        set_attention(model, reference_impl)
    try:
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            out = model(**inputs).float()
    finally:
        if reference_impl:
            set_attention(model, "sdpa")
    return ((out - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------------------------------


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def csv_augments(text: str) -> list[str]:
    from mmfuse.training.augment import STRENGTHS

    levels = [x for x in text.split(",") if x and x != "none"]
    if any(x not in STRENGTHS for x in levels):
        raise argparse.ArgumentTypeError(f"augmentations are {', '.join(STRENGTHS)} (or none), got {text!r}")
    return levels


def csv_modes(text: str) -> list[str]:
    from mmfuse.models.compile import COMPILE_MODES

    modes = [x.strip() for x in text.split(",") if x.strip()]
    if any(m not in COMPILE_MODES for m in modes):
        raise argparse.ArgumentTypeError(f"compile modes are {', '.join(COMPILE_MODES)}")
    return modes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny towers on CPU in fp32 (well under a minute)")
    p.add_argument("--batch-size", type=int, help="batch of the tuned rows and their variants (default 256; 32 small)")
    p.add_argument(
        "--big-batches", type=csv_ints, help="more tuned rows at these batches; OOM is reported (default 384,512; 64)"
    )
    p.add_argument("--steps", type=int, help="timed steps per row (default 20; 6 with --small)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; 2 with --small)")
    p.add_argument(
        "--compile",
        type=csv_modes,
        nargs="?",
        const=["model"],
        default=[],
        help="time the tuned step compiled: regional (each encoder layer), model (whole), or both, comma-separated; "
        "bare --compile: model (each pays a compile of 30-60 s on a GPU)",
    )
    p.add_argument(
        "--infer-compile", type=csv_modes, default=[], help="time bf16-weights inference compiled the same ways"
    )
    p.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor on a GPU, aot_eager on CPU: no C++ builds)"
    )
    p.add_argument(
        "--infer-batches", type=csv_ints, help="inference rows, autocast and bf16 weights (default 256,1024; 32)"
    )
    p.add_argument("--channels-last", action="store_true", help="also time the tuned step with channels_last images")
    p.add_argument(
        "--augment",
        type=csv_augments,
        default=["light"],
        help="time the tuned step on uint8 images with each of these augmentations beside none (default light; "
        "light,strong for both; none: skip the rows)",
    )
    p.add_argument("--no-files", action="store_true", help="skip the rows fed from JPEG files on disk")
    p.add_argument("--files", type=int, help="JPEGs written for those rows (default 1,024; 96 with --small)")
    p.add_argument("--workers", type=int, help="DataLoader workers for the PIL path (default: cores - 1, at most 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    import traceback

    import transformers

    from mmfuse.inference.predictor import Predictor
    from mmfuse.models.compile import compile_model
    from mmfuse.training.loop import make_accelerator

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.small and not cuda:
        # Tiny ops gain nothing from threads, and their barriers stall when other jobs share the cores.
        torch.set_num_threads(1)
    full = not args.small
    batch = args.batch_size or (32 if args.small else 256)
    big_batches = args.big_batches if args.big_batches is not None else ([64] if args.small else [384, 512])
    infer_batches = args.infer_batches or ([32] if args.small else [256, 1024])
    steps = args.steps or (6 if args.small else 20)
    warmup = max(2, args.warmup or (2 if args.small else 5))  # the first step compiles; the second may recompile
    backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    n_files = args.files or (96 if args.small else 1024)
    workers = args.workers if args.workers is not None else max(1, min(16, (os.cpu_count() or 2) - 1))
    image_size, tokens, vocab = (64, 32, 30522) if args.small else (224, 128, 30522)
    t0 = time.perf_counter()
    results: list[tuple[str, int, float | None, str]] = []  # variant, batch, samples/s (None: failed), MFU basis
    checks: list[tuple[str, str, bool]] = []
    notes: list[str] = []

    def add(name: str, bs: int, fn: Callable[[], float], flop: float | None) -> None:
        """Times one variant; an exception (out of memory, a compile error) fails that row and the run goes on."""
        try:
            rate = fn()
            results.append((name, bs, rate, flop))
            print(f"[{time.perf_counter() - t0:5.0f} s] {name}, batch {bs}: {rate:,.1f} samples/s", flush=True)
        except Exception as e:
            results.append((name, bs, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            print(f"[{time.perf_counter() - t0:5.0f} s] {name}, batch {bs}: FAILED", flush=True)
            print("\n".join(traceback.format_exc().splitlines()[-12:]), flush=True)
        free(device)  # the variant's model and optimizer are unreachable now; give their memory back

    def check(name: str, fn: Callable[[], float], limit: float) -> None:
        try:
            err = fn()
            checks.append((name, f"relative error {err:.1e} (limit {limit:g})", err <= limit))
        except Exception as e:  # CPU builds without bf16 kernels: only the GPU checks gate
            checks.append((name, f"not run: {type(e).__name__}: {str(e).splitlines()[0][:80]}", not cuda))
        print(f"[{time.perf_counter() - t0:5.0f} s] check {name}: {checks[-1][1]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="mmfuse-bench-") as tmp:
        tmp = Path(tmp)
        vision_dir, text_dir = build_reference(tmp / "towers", args.small)
        cfg = model_config(vision_dir, text_dir, args.small)
        build_s = time.perf_counter() - t0
        acc = make_accelerator("auto", tune_towers=True)
        precision = acc.mixed_precision

        # Checks first, on the predict path's models loaded from a run directory: fp32 weights (plain and under
        # autocast) and bf16 weights.
        write_run_dir(cfg, tmp / "run")
        start = time.perf_counter()
        predictor = Predictor(tmp / "run", device=str(device), dtype="fp32")
        load_s = time.perf_counter() - start
        autocast = Predictor(tmp / "run", device=str(device), dtype="autocast")
        bf16_weights = Predictor(tmp / "run", device=str(device), dtype="bf16")
        model = predictor.model
        check_data = synthetic_batch(8, image_size, tokens, vocab, device, seed=1)
        check(
            "eager vs SDPA attention, fp32 logits",
            lambda: relative_error(model, check_data, device, bf16=False, reference_impl="eager"),
            1e-4,
        )
        check("bf16 autocast vs fp32 logits", lambda: relative_error(model, check_data, device, bf16=True), 1e-2)

        def bf16_error(bf16_predictor) -> float:
            ref = predictor.logits(model_inputs(check_data)).float()
            out = bf16_predictor.logits(model_inputs(check_data)).float()
            return ((out - ref).norm() / ref.norm()).item()

        check("bf16 weights vs fp32 logits", lambda: bf16_error(bf16_weights), BF16_TOLERANCE)

        # Training.
        data16 = synthetic_batch(16, image_size, tokens, vocab, device)
        add("naive: fp32, eager, Adam", 16, lambda: naive_rate(cfg, device, data16, steps, warmup), TRAIN_FLOP)
        tuned_name = f"tuned: {'bf16' if precision == 'bf16' else 'fp32'}, SDPA, AdamW{' fused' if cuda else ''}"

        def tuned(bs: int, n_tokens: int = tokens, timing: dict | None = None, uint8: bool = False, **kw) -> float:
            data = synthetic_batch(bs, image_size, n_tokens, vocab, device, uint8=uint8)
            trainer = TunedTrainer(cfg, acc, total_steps=100, backend=backend, **kw)
            try:
                return samples_per_s(trainer.step, repeat(data), steps, warmup, device, timing)
            finally:
                trainer.close()
                free(device)

        for bs in [batch, *(b for b in big_batches if b != batch)]:
            add(tuned_name, bs, lambda bs=bs: tuned(bs), TRAIN_FLOP)
        if args.channels_last:
            add(tuned_name + ", channels_last", batch, lambda: tuned(batch, channels_last=True), TRAIN_FLOP)
        if full:
            add(tuned_name + ", 32 tokens", batch, lambda: tuned(batch, 32), None)
        synthetic = next((r[2] for r in results if r[0] == tuned_name and r[1] == batch), None)
        if args.augment:
            add(tuned_name + ", uint8", batch, lambda: tuned(batch, uint8=True), TRAIN_FLOP)
            for level in args.augment:
                name = f"{tuned_name}, uint8, aug. {level}"
                add(name, batch, lambda level=level: tuned(batch, uint8=True, augment=level), TRAIN_FLOP)
                notes.append(augment_note(level, batch, image_size, device, steps, warmup))

        # From JPEG files on disk, the same tuned step.
        if not args.no_files:
            size = (128, 96) if args.small else (640, 480)
            start = time.perf_counter()
            rows = write_jpegs(tmp / "jpegs", n_files, size, workers=max(2, workers))
            notes.append(f"wrote {n_files} JPEGs of {size[0]}x{size[1]} in {time.perf_counter() - start:.1f} s")
            total_batches = warmup + steps + 8  # a few spare so prefetching never runs dry
            from mmfuse.models.classifier import build_model

            probe = build_model(cfg, NUM_CLASSES)
            raw_dl, px_dl, spec, fill_s, reload_s = file_loaders(
                probe, rows, tmp / "jpegs", batch, workers, acc, total_batches, tokens
            )
            notes.append(
                f"uint8 cache ({spec.height}x{spec.width}): filled at {n_files / fill_s:,.0f} images/s "
                f"({workers} thread(s)), reloaded from disk at {n_files / reload_s:,.0f} images/s"
            )

            def from_loader(dl) -> float:
                trainer = TunedTrainer(cfg, acc, total_steps=100)  # uint8 pixels: the tower normalises them
                try:
                    return samples_per_s(trainer.step, iter(dl), steps, warmup, device)
                finally:
                    trainer.close()
                    free(device)

            add(f"files: PIL + processor, {workers} worker(s)", batch, lambda: from_loader(raw_dl), TRAIN_FLOP)
            add("files: uint8 cache (sources)", batch, lambda: from_loader(px_dl), TRAIN_FLOP)
            from gpu_decode import nvjpeg_available

            if nvjpeg_available(device):
                paths = [tmp / "jpegs" / r["image"] for r in rows]
                labels = torch.tensor([NOUNS.index(r["label"]) for r in rows])
                texts = [r["text"] for r in rows]

                from gpu_decode import decode_jpegs_gpu

                from mmfuse.features.sources import load_pixels

                gpu = decode_jpegs_gpu(paths[:64], spec, device).cpu().int()
                diff = (gpu - load_pixels(paths[:64], spec, use_cache=False).int()).abs().float()
                notes.append(
                    f"nvJPEG vs PIL pixels on 64 files: mean |diff| {diff.mean():.2f}, max {diff.max():.0f} grey levels"
                )

                def nvjpeg() -> float:
                    trainer = TunedTrainer(cfg, acc, total_steps=100)
                    it = nvjpeg_batches(paths, texts, labels, batch, spec, probe, device, tokens)
                    try:
                        first = next(it)
                        trainer.step(first)
                        if not torch.isfinite(trainer.total):  # find out where, rather than only that it broke
                            px = first["image"]["pixel_values"].float()
                            raise RuntimeError(
                                f"first nvJPEG step non-finite; pixels {px.min():.0f}..{px.max():.0f}, "
                                f"finite {bool(torch.isfinite(px).all())}"
                            )
                        return samples_per_s(trainer.step, it, steps, warmup, device)
                    finally:
                        trainer.close()
                        free(device)

                add("files: nvJPEG on the GPU", batch, nvjpeg, TRAIN_FLOP)
            else:
                notes.append("nvJPEG row skipped: needs CUDA and a working torchvision")
            del raw_dl, px_dl, probe

        # Inference through Predictor.probs: fp32 weights (plain, then under bf16 autocast: predict's default on a
        # GPU) and bf16 weights.
        data64 = synthetic_batch(64, image_size, tokens, vocab, device)
        add(
            "inference: predict path, fp32",
            64,
            lambda: inference_rate(predictor, data64, steps, warmup, device),
            INFER_FLOP,
        )
        for bs in infer_batches:
            data = synthetic_batch(bs, image_size, tokens, vocab, device)
            for name, pred in (("inference: bf16 autocast", autocast), ("inference: bf16 weights", bf16_weights)):
                add(
                    name, bs, lambda pred=pred, data=data: inference_rate(pred, data, steps, warmup, device), INFER_FLOP
                )
            del data
        autocast = bf16_weights = None  # their memory back before the compiled variants

        # Compiled variants last: each pays its compile up front, and one that fails or hangs costs only itself.
        # Order: regional training, compiled inference, then whole-model training (slower than eager before).
        def compiled_training(mode: str) -> float:
            torch._dynamo.reset()  # each variant pays its own compile, as a fresh process would
            timing: dict = {}
            try:
                return tuned(batch, compile=mode, timing=timing)
            finally:
                if timing:
                    notes.append(f"{mode} compile ({backend}), training: first step {timing['first_step_s']:.1f} s")

        def compiled_inference(mode: str, bs: int) -> float:
            torch._dynamo.reset()
            pred = Predictor(tmp / "run", device=str(device), dtype="bf16")
            pred.models = [compile_model(m, mode, backend=backend) for m in pred.models]
            timing: dict = {}
            try:
                check(f"bf16 weights, {mode} compile vs fp32 logits", lambda: bf16_error(pred), BF16_TOLERANCE)
                data = synthetic_batch(bs, image_size, tokens, vocab, device)
                return inference_rate(pred, data, steps, warmup, device, timing)
            finally:
                if timing:
                    notes.append(f"{mode} compile ({backend}), inference: first batch {timing['first_step_s']:.1f} s")

        if "regional" in args.compile:
            add(tuned_name + ", regional compile", batch, lambda: compiled_training("regional"), TRAIN_FLOP)
        bs = max(infer_batches)
        for mode in args.infer_compile:
            add(f"inference: bf16 weights, {mode} compile", bs, lambda m=mode: compiled_inference(m, bs), INFER_FLOP)
        if "model" in args.compile:
            add(tuned_name + ", whole-model compile", batch, lambda: compiled_training("model"), TRAIN_FLOP)
        torch._dynamo.reset()

    base = results[0][2]
    card = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s))"
    )
    what = "tiny ViT + RoBERTa (--small)" if args.small else "ViT-B/16 224 px + RoBERTa-base 8 of 12 layers"
    print()
    print(f"training/inference throughput: {what}, {tokens} tokens, {NUM_CLASSES} classes, random weights")
    print(
        f"device: {card}; torch {torch.__version__}, transformers {transformers.__version__}; mixed precision "
        f"{precision}; {datetime.date.today()}; {time.perf_counter() - t0:.0f} s "
        f"(towers built and saved in {build_s:.1f} s, run directory loaded by Predictor in {load_s:.1f} s); "
        f"{steps} timed steps after {warmup} per row"
    )
    for note in notes:
        print(f"note: {note}")
    for name, result, ok in checks:
        print(f"check {name}: {result}{'' if ok else '  FAILED'}")
    files = {r[0]: r[2] for r in results if r[0].startswith("files:")}
    for name, rate in files.items():
        if rate and synthetic:
            print(f"ratio {name} vs synthetic tensors (batch {batch}): {rate / synthetic:.2f}x (target >= 0.9x)")
    rates = {r[0]: r[2] for r in results if r[1] == batch}
    plain = rates.get(tuned_name + ", uint8")
    for level in args.augment:
        rate = rates.get(f"{tuned_name}, uint8, aug. {level}")
        if rate and plain:
            print(f"ratio --augment {level} vs none, uint8 images (batch {batch}): {rate / plain:.2f}x")
    print()
    print(f"| {'variant':<52} | {'batch':>5} | {'samples/s':>10} | {'vs naive':>8} | {'MFU':>6} |")
    print(f"|{'-' * 54}|{'-' * 7}|{'-' * 12}|{'-' * 10}|{'-' * 8}|")
    for name, bs, rate, flop in results:
        if rate is None:
            print(f"| {name:<52} | {bs:>5} | failed: {flop} |")
            continue
        ratio = f"{rate / base:.2f}x" if base and not name.startswith("inference") else "-"
        mfu = f"{rate * flop / PEAK_BF16:.1%}" if full and cuda and isinstance(flop, float) else "n/a"
        print(f"| {name:<52} | {bs:>5} | {rate:>10,.1f} | {ratio:>8} | {mfu:>6} |")
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
