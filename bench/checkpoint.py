"""What checkpointing costs a --tune all run of the reference architecture: one epoch's time beside one checkpoint's.

    python bench/checkpoint.py            # GPU: ViT-B/16 + RoBERTa-base cut to 8 layers, random weights
    python bench/checkpoint.py --small    # CPU: tiny towers, seconds; what tests/ could run

Trains the real loop (``mmfuse.training.loop.setup`` and ``train_epoch``) on generated JPEGs, then writes the epoch-end
checkpoint ``fit`` writes (``mmfuse.training.checkpoint.save_checkpoint``) a few times, and prints both with the
checkpoint's
size and its cost as a share of the epoch.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import build_reference, model_config, write_jpegs  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny towers on CPU")
    p.add_argument("--rows", type=int, help="training rows (default 64 small, 2,048 full)")
    p.add_argument("--batch-size", type=int, help="default 16 small, 128 full")
    p.add_argument("--repeats", type=int, default=3, help="checkpoints timed")
    args = p.parse_args(argv)

    import torch

    from mmfuse.config import DataConfig, RunConfig, TrainConfig
    from mmfuse.training.checkpoint import save_checkpoint
    from mmfuse.training.loop import setup, train_epoch

    rows = args.rows or (64 if args.small else 2048)
    batch = args.batch_size or (16 if args.small else 128)
    with tempfile.TemporaryDirectory(prefix="mmfuse-ckpt-") as tmp:
        root = Path(tmp)
        os.environ["MMFUSE_HOME"] = str(root / "home")
        vision, text = build_reference(root / "towers", args.small)
        data = write_jpegs(root / "data", rows, (96, 72) if args.small else (640, 480))
        with open(root / "data" / "train.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["image", "text", "label"])
            w.writeheader()
            w.writerows(data)
        cfg = RunConfig(
            DataConfig(train=str(root / "data" / "train.csv"), val_split=0.1),
            model_config(vision, text, args.small),
            TrainConfig(tune="all", epochs=2, batch_size=batch),
        )
        tr = setup(cfg, root / "run")
        train_epoch(tr, 1)  # warm-up: first-call costs (allocator, kernels) belong to no epoch
        sync = torch.cuda.synchronize if tr.acc.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        train_epoch(tr, 2)
        sync()
        epoch_s = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            path = save_checkpoint(tr, 3, 0, tr.generator.get_state(), (0.0, 0))
            times.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.iterdir())
        ckpt_s = statistics.median(times)
        device = torch.cuda.get_device_name() if tr.acc.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        what = "tiny ViT + RoBERTa (--small)" if args.small else "ViT-B/16 + RoBERTa-base 8 layers"
        print(f"checkpoint cost, --tune all, {what}, {device}, torch {torch.__version__}")
        print("| rows | batch | epoch s | checkpoint s (median) | checkpoint MB | share of an epoch |")
        print("|---|---|---|---|---|---|")
        print(f"| {tr.n_train} | {batch} | {epoch_s:.2f} | {ckpt_s:.3f} | {size / 1e6:.1f} | {ckpt_s / epoch_s:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
