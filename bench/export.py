"""onnxruntime against torch on CPU for an exported classifier, measured side by side in one run.

    python bench/export.py            # efficientnet-lite0 at 128 px + minilm, frozen: the quickstart's towers
    python bench/export.py --small    # tiny random ViT + RoBERTa: seconds; what tests/ runs

The run is made by the real code: ``mmfuse train --tune head --epochs 1`` on a few generated images and texts (the
weights of the head do not change the speed), then ``mmfuse.inference.export.export_run`` writes the graph and runs
its parity
gate. Both backends then classify the same raw inputs, already preprocessed once by ``OnnxPredictor.feeds`` (the
preprocessing is the same PIL resize and tokenizer either way, so it is left out of the times):

- torch: ``Predictor.probs``, the call ``predict`` makes per batch, fp32, every tower run on its inputs;
- onnxruntime: ``OnnxPredictor.session.run``, CPU execution provider.

Both use the same number of threads (torch's, by default all cores). Calls alternate between the backends, so load
from other processes on a shared machine falls on both alike; each row is the median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import build_reference  # noqa: E402

WORDS = "grinning cat face smiling eyes red apple green train old wooden bright star heart hand flag".split()


def make_data(root: Path, rows: int = 16, seed: int = 0) -> Path:
    """Two classes told apart by colour and word: enough for ``mmfuse train`` to make a run."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    lines = ["image,text,label"]
    for i in range(rows):
        label = ("red", "blue")[i % 2]
        img = Image.new("RGB", (96, 96), (245, 245, 245))
        ImageDraw.Draw(img).ellipse([20, 20, 70, 70], fill=(220, 40, 40) if label == "red" else (40, 60, 220))
        img.save(root / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,{label} {' '.join(rng.sample(WORDS, 6))},{label}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def inputs(batch: int, seed: int = 1) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)) for _ in range(batch)]
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(6, 14)))) for _ in range(batch)]
    return images, texts


def timed(fn, repeats: int) -> list[float]:
    return [fn() for _ in range(repeats)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny random towers (seconds)")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per backend and batch size")
    parser.add_argument("--image-size", type=int, default=128, help="packaged vision tower's input size")
    parser.add_argument("--threads", type=int, default=None, help="threads for both backends (default: torch's)")
    args = parser.parse_args(argv)

    from mmfuse.cli import main as mmfuse
    from mmfuse.inference.export import OnnxPredictor, export_run
    from mmfuse.inference.predictor import Predictor

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.small:
            os.environ.setdefault("MMFUSE_HOME", str(root / "home"))
        data = make_data(root / "data")
        if args.small:  # the tiny random ViT + RoBERTa every --small benchmark builds
            vision, text = build_reference(root / "towers", small=True)
            towers = ["--vision", str(vision), "--text", str(text)]
        else:
            towers = ["--image-size", str(args.image_size)]
        run = root / "run"
        train = ["train", str(data), "--out", str(run), "--tune", "head", "--epochs", "1", "--batch-size", "8"]
        if mmfuse([*train, *towers]) != 0:
            return 1
        start = time.perf_counter()
        info = export_run(run, run / "export")
        export_s = time.perf_counter() - start
        torch_model = Predictor(run, device="cpu", dtype="fp32")
        ort_model = OnnxPredictor(run / "export", threads=threads)
        rows = []
        for b in (int(x) for x in args.batches.split(",")):
            images, texts = inputs(b)
            feeds = ort_model.feeds(images if "image" in ort_model.modalities else None, texts)
            batch = {}
            if "pixel_values" in feeds:
                batch["image"] = {"pixel_values": torch.from_numpy(feeds["pixel_values"])}
            if "input_ids" in feeds:
                ids, mask = (torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask"))
                batch["text"] = {"input_ids": ids, "attention_mask": mask}
            if "present" in feeds:
                batch["present"] = torch.from_numpy(feeds["present"])

            def run_torch(batch=batch):
                t = time.perf_counter()
                p = torch_model.probs(batch)
                return time.perf_counter() - t, p

            def run_ort(feeds=feeds):
                t = time.perf_counter()
                p = ort_model.session.run(["probs"], feeds)[0]
                return time.perf_counter() - t, p

            _, p_torch = run_torch()  # warm-up: builds the frozen towers, first-call allocations
            _, p_ort = run_ort()
            diff = float(np.abs(p_torch - p_ort).max())
            t_torch, t_ort = [], []
            for _ in range(args.repeats):
                t_torch.append(run_torch()[0])
                t_ort.append(run_ort()[0])
            mt, mo = statistics.median(t_torch), statistics.median(t_ort)
            rows.append((b, feeds.get("input_ids", np.zeros((b, 0))).shape[1], mt, mo, diff))
            print(f"batch {b}: torch {mt * 1e3:.1f} ms, onnxruntime {mo * 1e3:.1f} ms", flush=True)

    print()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs visible, {threads} "
        f"threads per backend; torch {torch.__version__}, onnxruntime {info['versions']['onnxruntime']}"
    )
    what = "tiny random ViT + RoBERTa (--small)" if args.small else f"efficientnet-lite0 {args.image_size} px + minilm"
    print(
        f"model: {what}, frozen, raw inputs; exported by {info['exporter']['name']} (opset "
        f"{info['exporter']['opset']}) in {export_s:.0f} s, parity gate max |dp| {info['parity']['max_abs_diff']:.1e}"
    )
    print(f"median of {args.repeats} calls each, alternating; command: python bench/export.py {' '.join(argv or [])}")
    print()
    print(
        "| batch | tokens | torch ms/batch | onnxruntime ms/batch | torch rows/s | onnxruntime rows/s | ort speedup "
        "| max dp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for b, tokens, mt, mo, diff in rows:
        print(
            f"| {b} | {tokens} | {mt * 1e3:.1f} | {mo * 1e3:.1f} | {b / mt:.0f} | {b / mo:.0f} | {mt / mo:.2f}x "
            f"| {diff:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
