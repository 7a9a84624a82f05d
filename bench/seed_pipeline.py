"""The whole seed job through mmfuse's CLI, timed stage by stage with model loading included.

Caption 3,170 JPEGs (640x480) with ViT-B/16 + GPT-2 (124M), fine-tune ViT-B/16 + RoBERTa-8 with ``--tune all`` for
8 epochs on 2,003 of them, predict the other 1,167. Models have random weights (throughput does not depend on weight
values), saved to local directories first, as a download would leave them; that setup is timed but is not part of
the job.

    python bench/seed_pipeline.py            # GPU: full size (target: the job in <= 30 s, shared/PERF.md)
    python bench/seed_pipeline.py --small    # CPU: 60 small JPEGs, tiny models, 2 epochs, well under a minute

Each row's text is its generated short text followed by its caption (``"<text>; <caption>"``). Every caption has
exactly 20 tokens: ``min_new_tokens`` keeps random weights from stopping early, as in bench/caption.py. Training
holds out 15% of the 2,003 for validation, as ``mmfuse train`` does without ``--val``. The table is printed last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from reference_models import random_captioner  # noqa: E402
from train_throughput import build_reference, write_jpegs  # noqa: E402

MAX_NEW_TOKENS = 20


def caption_words(n: int) -> list[str]:
    """``n`` distinct words for the captioner's vocabulary, taken from MiniLM's, so each is about one text token."""
    from transformers import AutoTokenizer

    from mmfuse.models.towers import minilm_path

    vocab = AutoTokenizer.from_pretrained(minilm_path()).get_vocab()
    words = sorted(w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) > 2)
    return [words[i] if i < len(words) else f"{words[i % len(words)]}{i // len(words)}" for i in range(n)]


def build_captioner(directory: Path, small: bool) -> Path:
    """A random VisionEncoderDecoder (ViT + GPT-2) with a processor and a word-level tokenizer, as a local directory.

    The word-level tokenizer stands in for GPT-2's BPE, which is not on hand offline: every id decodes to a word.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, ViTImageProcessor

    # min_new_tokens: random weights must not stop early, so every caption costs the full decode.
    model = random_captioner(small, MAX_NEW_TOKENS, vocab_size=2000)
    vit, gpt = model.config.encoder, model.config.decoder
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": vit.image_size, "width": vit.image_size}).save_pretrained(directory)
    words = caption_words(gpt.vocab_size - 1) + ["<|endoftext|>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", **special).save_pretrained(directory)
    return directory


