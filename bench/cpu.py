"""Frozen towers on the CPU: images/s and texts/s of each packaged tower's embedding pass, torch against onnxruntime
(and onnxruntime in int8, ``--quantize int8``, for the text towers).

    python bench/cpu.py                                           # every packaged tower, 3 rounds
    python bench/cpu.py --towers efficientnet-lite0 minilm --rounds 5 --images 256 --texts 1024

Runs the real embedding pass (``features.sources.embed``, no feature cache: decoding or tokenizing, batching and the
tower) in a temporary ``$MMFUSE_HOME`` on synthetic JPEGs (320x240) and texts of 3 to 60 words, once with the tower in
torch (``--backend torch``), once in onnxruntime (``--backend onnx``, ``models.towers.onnx_engine``) and, for a text
tower, once in int8 (``--quantize int8``) per round, the order rotated each round so that a load changing over the run
falls on each. Each tower's export is made and
checked, and both backends run once, before the timed rounds. Prints the load average, the threads each backend uses,
the machine's fp32 matmul GFLOP/s (torch, 2048x2048, the best of a measurement at the start and one after each
tower) as the ceiling, and per tower: the median items/s of each
backend, their ratio, and the GFLOP/s each achieves (the pass's forward FLOPs, counted once by torch's
``FlopCounterMode``, over its time).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

IMAGE_TOWERS = ("efficientnet-lite0", "efficientnet-lite2")
WORDS = (
    "a the small old shiny quiet near big bright wooden red blue green cat dog train apple face park ball grass "
    "table window river mountain city street happy sad running jumping sleeping under over with without beside"
).split()


def write_data(root: Path, images: int, texts: int, seed: int = 0) -> Path:
    """A manifest of ``max(images, texts)`` rows: JPEGs of smooth colour with noise, and texts of 3-60 words."""
    import numpy as np
    from PIL import Image

    rng, pick = np.random.default_rng(seed), random.Random(seed)
    (root / "images").mkdir(parents=True)
    rows = []
    ys, xs = np.mgrid[0:240, 0:320]
    for i in range(max(images, texts)):
        name = f"images/{i}.jpg"
        if i < images:
            base = np.stack([(xs * (i % 7 + 1)) % 256, (ys * (i % 5 + 1)) % 256, (xs + ys + 40 * i) % 256], -1)
            noise = rng.integers(-20, 21, base.shape)
            Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(root / name, quality=90)
        text = " ".join(pick.choice(WORDS) for _ in range(pick.randint(3, 60)))
        rows.append({"image": name, "text": text, "label": "ab"[i % 2]})
    with open(root / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    return root / "data.csv"


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """The best of ``reps`` fp32 n x n matmuls in torch, in GFLOP/s: what the CPU's cores can give."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_tower(name: str, records: list, rounds: int, batch_size: int) -> tuple[dict, dict, float]:
    """Seconds per pass of each backend over ``records``, and the pass's forward FLOPs per item."""
    from torch.utils.flop_counter import FlopCounterMode

    from mmfuse.config import ModelConfig
    from mmfuse.features.sources import embed
    from mmfuse.models.classifier import build_model
    from mmfuse.models.towers.onnx_engine import OnnxTower, engine, int8_refusal

    modality = "image" if name in IMAGE_TOWERS else "text"
    kw = {"vision": name} if modality == "image" else {"text": name}
    settings = {"torch": {"backend": "torch"}, "onnx": {"backend": "onnx"}}
    if modality == "text" and not int8_refusal(name):  # mpnet's int8 is refused: its features disagree
        settings["int8"] = {"backend": "onnx", "quantize": "int8"}
    models = {b: build_model(ModelConfig(**kw, modalities=[modality], **c), 2).eval() for b, c in settings.items()}

    def run(backend: str) -> float:
        return _timed(lambda: embed(models[backend], modality, records, None, batch_size, show=False))

    for backend in models:  # the export (made and checked once), and both warmed up: not timed
        run(backend)
    assert isinstance(engine(models["onnx"].build_tower(modality), "onnx"), OnnxTower), f"{name} is not in onnxruntime"
    with FlopCounterMode(display=False) as flops:
        embed(models["torch"], modality, records, None, batch_size, show=False)
    order = list(models)
    times = {b: [] for b in order}
    for r in range(rounds):
        for backend in order[r % len(order) :] + order[: r % len(order)]:
            times[backend].append(run(backend))
    return times, {"modality": modality, "items": len(records)}, flops.get_total_flops() / len(records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", nargs="+", default=["efficientnet-lite0", "efficientnet-lite2", "minilm", "mpnet"])
    p.add_argument("--images", type=int, default=128, help="images a pass embeds")
    p.add_argument("--texts", type=int, default=512, help="texts a pass embeds")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per backend")
    p.add_argument("--batch-size", type=int, default=64, help="as train's embedding pass")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MMFUSE_HOME"] = str(Path(tmp) / "home")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        from mmfuse.data.read import read_data
        from mmfuse.models.towers.onnx_engine import available_cores

        records = read_data(write_data(Path(tmp) / "data", args.images, args.texts))[0]
        load, cores = os.getloadavg(), available_cores()
        ceilings = [matmul_gflops()]  # measured again after each tower: the best is the ceiling (load only lowers it)
        print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; {os.cpu_count()} CPUs, {cores} available")
        print(f"threads: torch {torch.get_num_threads()}, onnxruntime {cores} (intra-op)")
        print(f"fp32 matmul (torch, 2048x2048): {ceilings[0]:.1f} GFLOP/s\n")
        rows = []
        for name in args.towers:
            n = args.images if name in IMAGE_TOWERS else args.texts
            times, what, per_item = bench_tower(name, records[:n], args.rounds, args.batch_size)
            speed = {b: n / statistics.median(t) for b, t in times.items()}
            rows.append((name, what, speed, per_item))
            ratio = speed["onnx"] / speed["torch"]
            print(
                f"{name}: torch {speed['torch']:.1f}, onnxruntime {speed['onnx']:.1f} {what['modality']}s/s "
                f"(x{ratio:.2f})"
            )
            if "int8" in speed:
                print(f"  int8 (onnxruntime): {speed['int8']:.1f} texts/s (x{speed['int8'] / speed['torch']:.2f})")
            print("  rounds: " + "; ".join(f"{b} {_fmt(t)}" for b, t in times.items()))
            ceilings.append(matmul_gflops())
        load = os.getloadavg()
        ceiling = max(ceilings)
        print(f"\nload average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        print(
            f"fp32 matmul GFLOP/s, at the start and after each tower: {_fmt(ceilings, '')}; "
            f"the best, {ceiling:.1f}, is the ceiling\n"
        )
        print(
            "| tower | items | torch /s | onnxruntime /s | onnxruntime / torch | GFLOP per item | torch GFLOP/s "
            "| onnxruntime GFLOP/s (% of matmul) | int8 /s | int8 / torch |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, what, speed, per_item in rows:
            g = {b: per_item * s / 1e9 for b, s in speed.items()}
            print(
                f"| {name} | {what['items']} {what['modality']}s | {speed['torch']:.1f} | {speed['onnx']:.1f} | "
                f"{speed['onnx'] / speed['torch']:.2f}x | {per_item / 1e9:.2f} | {g['torch']:.1f} | "
                f"{g['onnx']:.1f} ({100 * g['onnx'] / ceiling:.0f}%) | "
                + (f"{speed['int8']:.1f} | {speed['int8'] / speed['torch']:.2f}x |" if "int8" in speed else "- | - |")
            )
    return 0


def _fmt(values: list[float], unit: str = "s") -> str:
    return " ".join(f"{v:.2f}{unit}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
