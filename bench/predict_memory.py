"""Peak memory of ``mmfuse predict`` for N and 4N rows, streamed in chunks and in one chunk: streaming keeps it flat.

    python bench/predict_memory.py                       # N=1500, chunks of 256 vs one chunk; tiny random towers
    python bench/predict_memory.py --rows 4000 --tune image

The run is made by the real code (``mmfuse train`` on the tiny random ViT + RoBERTa every --small benchmark builds),
and each prediction is the real CLI in a subprocess, with a cold feature cache of its own: its peak resident set is
``getrusage(RUSAGE_CHILDREN).ru_maxrss`` read by a wrapper process that ran only that prediction.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import build_reference, write_jpegs  # noqa: E402

# Runs one command and prints its peak RSS in kB (Linux reports ru_maxrss in kB).
WRAPPER = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if rc == 0 else -rc)"
)


def peak_rss_mb(cmd: list[str], env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], env=env, capture_output=True, text=True, check=True)
    kb = int(out.stdout.split()[-1])
    if kb < 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return kb / 1024


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["image", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1500, help="N: predictions are measured for N and 4N rows")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per chunk of the streamed predictions")
    parser.add_argument("--image-px", type=int, default=64, help="side of the generated JPEGs")
    parser.add_argument("--tune", default="head", help="what the run fine-tuned (image: pixels decoded per chunk)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        rows = write_jpegs(data, 4 * args.rows, (args.image_px, args.image_px), workers=2)
        vision, text = build_reference(root / "towers", small=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MMFUSE_HOME": str(root / "home-train")}
        train = [sys.executable, "-m", "mmfuse", "train", str(write_manifest(data / "train.csv", rows[:64]))]
        train += ["--out", str(root / "run"), "--vision", str(vision), "--text", str(text), "--tune", args.tune]
        subprocess.run([*train, "--epochs", "1", "--batch-size", "16"], env=env, check=True, capture_output=True)
        print(f"peak RSS of mmfuse predict (MB), tiny random towers, --tune {args.tune}, {args.image_px}-px JPEGs")
        print(f"{'rows':>8} {'chunk ' + str(args.chunk_size):>12} {'one chunk':>12}")
        for n in (args.rows, 4 * args.rows):
            manifest = write_manifest(data / f"rows{n}.csv", rows[:n])
            peaks = []
            for chunk in (args.chunk_size, 10**9):
                env["MMFUSE_HOME"] = str(root / f"home-{n}-{chunk}")  # a cold feature cache for each
                out = root / f"preds-{n}-{chunk}.csv"
                cmd = [sys.executable, "-m", "mmfuse", "predict", str(root / "run"), str(manifest), "--out", str(out)]
                peaks.append(peak_rss_mb([*cmd, "--chunk-size", str(chunk)], env))
            print(f"{n:>8} {peaks[0]:>12.0f} {peaks[1]:>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