def write_manifest(path: Path, rows: list[dict], captions: dict[str, str], label: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "label"] if label else ["image", "text"])
        for r in rows:
            text = f"{r['text']}; {captions[r['image']]}"
            w.writerow([r["image"], text, r["label"]] if label else [r["image"], text])


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny models and images on CPU (well under a minute)")
    p.add_argument("--images", type=int, help="JPEGs generated (default 3,170; 60 with --small)")
    p.add_argument("--train", type=int, help="of which trained on (default 2,003; 40 with --small)")
    p.add_argument("--epochs", type=int, help="default 8; 2 with --small")
    p.add_argument("--batch-size", type=int, help="training batch (default 128; 8 with --small)")
    p.add_argument("--caption-batch", type=int, help="captioning batch (default 1,024; 32 with --small)")
    p.add_argument("--workers", type=int, help="training DataLoader workers (default: cores - 1, at most 15; 0 small)")
    p.add_argument("--keep", help="keep the generated data, models and run in this directory")
    args = p.parse_args(argv)
    if not args.small and not torch.cuda.is_available():
        print("error: the full-size job needs a GPU (on this CPU it would take hours); pass --small", file=sys.stderr)
        return 2

    import transformers

    from mmfuse.cli import main as mmfuse

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    small = args.small
    if small:
        torch.set_num_threads(1)  # tiny ops gain nothing from threads on a shared 2-core machine
    n_images = args.images or (60 if small else 3170)
    n_train = args.train or (40 if small else 2003)
    epochs = args.epochs or (2 if small else 8)
    batch = args.batch_size or (8 if small else 128)
    caption_batch = args.caption_batch or (32 if small else 1024)
    workers = args.workers if args.workers is not None else (0 if small else max(0, min(15, (os.cpu_count() or 1) - 1)))
    size = (96, 72) if small else (640, 480)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def run(stage: str, argv: list[str]) -> None:
        start = time.perf_counter()
        rc = mmfuse(argv)
        times[stage] = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(f"mmfuse {argv[0]} exited with {rc}")

    with tempfile.TemporaryDirectory(prefix="mmfuse-seed-") as tmp:
        root = Path(args.keep or tmp)
        start = time.perf_counter()
        rows = write_jpegs(root / "data", n_images, size, seed=1, workers=max(2, (os.cpu_count() or 2)))
        times["setup: generate JPEGs"] = time.perf_counter() - start
        start = time.perf_counter()
        vision_dir, text_dir = build_reference(root / "towers", small)
        captioner = build_captioner(root / "captioner", small)
        times["setup: random models to disk"] = time.perf_counter() - start
        # matplotlib builds its font cache on first import, once per machine; a user's second run never pays it.
        import matplotlib.font_manager  # noqa: F401

        run(
            "caption",
            [
                "caption",
                str(root / "data" / "images"),
                "--out",
                str(root / "captions.csv"),
                "--model",
                str(captioner),
                "--batch-size",
                str(caption_batch),
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
            ],
        )
        captions = {f"images/{r['image']}": r["text"] for r in read_rows(root / "captions.csv")}
        write_manifest(root / "data" / "train.csv", rows[:n_train], captions, label=True)
        write_manifest(root / "data" / "predict.csv", rows[n_train:], captions, label=False)
        # fmt: off
        run("train", [
            "train", str(root / "data" / "train.csv"), "--out", str(root / "run"),
            "--vision", str(vision_dir), "--text", str(text_dir), "--text-layers", "2" if small else "8",
            "--vision-pooling", "cls", "--text-pooling", "cls", "--tune", "all", "--epochs", str(epochs),
            "--batch-size", str(batch), "--num-workers", str(workers), "--overwrite",  # --keep DIR may hold a run
        ])
        # fmt: on
        run(
            "predict", ["predict", str(root / "run"), str(root / "data" / "predict.csv"), "--out", str(root / "pr.csv")]
        )
        n_captions, n_preds = len(captions), len(read_rows(root / "pr.csv"))
        fitted = json.loads((root / "run" / "metrics.json").read_text())
        rates = [float(r["samples_per_s"]) for r in read_rows(root / "run" / "history.csv")]
        example = next(iter(captions.values()))

    if n_captions != n_images or n_preds != n_images - n_train:
        print(f"error: {n_captions} captions for {n_images} images, {n_preds} predictions for {n_images - n_train}")
        return 1
    job = times["caption"] + times["train"] + times["predict"]
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, 1 thread)"
    if not small:
        print(f"target (H100/H200, shared/PERF.md): the job in <= 30 s; measured {job:.1f} s")
    print()
    what = "tiny models (--small)" if small else "ViT-B/16 + GPT-2 124M captioner; ViT-B/16 + RoBERTa-8 classifier"
    print(
        f"seed job: {what}; {n_images} JPEGs of {size[0]}x{size[1]}, train {n_train} for {epochs} epochs (batch "
        f"{batch}, --tune all), predict {n_images - n_train}"
    )
    print(
        f"device: {card}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today()}; {time.perf_counter() - t_all:.0f} s in all"
    )
    print(f"example caption: {example!r}")
    print(
        f"training: {fitted['n_train']} rows x {epochs} epochs, {fitted['n_val']} held out for validation; the "
        f"epochs themselves took {fitted['train_seconds']:.1f} s of the train stage's {times['train']:.1f} s"
    )
    # Apart, so the first epoch's warm-up shows beside the steady rate of the others.
    print(f"samples/s by epoch, validation included: {', '.join(f'{r:,.0f}' for r in rates)}")
    print()
    items = {"caption": n_images, "train": fitted["n_train"] * epochs, "predict": n_images - n_train}
    print(f"| {'stage':<30} | {'items':>6} | {'wall s':>7} | {'items/s':>8} |")
    print(f"|{'-' * 32}|{'-' * 8}|{'-' * 9}|{'-' * 10}|")
    for stage, seconds in times.items():
        n = items.get(stage)
        rate = f"{n / seconds:,.1f}" if n else "-"
        print(f"| {stage:<30} | {n or '-':>6} | {seconds:>7.2f} | {rate:>8} |")
    print(f"| {'job: caption + train + predict':<30} | {'-':>6} | {job:>7.2f} | {'-':>8} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
